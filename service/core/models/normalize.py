"""Input normalisation as part of the model, so callers always pass pixels in [0, 1]."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class Normalized(nn.Module):
    """Wrap `net` so that `forward(x)` sees (x - mean) / std per channel.

    >>> import torch
    >>> m = Normalized(torch.nn.Flatten(), mean=(0.5,), std=(0.25,))
    >>> m(torch.full((1, 1, 1, 1), 0.75)).item()
    1.0
    """

    def __init__(self, net: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        if len(mean) != len(std):
            raise ValueError("mean and std need one value per channel")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        self.net = net
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)
