"""One experiment's shared state: data splits, the burn-in, calibration, and fresh learners.

Campaigns, the quickstart and the service all start the same way: load and split the data with
the seed, burn in (cached), calibrate the threshold on the trusted clean split, and hand out
learners that all start from the same burn-in state with a fresh optimizer.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch

from service.core.burnin import BurnInResult, burn_in
from service.core.config import ExperimentConfig, StrategyConfig
from service.core.data import Splits, SplitSizes, default_cache_dir, load_dataset, make_splits
from service.core.defense.calibration import Calibration, calibrate
from service.core.defense.strategies import build_strategy, strategy_class
from service.core.device import resolve_device
from service.core.learner import OnlineLearner


@dataclass
class Experiment:
    """Everything the runs of one config share. Build it with `Experiment.prepare(config)`."""

    config: ExperimentConfig
    splits: Splits
    burnin: BurnInResult
    device: torch.device
    _calibrations: dict[tuple, Calibration] = field(default_factory=dict, repr=False)

    @classmethod
    def prepare(cls, config: ExperimentConfig, cache_dir=None, progress: bool = True) -> Experiment:
        cache_dir = default_cache_dir() if cache_dir is None else cache_dir
        data = config.data
        train, test = load_dataset(data.dataset, data.data_dir, download=data.download, cache_dir=cache_dir)
        sizes = SplitSizes(stream=data.stream, attacker_val=data.attacker_val, calibration=data.calibration,
                           burnin=data.burnin, test=data.test)
        splits = make_splits(train, test, sizes, seed=config.seed)
        device = resolve_device(config.device)
        result = burn_in(config, splits.burnin, cache_dir, test=splits.test, device=device, progress=progress)
        return cls(config, splits, result, device)

    @cached_property
    def test_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.splits.test.tensors()

    @cached_property
    def calibration_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.splits.calibration.tensors()

    def calibration_for(self, divergence: str = "kl", unit: str = "sample") -> Calibration:
        """The threshold schedule calibrated on the trusted clean split (computed once per setting)."""
        cal = self.config.calibration
        key = (divergence, unit, cal.target_false_flag_rate, cal.warmup_batches)
        if key not in self._calibrations:
            x, y = self.calibration_tensors
            stream = self.config.stream
            self._calibrations[key] = calibrate(
                self.burnin.model, self.burnin.auxiliary, x.to(self.device), y.to(self.device),
                target_false_flag_rate=cal.target_false_flag_rate, divergence=divergence,
                warmup_batches=cal.warmup_batches, batch_size=stream.batch_size, lr=stream.lr,
                momentum=stream.momentum, seed=self.config.seed, unit=unit,
            )
        return self._calibrations[key]

    def new_learner(self, strategy: StrategyConfig | None = None) -> OnlineLearner:
        """A learner at the end of burn-in, with a fresh optimizer, defended by `strategy`."""
        strategy = strategy or self.config.strategy
        calibration = None
        if strategy_class(strategy.name).needs_calibration:
            calibration = self.calibration_for(strategy.divergence, strategy.early_stop)
        stream = self.config.stream
        return OnlineLearner(
            copy.deepcopy(self.burnin.model), copy.deepcopy(self.burnin.auxiliary),
            build_strategy(strategy, calibration, trusted=self.calibration_tensors, batch_size=stream.batch_size,
                           seed=self.config.seed),
            model_spec=self.burnin.model_spec, lr=stream.lr,
            momentum=stream.momentum, weight_decay=stream.weight_decay, device=self.device, seed=self.config.seed,
        )

    @property
    def client_batch_size(self) -> int:
        """Samples per batch the simulated clients send: `campaign.client_batch_size`, default `stream.batch_size`."""
        return self.config.campaign.client_batch_size or self.config.stream.batch_size

    def stream_batches(self, count: int, seed: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """`count` batches of fresh stream data, reshuffled with the seed each time the pool runs out; of
        `client_batch_size` samples."""
        x, y = self.splits.stream.tensors()
        size = self.client_batch_size
        generator = torch.Generator().manual_seed(self.config.seed if seed is None else seed)
        order = torch.randperm(len(x), generator=generator)
        position = 0
        for _ in range(count):
            if position + size > len(order):
                order, position = torch.randperm(len(x), generator=generator), 0
            idx = order[position : position + size]
            position += size
            yield x[idx], y[idx]

    def test_accuracy(self, learner: OnlineLearner) -> float:
        return learner.accuracy(*self.test_tensors)
