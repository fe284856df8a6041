"""Tensor encodings on the wire and in the queue, validated before anything is allocated or enqueued.

Two request encodings carry a batch: JSON with the inputs as base64 of raw little-endian bytes plus
`dtype` and `shape`, and a safetensors body with tensors `x` (and `y`). Both are checked in the same
order: dtype, shape against the model's input, the fewest samples <= N <= the limit, byte length (computed from the
declared shape *before* decoding), then the values (finite, in [0, 1]) and the labels (in [0, classes)).

>>> import numpy as np
>>> spec = InputSpec(input_shape=(1, 2, 2), num_classes=3, max_samples=8)
>>> x = np.zeros((2, 1, 2, 2), np.uint8)
>>> batch = decode_json_batch(encode_json_batch("b1", x, [0, 2]), spec)
>>> batch.x.shape, batch.y.tolist()
((2, 1, 2, 2), [0, 2])
>>> decode_safetensors_batch(encode_safetensors_batch(x, [0, 2], batch_id="b1"), spec).batch_id
'b1'
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

# dtype name on the wire -> numpy dtype (little-endian) and safetensors code
INPUT_DTYPES = {"uint8": np.dtype("u1"), "float32": np.dtype("<f4")}
_SAFETENSORS_INPUT = {"U8": "uint8", "F32": "float32"}
_SAFETENSORS_LABEL = {"I64": np.dtype("<i8"), "I32": np.dtype("<i4")}
BATCH_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"
# a batch's header names two tensors and a batch id: a few hundred bytes; anything near this is not a batch
SAFETENSORS_HEADER_LIMIT = 1 << 20
_BATCH_ID = re.compile(BATCH_ID_PATTERN)
# the key beside a model spec, as the worker publishes it, for the fewest samples a batch to learn from may hold
MIN_SAMPLES_KEY = "min_batch_samples"


class BatchRejected(ValueError):
    """A request or queue entry that cannot be used; `reason` is a short label for metrics."""

    def __init__(self, reason: str, message: str, status_code: int = 422):
        super().__init__(message)
        self.reason, self.message, self.status_code = reason, message, status_code


@dataclass(frozen=True)
class InputSpec:
    """What the model accepts: [N, *input_shape] with min_samples <= N <= max_samples, labels in [0, num_classes),
    values in `value_range` and, for a bundle's feature vectors, each feature inside its `feature_bounds` [low, high].
    `min_samples` is 2 for a batch that a model with BatchNorm learns from (the learner's `min_batch_samples`).

    >>> spec = InputSpec.from_model_spec({"name": "m", "num_classes": 2, "input_shape": [2], "bundle": {"input": {
    ...     "shape": [2], "value_range": [0, 1], "feature_bounds": [[0, 0.5], [0, 1]], "num_classes": 2}}}, 8)
    >>> try:
    ...     check_values(np.array([[0.6, 0.2]], np.float32), spec)
    ... except BatchRejected as exc:
    ...     print(exc.reason, exc.message)
    values feature 0 must lie in [0, 0.5] (the model's input.feature_bounds), got values in [0.6, 0.6]
    """

    input_shape: tuple[int, ...]
    num_classes: int
    max_samples: int
    value_range: tuple[float, float] = (0.0, 1.0)
    feature_bounds: tuple[tuple[float, float], ...] | None = None
    min_samples: int = 1

    @classmethod
    def from_model_spec(cls, model_spec: Mapping, max_samples: int) -> InputSpec:
        """From a published model spec; a bundle's (its `bundle.input` section) adds the value range and bounds, and
        the worker's `MIN_SAMPLES_KEY` beside it the fewest samples."""
        bundle_input = model_spec.get("bundle", {}).get("input", {})
        bounds = bundle_input.get("feature_bounds")
        return cls(tuple(int(v) for v in model_spec["input_shape"]), int(model_spec["num_classes"]), max_samples,
                   tuple(float(v) for v in bundle_input.get("value_range", (0.0, 1.0))),
                   tuple((float(lo), float(hi)) for lo, hi in bounds) if bounds is not None else None,
                   int(model_spec.get(MIN_SAMPLES_KEY, 1)))


@dataclass(frozen=True)
class Batch:
    """A validated batch: x uint8 or float32 [N, C, H, W] (float in [0, 1]), y int64 [N] or None."""

    batch_id: str | None
    x: np.ndarray
    y: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.x)

    def inputs(self) -> torch.Tensor:
        """float32 in [0, 1]; uint8 is scaled exactly as `ArrayDataset.tensors()` does."""
        x = torch.from_numpy(np.array(self.x, copy=True))
        return x.float() / 255.0 if x.dtype == torch.uint8 else x

    def labels(self) -> torch.Tensor:
        if self.y is None:
            raise ValueError("this batch carries no labels")
        return torch.from_numpy(np.array(self.y, dtype=np.int64, copy=True))


# -- checks shared by every encoding -------------------------------------------------------------
def check_batch_id(batch_id: object) -> str:
    if not isinstance(batch_id, str) or not _BATCH_ID.match(batch_id):
        raise BatchRejected("batch_id", f"batch_id must be 1-128 characters of A-Z a-z 0-9 . _ : -, got {batch_id!r}")
    return batch_id


def check_declared(dtype: str, shape: Sequence[int], spec: InputSpec) -> int:
    """Check dtype and shape before any decoding; return the byte length the data must have."""
    if dtype not in INPUT_DTYPES:
        raise BatchRejected("dtype", f"dtype must be one of {', '.join(INPUT_DTYPES)}, got {dtype!r}")
    expected = "[N, " + ", ".join(map(str, spec.input_shape)) + "]"
    if not isinstance(shape, list | tuple) or not all(type(v) is int for v in shape):
        raise BatchRejected("shape", f"shape must be a list of integers {expected}, got {shape!r}")
    if len(shape) != 1 + len(spec.input_shape) or tuple(shape[1:]) != spec.input_shape:
        raise BatchRejected("shape", f"shape must be {expected} for this model, got {list(shape)}")
    n = shape[0]
    if not spec.min_samples <= n <= spec.max_samples:
        why = (f" (the model has BatchNorm layers: it learns from {spec.min_samples} samples or more)"
               if spec.min_samples > 1 else "")
        raise BatchRejected("batch_size", f"the batch must hold {spec.min_samples} to {spec.max_samples} samples"
                                          f"{why}, got N={n}")
    return math.prod(shape) * INPUT_DTYPES[dtype].itemsize


def check_values(x: np.ndarray, spec: InputSpec) -> np.ndarray:
    if x.dtype == np.uint8:
        if spec.value_range != (0.0, 1.0) or spec.feature_bounds is not None:
            raise BatchRejected("dtype", "this model takes float32 inputs (uint8 is for images in [0, 1])")
        return x
    if not np.isfinite(x).all():
        raise BatchRejected("values", "float32 inputs must be finite (found NaN or infinity)")
    low, high = float(x.min()), float(x.max())
    range_low, range_high = spec.value_range
    if low < range_low or high > range_high:
        raise BatchRejected("values", f"float32 inputs must lie in [{range_low:g}, {range_high:g}], got values in "
                                      f"[{low}, {high}]")
    for index, (bound_low, bound_high) in enumerate(spec.feature_bounds or ()):
        feature = x[:, index]
        # compared in float32, as the inputs are and as the defense and the attacker project them
        if feature.min() < np.float32(bound_low) or feature.max() > np.float32(bound_high):
            raise BatchRejected("values", f"feature {index} must lie in [{bound_low:g}, {bound_high:g}] (the model's "
                                          f"input.feature_bounds), got values in [{float(feature.min()):g}, "
                                          f"{float(feature.max()):g}]")
    return x


def check_labels(y: np.ndarray, n: int, spec: InputSpec) -> np.ndarray:
    if y.ndim != 1 or len(y) != n:
        raise BatchRejected("labels", f"need one label per sample: {n} inputs but labels shaped {list(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise BatchRejected("labels", f"labels must be integers in [0, {spec.num_classes}), "
                                      f"got values in [{int(y.min())}, {int(y.max())}]")
    return y.astype(np.int64, copy=False)


# -- JSON: base64 of raw little-endian bytes ----------------------------------------------------------
def decode_base64_inputs(data: str, dtype: str, shape: Sequence[int], spec: InputSpec) -> np.ndarray:
    nbytes = check_declared(dtype, shape, spec)
    # Padded base64 of n bytes is exactly 4 * ceil(n / 3) characters: check before decoding anything.
    if len(data) != 4 * math.ceil(nbytes / 3):
        raise BatchRejected("encoding", f"data must be base64 of {nbytes} bytes (shape {list(shape)} of {dtype}), "
                                        f"i.e. {4 * math.ceil(nbytes / 3)} characters; got {len(data)}",
                            status_code=400)
    try:
        raw = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BatchRejected("encoding", f"data is not valid base64: {exc}", status_code=400) from exc
    if len(raw) != nbytes:
        raise BatchRejected("encoding", f"data decodes to {len(raw)} bytes, expected {nbytes}", status_code=400)
    return check_values(np.frombuffer(raw, dtype=INPUT_DTYPES[dtype]).reshape(tuple(shape)), spec)


def decode_json_batch(payload: Mapping, spec: InputSpec, need_labels: bool = True) -> Batch:
    """A request body already parsed by the schema: {batch_id, x: {dtype, shape, data}, y: [ints]}."""
    tensor = payload["x"]
    x = decode_base64_inputs(tensor["data"], tensor["dtype"], tensor["shape"], spec)
    y = None
    if need_labels:
        try:
            labels = np.asarray(payload["y"], dtype=np.int64).reshape(-1)
        except (OverflowError, TypeError, ValueError) as exc:
            raise BatchRejected("labels", f"labels must be a list of integers in [0, {spec.num_classes})") from exc
        y = check_labels(labels, len(x), spec)
    batch_id = check_batch_id(payload["batch_id"]) if need_labels else None
    return Batch(batch_id, x, y)


def encode_json_batch(batch_id: str | None, x: np.ndarray | torch.Tensor,
                      y: Sequence[int] | np.ndarray | torch.Tensor | None = None) -> dict:
    """The JSON body for /v1/ingest (or /v1/predict with y None) from uint8 or float32 inputs."""
    x = _as_numpy_inputs(x)
    body: dict = {"x": {"dtype": x.dtype.name, "shape": list(x.shape),
                        "data": base64.b64encode(x.astype(x.dtype.newbyteorder("<")).tobytes()).decode()}}
    if batch_id is not None:
        body["batch_id"] = batch_id
    if y is not None:
        body["y"] = [int(v) for v in np.asarray(y).reshape(-1)]
    return body


# -- safetensors body ---------------------------------------------------------------------------------
def decode_safetensors_batch(body: bytes, spec: InputSpec, need_labels: bool = True) -> Batch:
    """A safetensors file with `x` (U8 or F32) and `y` (I64 or I32); `__metadata__.batch_id` for ingest."""
    header, data = _safetensors_header(body)
    metadata = header.pop("__metadata__", None) or {}
    expected_names = {"x", "y"} if need_labels else {"x"}
    if set(header) != expected_names:
        raise BatchRejected("encoding", f"the safetensors body must hold exactly the tensors "
                                        f"{sorted(expected_names)}, got {sorted(header)}", status_code=400)
    x_info = header["x"]
    dtype = _safetensors_dtype(x_info)
    dtype = _SAFETENSORS_INPUT.get(dtype, dtype)
    shape = x_info.get("shape", [])
    nbytes = check_declared(dtype, shape, spec)
    x = check_values(np.frombuffer(_tensor_bytes(data, x_info, nbytes, "x"), INPUT_DTYPES[dtype]).reshape(shape),
                     spec)
    y = None
    if need_labels:
        y_info = header["y"]
        label_dtype = _SAFETENSORS_LABEL.get(_safetensors_dtype(y_info))
        if label_dtype is None:
            raise BatchRejected("labels", f"y must be I64 or I32, got {y_info.get('dtype')!r}")
        y_shape = y_info.get("shape", [])
        if y_shape != [len(x)]:
            raise BatchRejected("labels", f"need one label per sample: {len(x)} inputs but y shaped {y_shape}")
        y = check_labels(np.frombuffer(_tensor_bytes(data, y_info, len(x) * label_dtype.itemsize, "y"),
                                       label_dtype), len(x), spec)
    batch_id = check_batch_id(metadata.get("batch_id")) if need_labels else None
    return Batch(batch_id, x, y)


def encode_safetensors_batch(x: np.ndarray | torch.Tensor, y: Sequence[int] | np.ndarray | torch.Tensor | None = None,
                             batch_id: str | None = None) -> bytes:
    """The binary body for /v1/ingest (with y and batch_id) or /v1/predict (x only)."""
    from safetensors.numpy import save

    tensors = {"x": np.ascontiguousarray(_as_numpy_inputs(x))}
    if y is not None:
        tensors["y"] = np.asarray(y, dtype=np.int64).reshape(-1)
    return save(tensors, metadata={"batch_id": batch_id} if batch_id is not None else None)


def _safetensors_header(body: bytes) -> tuple[dict, memoryview]:
    if len(body) < 8:
        raise BatchRejected("encoding", "the body is not a safetensors file (shorter than its 8-byte header)", 400)
    (length,) = struct.unpack("<Q", body[:8])
    if length > len(body) - 8:
        raise BatchRejected("encoding", f"safetensors header of {length} bytes does not fit the body ({len(body) - 8} "
                                        f"bytes after its 8-byte length; headers are limited to 1 MiB)", 400)
    if length > SAFETENSORS_HEADER_LIMIT:
        raise BatchRejected("encoding", f"safetensors header of {length} bytes is over the limit of "
                                        f"{SAFETENSORS_HEADER_LIMIT} bytes (1 MiB) for a header", 400)
    try:
        header = json.loads(bytes(body[8 : 8 + length]))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, or an int too long
        raise BatchRejected("encoding", f"safetensors header is not valid JSON: {exc}", 400) from exc
    if not isinstance(header, dict) or not all(isinstance(v, dict) for v in header.values()):
        raise BatchRejected("encoding", "safetensors header must map tensor names to descriptions", 400)
    return header, memoryview(body)[8 + length :]


def _safetensors_dtype(info: dict) -> str | None:
    """The declared dtype when it is a string (anything else is no dtype, refused by the caller)."""
    dtype = info.get("dtype")
    return dtype if isinstance(dtype, str) else None


def _tensor_bytes(data: memoryview, info: dict, nbytes: int, name: str) -> memoryview:
    offsets = info.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(v, int) for v in offsets)
            or offsets[1] - offsets[0] != nbytes or offsets[0] < 0 or offsets[1] > len(data)):
        raise BatchRejected("encoding", f"tensor {name}: data_offsets {offsets} do not hold the {nbytes} bytes its "
                                        f"dtype and shape need", 400)
    return data[offsets[0] : offsets[1]]


