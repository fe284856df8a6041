"""BatchNorm's running statistics as part of an update: what a batch moves them to, and the model measured (or left)
with them moved part of the way.

A batch moves the running statistics in the forward that takes its gradient, before any defense has judged it, and
eval-mode predictions read them. So the update gate treats the move as part of the update: the action scales it as it
scales the gradient (a skipped batch moves nothing), and it is capped at what clean trusted batches move them
(`move_size`). Only BatchNorm layers that keep running statistics take part; a model without them is left as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

Statistics = list[tuple[torch.Tensor, torch.Tensor]]  # (running_mean, running_var) per tracking BatchNorm layer


def tracking_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The model's BatchNorm layers that keep running statistics, in module order (also while a block has paused
    their tracking: `training_mode_frozen_stats`)."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.running_mean is not None]


def snapshot(model: nn.Module) -> Statistics:
    """A copy of the running statistics as they stand."""
    return [(m.running_mean.detach().clone(), m.running_var.detach().clone()) for m in tracking_norms(model)]


def put(model: nn.Module, before: Statistics, after: Statistics, scale: float,
        also: tuple[Statistics, float] | None = None) -> None:
    """Set the running statistics to before + scale * (after - before), plus share * (other - before) where `also`
    is (other, share).

    >>> model = nn.BatchNorm1d(2)
    >>> put(model, [(torch.zeros(2), torch.ones(2))], [(torch.full((2,), 4.0), torch.ones(2))], 0.25)
    >>> model.running_mean.tolist()
    [1.0, 1.0]
    >>> put(model, [(torch.zeros(2), torch.ones(2))], [(torch.full((2,), 4.0), torch.ones(2))], 0.25,
    ...     also=([(torch.full((2,), -8.0), torch.ones(2))], 0.5))
    >>> model.running_mean.tolist()
    [-3.0, -3.0]
    """
    other, share = also if also is not None else (before, 0.0)
    with torch.no_grad():
        for m, (mean0, var0), (mean1, var1), (mean2, var2) in zip(tracking_norms(model), before, after, other,
                                                                  strict=True):
            m.running_mean.copy_(mean0 + scale * (mean1 - mean0) + share * (mean2 - mean0))
            m.running_var.copy_(var0 + scale * (var1 - var0) + share * (var2 - var0))


@contextmanager
def moved(model: nn.Module, before: Statistics | None, after: Statistics | None, scale: float) -> Iterator[None]:
    """Inside the block, the running statistics moved `scale` of the way from `before` to `after`; as they were
    after it. Without statistics (None, or a model without tracking BatchNorm) nothing changes."""
    if not before:
        yield
        return
    kept = snapshot(model)
    put(model, before, after, scale)
    try:
        yield
    finally:
        put(model, kept, kept, 0.0)


def after_batch(model: nn.Module, forward: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, Statistics]:
    """Run `forward` (in training mode, running statistics frozen) and return its output and the statistics the same
    batch would have moved them to, as BatchNorm's own update would (its momentum, the unbiased batch variance)."""
    norms = tracking_norms(model)
    seen: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(module, inputs, _output):
        x = inputs[0].detach()
        dims = [0, *range(2, x.dim())]
        count = x.numel() // x.shape[1]
        seen[module] = (x.mean(dims), x.var(dims, unbiased=False) * count / max(count - 1, 1))

    hooks = [m.register_forward_hook(record) for m in norms]
    try:
        output = forward()
    finally:
        for hook in hooks:
            hook.remove()
    after = []
    for m in norms:
        momentum = m.momentum if m.momentum is not None else 1.0 / (int(m.num_batches_tracked) + 1)
        mean, var = seen.get(m, (m.running_mean, m.running_var))
        after.append(((1 - momentum) * m.running_mean + momentum * mean,
                      (1 - momentum) * m.running_var + momentum * var))
    return output, after


def move_size(before: Statistics, after: Statistics) -> float:
    """How far a move goes, scale-free: the largest change of a channel's mean in its standard deviations, or of
    its variance relative to itself, over every layer (0 without layers).

    >>> move_size([(torch.zeros(2), torch.full((2,), 4.0))], [(torch.tensor([1.0, 0.0]), torch.full((2,), 4.0))])
    0.5
    """
    size = 0.0
    for (mean0, var0), (mean1, var1) in zip(before, after, strict=True):
        scale = var0.clamp_min(1e-5)
        size = max(size, float(((mean1 - mean0).abs() / scale.sqrt()).max()),
                   float(((var1 - var0).abs() / scale).max()))
    return size
