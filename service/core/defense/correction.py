"""Reverse-PGD sample correction: error-minimising signed-gradient steps inside an L-inf ball.

DSC (Algorithm 1 of Zhu et al.) corrects a sample only while its Memorization Discrepancy is
above the threshold P; samples below it are never touched (they stay bit-identical). The research
code stops on the batch-mean discrepancy instead; both are offered. AT corrects every sample for
all K steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from service.core.defense.detector import DiscrepancyDetector
from service.core.defense.discrepancy import divergence_from_logits
from service.core.defense.eval_mode import eval_mode
from service.core.defense.projection import Budget, project_linf

EarlyStop = Literal["sample", "batch", "none"]


@dataclass(frozen=True)
class CorrectionResult:
    """What the correction did to one batch; tensors are per sample."""

    x: torch.Tensor
    discrepancy_before: torch.Tensor | None
    discrepancy_after: torch.Tensor | None
    flagged: torch.Tensor
    steps_taken: torch.Tensor


class ReversePGD:
    """Error-minimising PGD with discrepancy-aware early stopping.

    Budgets are validated once, at construction (like torchattacks); calling the object corrects
    a batch: `x~ <- Proj_{B(x, eps) cap [0,1]}(x~ - step_size * sign(grad_x CE(f(x~), y)))`.

    >>> import torch
    >>> net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 3))
    >>> pgd = ReversePGD(steps=3, step_size=0.05, epsilon=0.1, early_stop="none")
    >>> x = torch.rand(2, 1, 2, 2)
    >>> out = pgd(net, x, torch.tensor([0, 1]))
    >>> bool(((out.x - x).abs() <= 0.1 + 1e-6).all()), out.steps_taken.tolist()
    (True, [3, 3])
    """

    def __init__(self, steps: int = 10, step_size: float = 0.02, epsilon: float = 0.2, early_stop: EarlyStop = "sample",
                 divergence: str = "kl"):
        self.budget = Budget(epsilon=epsilon, steps=steps, step_size=step_size)  # validated as every attack's is
        if early_stop not in ("sample", "batch", "none"):
            raise ValueError(f"early_stop must be 'sample', 'batch' or 'none', got {early_stop!r}")
        self.steps, self.step_size, self.epsilon = steps, step_size, epsilon
        self.early_stop, self.divergence = early_stop, divergence
        self.detector = DiscrepancyDetector(divergence, early_stop) if early_stop != "none" else None
        # where corrected inputs must stay: None is [0, 1]; a served bundle sets its input spec's (low, high) box
        self.box: tuple[torch.Tensor, torch.Tensor] | None = None

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        auxiliary: nn.Module | None = None,
        threshold: float | None = None,
        discrepancy: torch.Tensor | None = None,
    ) -> CorrectionResult:
        """Correct `x`; with early stopping, `auxiliary` and `threshold` decide who is corrected.

        `discrepancy` is the per-sample discrepancy of `x` when the caller has already computed it.
        """
        n = len(x)
        steps_taken = torch.zeros(n, dtype=torch.long, device=x.device)
        x_corrected = x.detach().clone()
        with eval_mode(model, *([auxiliary] if auxiliary is not None else [])):
            if self.early_stop == "none":
                before = after = None
                active = torch.arange(n, device=x.device)
            else:
                if auxiliary is None or threshold is None:
                    raise ValueError("early stopping needs the auxiliary model and a threshold")
                if discrepancy is None:
                    with torch.no_grad():
                        discrepancy = divergence_from_logits(auxiliary(x), model(x), self.divergence)
                before = discrepancy.detach()
                after = before.clone()
                active = self._still_active(after, torch.arange(n, device=x.device), threshold)
            flagged = torch.zeros(n, dtype=torch.bool, device=x.device)
            flagged[active] = True
            for step in range(self.steps + 1):
                if len(active) == 0:
                    break
                x_active = x_corrected[active].requires_grad_(step < self.steps)
                with torch.set_grad_enabled(step < self.steps):
                    logits = model(x_active)
                if step > 0 and after is not None:
                    # the forward we need for the next step also gives the discrepancy of the last one
                    with torch.no_grad():
                        after[active] = divergence_from_logits(auxiliary(x_active.detach()), logits.detach(),
                                                               self.divergence)
                    keep = torch.isin(active, self._still_active(after, active, threshold))
                    active, logits = active[keep], logits[keep]
                if step == self.steps or len(active) == 0:
                    break
                loss = F.cross_entropy(logits, y[active], reduction="sum")
                (grad,) = torch.autograd.grad(loss, x_active)
                if after is not None:
                    grad = grad[keep] if step > 0 else grad
                stepped = x_corrected[active] - self.step_size * grad.sign()
                x_corrected[active] = project_linf(stepped, x[active], self.epsilon, self.box)
                steps_taken[active] += 1
        return CorrectionResult(x_corrected, before, after, flagged, steps_taken)

    def _still_active(self, after, active, threshold):
        # the detector's verdict on the batch as it now stands (batch unit, the research code: every sample
        # keeps moving while the batch mean is above P)
        return active[self.detector.flags(after, threshold)[active]]

