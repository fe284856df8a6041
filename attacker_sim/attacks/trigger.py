"""The trigger batch of the accumulative attack (Pang et al. 2021, step 1).

Its training gradient is crafted to point against the gradient on held-out data, so one SGD step
on it costs accuracy; the accumulative poisons make the model ever more sensitive to it.
"""

from __future__ import annotations

import torch
from torch import nn

from attacker_sim.attacks.base import Objective, SignedGradientAttack
from attacker_sim.attacks.gradients import cosine_sum, loss_gradients, trainable_parameters
from service.core.defense.projection import Budget


class TriggerCrafter(SignedGradientAttack):
    """Minimise sum_l cos(grad_l CE(f(x'), y), grad_l CE(f(x_val), y_val)) by signed-gradient descent on x'.

    The default budget is the research code's: epsilon 0.2, 2 steps of 0.2.

    >>> import torch
    >>> from attacker_sim.attacks import Budget
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> x, y = torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,))
    >>> x_val, y_val = torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,))
    >>> crafter = TriggerCrafter(Budget(epsilon=0.2, steps=3, step_size=0.05))
    >>> x_trigger = crafter(net, x, y, x_val, y_val)
    >>> crafter.cosine_objective(net, x_trigger, y, x_val, y_val) < crafter.cosine_objective(net, x, y, x_val, y_val)
    True
    """

    default_budget = Budget(epsilon=0.2, steps=2, step_size=0.2)

    def __call__(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
    ) -> torch.Tensor:
        """The trigger batch: a perturbed copy of `x` (labels `y` unchanged), within the budget."""
        return self._perturb(model, x, y, x_val, y_val)

    def cosine_objective(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
    ) -> float:
        """sum_l cos(grad_l CE(f(x), y), grad_l CE(f(x_val), y_val)), in the crafting mode: what is minimised."""
        with self._crafting(model):
            params = trainable_parameters(model)
            return float(cosine_sum(loss_gradients(model(x), y, params), loss_gradients(model(x_val), y_val, params)))

    def _objective(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor
    ) -> Objective:
        params = trainable_parameters(model)
        val_grads = loss_gradients(model(x_val), y_val, params)  # independent of x': computed once

        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            # create_graph: the parameter gradient is itself differentiated wrt x'; the minus turns
            # the base's ascent into descent on the cosine
            return -cosine_sum(loss_gradients(logits, y, params, create_graph=True), val_grads), logits

        return objective
