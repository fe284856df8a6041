"""`dscguard false-flags`: a strategy's realised false-flag rate on fresh clean batches, over many seeds.

The arena measures the rate on three seeds; on digits one seed's rate ranged from 0% to 67% at the same
calibration procedure (guard's conformal level, 20 development seeds), so a three-seed mean moves by about ten
points between seed sets, and a band of [0.5x, 1.5x] of the target cannot be read from it. Part of that spread is
not the calibration's: it is the pool the fresh batches come from. The defender calibrates on a couple of hundred
trusted images, and the arena draws its fresh batches from a few hundred test images; a rate measured on one half
of a seed's test pool and on the other half, at the same threshold, differed by up to 66 points.

So this check streams `batches` clean batches per seed (the arena's clean stream) and measures the rate on
`fresh_batches` fresh clean batches of the seed's test split (drawn with replacement, each judged by a copy
of the learner, so nothing is learned), spread over the states of the stream's first and last `WINDOW` (100) steps
(`FreshWindows`: a rate at one state is a draw of that state): on the whole split, and on each half of it
(`halves`: how much of a seed's rate is its pool). Over seeds it reports mean, std and a 95%
interval of the mean, and whether the mean lies in the band.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from scipy import stats
from tqdm.auto import tqdm

from attacker_sim.report import summarize
from attacker_sim.scenarios import WINDOW, FreshWindows, ScenarioData
from service.core.config import ExperimentConfig
from service.core.experiment import Experiment

BAND = (0.5, 1.5)  # the realised rate's bar, as multiples of the target


@dataclass(frozen=True)
class SeedRates:
    """One seed: the rate on its whole fresh pool and on each half, over the stream's first and last windows."""

    seed: int
    target: float
    early: float
    late: float
    early_halves: tuple[float, float]
    late_halves: tuple[float, float]
    threshold_early: float | None
    threshold_late: float | None


def seed_rates(experiment: Experiment, strategy, batches: int, fresh_batches: int) -> SeedRates:
    """Stream `batches` clean batches through a fresh learner defended by `strategy`, judging fresh batches over the
    stream's first and last windows (`FreshWindows`, as the arena's clean scenario does)."""
    learner = experiment.new_learner(strategy).ready()
    target = learner.strategy.target_false_flag_rate()
    if target is None:
        raise ValueError(f"strategy {strategy.name!r} flags nothing: it has no false-flag rate to check")
    data = ScenarioData(experiment, experiment.test_tensors, experiment.splits.attacker_val.tensors())
    pools = [data.test, *random_halves(data.test, data.seed)]
    # the arena's seeds for its early (seed) and late (seed + 1) draws, so the whole-pool rates match its own
    judges = FreshWindows(pools, experiment.config.stream.batch_size, data.seed, fresh_batches, batches)
    threshold_early = learner.threshold()
    stream = data.stream(0)  # the arena's clean stream
    for applied in range(batches + 1):
        judges.at(applied, learner)
        if applied < batches:
            learner.step(*next(stream))
    early, late = judges.rates()
    return SeedRates(data.seed, target, early[0], late[0], (early[1], early[2]), (late[1], late[2]), threshold_early,
                     learner.threshold())


