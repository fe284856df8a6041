"""What "the same decision again" means when a learner is restored, copied or made ready, per device.

On CPU the kernels these tests run are deterministic: reruns are compared exactly (or within what a test names).
On CUDA, kernels that sum with atomics (convolution and linear-layer gradients) reorder their sums from run to run,
and the gate's threshold, a quantile of differences of probe losses, carries that noise amplified: a learner and
its restored copy drew thresholds 0.02-0.2% apart on an H100 (digits, 2026-11-27), losses about 1e-7 apart.
There reruns are compared within CUDA_RELATIVE.
"""

from __future__ import annotations

import pytest
import torch

CUDA_RELATIVE = 5e-3


def assert_reproduced(actual, expected, device: torch.device, cpu_relative: float = 0.0) -> None:
    """`actual` equals `expected` (numbers, and lists, tuples and dicts of them) as a rerun on `device` can.

    >>> assert_reproduced([0.1, {"t": 0.2}], [0.1, {"t": 0.2}], torch.device("cpu"))
    >>> assert_reproduced([0.1, {"t": 0.2}], [0.1, {"t": 0.2002}], torch.device("cuda"))
    >>> assert_reproduced([0.1, {"t": 0.2}], [0.1, {"t": 0.2002}], torch.device("cpu"))
    Traceback (most recent call last):
    ...
    AssertionError: [0.1, {'t': 0.2}] != [0.1, {'t': 0.2002}] (relative 0 on cpu)
    >>> assert_reproduced([0.1, {"t": 0.2}], [0.1, {"t": 0.21}], torch.device("cuda"))
    Traceback (most recent call last):
    ...
    AssertionError: [0.1, {'t': 0.2}] != [0.1, {'t': 0.21}] (relative 0.005 on cuda)
    >>> assert_reproduced(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001]), torch.device("cuda"))
    >>> assert_reproduced(torch.tensor([1.0, 2.0]), torch.tensor([1.0, 2.001]), torch.device("cpu"))
    Traceback (most recent call last):
    ...
    AssertionError: tensor([1., 2.]) != tensor([1.0000, 2.0010]) (relative 0 on cpu)
    """
    relative = cpu_relative if device.type == "cpu" else CUDA_RELATIVE
    if not _close(actual, expected, relative):
        raise AssertionError(f"{actual!r} != {expected!r} (relative {relative:g} on {device})")


def _close(a, b, relative: float) -> bool:
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_close(a[key], b[key], relative) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_close(x, y, relative) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if not relative:
            return torch.equal(a, b)
        return bool(torch.allclose(a, b, rtol=relative, atol=relative * float(b.abs().max()) if b.numel() else 0.0))
    if relative and isinstance(a, float) and isinstance(b, float):
        return a == pytest.approx(b, rel=relative, abs=1e-6)
    return a == b
