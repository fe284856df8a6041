"""Accumulative poisons (Pang et al. 2021, step 2): stream batches that prime the model for the trigger.

Each incoming clean batch S_t is perturbed so that its training gradient g(S_t') aligns, per
parameter tensor, with gamma * g(S_t) + H, where H = grad_theta sum_l cos(g_l(S_T), g_l(S_val)).
The SGD step on S_t' then descends the clean loss (accuracy looks normal) and also descends along
H: it makes the trigger's gradient point further against the validation gradient, so the trigger
step fired later costs more accuracy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from attacker_sim.attacks.base import Objective, SignedGradientAttack
from attacker_sim.attacks.gradients import alignment, cosine_sum, loss_gradients, normalized, trainable_parameters
from service.core.defense.projection import Budget

AccumulativeObjective = Literal["full", "second_order_only", "clean_only"]
OBJECTIVES = ("full", "second_order_only", "clean_only")
Batch = tuple[torch.Tensor, torch.Tensor]


class AccumulativePoison(SignedGradientAttack):
    """Maximise sum_l <n(g_l(S_t')), gamma * n(g_l(S_t)) + n(H_l)>, n = divide by the tensor's L2 norm.

    `objective` picks the ablation: "full" (both terms), "clean_only" (drops H: no trigger or
    validation batch needed) or "second_order_only" (drops the gamma term). H does not depend on
    x', so it is computed once per call (one double backward). The default budget is the research
    code's: epsilon 0.2, 2 steps of 0.2.

    >>> import torch
    >>> from attacker_sim.attacks import Budget
    >>> _ = torch.manual_seed(0)
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    >>> batch = lambda: (torch.rand(6, 1, 2, 2), torch.randint(0, 3, (6,)))
    >>> (x, y), trigger, validation = batch(), batch(), batch()
    >>> attack = AccumulativePoison(Budget(epsilon=0.1, steps=2, step_size=0.05))
    >>> x_poison = attack(net, x, y, trigger=trigger, validation=validation)
    >>> h = attack.second_order_direction(net, trigger, validation)
    >>> bool(attack.objective_value(net, x_poison, x, y, h) > attack.objective_value(net, x, x, y, h))
    True
    """

    default_budget = Budget(epsilon=0.2, steps=2, step_size=0.2)

    def __init__(self, budget: Budget | None = None, gamma: float = 1.0, objective: AccumulativeObjective = "full",
                 **options):
        """`options`: those of `SignedGradientAttack` (model_mode, random_start, auxiliary, beta)."""
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma (weight of the clean-gradient term) must be a finite number >= 0, got {gamma}")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
        super().__init__(budget, **options)
        self.gamma = float(gamma)
        self.objective: AccumulativeObjective = objective

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        trigger: Batch | None = None,
        validation: Batch | None = None,
    ) -> torch.Tensor:
        """Poisoned copy of the stream batch `x` (labels `y` unchanged), within the budget.

        `trigger` = (x_T, y_T) and `validation` = (x_val, y_val) are needed unless objective is "clean_only".
        """
        return self._perturb(model, x, y, trigger, validation)

    def second_order_direction(self, model: nn.Module, trigger: Batch, validation: Batch) -> list[torch.Tensor]:
        """H = grad_theta sum_l cos(g_l(S_T), g_l(S_val)), one detached tensor per trainable parameter."""
        with self._crafting(model):
            return self._second_order_direction(model, trigger, validation)

    def objective_value(
        self,
        model: nn.Module,
        x_adv: torch.Tensor,
        x: torch.Tensor,
        y: torch.Tensor,
        second_order: Sequence[torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The alignment maximised at `x_adv` (without the adaptive term), differentiable wrt `x_adv`.

        `second_order` is H from `second_order_direction`; unused (may be None) for "clean_only".
        """
        with self._crafting(model):
            return self._alignment_objective(model, x, y, second_order)(x_adv)[0]

    def _objective(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Batch | None, validation: Batch | None
    ) -> Objective:
        second_order = None
        if self.objective != "clean_only":
            if trigger is None or validation is None:
                raise ValueError(f"objective {self.objective!r} needs trigger=(x_T, y_T) and validation=(x_val, y_val)")
            second_order = self._second_order_direction(model, trigger, validation)
        return self._alignment_objective(model, x, y, second_order)

    def _second_order_direction(self, model: nn.Module, trigger: Batch, validation: Batch) -> list[torch.Tensor]:
        params = trainable_parameters(model)
        (x_trigger, y_trigger), (x_val, y_val) = trigger, validation
        # both gradients keep their graphs: H differentiates the similarity through both of them
        similarity = cosine_sum(
            loss_gradients(model(x_trigger), y_trigger, params, create_graph=True),
            loss_gradients(model(x_val), y_val, params, create_graph=True),
        )
        return [h.detach() for h in torch.autograd.grad(similarity, params, materialize_grads=True)]

    def _alignment_objective(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, second_order: Sequence[torch.Tensor] | None
    ) -> Objective:
        params = trainable_parameters(model)
        if self.objective != "clean_only" and second_order is None:
            raise ValueError(f"objective {self.objective!r} needs the second-order direction H")
        if self.objective == "second_order_only":
            target = normalized(second_order)
        else:
            target = [self.gamma * g for g in normalized(loss_gradients(model(x), y, params))]
            if self.objective == "full":
                target = [t + h for t, h in zip(target, normalized(second_order), strict=True)]

        def objective(x_adv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = model(x_adv)
            # create_graph: the alignment of the parameter gradient is differentiated wrt x'
            poison_grads = loss_gradients(logits, y, params, create_graph=True)
            return alignment(normalized(poison_grads), target), logits

        return objective
