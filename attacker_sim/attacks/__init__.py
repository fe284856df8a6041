"""Poison generators: one class per attack, built with its budget, called on (model, x, y)."""

from attacker_sim.attacks.budget import Budget
from attacker_sim.attacks.pgd import PGDDelusive

__all__ = ["Budget", "PGDDelusive"]
