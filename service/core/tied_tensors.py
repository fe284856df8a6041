"""A model's tensors as safetensors keeps them, tied weights included.

A network may give one tensor two names (tied weights: `decoder.weight = encoder.weight`). safetensors refuses to
write tensors that share memory, and `safetensors.torch.save_model`, which users write such a network with, keeps one
name of each tie and leaves the others out. So what is written stores each name as its own copy (`storable`), and
what is read has the left-out names of a tie filled in from the one given (`with_tied_names`).

>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
>>> net[1].weight = net[0].weight
>>> stored = storable(net.state_dict())
>>> stored["0.weight"].data_ptr() != stored["1.weight"].data_ptr()
True
>>> given = {name: value for name, value in stored.items() if name != "1.weight"}  # as save_model writes it
>>> sorted(set(with_tied_names(net, given)) - set(given))
['1.weight']
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def storable(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors for safetensors; a tensor whose memory an earlier one already holds (a tied
    weight's second name, a view) is stored as a copy of its own."""
    stored: dict[str, torch.Tensor] = {}
    held: set[int] = set()
    for name, tensor in tensors.items():
        value = tensor.detach().cpu().contiguous()
        memory = value.untyped_storage().data_ptr()
        if memory in held:
            value = value.clone()
        held.add(value.untyped_storage().data_ptr())
        stored[name] = value
    return stored


def with_tied_names(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with every name of `module`'s state dict that shares its tensor with a given name filled in from
    it; nothing else added (a name missing for another reason stays missing, for the caller to report)."""
    ties: dict[int, list[str]] = {}
    for name, value in module.state_dict(keep_vars=True).items():
        ties.setdefault(id(value), []).append(name)
    filled = dict(tensors)
    for names in ties.values():
        given = next((name for name in names if name in tensors), None)
        if given is not None:
            for name in names:
                filled.setdefault(name, tensors[given])
    return filled
