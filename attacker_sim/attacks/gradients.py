"""Parameter-space gradient helpers shared by the gradient-matching attacks (trigger, accumulative).

Gradients are lists with one tensor per trainable parameter tensor, in `model.parameters()` order;
similarities are summed per tensor, as in Pang et al. (one cosine per layer weight or bias).

>>> import torch
>>> a = [torch.tensor([3.0, 4.0]), torch.tensor([1.0])]
>>> cosine_sum(a, a).item()
2.0
>>> [t.tolist() for t in normalized(a)]
[[0.6000000238418579, 0.800000011920929], [1.0]]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

# Added to each tensor's norm so an all-zero gradient normalises to zero instead of NaN.
NORM_EPS = 1e-12


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an SGD step would move: the space the gradients live in."""
    return [p for p in model.parameters() if p.requires_grad]


def loss_gradients(
    logits: torch.Tensor, y: torch.Tensor, params: Sequence[torch.Tensor], create_graph: bool = False
) -> list[torch.Tensor]:
    """grad_theta CE(logits, y) per parameter tensor, via autograd.grad so no `.grad` is touched.

    `create_graph=True` keeps the graph for a second differentiation (wrt inputs or parameters).
    """
    # materialize_grads: a parameter the loss does not reach gets a zero gradient, not None
    grads = torch.autograd.grad(F.cross_entropy(logits, y), params, create_graph=create_graph, materialize_grads=True)
    return list(grads)


def normalized(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor divided by its own L2 norm (+NORM_EPS)."""
    return [t / (t.norm() + NORM_EPS) for t in tensors]


def alignment(directions: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l <directions_l, targets_l>, a scalar tensor."""
    return sum((d * t).sum() for d, t in zip(directions, targets, strict=True))


def cosine_sum(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    """sum_l cos(a_l, b_l): the per-tensor gradient similarity both gradient-matching attacks use."""
    return alignment(normalized(a), normalized(b))
