"""User factories that tests/test_bundle.py's manifests name by import path, as a user's own package would be named
(`tests.bundle_factory:tiny_mlp`): a bundle carries no code."""

from __future__ import annotations

from torch import nn


def tiny_mlp(features: int, classes: int, hidden: int = 8) -> nn.Module:
    """A two-layer perceptron for feature vectors [features]."""
    return nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def not_a_module(features: int, classes: int) -> dict:
    """A factory gone wrong: it returns the layer sizes instead of a network."""
    return {"features": features, "classes": classes}


def tiny_cnn(channels: int, classes: int, width: int = 8) -> nn.Module:
    """A small convolutional network for images [channels, H, W] of any size: the user's own module."""
    return nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(4 * width, classes))
