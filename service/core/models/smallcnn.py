"""SmallCNN from the TRADES paper (Zhang et al. 2019): 4 convolutions and 3 linear layers."""

from __future__ import annotations

from torch import nn


def _conv_out(size: int) -> int:
    # two unpadded 3x3 convolutions then a 2x2 pool, twice
    for _ in range(2):
        size = (size - 4) // 2
    return size


class SmallCNN(nn.Module):
    """Conv(32)-Conv(32)-Pool-Conv(64)-Conv(64)-Pool-FC(200)-FC(200)-FC(classes)."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int], dropout: float = 0.5):
        super().__init__()
        height, width = (_conv_out(s) for s in image_size)
        if height < 1 or width < 1:
            raise ValueError(f"smallcnn needs images of at least 12x12, got {image_size}")
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * height * width, 200),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