def _as_numpy_inputs(x: np.ndarray | torch.Tensor) -> np.ndarray:
    array = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if array.dtype.name not in INPUT_DTYPES:
        array = array.astype(np.float32)
    return array


# -- queue entries ------------------------------------------------------------------------------------
def to_stream_fields(batch: Batch) -> dict[str, bytes | str]:
    """A validated batch as the fields of one stream entry (raw bytes, no re-encoding)."""
    return {"batch_id": batch.batch_id, "dtype": batch.x.dtype.name, "shape": ",".join(map(str, batch.x.shape)),
            "x": np.ascontiguousarray(batch.x).astype(batch.x.dtype.newbyteorder("<"), copy=False).tobytes(),
            "y": np.asarray(batch.y, dtype="<i8").tobytes()}


def from_stream_fields(fields: Mapping[bytes, bytes], spec: InputSpec) -> Batch:
    """Decode and re-validate a stream entry (the worker trusts nothing it did not check)."""
    try:
        batch_id = fields[b"batch_id"].decode()
        dtype = fields[b"dtype"].decode()
        shape = [int(v) for v in fields[b"shape"].decode().split(",")]
        raw_x, raw_y = fields[b"x"], fields[b"y"]
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise BatchRejected("entry", f"stream entry is missing or has malformed fields: {exc!r}") from exc
    nbytes = check_declared(dtype, shape, spec)
    if len(raw_x) != nbytes or len(raw_y) != 8 * shape[0]:
        raise BatchRejected("entry", f"stream entry holds {len(raw_x)} input bytes and {len(raw_y)} label bytes, "
                                     f"expected {nbytes} and {8 * shape[0]}")
    x = check_values(np.frombuffer(raw_x, INPUT_DTYPES[dtype]).reshape(shape), spec)
    y = check_labels(np.frombuffer(raw_y, "<i8"), shape[0], spec)
    return Batch(check_batch_id(batch_id), x, y)
