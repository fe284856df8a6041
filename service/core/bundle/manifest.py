"""`bundle.json`: what a bundle holds and how to rebuild its model, as one validated pydantic model.

The manifest names the architecture (a built-in of `service.core.models`, a torchvision classifier, or a user factory),
the input the model takes, the bundle's files, and the stream and defense settings (the `StreamConfig`,
`StrategyConfig` and `CalibrationConfig` sections of the experiment configuration, reused as they are). Any
missing or unknown field is refused; `BundleManifest.model_json_schema()` is the published JSON Schema
(`bundle.schema.json`).

For a built-in architecture the model section is the burn-in's model spec (`service.core.burnin.model_spec_for`) split
into its parts, so a profile's burn-in becomes a bundle and back without a second description:

>>> spec = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8], "mean": [0.3], "std": [0.4]}
>>> manifest = BundleManifest.from_model_spec(spec)
>>> manifest.model.architecture, manifest.input.shape, manifest.model.normalization.mean
('digitscnn', [1, 8, 8], [0.3])
>>> manifest.model_spec() == spec
True
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from service.core.config import CalibrationConfig, StrategyConfig, StreamConfig
from service.core.models import MODELS

# the manifest format this dscguard writes; it reads every version in SCHEMA_VERSIONS, so the bundles written as
# version 1 keep loading unchanged. 2 adds the optional files.optimizer (a version-1 manifest naming one is refused)
SCHEMA_VERSION = 2
SCHEMA_VERSIONS = (1, 2)
MANIFEST_FILE = "bundle.json"
SCHEMA_FILE = "bundle.schema.json"
ONLINE_FILE, AUXILIARY_FILE, TRUSTED_FILE = "online.safetensors", "auxiliary.safetensors", "trusted.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
# the stream optimizer (SGD)'s per-parameter state that a bundle may carry, as `<state>.<parameter name>` tensors
OPTIMIZER_STATES = ("momentum_buffer",)
# torch.save and pickle files: refused by name wherever a safetensors file is expected, never opened
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt")
TORCHVISION_PREFIX = "torchvision:"
_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
# kwargs the bundle sets itself (from `input`) or that would fetch weights from a hub
_RESERVED_KWARGS = {"builtin": ("name", "num_classes", "input_shape", "mean", "std"),
                    "torchvision": ("num_classes", "weights", "weights_backbone", "pretrained")}


def _kind(architecture: str) -> Literal["builtin", "torchvision", "factory"]:
    if architecture in MODELS:
        return "builtin"
    return "torchvision" if architecture.startswith(TORCHVISION_PREFIX) else "factory"


class BundleError(ValueError):
    """A bundle that cannot be used: one line naming the file, the field (manifest field or tensor name) and the
    problem.

    >>> str(BundleError("b/online.safetensors", "net.0.weight", "holds NaN or infinite values"))
    'b/online.safetensors: net.0.weight: holds NaN or infinite values'
    """

    def __init__(self, file: str | Path, field: str | None, problem: str):
        self.file, self.field, self.problem = Path(file), field, " ".join(problem.split())
        super().__init__(f"{file}: {field}: {self.problem}" if field else f"{file}: {self.problem}")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Normalization(_Section):
    """Per-channel mean and std the model subtracts and divides by, inside itself (`service.core.models.Normalized`)."""

    mean: list[float] = Field(min_length=1)
    std: list[PositiveFloat] = Field(min_length=1)

    @model_validator(mode="after")
    def _one_value_per_channel(self):
        if len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}: one per channel each")
        return self


class ModelSection(_Section):
    """How to build the network; its weights come from the bundle's files only, never from a hub."""

    architecture: str = Field(description=f"a built-in ({', '.join(MODELS)}), '{TORCHVISION_PREFIX}NAME' (a "
                                          "classification model of torchvision.models), or a user factory "
                                          "'package.module:function' (the package must be installed)")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="constructor keyword arguments (a factory "
                                                                     "gets these and nothing else)")
    normalization: Normalization | None = Field(
        None, description="per-channel normalisation inside the model (built-ins: 0.5/0.5 when omitted)")

    @field_validator("architecture")
    @classmethod
    def _known_form(cls, value: str) -> str:
        if value in MODELS or _FACTORY.match(value):
            return value
        if value.startswith(TORCHVISION_PREFIX) and value[len(TORCHVISION_PREFIX):].isidentifier():
            return value
        raise ValueError(f"expected a built-in ({', '.join(MODELS)}), '{TORCHVISION_PREFIX}NAME' or "
                         f"'package.module:function'")

    @field_validator("kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, Any], info: ValidationInfo) -> dict[str, Any]:
        architecture = info.data.get("architecture")
        reserved = [k for k in _RESERVED_KWARGS.get(_kind(architecture), ()) if k in value] if architecture else []
        if reserved:
            raise ValueError(f"{', '.join(reserved)} cannot be set for {architecture}: the bundle sets them (the class "
                             f"count and shape from `input`, mean and std from `normalization`, the weights from its "
                             f"own files, never from a hub)")
        return value

    @property
    def kind(self) -> Literal["builtin", "torchvision", "factory"]:
        return _kind(self.architecture)


class InputSection(_Section):
    """What the model takes: images [C, H, W] or feature vectors [D], values in `value_range`."""

    shape: list[int] = Field(description="[C, H, W] for images, [D] for feature vectors")
    value_range: tuple[float, float] = Field((0.0, 1.0), description="[low, high] of every input value")
    feature_bounds: list[tuple[float, float]] | None = Field(
        None, description="feature vectors only: [low, high] per feature, inside value_range")
    num_classes: int = Field(ge=2)
    class_names: list[str] | None = Field(None, description="one name per class, in label order")

    @model_validator(mode="after")
    def _consistent(self):
        if len(self.shape) not in (1, 3) or min(self.shape) < 1:
            raise ValueError(f"shape must be [C, H, W] or [D] of positive sizes, got {self.shape}")
        low, high = self.value_range
        if not low < high:
            raise ValueError(f"value_range must be [low, high] with low < high, got {list(self.value_range)}")
        if self.feature_bounds is not None:
            if len(self.shape) != 1 or len(self.feature_bounds) != self.shape[0]:
                raise ValueError(f"feature_bounds needs a feature-vector shape [D] and one [low, high] per feature; "
                                 f"got {len(self.feature_bounds)} bounds for shape {self.shape}")
            for index, (lo, hi) in enumerate(self.feature_bounds):
                if not low <= lo < hi <= high:
                    raise ValueError(f"feature_bounds[{index}] = [{lo}, {hi}] is not a range inside value_range "
                                     f"[{low}, {high}]")
        if self.class_names is not None and (len(self.class_names) != self.num_classes
                                             or len(set(self.class_names)) != self.num_classes):
            raise ValueError(f"class_names must be {self.num_classes} distinct names (num_classes), "
                             f"got {self.class_names}")
        return self


class BundleFiles(_Section):
    """The bundle's safetensors files, by name inside the bundle directory."""

    online: str = Field(ONLINE_FILE, description="the current weights (required)")
    auxiliary: str | None = Field(None, description="an earlier checkpoint of the same architecture, or none")
    trusted: str = Field(TRUSTED_FILE, description="the trusted clean calibration set: tensors x and y (required)")
    optimizer: str | None = Field(None, description="the stream optimizer's state to start from: "
                                                    "momentum_buffer.<parameter name> tensors (schema version 2), "
                                                    "or none (a fresh optimizer)")

    @field_validator("online", "auxiliary", "trusted", "optimizer")
    @classmethod
    def _safetensors_name(cls, value: str | None) -> str | None:
        if value is None:
            return value
        if Path(value).suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{value!r} is a pickle file: bundles hold safetensors only, and pickles are never "
                             f"loaded (safetensors.torch.save_file writes one)")
        if Path(value).name != value or value.startswith(".") or not value.endswith(".safetensors"):
            raise ValueError(f"expected a file name inside the bundle ending in .safetensors, got {value!r}")
        return value

    @model_validator(mode="after")
    def _distinct(self):
        names = [n for n in (self.online, self.auxiliary, self.trusted, self.optimizer) if n is not None]
        if len(set(names)) != len(names):
            raise ValueError(f"online, auxiliary, trusted and optimizer must be different files, got {names}")
        return self


