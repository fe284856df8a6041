"""PGD delusive poisons (Fowl et al.): error-maximising perturbations of correctly labelled data."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from attacker_sim.attacks.budget import Budget
from service.defense.eval_mode import eval_mode


class PGDDelusive:
    """Maximise CE(f(x'), y) by signed-gradient ascent inside the L-inf ball.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    >>> x = torch.rand(3, 1, 2, 2)
    >>> x_adv = PGDDelusive(Budget(epsilon=0.1, steps=2, step_size=0.05))(net, x, torch.tensor([0, 1, 0]))
    >>> bool(((x_adv - x).abs() <= 0.1 + 1e-6).all())
    True
    """

    def __init__(self, budget: Budget | None = None, random_start: bool = False):
        self.budget = budget or Budget()
        self.random_start = random_start

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        b = self.budget
        x_adv = x.detach().clone()
        if self.random_start:
            x_adv = b.project(x_adv + torch.empty_like(x_adv).uniform_(-b.epsilon, b.epsilon), x)
        with eval_mode(model):
            for _ in range(b.steps):
                x_adv.requires_grad_(True)
                loss = F.cross_entropy(model(x_adv), y)
                (grad,) = torch.autograd.grad(loss, x_adv)
                x_adv = b.project(x_adv + b.step_size * grad.sign(), x)
        return x_adv.detach()
