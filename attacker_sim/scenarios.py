"""The arena's scenarios, each a function of (a fresh learner, the experiment's data) -> one `Outcome`.

A scenario says what the defense faces; the arena and the baseline tuning run the same scenarios (the
tuning on the defender's trusted split and tuning seeds, the arena on the test split and reporting seeds):

- `clean`: the clean oracle, in-distribution batches only; also the realised clean false-flag rate, on the
  stream's batches and on fresh batches the model never learned (`FreshWindows`), early and late.
- `attack`: the accumulative attack (Pang et al.) after `launch_after` clean batches.
- `slow_poison`: one poisoned batch every `every` batches for a long stretch, then the trigger.
- `drift`: honest data that drifts (`attacker_sim.drift`), accuracy on the drifted test set; from the start, and
  (the arena's `drift:<kind>@<batches>`) after a long clean stretch.
- `drift_attack`: drift first, then the attack on the drifted stream.
- `label_flip`: an attacker who controls labels, not images: every stream sample of one class is labelled as
  another (`label-flip:<source>><target>`), or as any other, drawn for each sample (`label-flip:<source>>*`);
  accuracy on the unchanged test split; or told on a drift's honest batches (`label-flip:...@drift:<kind>`),
  accuracy on the drifted test view.
- `backdoor`: an attacker who stamps a small square on part of the stream's samples of every other class and labels
  them its target class (`backdoor:*><target>x<fraction>`, `attacker_sim.attacks.backdoor`): clean accuracy on the
  test split, and the attack's success, the share of the test split's other classes that the square sends to the
  target.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from attacker_sim.attacks.backdoor import stamp
from attacker_sim.campaign import AccumulativeCampaign, RunResult, accuracy
from attacker_sim.drift import build_drift
from attacker_sim.targets import InProcessTarget
from service.core.experiment import Experiment
from service.core.learner import OnlineLearner
from service.core.randomness import BACKDOOR, FRESH_JUDGE, LABEL_FLIP, key_seed

Tensors = tuple[torch.Tensor, torch.Tensor]
WINDOW = 100  # stream batches in the early and the late stretch of a long clean stream


@dataclass
class Outcome:
    """One scenario of one strategy with one seed; accuracies are fractions on the scenario's test view."""

    scenario: str
    strategy: str
    seed: int
    start_acc: float
    final_acc: float
    poison_acc: float | None = None
    batches: int | None = None  # accumulative batches before the trigger
    poisons_flagged: float | None = None  # share of poisoned samples the defense flagged
    attack_success: float | None = None  # backdoor: share of stamped test inputs of other classes sent to the target
    clean_flag_rate: float | None = None  # share of clean samples flagged (the realised false-flag rate)
    clean_flag_rate_early: float | None = None
    clean_flag_rate_late: float | None = None
    fresh_flag_rate_early: float | None = None  # share of fresh clean batches flagged, over the stream's first window
    fresh_flag_rate_late: float | None = None  # ... and over its last (`FreshWindows`)
    target_flag_rate: float | None = None
    promotions_refused: int | None = None  # DSC's rolling auxiliary: health-gate refusals during the scenario
    seconds_per_step: float = 0.0

    @classmethod
    def from_run(cls, scenario: str, run: RunResult, target_flag_rate: float | None) -> Outcome:
        return cls(scenario, run.strategy, run.seed, start_acc=run.start_acc, final_acc=run.final_acc,
                   poison_acc=run.poison_acc, batches=run.batches, poisons_flagged=run.flagged_rate,
                   clean_flag_rate=run.clean_flagged_rate, target_flag_rate=target_flag_rate,
                   seconds_per_step=run.seconds_per_step)


@dataclass
class ScenarioData:
    """What the scenarios of one seed draw on: the experiment, where accuracy is measured, and the streams."""

    experiment: Experiment
    test: Tensors  # the reporting test split in the arena; the trusted calibration split when tuning
    validation: Tensors  # the attacker's own validation split (its monitor)

    def stream(self, offset: int) -> Iterator[Tensors]:
        """Clean stream batches, identical for every strategy of this seed (`offset` picks the stream)."""
        return self.experiment.stream_batches(100_000, seed=self.seed * 7919 + 1 + offset)

    def drifted(self, kind: str, offset: int, count: int) -> tuple[Iterator[Tensors], Tensors]:
        """`count` honest batches drifted by `kind` (`offset` picks the stream), of the clients' batch size, and the
        drifted test view."""
        drifter = build_drift(kind)
        batches = drifter.batches(*self.experiment.splits.stream.tensors(), self.experiment.client_batch_size, count,
                                  seed=self.seed * 7919 + offset)
        return batches, drifter.test_view(*self.test, seed=self.seed)

    @property
    def seed(self) -> int:
        return self.experiment.config.seed


