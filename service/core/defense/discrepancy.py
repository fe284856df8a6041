"""Memorization Discrepancy: how far the current model's prediction moved from a frozen checkpoint's.

MD(x) = D(softmax f(x; theta_aux), softmax f(x; theta_t)) per sample (Zhu et al., ICML 2023).
Poisons crafted against the current model move its prediction away from what the historical
(auxiliary) model memorised, so they score higher than clean samples.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from service.core.defense.eval_mode import eval_mode
from service.core.device import model_device

DIVERGENCES = ("kl", "reverse_kl", "js")


def divergence_from_logits(aux_logits: torch.Tensor, cur_logits: torch.Tensor, kind: str = "kl") -> torch.Tensor:
    """Per-row divergence between the softmax of two logit tensors [N, classes] -> [N].

    `kl` is KL(p_aux || p_cur) (the paper's choice), `reverse_kl` is KL(p_cur || p_aux), and
    `js` is the Jensen-Shannon divergence (natural log, bounded by ln 2).
    """
    log_p_aux = F.log_softmax(aux_logits.float(), dim=1)
    log_p_cur = F.log_softmax(cur_logits.float(), dim=1)
    if kind == "kl":
        return _kl(log_p_aux, log_p_cur)
    if kind == "reverse_kl":
        return _kl(log_p_cur, log_p_aux)
    if kind == "js":
        log_m = torch.logsumexp(torch.stack([log_p_aux, log_p_cur]), dim=0) - math.log(2.0)
        return 0.5 * (_kl(log_p_aux, log_m) + _kl(log_p_cur, log_m))
    raise ValueError(f"unknown divergence {kind!r}; expected one of {', '.join(DIVERGENCES)}")


def _kl(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    # clamp: tiny negative values from rounding would read as "less than identical"
    return (log_p.exp() * (log_p - log_q)).sum(dim=1).clamp_min(0.0)


@torch.no_grad()
def memorization_discrepancy(
    aux: nn.Module, model: nn.Module, x: torch.Tensor, divergence: str = "kl", batch_size: int = 1024
) -> torch.Tensor:
    """Per-sample Memorization Discrepancy of `x` between `aux` (frozen) and `model` (current).

    Both forwards run in eval mode without gradients; the modules' modes are restored after.

    >>> import torch
    >>> net = torch.nn.Linear(4, 3)
    >>> memorization_discrepancy(net, net, torch.rand(5, 4)).tolist()
    [0.0, 0.0, 0.0, 0.0, 0.0]
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; expected one of {', '.join(DIVERGENCES)}")
    scores, device = [], model_device(model)
    with eval_mode(aux, model):
        for start in range(0, len(x), batch_size):
            chunk = x[start : start + batch_size].to(device)
            scores.append(divergence_from_logits(aux(chunk), model(chunk), divergence))
    return torch.cat(scores) if scores else x.new_zeros(0, device=device)
