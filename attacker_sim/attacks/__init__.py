"""Poison generators: one class per attack, built with its budget, called to return perturbed inputs.

The simple error-maximising generators are chosen by name; the trigger and the accumulative
poisons are used directly by the campaign.

>>> import torch
>>> attack = build_attack("cw_inf", Budget(epsilon=0.1, steps=2, step_size=0.05), kappa=1.0)
>>> type(attack).__name__, attack.kappa
('CarliniWagnerInf', 1.0)
>>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
>>> attack(net, torch.rand(3, 1, 2, 2), torch.tensor([0, 1, 0])).shape
torch.Size([3, 1, 2, 2])
"""

from attacker_sim.attacks.accumulative import AccumulativePoison
from attacker_sim.attacks.base import ErrorMaximizingAttack, ModelMode, SignedGradientAttack, model_in_mode
from attacker_sim.attacks.carlini_wagner import CarliniWagnerInf
from attacker_sim.attacks.pgd import PGDDelusive
from attacker_sim.attacks.trades import TradesKL
from attacker_sim.attacks.trigger import TriggerCrafter
from service.core.defense.projection import Budget

ATTACKS: dict[str, type[ErrorMaximizingAttack]] = {
    "pgd": PGDDelusive,
    "trades_kl": TradesKL,
    "cw_inf": CarliniWagnerInf,
}


def build_attack(name: str, budget: Budget | None = None, **kwargs) -> ErrorMaximizingAttack:
    """The error-maximising attack registered as `name`, built with `budget` and its own options."""
    if name not in ATTACKS:
        raise ValueError(f"unknown attack {name!r}; expected one of {', '.join(ATTACKS)}")
    return ATTACKS[name](budget, **kwargs)


__all__ = [
    "ATTACKS",
    "AccumulativePoison",
    "Budget",
    "CarliniWagnerInf",
    "ErrorMaximizingAttack",
    "ModelMode",
    "PGDDelusive",
    "SignedGradientAttack",
    "TradesKL",
    "TriggerCrafter",
    "build_attack",
    "model_in_mode",
]
