"""Write and read bundles: the manifest, the weights of the online and auxiliary models, the trusted set.

Tensors are read with `safetensors.torch.load_file` only: a pickle (`.pt`, `.pth`, ...) given where safetensors is
expected is refused by its name, and a `torch.save` file renamed `.safetensors` by its first bytes, before
anything is unpickled. Every check runs the same way when a bundle is created and when it is loaded, and every
refusal is a `BundleError` naming the file (the user's source file, or the bundle's own) and the field.

>>> import tempfile, torch
>>> from service.core.models import build_model
>>> from service.core.bundle.manifest import BundleManifest
>>> manifest = BundleManifest(schema_version=1, model={"architecture": "digitscnn"},
...                           input={"shape": [1, 8, 8], "num_classes": 10})
>>> trusted = (torch.rand(8, 1, 8, 8), torch.arange(8))
>>> with tempfile.TemporaryDirectory() as d:
...     _ = create_bundle(d, manifest, build_model(**manifest.model_spec()), trusted)
...     bundle = load_bundle(d)
>>> bundle.auxiliary is None, bundle.trusted[0].shape
(True, torch.Size([8, 1, 8, 8]))
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_bytes
from torch import nn

from service.core.atomic import atomic_write_text, atomic_writer
from service.core.bundle.architecture import build_network
from service.core.bundle.manifest import (
    AUXILIARY_FILE,
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    OPTIMIZER_STATES,
    PICKLE_SUFFIXES,
    SCHEMA_FILE,
    SCHEMA_VERSION,
    BundleError,
    BundleManifest,
    InputSection,
    read_manifest,
)
from service.core.models import Normalized
from service.core.tied_tensors import storable, with_tied_names

Tensors = Mapping[str, torch.Tensor]
OptimizerState = dict[str, dict[str, torch.Tensor]]  # parameter name -> {"momentum_buffer": tensor}
# the first bytes of what torch.save writes (a zip archive) and of a bare pickle (protocol 2 and later)
_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
_SHOWN_NAMES = 3  # tensor names listed in a mismatch message before "..."


@dataclass
class LoadedBundle:
    """A bundle checked and ready: its manifest, the online model, the auxiliary (or None), the trusted set, and
    the stream optimizer's state to start from (or None: a fresh optimizer)."""

    directory: Path
    manifest: BundleManifest
    model: nn.Module
    auxiliary: nn.Module | None
    trusted: tuple[torch.Tensor, torch.Tensor]  # x float32 [N, *input.shape], y int64 [N], on the CPU
    optimizer_state: OptimizerState | None = None  # on the CPU; `apply_optimizer_state` puts it in an optimizer


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a BundleError when it is missing, a pickle, or not safetensors."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise BundleError(path, None, "a pickle file is never loaded: give a .safetensors file "
                                      "(safetensors.torch.save_file(model.state_dict(), path) writes one)")
    try:
        with path.open("rb") as fh:
            head = fh.read(9)  # safetensors: an 8-byte header length, then the JSON header
    except FileNotFoundError:
        raise BundleError(path, None, "missing") from None
    except OSError as exc:
        raise BundleError(path, None, f"cannot be read: {exc}") from exc
    if head[8:9] != b"{" and head.startswith(_PICKLE_MAGIC):
        raise BundleError(path, None, "holds a pickle (torch.save), not safetensors: it is never loaded; "
                                      "write it with safetensors.torch.save_file")
    try:
        # copies: load_file's tensors may map the file, and a file rewritten in place under a mapping is a SIGBUS
        return {name: tensor.clone() for name, tensor in load_file(path).items()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise BundleError(path, None, f"not a readable safetensors file: {exc}") from exc


def read_trusted(path: str | Path) -> dict[str, torch.Tensor]:
    """A trusted set from the user: tensors x and y in a .safetensors file, or arrays x and y in an .npz (read
    without pickle). Checked against the input spec later, by `check_trusted`."""
    path = Path(path)
    if path.suffix.lower() != ".npz":
        return read_tensors(path)
    try:
        with np.load(path, allow_pickle=False) as arrays:
            return {name: torch.from_numpy(arrays[name]) for name in arrays.files}
    except FileNotFoundError:
        raise BundleError(path, None, "missing") from None
    except (OSError, ValueError) as exc:  # ValueError: an object array, which only a pickle could read
        raise BundleError(path, None, f"not a readable .npz of numeric arrays: {exc}") from exc


def load_weights(model: nn.Module, tensors: Tensors, file: str | Path, manifest: BundleManifest) -> nn.Module:
    """Load `tensors` into `model` after checking names, shapes, finite values and the normalisation the manifest
    declares; a BundleError naming `file` and the tensor otherwise."""
    expected = model.state_dict()
    architecture = manifest.model.architecture
    tensors = with_tied_names(model, tensors)  # a tie written once (safetensors.torch.save_model) is read as a tie
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"{label} {_few(names)}" for label, names in (("missing", missing), ("unexpected", unexpected))
                 if names]
        raise BundleError(file, (missing or unexpected)[0], f"tensor names do not match {architecture}: "
                                                            f"{'; '.join(parts)}")
    for name, reference in expected.items():
        _check_tensor(tensors[name], reference, file, name, architecture)
    if isinstance(model, Normalized):  # its mean and std buffers come from the manifest: the file must agree
        undeclared = " (not declared: the built-ins' default)" if manifest.model.normalization is None else ""
        for name in ("mean", "std"):
            if not torch.allclose(tensors[name].float().cpu(), expected[name].cpu()):
                raise BundleError(file, name, f"{_values(tensors[name])} differs from the manifest's normalisation, "
                                              f"model.normalization.{name} = {_values(expected[name])}{undeclared}")
    model.load_state_dict(tensors)
    return model


