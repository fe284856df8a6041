"""The L-inf budget every input-space perturbation shares (the attacks' and the defense's reverse-PGD),
validated once at construction, and the projection onto its ball intersected with the [0, 1] box."""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class Budget:
    """Radius `epsilon`, `steps` signed-gradient steps of `step_size`, all in [0,1] pixel units.

    >>> import torch
    >>> Budget(epsilon=0.1, steps=2, step_size=0.05).project(torch.tensor([1.2]), torch.tensor([0.95])).item()
    1.0
    """

    epsilon: float = 0.2
    steps: int = 10
    step_size: float = 0.02

    def __post_init__(self):
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1] (pixel units), got {self.epsilon}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")

    def project(self, x_new: torch.Tensor, x_clean: torch.Tensor) -> torch.Tensor:
        """Back into the epsilon-ball around `x_clean`, intersected with [0, 1]."""
        return project_linf(x_new, x_clean, self.epsilon)
