"""Build the network a manifest names: a built-in of `service.core.models`, a torchvision classifier, or a user factory.

Every model takes inputs in the manifest's value range and normalises inside itself, as the built-ins always have:
a built-in comes wrapped by `build_model`, a torchvision network or a factory's module is wrapped in `Normalized`
when the manifest declares `model.normalization` (a factory may also normalise in its own module). No weights are
fetched from anywhere: torchvision builds with `weights=None`, and the bundle's files fill the parameters.

A factory is imported by its path and called with the manifest's kwargs and nothing else; a bundle carries no code,
so the package must be installed where the bundle is loaded (as with MLServer's `implementation`).

A learner serving a bundle keeps `bundle_model_spec(manifest)` as its model spec: `build_model_from_spec` rebuilds the
network from it (and a built-in's from `build_model`'s arguments), and `input_box` reads the bounds its inputs must
stay in.

>>> from service.core.bundle.manifest import BundleManifest
>>> manifest = BundleManifest(schema_version=1, model={"architecture": "digitscnn"},
...                           input={"shape": [1, 8, 8], "num_classes": 10})
>>> type(build_network(manifest, "bundle.json")).__name__
'Normalized'
"""

from __future__ import annotations

import importlib
from pathlib import Path

import torch
from torch import nn

from service.core.bundle.manifest import SCHEMA_VERSION, TORCHVISION_PREFIX, BundleError, BundleManifest
from service.core.defense.eval_mode import eval_mode
from service.core.models import Normalized, build_model

_PROBE_SAMPLES = 2  # a forward on two inputs: more than one, so that batch-size-1 reshapes are caught too


def build_network(manifest: BundleManifest, manifest_path: str | Path) -> nn.Module:
    """The manifest's model with freshly initialised weights, shown to map [N, *input.shape] to
    [N, input.num_classes]; a BundleError naming `manifest_path` and the field otherwise."""
    section = manifest.model
    if section.kind == "builtin":
        net = _call(build_model, section.architecture, manifest_path, manifest.model_spec())
    elif section.kind == "torchvision":
        net = _torchvision(section.architecture[len(TORCHVISION_PREFIX):], manifest, manifest_path)
    else:
        net = _factory(section.architecture, section.kwargs, manifest_path)
    if section.kind != "builtin" and section.normalization is not None:
        net = Normalized(net, section.normalization.mean, section.normalization.std)
    _check_forward(net, manifest, manifest_path)
    return net


def _call(builder, architecture: str, manifest_path, kwargs: dict) -> nn.Module:
    try:
        return builder(**kwargs)
    except Exception as exc:  # the constructor of someone else's module: any failure is the manifest's problem
        raise BundleError(manifest_path, "model.kwargs", f"building {architecture} failed: "
                                                         f"{type(exc).__name__}: {exc}") from exc


def _torchvision(name: str, manifest: BundleManifest, manifest_path) -> nn.Module:
    import torchvision.models

    available = torchvision.models.list_models(module=torchvision.models)  # classification models only
    if name not in available:
        raise BundleError(manifest_path, "model.architecture", f"torchvision has no classification model {name!r} "
                                                               f"(e.g. {', '.join(available[:4])}, ...)")
    return _call(torchvision.models.get_model, manifest.model.architecture, manifest_path,
                 {"name": name, "weights": None, "num_classes": manifest.input.num_classes, **manifest.model.kwargs})


def _factory(path: str, kwargs: dict, manifest_path) -> nn.Module:
    module_name, _, function_name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or whatever the module raises while it is imported
        raise BundleError(manifest_path, "model.architecture",
                          f"cannot import {module_name!r} ({type(exc).__name__}: {exc}); a bundle carries no code: "
                          f"install the package that defines {path}") from exc
    factory = getattr(module, function_name, None)
    if not callable(factory):
        raise BundleError(manifest_path, "model.architecture", f"module {module_name!r} has no function "
                                                               f"{function_name!r}")
    net = _call(factory, path, manifest_path, kwargs)
    if not isinstance(net, nn.Module):
        raise BundleError(manifest_path, "model.architecture", f"{path} returned a {type(net).__name__}, not a "
                                                               f"torch.nn.Module")
    return net


