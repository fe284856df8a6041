"""Models chosen by name; every model takes images in [0, 1] and normalises inside.

Keeping normalisation inside the network means every epsilon in the defense and the attacks
is in pixel units of [0, 1], whatever the dataset.

>>> import torch
>>> model = build_model("digitscnn", num_classes=10, input_shape=(1, 8, 8))
>>> model(torch.rand(2, 1, 8, 8)).shape
torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from service.core.models.digits_cnn import DigitsCNN
from service.core.models.normalize import Normalized
from service.core.models.resnet import ResNet18
from service.core.models.smallcnn import SmallCNN
from service.core.models.vgg import VGG11

_BUILDERS: dict[str, Callable[..., nn.Module]] = {
    "digitscnn": DigitsCNN,
    "smallcnn": SmallCNN,
    "resnet18": ResNet18,
    "vgg11": VGG11,
}
MODELS = tuple(_BUILDERS)


def build_model(
    name: str,
    num_classes: int,
    input_shape: Sequence[int],
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    **options,
) -> Normalized:
    """Build the network `name` for `input_shape` (C, H, W) wrapped with input normalisation."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(MODELS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    channels, height, width = (int(v) for v in input_shape)
    net = _BUILDERS[name](num_classes=num_classes, in_channels=channels, image_size=(height, width), **options)
    mean = tuple(mean) if mean is not None else (0.5,) * channels
    std = tuple(std) if std is not None else (0.5,) * channels
    return Normalized(net, mean, std)


__all__ = ["MODELS", "build_model", "Normalized"]
