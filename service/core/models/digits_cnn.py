"""A small CNN for 8x8 digits: the embedded default's model, trains in seconds on a CPU."""

from __future__ import annotations

from torch import nn


class DigitsCNN(nn.Sequential):
    """Two 3x3 convolutions, one 2x2 pool, two linear layers."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], width: int = 32):
        height, wide = image_size
        super().__init__(
            nn.Conv2d(in_channels, width // 2, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(width * (height // 2) * (wide // 2), 64),
            nn.ReLU(),
            nn.Linear(64, num_classes),
        )
