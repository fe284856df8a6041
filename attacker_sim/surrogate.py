"""The black-box attacker's surrogate: a model of the victim's architecture trained on the attacker's own data.

A black-box attacker (Zhu et al., Table 11) cannot see the victim's weights, so it crafts against
a surrogate of its own. Only a trained surrogate makes that row meaningful: an untrained network's
gradients say nothing about the victim. The surrogate here knows the architecture (a `model_spec`
as `service.core.models.build_model` takes it) and nothing else: it starts from its own seeded
initialisation and learns from the attacker's samples only.

>>> import torch
>>> _ = torch.manual_seed(0)
>>> x = torch.rand(40, 1, 8, 8)
>>> y = (x.mean(dim=(1, 2, 3)) > 0.5).long()  # a learnable rule: bright images are class 1
>>> spec = {"name": "digitscnn", "num_classes": 2, "input_shape": [1, 8, 8]}
>>> surrogate = train_surrogate(spec, x, y, epochs=30, lr=0.05, batch_size=10, seed=0)
>>> surrogate.training, surrogate_accuracy(surrogate, x, y) > 0.9
(False, True)
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from service.core.bundle.architecture import build_model_from_spec
from service.core.defense.eval_mode import eval_mode
from service.core.device import model_device
from service.core.randomness import seeded_draws

SGD_MOMENTUM = 0.9


def _check_data(x: torch.Tensor, y: torch.Tensor, what: str, input_shape=None, num_classes=None) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or not x.is_floating_point():
        raise ValueError(f"{what} images must be a float tensor [N, C, H, W] in [0, 1], got "
                         f"{getattr(x, 'dtype', type(x).__name__)} of shape {tuple(getattr(x, 'shape', ()))}")
    if len(x) == 0:
        raise ValueError(f"{what} data is empty: at least one labelled sample is needed")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or len(y) != len(x):
        raise ValueError(f"{what} labels must be a 1-d tensor with one label per image ({len(x)}), "
                         f"got shape {tuple(getattr(y, 'shape', ()))}")
    if input_shape is not None and tuple(x.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{what} images are {tuple(x.shape[1:])} but the model_spec's input_shape is "
                         f"{tuple(input_shape)}")
    if num_classes is not None and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"{what} labels must be in [0, {num_classes - 1}] (num_classes={num_classes}), "
                         f"got {int(y.min())}..{int(y.max())}")


def train_surrogate(
    model_spec: dict,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    weight_decay: float = 0.0,
    device: torch.device | str = "cpu",
) -> nn.Module:
    """A fresh `build_model(**model_spec)` trained on (x, y) only; returned in eval mode on `device`.

    Plain SGD (momentum 0.9, constant `lr`), cross-entropy, `epochs` passes over the data in a
    seeded shuffled order. Initialisation, order and any dropout all follow `seed`, inside a forked
    RNG: the same call gives the same weights, and the caller's global RNG state is left as it was.
    The parameters keep `requires_grad` (the gradient-matching attacks differentiate through them).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an integer >= 1, got {epochs!r}")
    if not (math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr (learning rate) must be a finite number > 0, got {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not (math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if not isinstance(model_spec, dict) or not {"name", "num_classes", "input_shape"} <= set(model_spec):
        raise ValueError(f"model_spec must be a dict with name, num_classes and input_shape, got {model_spec!r}")
    _check_data(x, y, "surrogate training", model_spec["input_shape"], model_spec["num_classes"])
    device = torch.device(device)
    with seeded_draws(device, seed):
        model = build_model_from_spec(model_spec).to(device)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=SGD_MOMENTUM, weight_decay=weight_decay)
        order_generator = torch.Generator().manual_seed(seed)
        model.train()
        for _ in range(epochs):
            for idx in torch.randperm(len(x), generator=order_generator).split(batch_size):
                optimizer.zero_grad(set_to_none=True)
                F.cross_entropy(model(x[idx].to(device)), y[idx].to(device)).backward()
                optimizer.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


@torch.no_grad()
def surrogate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1024) -> float:
    """Top-1 accuracy of `model` on (x, y), in eval mode (the model's mode is restored after)."""
    _check_data(x, y, "evaluation")
    device = model_device(model)
    correct = 0
    with eval_mode(model):
        for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
            correct += int((model(xb.to(device)).argmax(dim=1).cpu() == yb.cpu()).sum())
    return correct / len(y)


__all__ = ["surrogate_accuracy", "train_surrogate"]
