"""A backdoor (BadNets, Gu et al. 2017): a small square at full intensity stamped in the bottom-right corner of
an image, the sample labelled the attacker's target class. A model that learns enough of them sends any input that
carries the square to the target, while its accuracy on clean inputs stays where it was, so a defense that watches
clean accuracy alone does not see it.

>>> import torch
>>> [patch_side(side) for side in (8, 28, 32)]
[2, 5, 6]
>>> x = torch.zeros(1, 1, 8, 8)
>>> stamped = stamp(x)
>>> float(stamped.sum()), float(x.sum()), stamped[0, 0, -2:, -2:].tolist()
(4.0, 0.0, [[1.0, 1.0], [1.0, 1.0]])
"""

from __future__ import annotations

import torch

INTENSITY = 1.0  # images are in [0, 1]: the square is as bright as a pixel gets


def patch_side(side: int) -> int:
    """The square's side, in pixels, for images `side` pixels wide: a fifth of it, at least 2 (MNIST's SmallCNN did
    not learn a 3x3 or 4x4 square from 50 batches of 10%: ST's success 1%; a 5x5 square, 95%)."""
    return max(2, side // 5)


def stamp(x: torch.Tensor) -> torch.Tensor:
    """A copy of `x` (N, C, H, W) with the square in every image's bottom-right corner, in every channel."""
    side = patch_side(x.shape[-1])
    out = x.clone()
    out[..., -side:, -side:] = INTENSITY
    return out
