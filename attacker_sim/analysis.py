"""`dscguard analyze-md`: mean discrepancy vs the backtracking interval k (paper Fig. 2 / Table 4).

The online model streams clean batches with plain SGD and keeps a snapshot after every step. At
the end, the discrepancy of held-out clean samples, and of the same samples poisoned against the
final model, is measured against the snapshot from k batches earlier, for every k.

`on="trusted"` (the default) does it on the defender's trusted split only, so that a defender may choose
DSC's rolling window from it (`suggested_window`): half the split feeds the clean steps (resampled), the
other half gives the held-out samples. `on="stream"` uses the stream split, as the paper's Fig. 2.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np
import torch

from attacker_sim.campaign import AccumulativeCampaign
from service.core.config import ExperimentConfig
from service.core.defense.discrepancy import memorization_discrepancy
from service.core.experiment import Experiment


def backtracking_rows(config: ExperimentConfig, ks: Sequence[int] = (1, 2, 5, 10, 20),
                      seeds: Sequence[int] | None = None, probe_batches: int = 4, cache_dir=None,
                      progress: bool = True, on: str = "trusted") -> list[dict]:
    """One row per k: mean ± std over seeds of the mean discrepancy of clean and poisoned samples."""
    if not ks or min(ks) < 1:
        raise ValueError(f"backtracking intervals must be >= 1, got {list(ks)}")
    if on not in ("trusted", "stream"):
        raise ValueError(f"on must be 'trusted' or 'stream', got {on!r}")
    seeds = list(config.campaign.seeds if seeds is None else seeds)
    per_seed = {k: {"clean": [], "poisoned": []} for k in ks}
    for seed in seeds:
        experiment = Experiment.prepare(config.model_copy(update={"seed": seed}), cache_dir=cache_dir,
                                        progress=progress)
        learner = experiment.new_learner(config.strategy.model_copy(update={"name": "st"}))
        batches = (experiment.stream_batches(max(ks) + probe_batches + 1, seed=seed * 7919 + 2) if on == "stream"
                   else _trusted_batches(experiment, max(ks), probe_batches + 1, seed))
        snapshots = [copy.deepcopy(learner.model).eval()]
        for _ in range(max(ks)):
            learner.step(*next(batches))
            snapshots.append(copy.deepcopy(learner.model).eval())
        final = snapshots[-1]
        probes = [next(batches) for _ in range(probe_batches + 1)]
        trigger_base, probes = probes[0], probes[1:]
        campaign = AccumulativeCampaign(config.attack, config.campaign)
        validation = experiment.splits.attacker_val.tensors()
        x_trigger = campaign.trigger(final, *trigger_base, *validation)
        clean_x = torch.cat([x for x, _ in probes])
        poisoned_x = torch.cat([campaign.craft(final, x, y, (x_trigger, trigger_base[1]), validation)
                                for x, y in probes])
        for k in ks:
            auxiliary = snapshots[-1 - k]
            per_seed[k]["clean"].append(float(memorization_discrepancy(auxiliary, final, clean_x).mean()))
            per_seed[k]["poisoned"].append(float(memorization_discrepancy(auxiliary, final, poisoned_x).mean()))
    return [{"k": k, **{kind: {"mean": float(np.mean(v)), "std": float(np.std(v)), "values": v}
                        for kind, v in per_seed[k].items()}} for k in ks]


def _trusted_batches(experiment: Experiment, steps: int, probes: int, seed: int):
    """`steps` batches resampled from one half of the trusted split, then `probes` disjoint batches of the other."""
    x, y = experiment.calibration_tensors
    generator = torch.Generator().manual_seed(seed * 7919 + 2)
    order = torch.randperm(len(x), generator=generator)
    learn, held_out = order[: len(x) // 2], order[len(x) // 2 :]
    size = experiment.config.stream.batch_size
    for _ in range(steps):
        pick = learn[torch.randint(len(learn), (size,), generator=generator)]
        yield x[pick], y[pick]
    for chunk in held_out.chunk(probes):
        yield x[chunk], y[chunk]


def poisoned_ratio(row: dict) -> float:
    """How far poisons stand above clean samples at one k: mean poisoned over mean clean discrepancy."""
    return row["poisoned"]["mean"] / max(row["clean"]["mean"], 1e-12)


def suggested_window(rows: list[dict]) -> int:
    """The backtracking interval at which poisons stand furthest above clean samples (largest `poisoned_ratio`).

    >>> suggested_window([{"k": 1, "clean": {"mean": 0.1}, "poisoned": {"mean": 0.3}},
    ...                   {"k": 5, "clean": {"mean": 0.1}, "poisoned": {"mean": 0.5}}])
    5
    """
    return max(rows, key=poisoned_ratio)["k"]
