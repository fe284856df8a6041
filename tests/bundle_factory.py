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


class _TiedMLP(nn.Module):
    """Two hidden layers that share one weight matrix (tied weights: two names in the state dict, one tensor)."""

    def __init__(self, features: int, classes: int, hidden: int):
        super().__init__()
        self.inp = nn.Linear(features, hidden)
        self.first, self.second = nn.Linear(hidden, hidden), nn.Linear(hidden, hidden)
        self.second.weight = self.first.weight
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = self.inp(x).relu()
        return self.out(self.second(self.first(h).relu()).relu())


def tied_mlp(features: int, classes: int, hidden: int = 8) -> nn.Module:
    """A perceptron with tied weights, as a user's network may have them."""
    return _TiedMLP(features, classes, hidden)


class _SpareHead(nn.Module):
    """A perceptron with a second head its forward never uses (its author trains it elsewhere): a parameter that
    no loss of this network reaches."""

    def __init__(self, features: int, classes: int, hidden: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(features, hidden), nn.ReLU())
        self.head, self.spare = nn.Linear(hidden, classes), nn.Linear(hidden, classes)

    def forward(self, x):
        return self.head(self.body(x))


def spare_head_mlp(features: int, classes: int, hidden: int = 8) -> nn.Module:
    """A perceptron with a parameter outside its forward."""
    return _SpareHead(features, classes, hidden)


def tiny_bn_mlp(features: int, classes: int, hidden: int = 8) -> nn.Module:
    """A perceptron with BatchNorm over its hidden features: in training it needs two samples or more a batch."""
    return nn.Sequential(nn.Linear(features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, classes))
