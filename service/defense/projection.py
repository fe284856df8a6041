"""Projection onto the L-inf ball around a reference sample, intersected with the [0, 1] box."""

from __future__ import annotations

import torch


def project_linf(x_new: torch.Tensor, x_reference: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Clamp `x_new` into [x_reference - epsilon, x_reference + epsilon] and into [0, 1].

    >>> import torch
    >>> project_linf(torch.tensor([1.2, 0.0]), torch.tensor([0.95, 0.5]), 0.1).tolist()
    [1.0, 0.4000000059604645]
    """
    lower = (x_reference - epsilon).clamp_min(0.0)
    upper = (x_reference + epsilon).clamp_max(1.0)
    return torch.max(torch.min(x_new.detach(), upper), lower)
