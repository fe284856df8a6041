"""VGG-11 with batch norm, CIFAR variant (one linear classifier after global pooling)."""

from __future__ import annotations

from torch import nn

_CONFIG = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M")


class VGG11(nn.Module):
    """Eight 3x3 convolutions with batch norm and five max-pools, then a linear layer."""

    def __init__(self, num_classes: int, in_channels: int, image_size: tuple[int, int]):
        super().__init__()
        del image_size  # the adaptive pool makes the head independent of the input size
        layers: list[nn.Module] = []
        channels = in_channels
        for item in _CONFIG:
            if item == "M":
                layers.append(nn.MaxPool2d(2, ceil_mode=True))
            else:
                layers += [nn.Conv2d(channels, item, 3, padding=1), nn.BatchNorm2d(item), nn.ReLU()]
                channels = item
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))

    def forward(self, x):
        return self.head(self.features(x))
