"""Thresholds from trusted clean data instead of hand-set constants.

The paper hand-sets P = mu + tau * m per dataset and names that as its limitation. Here mu is the
clean-discrepancy quantile that gives a target false-flag rate, and tau is the drift per stream
batch of that quantile, measured over a short warm-up stream of trusted clean batches taken on a
copy of the model (so the real model is untouched). Like an alibi-detect detector, the result is
saved with the checkpoint and every verdict can be traced to the threshold it was judged against.
"""

from __future__ import annotations

import copy
import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from service.core.defense.discrepancy import memorization_discrepancy
from service.core.device import model_device


@dataclass(frozen=True)
class Calibration:
    """A calibrated threshold schedule P(m) = mu + tau * m and how it was obtained.

    >>> Calibration(mu=0.5, tau=0.02, target_false_flag_rate=0.1, divergence="kl").threshold(10)
    0.7
    """

    mu: float
    tau: float
    target_false_flag_rate: float
    divergence: str
    samples: int = 0
    warmup_batches: int = 0
    quantile_per_warmup_batch: list[float] = field(default_factory=list)
    clean_discrepancy_mean: float = 0.0
    clean_discrepancy_median: float = 0.0
    unit: str = "sample"  # what a verdict judges: one sample's score, or a batch's mean score

    def threshold(self, batch_index: int) -> float:
        return round(self.mu + self.tau * batch_index, 12)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        return cls(**data)


def conformal_quantile(values: torch.Tensor, level: float) -> float:
    """The ceil((n + 1) * level)-th smallest of n values: a finite-sample-valid upper quantile.

    With fewer values than the level needs, the largest is returned (the bound is then loose).

    >>> conformal_quantile(torch.arange(1.0, 11.0), 0.9)
    10.0
    >>> conformal_quantile(torch.arange(1.0, 101.0), 0.9)
    91.0
    """
    n = len(values)
    if n == 0:
        raise ValueError("conformal_quantile needs at least one value")
    rank = min(math.ceil((n + 1) * level), n)
    return float(torch.sort(values.flatten()).values[rank - 1])


def threshold_statistic(scores: torch.Tensor, level: float, unit: str, batch_size: int, seed: int = 0) -> float:
    """The conformal `level` quantile of what a verdict judges, from per-sample clean discrepancies.

    `unit="sample"`: of the scores themselves. `unit="batch"`: of the means of 512 clean batches of
    `batch_size` drawn with replacement (stream batches come from a far larger population than the
    calibration split, so a reshuffle of it would understate their spread).

    >>> threshold_statistic(torch.arange(1.0, 101.0), 0.9, "sample", batch_size=10)
    91.0
    """
    if unit not in ("sample", "batch"):
        raise ValueError(f"unit must be 'sample' or 'batch', got {unit!r}")
    if unit == "batch":
        generator = torch.Generator().manual_seed(seed + 1)
        picks = torch.randint(len(scores), (512, batch_size), generator=generator)
        scores = scores.cpu()[picks].mean(dim=1)
    return conformal_quantile(scores.double(), level)


def calibrate(
    model: nn.Module,
    auxiliary: nn.Module,
    clean_x: torch.Tensor,
    clean_y: torch.Tensor,
    *,
    target_false_flag_rate: float = 0.1,
    divergence: str = "kl",
    warmup_batches: int = 8,
    batch_size: int = 25,
    lr: float = 0.05,
    momentum: float = 0.9,
    seed: int = 0,
    unit: str = "sample",
) -> Calibration:
    """Calibrate mu and tau on trusted clean samples (`clean_x` in [0,1], labels `clean_y`).

    mu: the conformal (1 - target) quantile of the clean discrepancy now (`threshold_statistic`): of
    every calibration sample (`unit="sample"`, per-sample early stop), or of the mean over random clean
    batches of `batch_size` (`unit="batch"`, the research code's batch-mean early stop).
    tau: the least-squares slope of that quantile over `warmup_batches` plain SGD steps on clean
    batches, measured on a held-out half of the calibration samples; never negative.
    """
    if unit not in ("sample", "batch"):
        raise ValueError(f"unit must be 'sample' or 'batch', got {unit!r}")
    if not 0 < target_false_flag_rate < 1:
        raise ValueError(f"target_false_flag_rate must be in (0, 1), got {target_false_flag_rate}")
    if len(clean_x) < 2:
        raise ValueError("calibration needs at least 2 clean samples")
    level = 1.0 - target_false_flag_rate
    device = model_device(model)
    clean_x, clean_y = clean_x.to(device), clean_y.to(device)
    scores = memorization_discrepancy(auxiliary, model, clean_x, divergence)

    def statistic(values: torch.Tensor) -> float:
        return threshold_statistic(values, level, unit, batch_size, seed)

    mu = statistic(scores)
    tau, quantiles = 0.0, [mu]
    if warmup_batches > 0:
        tau, quantiles = _drift(model, auxiliary, clean_x, clean_y, statistic, divergence, warmup_batches,
                                batch_size, lr, momentum, seed)
    return Calibration(
        mu=mu, tau=tau, target_false_flag_rate=target_false_flag_rate, divergence=divergence,
        samples=len(clean_x), warmup_batches=warmup_batches, quantile_per_warmup_batch=quantiles,
        clean_discrepancy_mean=float(scores.mean()), clean_discrepancy_median=float(scores.median()), unit=unit,
    )


def _drift(model, auxiliary, clean_x, clean_y, statistic, divergence, warmup_batches, batch_size, lr, momentum,
           seed):
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(clean_x), generator=generator)
    train_idx, probe_idx = order[: len(order) // 2], order[len(order) // 2 :]
    probe = clean_x[probe_idx]
    warm = copy.deepcopy(model)
    warm.train()
    optimizer = torch.optim.SGD(warm.parameters(), lr=lr, momentum=momentum)
    quantiles = []
    for m in range(warmup_batches + 1):
        quantiles.append(statistic(memorization_discrepancy(auxiliary, warm, probe, divergence)))
        if m == warmup_batches:
            break
        pick = train_idx[torch.randint(len(train_idx), (batch_size,), generator=generator)]
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(warm(clean_x[pick]), clean_y[pick]).backward()
        optimizer.step()
    slope = float(np.polyfit(np.arange(len(quantiles)), np.asarray(quantiles), 1)[0])
    return max(slope, 0.0), quantiles
