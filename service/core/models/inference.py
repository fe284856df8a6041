"""Forwards over a large tensor in chunks, in eval mode, without gradients: the one way the learner, the
published model and the burn-in predict.

>>> import torch
>>> net = torch.nn.Linear(3, 2)
>>> logits_in_chunks(net, torch.rand(5, 3), batch_size=2).shape
torch.Size([5, 2])
"""

from __future__ import annotations

import torch
from torch import nn

from service.core.defense.eval_mode import eval_mode


@torch.no_grad()
def logits_in_chunks(model: nn.Module, x: torch.Tensor, batch_size: int = 1024,
                     device: torch.device | None = None) -> torch.Tensor:
    """The model's logits for `x`, `batch_size` rows at a time (moved to `device` when given), on x's device."""
    with eval_mode(model):
        chunks = [model(x[i : i + batch_size].to(device) if device is not None else x[i : i + batch_size])
                  for i in range(0, len(x), batch_size)]
    return torch.cat(chunks) if chunks else x.new_zeros((0,))