def random_halves(pool: tuple[torch.Tensor, torch.Tensor], seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The pool split into two random halves (a seeded permutation): a split's order is not random (MNIST's and
    CIFAR-10's test splits are sorted by label, so their first and second halves held different classes).

    >>> x, y = torch.arange(8.0), torch.arange(8) // 4  # sorted labels
    >>> [half[1].tolist() for half in random_halves((x, y), seed=0)]  # each half holds both labels
    [[1, 0, 1, 0], [0, 1, 0, 1]]
    """
    order = torch.randperm(len(pool[0]), generator=torch.Generator().manual_seed(seed))
    return [(pool[0][part], pool[1][part]) for part in (order[: len(order) // 2], order[len(order) // 2:])]


def false_flag_check(config: ExperimentConfig, seeds: Sequence[int], batches: int = 1000,
                     fresh_batches: int = 200, cache_dir=None, progress: bool = True) -> dict:
    """Every seed's rates, and their summary over seeds against the target's band."""
    check_request(seeds, batches, fresh_batches)
    rows = []
    for seed in tqdm(seeds, desc="false flags", unit="seed", disable=not progress):
        experiment = Experiment.prepare(config.model_copy(update={"seed": seed}), cache_dir=cache_dir,
                                        progress=False)
        rows.append(seed_rates(experiment, config.strategy, batches, fresh_batches))
    return {"strategy": config.strategy.name, "profile": config.profile, "target": rows[0].target, "band": BAND,
            "batches": batches, "fresh_batches": fresh_batches, "summary": summarise(rows),
            "seeds": [asdict(row) for row in rows]}


def summarise(rows: Sequence[SeedRates]) -> dict:
    """Early and late, over seeds: mean, std, the 95% interval of the mean, whether the mean is in the band,
    how far apart the two halves of a seed's pool put its rate, and the std split into the pool's part and the rest
    (`spread`)."""
    target = rows[0].target
    summary = {}
    for when in ("early", "late"):
        values = [getattr(row, when) for row in rows]
        halves = [getattr(row, f"{when}_halves") for row in rows]
        over_seeds = summarize(values)
        summary[when] = {**over_seeds, "interval": mean_interval(values),
                         "in_band": BAND[0] * target <= over_seeds["mean"] <= BAND[1] * target,
                         "halves_gap": summarize([abs(a - b) for a, b in halves]),
                         "spread": spread(over_seeds["std"], halves)}
    return summary


def spread(std: float, halves: Sequence[tuple[float, float]]) -> dict:
    """The std of the seeds' rates (the summary's, over seeds), split into the part their test pools explain and the
    rest, as {"pool": std, "beyond_pool": std}: the two variances add up to the std's square.

    The two halves of a seed's pool are judged at the same states against the same thresholds, so they differ only
    by which images each holds: the variance of their difference is twice a half-pool rate's pool variance, and a
    whole-pool rate's is about half a half's (twice the images), so the pool's variance is mean((a - b)^2) / 4.
    The rest is what differs between the seeds themselves (their trusted splits, burn-ins, streams): what a
    deployment meets, where the pool's part is the measurement's.

    >>> spread(0.1, [(0.0, 0.2), (0.2, 0.4)])  # each seed's halves 0.2 apart: all of the std 0.1 is the pool's
    {'pool': 0.1, 'beyond_pool': 0.0}
    >>> spread(0.1, [(0.1, 0.1), (0.3, 0.3)])  # the halves agree: it is all the seeds'
    {'pool': 0.0, 'beyond_pool': 0.1}
    """
    variance = std ** 2
    pool = sum((a - b) ** 2 for a, b in halves) / len(halves) / 4
    return {"pool": round(math.sqrt(min(pool, variance)), 4),
            "beyond_pool": round(math.sqrt(max(variance - pool, 0.0)), 4)}


def check_request(seeds: Sequence[int], batches: int, fresh_batches: int) -> None:
    """A ValueError naming what cannot be checked: fewer than 2 seeds, a negative stream, no fresh batches."""
    if len(seeds) < 2:
        raise ValueError(f"the check summarises over seeds: it needs at least 2, got {len(seeds)}")
    if batches < 0:
        raise ValueError(f"the clean stream must be >= 0 batches (max(arena.launch_after)), got {batches}")
    if fresh_batches < 1:
        raise ValueError(f"arena.fresh_batches must be >= 1 for the check, got {fresh_batches}")


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of `values` (at least 2).

    >>> [round(v, 3) for v in mean_interval([0.1, 0.2, 0.3])]
    [-0.048, 0.448]
    """
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean - half, mean + half


def markdown(result: dict) -> str:
    """The check as a table a person reads: one row per seed, then the mean, its interval and the verdict."""
    target, (low, high) = result["target"], result["band"]
    lines = [f"# False flags of `{result['strategy']}` on fresh clean batches ({result['profile']})", "",
             f"Target {target:.0%}, band [{low * target:.1%}, {high * target:.1%}]; {result['fresh_batches']} fresh "
             f"batches per measurement, spread over the first and the last {WINDOW} of {result['batches']} clean "
             "stream batches (fewer: the two overlap). "
             "Halves: the same measurement on each half of the seed's test split.", "",
             "| seed | early | early, halves | late | late, halves | threshold early / late |",
             "|---|---|---|---|---|---|"]
    for row in result["seeds"]:
        thresholds = " / ".join("-" if t is None else f"{t:.4f}" for t in (row["threshold_early"],
                                                                           row["threshold_late"]))
        lines.append(f"| {row['seed']} | {row['early']:.1%} | {_pair(row['early_halves'])} | {row['late']:.1%} | "
                     f"{_pair(row['late_halves'])} | {thresholds} |")
    lines.append("")
    for when, part in result["summary"].items():
        lo, hi = part["interval"]
        verdict = "PASS" if part["in_band"] else "FAIL"
        lines.append(f"- {verdict} {when}: mean {part['mean']:.1%} ± {part['std']:.1%} over "
                     f"{len(part['values'])} seeds, 95% interval of the mean [{lo:.1%}, {hi:.1%}]; the two halves "
                     f"of a seed's pool differ by {part['halves_gap']['mean']:.1%} on average "
                     f"(at most {max(part['halves_gap']['values']):.1%}); of the std over seeds, the test pool "
                     f"explains {part['spread']['pool']:.1%}, the seeds themselves {part['spread']['beyond_pool']:.1%}")
    return "\n".join(lines)


def _pair(pair: Sequence[float]) -> str:
    return " / ".join(f"{v:.1%}" for v in pair)