def check_optimizer_state(tensors: Tensors, model: nn.Module, file: str | Path,
                          manifest: BundleManifest) -> OptimizerState:
    """The stream optimizer's state from `momentum_buffer.<parameter name>` tensors, checked against `model`'s
    parameters (every key names one, same shape, finite floating-point values; parameters left out start fresh);
    a BundleError naming `file` and the key otherwise.

    >>> from service.core.models import build_model
    >>> manifest = BundleManifest(schema_version=2, model={"architecture": "digitscnn"},
    ...                           input={"shape": [1, 8, 8], "num_classes": 10})
    >>> net = build_model(**manifest.model_spec())
    >>> state = check_optimizer_state({"momentum_buffer.net.0.bias": torch.zeros(16)}, net, "o.safetensors", manifest)
    >>> {name: list(s) for name, s in state.items()}
    {'net.0.bias': ['momentum_buffer']}
    >>> try:
    ...     check_optimizer_state({"momentum_buffer.net.0.bias": torch.zeros(2)}, net, "o.safetensors", manifest)
    ... except BundleError as error:
    ...     print(error)
    o.safetensors: momentum_buffer.net.0.bias: shape [2], but digitscnn expects [16]
    """
    if not tensors:
        raise BundleError(file, None, "holds no tensors: an optimizer state holds momentum_buffer.<parameter name> "
                                      "tensors (leave the file out for a fresh optimizer)")
    parameters = dict(model.named_parameters())
    architecture = manifest.model.architecture
    state: OptimizerState = {}
    for key in sorted(tensors):
        kind, _, name = key.partition(".")
        if kind not in OPTIMIZER_STATES or not name:
            raise BundleError(file, key, f"not a state of the stream optimizer (SGD): keys are "
                                         f"{' or '.join(OPTIMIZER_STATES)}.<parameter name>")
        if name not in parameters:
            raise BundleError(file, key, f"{name!r} is not a parameter of {architecture} (its parameters: "
                                         f"{_few(list(parameters))})")
        tensor = tensors[key]
        if not tensor.is_floating_point():
            raise BundleError(file, key, f"dtype {tensor.dtype}: an optimizer state is floating point")
        _check_tensor(tensor, parameters[name], file, key, architecture)
        state.setdefault(name, {})[kind] = tensor.detach().to(dtype=parameters[name].dtype, device="cpu")
    return state


def apply_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, state: OptimizerState | None) -> None:
    """Start `optimizer` (over `model`'s parameters) from a bundle's optimizer state: a copy of each tensor, on the
    parameter's device, as `optimizer.state[parameter][kind]`; nothing to do without a state."""
    if not state:
        return
    for name, parameter in model.named_parameters():
        for kind, tensor in state.get(name, {}).items():
            optimizer.state[parameter][kind] = tensor.to(device=parameter.device, dtype=parameter.dtype).clone()


def optimizer_state_tensors(state: OptimizerState) -> dict[str, torch.Tensor]:
    """The tensors of `optimizer.safetensors`: `<kind>.<parameter name>`, as `check_optimizer_state` reads them."""
    return {f"{kind}.{name}": tensor for name, kinds in state.items() for kind, tensor in kinds.items()}


