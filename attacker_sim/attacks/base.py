"""The machinery every poison generator shares: signed-gradient ascent inside an L-inf ball.

A subclass only says what to maximise (`_objective`); the base owns the budget, the random
start, the model mode during crafting, the projection and the optional adaptive term that keeps
the defender's Memorization Discrepancy small (Zhu et al., Table 3).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from typing import Literal

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.modules.batchnorm import _BatchNorm

from service.core.defense.discrepancy import divergence_from_logits
from service.core.defense.eval_mode import eval_mode
from service.core.defense.projection import Budget
from service.core.device import model_device

ModelMode = Literal["eval", "train"]
MODEL_MODES = ("eval", "train")

# x' -> (value to maximise, logits of the attacked model at x'); the logits feed the adaptive
# term so it costs no extra forward of the model.
Objective = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def model_in_mode(model: nn.Module, mode: ModelMode) -> Iterator[None]:
    """Put `model` in `mode` for the block, then restore every submodule's mode.

    In train mode BatchNorm normalises with batch statistics but would also move its running
    statistics; the attacker only looks at the model, so tracking is switched off for the block
    (same outputs, running statistics untouched, nothing for a later backward to trip over).

    >>> net = torch.nn.Sequential(torch.nn.BatchNorm1d(2)).eval()
    >>> with model_in_mode(net, "train"):
    ...     _ = net(torch.randn(4, 2) + 5)
    >>> net.training, net[0].running_mean.tolist()
    (False, [0.0, 0.0])
    """
    if mode not in MODEL_MODES:
        raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {mode!r}")
    # per submodule, not just the root: a caller may keep e.g. frozen BatchNorm layers in eval mode
    previous = [(m, m.training) for m in model.modules()]
    tracking = [(m, m.track_running_stats) for m in model.modules() if isinstance(m, _BatchNorm)]
    model.train(mode == "train")
    if mode == "train":
        for m, _ in tracking:
            m.track_running_stats = False
    try:
        yield
    finally:
        for m, was_training in previous:
            m.training = was_training
        for m, was_tracking in tracking:
            m.track_running_stats = was_tracking


def per_sample_unit(gradient: torch.Tensor) -> torch.Tensor:
    """Each row (sample) of `gradient` [N, ...] divided by its L2 norm; an all-zero row stays zero.

    >>> per_sample_unit(torch.tensor([[3.0, 4.0], [0.0, 0.0]])).tolist()
    [[0.6000000238418579, 0.800000011920929], [0.0, 0.0]]
    """
    norms = gradient.flatten(1).norm(dim=1).view(-1, *([1] * (gradient.dim() - 1)))
    # no epsilon added: a non-zero row is divided by its exact norm, a zero row by 1
    return gradient / torch.where(norms > 0, norms, torch.ones_like(norms))


class SignedGradientAttack(ABC):
    """Base of the L-inf attacks: `steps` signed-gradient ascent steps on an objective of x'.

    `model_mode` is the mode the attacked model is in while crafting. The research code crafts in
    "eval" while the victim updates in "train" (a BatchNorm mismatch); here it is a choice.

    The adaptive attacker (Zhu et al., Table 3) keeps the poisons inconspicuous to a discrepancy
    detector: with `beta > 0` each step also descends MD(x') = KL(p_aux(x') || p_model(x')) against
    the defender's `auxiliary` checkpoint (run in eval mode, as the defender does). The objective
    and MD live on unrelated scales (a sum of cosines, a cross-entropy, a KL), so their input
    gradients are combined per sample after dividing each by its own L2 norm over (C, H, W):

        step direction = sign( g_obj / ||g_obj|| - beta * g_md / ||g_md|| )

    `beta` is therefore scale-free: 1 weighs "attack" and "hide" equally, 0 is the plain attack
    (bit-identical to it, the MD is not even computed), and a zero gradient stays zero. An attack
    changes neither the model's parameters' `.grad` nor its mode nor its buffers.

    >>> import torch
    >>> from attacker_sim.attacks import Budget, PGDDelusive
    >>> from service.core.defense.discrepancy import memorization_discrepancy
    >>> _ = torch.manual_seed(0)
    >>> net, aux = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    >>> x, y = torch.rand(64, 4), torch.randint(0, 3, (64,))
    >>> budget = Budget(epsilon=0.2, steps=4, step_size=0.05)
    >>> md = {beta: memorization_discrepancy(aux, net, PGDDelusive(budget, auxiliary=aux, beta=beta)(net, x, y)).mean()
    ...       for beta in (0.0, 1.0)}
    >>> bool(md[1.0] < md[0.0])
    True
    """

    default_budget = Budget()

    def __init__(
        self,
        budget: Budget | None = None,
        *,
        model_mode: ModelMode = "eval",
        random_start: bool = False,
        auxiliary: nn.Module | None = None,
        beta: float = 0.0,
    ):
        if budget is not None and not isinstance(budget, Budget):
            raise TypeError(f"budget must be a Budget, got {type(budget).__name__}")
        if model_mode not in MODEL_MODES:
            raise ValueError(f"model_mode must be one of {MODEL_MODES}, got {model_mode!r}")
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"beta (weight of the discrepancy term) must be a finite number >= 0, got {beta}")
        if beta > 0 and auxiliary is None:
            raise ValueError(f"beta={beta} > 0 needs the defender's auxiliary model (auxiliary=...)")
        self.budget = budget if budget is not None else self.default_budget
        self.model_mode: ModelMode = model_mode
        self.random_start = random_start
        self.auxiliary = auxiliary
        self.beta = float(beta)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.budget}, model_mode={self.model_mode!r}, beta={self.beta})"

    @abstractmethod
    def _objective(self, model: nn.Module, x: torch.Tensor, *context) -> Objective:
        """The function of x' to maximise; runs in crafting mode, so constant parts can be computed here."""

    @contextmanager
    def _crafting(self, model: nn.Module) -> Iterator[None]:
        with ExitStack() as stack:
            stack.enter_context(torch.enable_grad())  # callers may hold no_grad; crafting needs gradients
            # attention by its math kernel: the fused ones have no second derivative, which the gradient-matching
            # attacks take through the model's parameter gradients (a user's transformer failed there)
            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            stack.enter_context(model_in_mode(model, self.model_mode))
            if self.auxiliary is not None:
                stack.enter_context(eval_mode(self.auxiliary))
            yield

    def _start(self, x: torch.Tensor) -> torch.Tensor:
        if not self.random_start:
            return x.clone()
        eps = self.budget.epsilon
        return self.budget.project(x + torch.empty_like(x).uniform_(-eps, eps), x)

    def _perturb(self, model: nn.Module, x: torch.Tensor, *context) -> torch.Tensor:
        """Craft on the model's device (inputs anywhere); the result goes back to where `x` was."""
        budget = self.budget
        home, device = x.device, model_device(model)
        x = x.detach().to(device)
        context = _on(device, context)
        with self._crafting(model), _second_derivatives_named(self):
            objective = self._objective(model, x, *context)
            x_adv = self._start(x)
            for _ in range(budget.steps):
                x_adv.requires_grad_(True)
                value, logits = objective(x_adv)
                if self.beta > 0:
                    # the MD shares the model's forward (logits) with the objective: keep that graph
                    (grad,) = torch.autograd.grad(value, x_adv, retain_graph=True)
                    # summed, not averaged: each row then gets its own sample's MD gradient, unscaled by N
                    discrepancy = divergence_from_logits(self.auxiliary(x_adv), logits, "kl").sum()
                    (md_grad,) = torch.autograd.grad(discrepancy, x_adv)
                    grad = per_sample_unit(grad) - self.beta * per_sample_unit(md_grad)
                else:
                    (grad,) = torch.autograd.grad(value, x_adv)
                x_adv = budget.project(x_adv + budget.step_size * grad.sign(), x)
        return x_adv.detach().to(home)


@contextmanager
def _second_derivatives_named(attack) -> Iterator[None]:
    """torch's error for an operation without a second derivative (MobileNetV3's hardsigmoid, for one), said in
    the attack's terms: only the attacks that differentiate a parameter gradient meet it."""
    try:
        yield
    except RuntimeError as exc:
        if "derivative for" not in str(exc) or "not implemented" not in str(exc):
            raise
        raise RuntimeError(f"{type(attack).__name__} differentiates the model's parameter gradient (a second "
                           f"derivative), which an operation of this model lacks ({exc}); the first-order attacks "
                           f"(pgd, trades_kl, cw_inf) and every defense work with it") from exc


def _on(device: torch.device, value):
    """`value` with every tensor in it (nested in tuples, as batches are) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_on(device, item) for item in value)
    return value


class ErrorMaximizingAttack(SignedGradientAttack):
    """An attack called on a labelled batch alone: `attack(model, x, y) -> x_adv`."""

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Perturbed copy of `x`, within `budget.epsilon` of it and inside [0, 1]."""
        return self._perturb(model, x, y)
