"""Find the part of a model that computes the same thing in train and eval mode.

A convolutional trunk without dropout or batch norm gives identical features in both modes, so
the defense can run it once per batch: its eval-mode head output feeds the Memorization
Discrepancy and its train-mode head output feeds the update. That saves one full forward of the
current model per stream step (the issue's cost target), and changes no number.
"""

from __future__ import annotations

from torch import nn

from service.core.models.normalize import Normalized

_MODE_DEPENDENT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                   nn.modules.batchnorm._NormBase)


class Trunk(nn.Module):
    """Normalisation + the mode-invariant feature extractor of a `Normalized` model."""

    def __init__(self, model: Normalized):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model.net.features((x - self.model.mean) / self.model.std)


def split_mode_invariant(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(trunk, head) when `model` is a `Normalized` net with a `features` part free of dropout and
    batch norm and a `classifier` head; None otherwise (then nothing can be shared)."""
    net = getattr(model, "net", None)
    features, head = getattr(net, "features", None), getattr(net, "classifier", None)
    if not isinstance(model, Normalized) or features is None or head is None:
        return None
    if any(isinstance(m, _MODE_DEPENDENT) for m in features.modules()):
        return None
    return Trunk(model), head