class FreshTally:
    """Fresh clean batches drawn with replacement from `pool` (data the model never learned and the calibration never
    saw), each judged by a copy of a learner as it stands, so nothing is learned: the share of their samples flagged.

    On a small stream split shown many times the model memorises the stream's batches, and the rate on them says
    little about the calibration: the calibration's target is about batches like these.
    """

    def __init__(self, pool: Tensors, batch_size: int, seed: int):
        self.pool, self.batch_size = pool, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.judged = self.flagged = self.samples = 0

    def judge(self, learner: OnlineLearner, batches: int) -> None:
        """Judge `batches` more fresh batches against the learner as it stands."""
        if batches < 1:
            return
        learner.ready()  # a calibration due at the next update is taken once here, not once by every copy
        for _ in range(batches):
            pick = torch.randint(len(self.pool[0]), (self.batch_size,), generator=self.generator)
            judge = copy.deepcopy(learner)
            # dropout masks of its own, as each stream batch has
            judge.seed = key_seed(learner.seed, FRESH_JUDGE, self.judged)
            report = judge.step(self.pool[0][pick], self.pool[1][pick])
            self.judged += 1
            self.flagged, self.samples = self.flagged + int(report.flagged.sum()), self.samples + len(pick)

    @property
    def rate(self) -> float | None:
        return self.flagged / self.samples if self.samples else None


