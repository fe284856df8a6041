"""Pick the compute device (CUDA when present, CPU otherwise, unless the config names one), and find a model's."""

from __future__ import annotations

import torch
from torch import nn

_EXPECTED = "expected auto (CUDA when present), cpu, cuda, cuda:N or mps"


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` -> cuda if available else cpu; any other name is checked to be usable.

    Every refusal is a ValueError that names the device and what would work instead.

    >>> resolve_device("cpu")
    device(type='cpu')
    >>> resolve_device("nosuch")
    Traceback (most recent call last):
    ...
    ValueError: unknown device 'nosuch'; expected auto (CUDA when present), cpu, cuda, cuda:N or mps
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:  # torch's message lists every backend it was built with
        raise ValueError(f"unknown device {name!r}; {_EXPECTED}") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but CUDA is not available on this machine; "
                             "use auto (CUDA when present) or cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {name!r} asked for, but MPS is not available on this machine; use auto or cpu")
    return device


def model_device(model: nn.Module) -> torch.device:
    """Where `model`'s parameters live: functions that take a model and a batch move the batch there.

    >>> model_device(nn.Linear(2, 2))
    device(type='cpu')
    """
    return next(model.parameters()).device
