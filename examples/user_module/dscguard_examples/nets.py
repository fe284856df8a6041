"""The user's own networks. A bundle names a factory by import path and calls it with the manifest's kwargs; the
bundle carries no code, so this package is installed wherever the bundle is loaded (worker, API, attacker)."""

from __future__ import annotations

from torch import nn


def digits_cnn(classes: int = 10, width: int = 16) -> nn.Module:
    """A small CNN for 8x8 grey images [1, 8, 8]; the bundle adds the input normalisation (--mean/--std)."""
    return nn.Sequential(
        nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
        nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(2 * width * 4 * 4, 64), nn.ReLU(), nn.Linear(64, classes),
    )


def tabular_mlp(features: int, classes: int = 2, hidden: int = 32) -> nn.Module:
    """A two-hidden-layer perceptron for feature vectors [features]."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))
