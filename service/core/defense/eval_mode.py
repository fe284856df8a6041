"""Run a module in eval mode, or in training mode with its running statistics frozen, for a moment, then put
its previous mode back."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def eval_mode(*modules: nn.Module) -> Iterator[None]:
    """Switch `modules` to eval mode inside the block (BatchNorm statistics and dropout frozen)."""
    previous = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(modules, previous, strict=True):
            m.train(was_training)


@contextmanager
def training_mode_frozen_stats(module: nn.Module) -> Iterator[None]:
    """Training mode inside the block (dropout on, BatchNorm normalising with the batch's own statistics, as an
    update sees the model) without recording anything: the running statistics are left as they were."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    was_training = module.training
    module.train()
    for norm in norms:
        norm.track_running_stats = False
    try:
        yield
    finally:
        for norm in norms:
            norm.track_running_stats = True
        module.train(was_training)