def _check_forward(net: nn.Module, manifest: BundleManifest, manifest_path) -> None:
    spec = manifest.input
    low, high = spec.value_range
    x = torch.full((_PROBE_SAMPLES, *spec.shape), (low + high) / 2)
    try:
        with torch.no_grad(), eval_mode(net):
            out = net(x)
    except Exception as exc:  # a shape the network cannot take fails deep inside it, with any exception
        raise BundleError(manifest_path, "input.shape", f"{manifest.model.architecture} cannot take inputs "
                                                        f"[N, {', '.join(map(str, spec.shape))}]: "
                                                        f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (_PROBE_SAMPLES, spec.num_classes):
        got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise BundleError(manifest_path, "input.num_classes", f"{manifest.model.architecture} maps "
                                                              f"{_PROBE_SAMPLES} inputs to {got}, not to "
                                                              f"[{_PROBE_SAMPLES}, {spec.num_classes}] class scores")


# the key of a model spec that holds a bundle's model and input sections (a built-in profile's spec has none)
BUNDLE_SPEC_KEY = "bundle"


def bundle_model_spec(manifest: BundleManifest) -> dict:
    """The model spec a learner, its checkpoints and the published model keep for a bundle's network: the name,
    class count and input shape every model spec has, plus the manifest's model and input sections, from which
    `build_model_from_spec` rebuilds it (the bundle directory is not needed again).

    >>> from service.core.bundle.manifest import BundleManifest
    >>> manifest = BundleManifest(schema_version=1, model={"architecture": "tests.bundle_factory:tiny_mlp",
    ...     "kwargs": {"features": 3, "classes": 2}}, input={"shape": [3], "num_classes": 2,
    ...     "feature_bounds": [[0, 1], [0.2, 0.5], [0, 0.5]]})
    >>> spec = bundle_model_spec(manifest)
    >>> spec["name"], spec["input_shape"], type(build_model_from_spec(spec)).__name__
    ('tests.bundle_factory:tiny_mlp', [3], 'Sequential')
    """
    return {"name": manifest.model.architecture, "num_classes": manifest.input.num_classes,
            "input_shape": list(manifest.input.shape),
            BUNDLE_SPEC_KEY: {"model": manifest.model.model_dump(mode="json"),
                              "input": manifest.input.model_dump(mode="json")}}


def build_model_from_spec(spec: dict) -> nn.Module:
    """A fresh network for a model spec: a bundle's (`bundle_model_spec`) or a built-in's (`build_model`'s
    arguments, as a profile's burn-in keeps them)."""
    if BUNDLE_SPEC_KEY not in spec:
        return build_model(**spec)
    sections = spec[BUNDLE_SPEC_KEY]
    manifest = BundleManifest(schema_version=SCHEMA_VERSION, model=sections["model"], input=sections["input"])
    return build_network(manifest, f"model spec of {spec['name']}")


def input_box(spec: dict) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The box every input value must stay in, as (low, high) tensors shaped like one input, when a bundle's
    spec declares one other than [0, 1] (per-feature bounds, or a value range); None for [0, 1].

    >>> spec = {"name": "m", "num_classes": 2, "input_shape": [2], "bundle": {"model": {}, "input": {
    ...     "shape": [2], "value_range": [0, 1], "feature_bounds": [[0, 0.5], [0.25, 1]], "num_classes": 2}}}
    >>> [t.tolist() for t in input_box(spec)]
    [[0.0, 0.25], [0.5, 1.0]]
    """
    section = spec.get(BUNDLE_SPEC_KEY, {}).get("input")
    if section is None:
        return None
    shape = list(section["shape"])
    if section.get("feature_bounds") is not None:
        bounds = torch.tensor(section["feature_bounds"], dtype=torch.float32)
        return bounds[:, 0].reshape(shape), bounds[:, 1].reshape(shape)
    low, high = section.get("value_range", (0.0, 1.0))
    if (low, high) == (0.0, 1.0):
        return None
    return torch.full(shape, float(low)), torch.full(shape, float(high))