class FreshWindows:
    """The realised false-flag rate on fresh clean batches early and late in a stream of `length` batches: `batches`
    fresh batches per pool spread evenly over the model states of the stream's first `window` steps (from the state
    before its first update) and as many over its last `window` (to the state after its last update).

    Over a stretch, not at one state: a model learning with momentum moves its clean updates' statistic faster than
    a gate recalibrates (MNIST, seed 2, the same 100 clean batches: 3% to 27% of fresh batches flagged at states 10
    steps apart, and 61.5% at the last state on another machine's floats), so a rate judged at one state is a draw
    of that state's phase, while the calibration's target is about the batches a stream meets over time. When the
    stream is shorter than two windows, the two overlap.

    >>> FreshWindows.spread(5, 3)
    [2, 2, 1]
    """

    def __init__(self, pools: list[Tensors], batch_size: int, seed: int, batches: int, length: int,
                 window: int = WINDOW):
        self.length, self.window = length, max(1, min(window, length))
        self.plan = self.spread(batches, self.window)
        self.early = [FreshTally(pool, batch_size, seed) for pool in pools]
        self.late = [FreshTally(pool, batch_size, seed + 1) for pool in pools]

    @staticmethod
    def spread(batches: int, steps: int) -> list[int]:
        """`batches` judged over `steps` states, as evenly as whole batches allow (the first states one more)."""
        return [batches // steps + int(step < batches % steps) for step in range(steps)]

    def at(self, applied: int, learner: OnlineLearner) -> None:
        """Judge what falls to the state after `applied` stream updates (0 to `length`)."""
        if applied < self.window:
            for tally in self.early:
                tally.judge(learner, self.plan[applied])
        late = applied - (self.length - self.window) - 1
        if late >= 0:
            for tally in self.late:
                tally.judge(learner, self.plan[late])

    def rates(self) -> tuple[list[float | None], list[float | None]]:
        """(early, late): one rate per pool."""
        return [tally.rate for tally in self.early], [tally.rate for tally in self.late]


def clean_prefix(learner: OnlineLearner, data: ScenarioData, label: str, length: int, clean_batches: int,
                 snapshot_at: set[int], on_step: Callable[[], None] | None = None,
                 window: int = WINDOW, fresh_batches: int = 0) -> tuple[Outcome, dict[int, OnlineLearner]]:
    """Stream `length` clean batches; the clean oracle is the accuracy after `clean_batches` of them.

    Returns the clean-oracle outcome (with the realised clean false-flag rate over the whole stretch, its
    first and its last `window` batches, and on `fresh_batches` fresh batches from the test view judged over the
    states of each of those windows: `FreshWindows`) and copies of the learner taken after each of `snapshot_at`
    batches.
    """
    batch_size = data.experiment.config.stream.batch_size
    judges = None
    if learner.strategy.target_false_flag_rate() is not None and fresh_batches:
        judges = FreshWindows([data.test], batch_size, data.seed, fresh_batches, length, window)
    target = InProcessTarget(learner)
    start = accuracy(target, *data.test)
    final = start
    snapshots: dict[int, OnlineLearner] = {}
    flagged, samples, seconds = [], [], []
    batches = data.stream(0)
    for m in range(length + 1):
        if judges:
            judges.at(m, learner)
        if m in snapshot_at:
            snapshots[m] = copy.deepcopy(learner)
        if m == clean_batches:
            final = accuracy(target, *data.test)
        if m == length:
            break
        outcome = target.step(*next(batches))
        flagged.append(outcome.flagged)
        samples.append(outcome.samples)
        seconds.append(outcome.seconds)
        if on_step:
            on_step()

    def rate(part: slice) -> float | None:
        total = sum(samples[part])
        return sum(flagged[part]) / total if total else None

    (fresh_early,), (fresh_late,) = judges.rates() if judges else ([None], [None])
    result = Outcome("clean", label, data.seed, start_acc=start, final_acc=final, clean_flag_rate=rate(slice(None)),
                     clean_flag_rate_early=rate(slice(0, window)), clean_flag_rate_late=rate(slice(-window, None)),
                     fresh_flag_rate_early=fresh_early, fresh_flag_rate_late=fresh_late,
                     target_flag_rate=learner.strategy.target_false_flag_rate(),
                     promotions_refused=_refusals(learner), seconds_per_step=float(np.mean(seconds or [0.0])))
    return result, snapshots


def attack(learner: OnlineLearner, data: ScenarioData, label: str, campaign: AccumulativeCampaign,
           scenario: str, stream_offset: int, on_step: Callable[[], None] | None = None,
           clean_between: int = 0, max_poisons: int | None = None) -> Outcome:
    """The accumulative attack against `learner` as it stands (after whatever it has learned so far)."""
    refused = _refusals(learner)
    run = campaign.run(InProcessTarget(learner), data.stream(stream_offset), data.test, data.validation, label,
                       data.seed, on_step=on_step, clean_between=clean_between, max_poisons=max_poisons,
                       trace=False)
    outcome = Outcome.from_run(scenario, run, learner.strategy.target_false_flag_rate())
    if refused is not None:
        outcome.promotions_refused = _refusals(learner) - refused
    return outcome


def _refusals(learner: OnlineLearner) -> int | None:
    """Promotions the strategy's health gate refused so far (None: it has no such gate)."""
    promotions = learner.strategy.health(learner.batches_applied).get("promotions")
    return sum(n for reason, n in promotions.items() if reason != "healthy") if promotions is not None else None


def drift(learner: OnlineLearner, data: ScenarioData, label: str, kind: str, batches: int,
          on_step: Callable[[], None] | None = None, after: int = 0) -> Outcome:
    """Honest drifted batches; the gain is accuracy on the drifted test view after minus before. `after`: the clean
    batches the learner has already learned (named in the scenario, `drift:<kind>@<after>`, when > 0): a defense
    calibrated on the model as it goes must still let drift in late in a stream."""
    stream, test = data.drifted(kind, offset=3, count=batches)
    target = InProcessTarget(learner)
    start = accuracy(target, *test)
    flagged = samples = 0
    seconds = []
    for x, y in stream:
        outcome = target.step(x, y)
        flagged, samples = flagged + outcome.flagged, samples + outcome.samples
        seconds.append(outcome.seconds)
        if on_step:
            on_step()
    name = f"drift:{kind}" + (f"@{after}" if after else "")
    return Outcome(name, label, data.seed, start_acc=start, final_acc=accuracy(target, *test),
                   clean_flag_rate=flagged / samples, target_flag_rate=learner.strategy.target_false_flag_rate(),
                   seconds_per_step=float(np.mean(seconds)))


def drift_attack(learner: OnlineLearner, data: ScenarioData, label: str, kind: str, batches: int,
                 campaign: AccumulativeCampaign, on_step: Callable[[], None] | None = None) -> Outcome:
    """Drift for `batches` honest batches, then the accumulative attack on the drifted stream."""
    drift(learner, data, label, kind, batches, on_step)
    stream, test = data.drifted(kind, offset=4, count=100_000)
    validation = build_drift(kind).test_view(*data.validation, seed=data.seed + 1)
    run = campaign.run(InProcessTarget(learner), stream, test, validation, label, data.seed, on_step=on_step,
                       trace=False)
    return Outcome.from_run(f"drift+attack:{kind}", run, learner.strategy.target_false_flag_rate())


Poisoned = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # a batch as learned (x, y), and which samples lie
Poison = Callable[[torch.Tensor, torch.Tensor], Poisoned]


def _poisoned_steps(learner: OnlineLearner, stream: Iterator[Tensors], batches: int, poison: Poison,
                    on_step: Callable[[], None] | None) -> tuple[float | None, float]:
    """Learn `batches` stream batches, each as `poison(x, y)` returns it ((x, y, which samples it poisoned)); returns
    (the share of poisoned samples the defense flagged, None where none was poisoned; the mean seconds per step)."""
    flagged = poisoned_count = 0
    seconds = []
    for _ in range(batches):
        x, y, poisoned = poison(*next(stream))
        report = learner.step(x, y)
        flagged += int(np.asarray(report.flagged)[poisoned.numpy()].sum())
        poisoned_count += int(poisoned.sum())
        seconds.append(report.seconds["total"])
        if on_step:
            on_step()
    return (flagged / poisoned_count if poisoned_count else None), float(np.mean(seconds))


def label_flip(learner: OnlineLearner, data: ScenarioData, label: str, source: int, target: int | None, batches: int,
               on_step: Callable[[], None] | None = None, fraction: float = 1.0, drift: str | None = None) -> Outcome:
    """`batches` stream batches whose samples of class `source` are labelled `target` (each with probability
    `fraction`, drawn with the seed: an attacker who lies about part of a class to stay under a label check's share;
    `target` None: each lie labelled a class drawn from all the others, so that no other class carries most of
    them): the plainest targeted poisoning, with images as clean as the stream's (nothing for an input-side
    discrepancy to see). Accuracy on the unchanged test split; `poisons_flagged` is the share of relabelled samples
    the defense flagged. `drift`: the lie told on the drift scenario's honest drifted batches instead (the same
    batches as `drift:<kind>`, accuracy on its drifted test view; `label-flip:...@drift:<kind>`), where a label check
    that relabels what looks like the lied-about class also meets honest samples of other classes that drift has made
    look like it."""
    stream, test = data.drifted(drift, offset=3, count=batches) if drift else (data.stream(6), data.test)
    judge = InProcessTarget(learner)
    start = accuracy(judge, *test)
    draws = torch.Generator().manual_seed(key_seed(data.seed, LABEL_FLIP, 0))
    classes = data.experiment.splits.stream.num_classes

    def lie(x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        poisoned = (y == source) & (torch.rand(len(y), generator=draws) < fraction)
        if target is None:  # one of the classes other than the source, uniformly
            other = torch.randint(classes - 1, y.shape, generator=draws)
            lies = other + (other >= source).long()
        else:
            lies = torch.full_like(y, target)
        return x, torch.where(poisoned, lies, y), poisoned

    flagged, seconds = _poisoned_steps(learner, stream, batches, lie, on_step)
    name = f"label-flip:{source}>{'*' if target is None else target}" + (f"x{fraction:g}" if fraction < 1 else "")
    return Outcome(f"{name}@drift:{drift}" if drift else name, label, data.seed, start_acc=start,
                   final_acc=accuracy(judge, *test), poisons_flagged=flagged,
                   target_flag_rate=learner.strategy.target_false_flag_rate(), seconds_per_step=seconds)


def backdoor(learner: OnlineLearner, data: ScenarioData, label: str, target: int, fraction: float, batches: int,
             on_step: Callable[[], None] | None = None) -> Outcome:
    """`batches` stream batches in which each sample of a class other than `target` is, with probability
    `fraction` (drawn with the seed), stamped with the backdoor's square and labelled `target`. `final_acc`: clean
    accuracy on the test split after them; `attack_success`: the share of the test split's samples of other classes
    that, stamped, the model then classifies as `target`; `poisons_flagged`: the share of stamped samples flagged."""
    stream, test = data.stream(7), data.test
    judge = InProcessTarget(learner)
    others = test[1] != target
    triggered = (stamp(test[0][others]), torch.full((int(others.sum()),), target, dtype=test[1].dtype))
    start = accuracy(judge, *test)
    draws = torch.Generator().manual_seed(key_seed(data.seed, BACKDOOR, 0))

    def plant(x: torch.Tensor, y: torch.Tensor) -> Poisoned:
        poisoned = (y != target) & (torch.rand(len(y), generator=draws) < fraction)
        stamped = torch.where(poisoned.view((-1,) + (1,) * (x.dim() - 1)), stamp(x), x)
        return stamped, torch.where(poisoned, torch.full_like(y, target), y), poisoned

    flagged, seconds = _poisoned_steps(learner, stream, batches, plant, on_step)
    return Outcome(f"backdoor:*>{target}x{fraction:g}", label, data.seed, start_acc=start,
                   final_acc=accuracy(judge, *test), poisons_flagged=flagged,
                   attack_success=accuracy(judge, *triggered),
                   target_flag_rate=learner.strategy.target_false_flag_rate(), seconds_per_step=seconds)