class BundleManifest(_Section):
    """`bundle.json`: a model, its input, its files, and how the stream and the defense treat it."""

    schema_version: Literal[1, 2] = Field(description=f"the manifest format; this dscguard reads "
                                                     f"{' and '.join(map(str, SCHEMA_VERSIONS))} and writes "
                                                     f"{SCHEMA_VERSION} (2 adds files.optimizer)")
    description: str = ""
    model: ModelSection
    input: InputSection
    files: BundleFiles = BundleFiles()
    stream: StreamConfig = StreamConfig()
    strategy: StrategyConfig = StrategyConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @model_validator(mode="after")
    def _version_has_its_fields(self):
        if self.files.optimizer is not None and self.schema_version < 2:
            raise ValueError(f"files.optimizer needs schema_version 2, got {self.schema_version}: version 1 has no "
                             f"optimizer state")
        return self

    @model_validator(mode="after")
    def _model_fits_input(self):
        normalization, shape = self.model.normalization, self.input.shape
        if normalization is not None and (len(shape) != 3 or len(normalization.mean) != shape[0]):
            raise ValueError(f"model.normalization has {len(normalization.mean)} channel(s) but input.shape is "
                             f"{shape}: it needs images [C, H, W] and one value per channel (feature vectors are "
                             f"normalised inside the factory's own module)")
        if self.model.kind == "builtin" and len(shape) != 3:
            raise ValueError(f"the built-in {self.model.architecture} takes images [C, H, W]; input.shape is {shape}")
        return self

    @classmethod
    def from_model_spec(cls, spec: dict, **fields: Any) -> BundleManifest:
        """The manifest of a built-in model described by a burn-in's model spec (`build_model`'s arguments)."""
        spec = dict(spec)
        name, num_classes, shape = spec.pop("name"), spec.pop("num_classes"), spec.pop("input_shape")
        mean, std = spec.pop("mean", None), spec.pop("std", None)
        normalization = {"mean": mean, "std": std} if mean is not None or std is not None else None
        input_fields = {"shape": list(shape), "num_classes": num_classes, **fields.pop("input", {})}
        return cls(schema_version=SCHEMA_VERSION, input=input_fields,
                   model={"architecture": name, "kwargs": spec, "normalization": normalization}, **fields)

    def model_spec(self) -> dict:
        """`build_model`'s arguments for a built-in architecture: the burn-in's model spec, as the learner keeps it."""
        if self.model.kind != "builtin":
            raise ValueError(f"{self.model.architecture} is not a built-in model: it has no build_model spec")
        spec = {"name": self.model.architecture, "num_classes": self.input.num_classes,
                "input_shape": list(self.input.shape)}
        if self.model.normalization is not None:
            spec.update(mean=list(self.model.normalization.mean), std=list(self.model.normalization.std))
        return {**spec, **self.model.kwargs}


def read_manifest(directory: str | Path) -> BundleManifest:
    """The validated manifest of the bundle at `directory`; a BundleError naming the file and the field otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise BundleError(directory, None, f"not a directory: a bundle is a directory holding {MANIFEST_FILE}")
    path = directory / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(path, None, "missing: not a bundle (`dscguard bundle create` writes one)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(path, None, f"cannot be read: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise BundleError(path, None, f"not valid JSON: {exc}") from exc
    try:
        return BundleManifest.model_validate(data)
    except ValidationError as exc:
        raise manifest_error(path, exc) from exc


def manifest_error(path: str | Path, exc: ValidationError) -> BundleError:
    """One BundleError for every problem of a manifest: the first field named up front, the others after it."""
    problems = []
    for error in exc.errors():
        got = error.get("input")
        shown = f" (got {got!r})" if "input" in error and not isinstance(got, dict | list) else ""
        message = error["msg"].removeprefix("Value error, ")  # pydantic's prefix for a validator's ValueError
        problems.append((".".join(str(part) for part in error["loc"]), f"{message}{shown}"))
    (field, first), rest = problems[0], problems[1:]
    return BundleError(path, field or None, "; ".join([first, *(f"{loc}: {msg}" for loc, msg in rest)]))
