"""The L-inf budget every input-space perturbation shares (the attacks' and the defense's reverse-PGD),
validated once at construction, and the projection onto its ball intersected with the [0, 1] box."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


def project_linf(x_new: torch.Tensor, x_reference: torch.Tensor, epsilon: float,
                 box: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Clamp `x_new` into [x_reference - epsilon, x_reference + epsilon] and into [0, 1], or into `box`: (low,
    high) tensors shaped like one input (a bundle's per-feature bounds).

    >>> import torch
    >>> project_linf(torch.tensor([1.2, 0.0]), torch.tensor([0.95, 0.5]), 0.1).tolist()
    [1.0, 0.4000000059604645]
    >>> project_linf(torch.tensor([[1.2, 0.0]]), torch.tensor([[0.95, 0.5]]), 0.1,
    ...              box=(torch.tensor([0.0, 0.45]), torch.tensor([0.9, 1.0]))).tolist()
    [[0.8999999761581421, 0.44999998807907104]]
    """
    if box is None:
        lower = (x_reference - epsilon).clamp_min(0.0)
        upper = (x_reference + epsilon).clamp_max(1.0)
    else:
        low, high = (bound.to(x_reference.device, x_reference.dtype) for bound in box)
        lower = torch.max(x_reference - epsilon, low)
        upper = torch.min(x_reference + epsilon, high)
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
    # (low, high) shaped like one input: a bundle's feature bounds, which the service refuses inputs outside of
    box: tuple[torch.Tensor, torch.Tensor] | None = field(default=None, compare=False)

    def __post_init__(self):
        if not 0 < self.epsilon <= 1:
            raise ValueError(f"epsilon must be in (0, 1] (pixel units), got {self.epsilon}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if not self.step_size > 0:
            raise ValueError(f"step_size must be > 0, got {self.step_size}")

    def project(self, x_new: torch.Tensor, x_clean: torch.Tensor) -> torch.Tensor:
        """Back into the epsilon-ball around `x_clean`, intersected with [0, 1] (or with `box`)."""
        return project_linf(x_new, x_clean, self.epsilon, self.box)