def check_trusted(tensors: Tensors, spec: InputSection, file: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """The trusted set as (x float32, y int64), checked against the input spec; a BundleError naming `file` and
    the tensor otherwise. uint8 images are scaled by 1/255, as everywhere in dscguard."""
    for name in ("x", "y"):
        if name not in tensors:
            raise BundleError(file, name, "missing: a trusted set holds x (inputs) and y (labels)")
    extra = sorted(set(tensors) - {"x", "y"})
    if extra:
        raise BundleError(file, extra[0], f"unexpected tensor(s) {_few(extra)}: a trusted set holds x and y only")
    x, y = tensors["x"], tensors["y"]
    if x.dtype == torch.uint8 and tuple(spec.value_range) == (0.0, 1.0):
        x = x.float() / 255.0
    shape = list(spec.shape)
    if x.ndim != 1 + len(shape) or list(x.shape[1:]) != shape or len(x) == 0:
        raise BundleError(file, "x", f"shape {list(x.shape)}, but input.shape {shape} needs [N, "
                                     f"{', '.join(map(str, shape))}] with N >= 1")
    if not x.is_floating_point():
        raise BundleError(file, "x", f"dtype {x.dtype}: inputs are floating point (or uint8 images in [0, 1])")
    x = x.float()
    if not torch.isfinite(x).all():
        raise BundleError(file, "x", "holds NaN or infinite values")
    low, high = spec.value_range
    if float(x.min()) < low or float(x.max()) > high:
        raise BundleError(file, "x", f"values in [{float(x.min()):g}, {float(x.max()):g}] fall outside "
                                     f"input.value_range [{low:g}, {high:g}]")
    if spec.feature_bounds is not None:
        bounds = torch.tensor(spec.feature_bounds, dtype=torch.float32)
        outside = ((x < bounds[:, 0]) | (x > bounds[:, 1])).any(0).nonzero().flatten().tolist()
        if outside:
            raise BundleError(file, "x", f"feature(s) {_few([str(i) for i in outside])} fall outside "
                                         f"input.feature_bounds")
    if y.ndim != 1 or len(y) != len(x) or y.is_floating_point() or y.dtype == torch.bool:
        raise BundleError(file, "y", f"needs one integer label per input: {len(x)} inputs, labels of shape "
                                     f"{list(y.shape)} and dtype {y.dtype}")
    y = y.long()
    if int(y.min()) < 0 or int(y.max()) >= spec.num_classes:
        raise BundleError(file, "y", f"labels in [{int(y.min())}, {int(y.max())}] fall outside [0, "
                                     f"{spec.num_classes}) (input.num_classes = {spec.num_classes})")
    return x, y


def create_bundle(out_dir: str | Path, manifest: BundleManifest, online: nn.Module | Tensors | str | Path,
                  trusted: tuple[torch.Tensor, torch.Tensor] | str | Path,
                  auxiliary: nn.Module | Tensors | str | Path | None = None,
                  optimizer_state: Tensors | str | Path | None = None) -> Path:
    """Write a bundle into `out_dir` (new or empty) from the user's pieces, every check done before any file is
    written. The weights are a module, its state dict, or a path to a .safetensors file (of the whole model, or of
    the network inside the normalisation the manifest declares); the trusted set is (x, y) or a .safetensors/.npz
    file; the optimizer state is `momentum_buffer.<parameter name>` tensors or a .safetensors file of them.
    `manifest.files.auxiliary` and `files.optimizer` are set by whether an auxiliary and an optimizer state are
    given (with an optimizer state, the manifest is written as schema version 2)."""
    out = empty_output(out_dir)
    auxiliary_file = (manifest.files.auxiliary or AUXILIARY_FILE) if auxiliary is not None else None
    optimizer_file = (manifest.files.optimizer or OPTIMIZER_FILE) if optimizer_state is not None else None
    version = SCHEMA_VERSION if optimizer_state is not None else manifest.schema_version
    manifest = BundleManifest.model_validate(
        {**manifest.model_dump(), "schema_version": version,
         "files": {**manifest.files.model_dump(), "auxiliary": auxiliary_file, "optimizer": optimizer_file}})
    files = manifest.files
    network = build_network(manifest, out / MANIFEST_FILE)
    contents = {files.online: _checked_weights(online, copy.deepcopy(network), out / files.online, manifest)}
    if auxiliary is not None:
        contents[files.auxiliary] = _checked_weights(auxiliary, copy.deepcopy(network), out / files.auxiliary,
                                                     manifest)
    if optimizer_state is not None:
        if isinstance(optimizer_state, str | Path):
            file, given = Path(optimizer_state), read_tensors(optimizer_state)
        else:
            file, given = out / files.optimizer, dict(optimizer_state)
        state = check_optimizer_state(given, network, file, manifest)
        contents[files.optimizer] = optimizer_state_tensors(state)
    source = trusted if isinstance(trusted, str | Path) else out / files.trusted
    given = read_trusted(trusted) if isinstance(trusted, str | Path) else {"x": trusted[0], "y": trusted[1]}
    x, y = check_trusted(given, manifest.input, source)
    contents[files.trusted] = {"x": x, "y": y}
    for name, tensors in contents.items():
        with atomic_writer(out / name) as fh:
            fh.write(safetensors_bytes(storable(tensors)))
    atomic_write_text(out / SCHEMA_FILE, json.dumps(BundleManifest.model_json_schema(), indent=2))
    # written last: a directory holds a bundle once its manifest is there
    atomic_write_text(out / MANIFEST_FILE, manifest.model_dump_json(indent=2))
    return out


def load_bundle(path: str | Path, device: str | torch.device = "cpu") -> LoadedBundle:
    """Read and check the bundle at `path`: the manifest, both models' weights, the trusted set."""
    directory = Path(path)
    manifest = read_manifest(directory)
    files = manifest.files
    with torch.random.fork_rng(devices=[]):  # initial weights are overwritten: leave the caller's RNG as it was
        network = build_network(manifest, directory / MANIFEST_FILE)
    auxiliary = None
    if files.auxiliary is not None:
        auxiliary = load_weights(copy.deepcopy(network), read_tensors(directory / files.auxiliary),
                                 directory / files.auxiliary, manifest).to(device)
    model = load_weights(network, read_tensors(directory / files.online), directory / files.online, manifest)
    trusted = check_trusted(read_tensors(directory / files.trusted), manifest.input, directory / files.trusted)
    optimizer_state = None
    if files.optimizer is not None:
        optimizer_state = check_optimizer_state(read_tensors(directory / files.optimizer), model,
                                                directory / files.optimizer, manifest)
    return LoadedBundle(directory, manifest, model.to(device), auxiliary, trusted, optimizer_state)


def empty_output(out_dir: str | Path) -> Path:
    """`out_dir`, created when missing; a FileExistsError when it holds anything (a bundle is never written over
    other files, nor over another bundle)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.iterdir()):
        raise FileExistsError(f"{out}: not empty; a bundle is written into a new or empty directory")
    return out


def _checked_weights(source: nn.Module | Tensors | str | Path, network: nn.Module, destination: Path,
                     manifest: BundleManifest) -> dict[str, torch.Tensor]:
    """The whole model's state dict from `source`, checked by `load_weights` (errors name the source file, or the
    bundle file being written)."""
    if isinstance(source, str | Path):
        file, tensors = Path(source), read_tensors(source)
    else:
        file, tensors = destination, source.state_dict() if isinstance(source, nn.Module) else dict(source)
    if isinstance(network, Normalized) and set(with_tied_names(network.net, tensors)) == set(network.net.state_dict()):
        # the weights of the network inside the normalisation: the buffers come from the manifest
        tensors = {**{f"net.{k}": v for k, v in tensors.items()}, "mean": network.mean, "std": network.std}
    return load_weights(network, tensors, file, manifest).state_dict()


def _check_tensor(tensor: torch.Tensor, reference: torch.Tensor, file: str | Path, name: str,
                  architecture: str) -> None:
    """A BundleError naming `file` and tensor `name` when its shape is not `reference`'s or its values not finite."""
    if tensor.shape != reference.shape:
        raise BundleError(file, name, f"shape {list(tensor.shape)}, but {architecture} expects "
                                      f"{list(reference.shape)}")
    if tensor.is_floating_point() and not torch.isfinite(tensor).all():
        raise BundleError(file, name, "holds NaN or infinite values")


def _values(tensor: torch.Tensor) -> str:
    """
    >>> _values(torch.tensor([0.1, 0.25]))
    '[0.1, 0.25]'
    """
    return "[" + ", ".join(f"{v:.6g}" for v in tensor.flatten().tolist()) + "]"


def _few(names: list[str]) -> str:
    """
    >>> _few(["a", "b", "c", "d"])
    'a, b, c, ... (4 in all)'
    """
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown if len(names) <= _SHOWN_NAMES else f"{shown}, ... ({len(names)} in all)"
