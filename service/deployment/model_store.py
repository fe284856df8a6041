"""How the current online model travels from the worker to the API (and to white-box attackers).

The worker publishes the weights as safetensors bytes with the model spec and version in the
metadata; the API keeps one built copy and rebuilds it only when the published version changes.

>>> from service.core.models import build_model
>>> spec = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}
>>> published = model_from_bytes(weights_to_bytes(build_model(**spec), version=3, spec=spec))
>>> published.version, published.spec["name"]
(3, 'digitscnn')
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from torch import nn

from service.core.bundle.architecture import build_model_from_spec
from service.core.models.inference import logits_in_chunks
from service.core.tied_tensors import storable


@dataclass(frozen=True)
class PublishedModel:
    """One published version: the model in eval mode on the CPU, its spec and its safetensors bytes."""

    version: int
    spec: dict
    model: nn.Module
    weights: bytes

    def predict(self, x: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Labels for x in [0, 1], computed as `OnlineLearner.predict` does."""
        return logits_in_chunks(self.model, x, batch_size).argmax(1)


def weights_to_bytes(model: nn.Module, version: int, spec: dict) -> bytes:
    return save_tensors(storable(model.state_dict()),
                        metadata={"model_version": str(version), "model_spec": json.dumps(spec)})


def model_from_bytes(weights: bytes) -> PublishedModel:
    """Rebuild a published model (the spec and version travel in the safetensors metadata; a bundle's spec
    rebuilds its architecture, so a factory's package must be importable where this runs)."""
    header_length = int.from_bytes(weights[:8], "little")
    metadata = json.loads(weights[8 : 8 + header_length]).get("__metadata__", {})
    spec = json.loads(metadata["model_spec"])
    with torch.random.fork_rng(devices=[]):  # random init is overwritten: leave the caller's RNG stream as it was
        model = build_model_from_spec(spec)
    model.load_state_dict(load_tensors(weights))
    return PublishedModel(int(metadata["model_version"]), spec, model.eval(), weights)


class ModelStore:
    """The API's view of the worker's model: fetched from the queue when its version changes."""

    def __init__(self, queue, spec_ttl_seconds: float = 5.0):
        self.queue = queue
        self.spec_ttl_seconds = spec_ttl_seconds
        self._current: PublishedModel | None = None
        self._spec: tuple[float, dict] | None = None
        self._lock = threading.Lock()

    def spec(self) -> dict | None:
        """The model spec (input shape, classes), re-read from the queue at most every `spec_ttl_seconds`."""
        now = time.monotonic()
        if self._spec is None or now - self._spec[0] > self.spec_ttl_seconds:
            spec = self.queue.model_spec()
            if spec is None:
                return None
            self._spec = (now, spec)
        return self._spec[1]

    def current(self) -> PublishedModel | None:
        """The newest published model, or None before the worker has published one."""
        version = self.queue.model_version()
        if version is None:
            return None
        current = self._current
        if current is not None and current.version == version:
            return current
        with self._lock:
            if self._current is None or self._current.version != version:
                published = self.queue.model_weights()
                if published is None:
                    return None
                self._current = model_from_bytes(published[1])
            return self._current
