"""A bundle in place of a profile's burn-in: the configuration, the data parts and the `Experiment` that the worker,
`dscguard eval --bundle` and `dscguard attack --bundle` start from.

The bundle gives the online model, the auxiliary (the online weights again when it has none), the trusted set (the
calibration part: DSC's threshold, guard's gate, the canary) and the stream, strategy and calibration settings. The
data the stream draws from, the attacker's validation part and the test part come from the user's own data
(`--data`: x and y as .npz or .safetensors, checked against the bundle's input spec like the trusted set); the
worker needs none of it.

>>> import tempfile, torch
>>> from service.core.bundle import BundleManifest, create_bundle, load_bundle
>>> from service.core.config import ExperimentConfig
>>> from service.core.models import build_model
>>> manifest = BundleManifest(schema_version=1, model={"architecture": "digitscnn"},
...                           input={"shape": [1, 8, 8], "num_classes": 10}, stream={"batch_size": 10})
>>> data = TensorSet(torch.rand(40, 1, 8, 8), torch.arange(40) % 10)
>>> with tempfile.TemporaryDirectory() as d:
...     _ = create_bundle(d, manifest, build_model(**manifest.model_spec()), (torch.rand(8, 1, 8, 8), torch.arange(8)))
...     bundle = load_bundle(d)
>>> config = bundle_config(bundle.manifest, ExperimentConfig.from_profile("digits"))
>>> experiment = bundle_experiment(bundle, config, data)
>>> splits = experiment.splits
>>> config.stream.batch_size, len(splits.stream), len(splits.attacker_val), len(splits.test)
(10, 25, 5, 10)
>>> experiment.new_learner().model_spec["bundle"]["input"]["shape"]
[1, 8, 8]
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from service.core.bundle.architecture import bundle_model_spec
from service.core.bundle.manifest import MANIFEST_FILE, BundleError, BundleManifest, read_manifest
from service.core.bundle.store import LoadedBundle, check_trusted, read_trusted
from service.core.config import ExperimentConfig
from service.core.data.splits import Splits

# `--data` without a test or validation size of its own: a quarter for the test part, an eighth for the attacker's
TEST_SHARE, ATTACKER_SHARE = 4, 8
_FINGERPRINT_CHUNK = 1 << 20
BUNDLE_SECTIONS = ("stream", "strategy", "calibration")  # the configuration a bundle carries
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")  # what an image-folder tree given as --data may hold


@dataclass(frozen=True)
class TensorSet:
    """Inputs x (float32, in the bundle's input space) and labels y (int64), as a data part: `tensors()` gives
    copies, as `ArrayDataset.tensors()` does."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return len(self.y)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x.clone(), self.y.clone()

    def subset(self, idx) -> TensorSet:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return TensorSet(self.x[idx], self.y[idx])


def bundle_config(manifest: BundleManifest, base: ExperimentConfig, strategy: str | None = None,
                  overrides: dict[str, dict] | None = None) -> ExperimentConfig:
    """`base` (the attack and campaign settings, the seed and device) with the bundle's stream, strategy and
    calibration sections, changed by `overrides` (`--set`, DSCGUARD_CONFIG_OVERRIDES) where they name one of them;
    `strategy` names another defense (DSCGUARD_STRATEGY)."""
    overrides = overrides or {}
    sections = {name: {**getattr(manifest, name).model_dump(), **overrides.get(name, {})} for name in BUNDLE_SECTIONS}
    if strategy is not None:
        sections["strategy"]["name"] = strategy
    return ExperimentConfig.model_validate({**base.model_dump(), **sections})


def read_data(path: str | Path, manifest: BundleManifest) -> TensorSet:
    """The user's data for a bundle: x and y in a .npz or .safetensors file, or an image-folder tree (a directory or
    a .tar.gz holding `train/<class>/*` and `test/<class>/*`, as the built-in datasets' trees do, both parts pooled),
    checked against the input spec (a BundleError naming the file and the tensor otherwise)."""
    path = Path(path)
    tensors = _read_image_tree(path, manifest) if is_image_tree(path) else read_trusted(path)
    x, y = check_trusted(tensors, manifest.input, path)
    return TensorSet(x, y)


def is_image_tree(path: str | Path) -> bool:
    """Whether `read_data` reads `path` as an image-folder tree (a directory or a .tar.gz) rather than a file of x
    and y."""
    path = Path(path)
    return path.is_dir() or path.name.endswith(".tar.gz")


def _read_image_tree(path: Path, manifest: BundleManifest) -> dict[str, torch.Tensor]:
    """An image-folder tree as uint8 x and int64 y; the class folders are `input.class_names` (or 0, 1, ...)."""
    from service.core.data.catalog import DatasetSpec
    from service.core.data.image_folder import read_image_folder

    spec = manifest.input
    if len(spec.shape) != 3 or spec.shape[0] not in (1, 3) or tuple(spec.value_range) != (0.0, 1.0):
        raise BundleError(path, None, f"an image folder holds images: input.shape must be [1 or 3, H, W] with values "
                                      f"in [0, 1], got {spec.shape} in {list(spec.value_range)}")
    classes = tuple(spec.class_names or (str(label) for label in range(spec.num_classes)))
    problems = []
    for extension in IMAGE_EXTENSIONS:
        dataset = DatasetSpec(name=path.name, input_shape=tuple(spec.shape), classes=classes, image_ext=extension)
        try:
            parts = read_image_folder(path, dataset)
        except (OSError, ValueError) as exc:  # no images of this extension, an unknown class folder, a bad image
            problems.append(str(exc))
            continue
        return {"x": torch.cat([torch.from_numpy(p.x) for p in parts]),
                "y": torch.cat([torch.from_numpy(p.y) for p in parts])}
    # the extension whose tree was there says what is wrong with it; otherwise no extension found any images
    problem = next((p for p in problems if "images found" not in p), problems[0])
    raise BundleError(path, None, f"not an image-folder tree of {', '.join(IMAGE_EXTENSIONS)} images for this "
                                  f"bundle: {problem}")


def split_data(data: TensorSet, config: ExperimentConfig) -> tuple[TensorSet, TensorSet, TensorSet]:
    """(stream, attacker_val, test), disjoint, shuffled with the config's seed: the test and attacker parts take
    `config.data`'s sizes at most, and a quarter and an eighth of the data at most; the stream gets the rest."""
    n = len(data)
    test = min(config.data.test or n, n // TEST_SHARE)
    attacker = min(config.data.attacker_val, n // ATTACKER_SHARE)
    if n - test - attacker < config.stream.batch_size or not test or not attacker:
        raise ValueError(f"the data holds {n} samples: too few for a test part, an attacker part and one stream "
                         f"batch of {config.stream.batch_size}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(config.seed))
    return (data.subset(order[test + attacker :]), data.subset(order[test : test + attacker]),
            data.subset(order[:test]))


def bundle_experiment(bundle: LoadedBundle, config: ExperimentConfig, data: TensorSet | None = None,
                      device: str | torch.device = "cpu"):
    """An `Experiment` whose burn-in is the bundle: its models, its trusted set as the calibration part, its
    optimizer state (the learners' stream optimizer starts from it), and, with `data`, the stream, attacker and test
    parts split from it (empty without: the worker needs none)."""
    # the service's experiment imports the learner, which imports this package: imported when it is needed
    from service.core.bundle.experiment import BundleExperiment
    from service.core.burnin import BurnInResult

    device = torch.device(device)
    model = bundle.model.to(device)
    auxiliary = (bundle.auxiliary if bundle.auxiliary is not None else copy.deepcopy(model)).to(device)
    burnin = BurnInResult(model, auxiliary, bundle_model_spec(bundle.manifest), history=[], cached=True,
                          directory=bundle.directory)
    x, y = bundle.trusted
    empty = TensorSet(x[:0], y[:0])
    stream, attacker, test = split_data(data, config) if data is not None else (empty, empty, empty)
    splits = Splits(burnin=empty, stream=stream, attacker_val=attacker, calibration=TensorSet(x, y), test=test)
    return BundleExperiment(config, splits, burnin, device, optimizer_state=bundle.optimizer_state)


def bundle_fingerprint(directory: str | Path) -> str:
    """What a checkpoint of a served bundle must match: a hash of its manifest and of the files it names.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     _ = (Path(d) / "bundle.json").write_text('{"schema_version": 1, "model": {"architecture": "digitscnn"}, '
    ...                                              '"input": {"shape": [1, 8, 8], "num_classes": 10}}')
    ...     for name in ("online.safetensors", "trusted.safetensors"):
    ...         _ = (Path(d) / name).write_bytes(b"weights")
    ...     len(bundle_fingerprint(d))
    16
    """
    directory = Path(directory)
    files = read_manifest(directory).files
    digest = hashlib.sha256()
    for name in (MANIFEST_FILE, files.online, files.auxiliary, files.trusted, files.optimizer):
        if name is None:
            continue
        digest.update(name.encode() + b"\0")
        with (directory / name).open("rb") as fh:
            while chunk := fh.read(_FINGERPRINT_CHUNK):
                digest.update(chunk)
    return digest.hexdigest()[:16]
