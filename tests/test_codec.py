import base64
import json
import struct

import numpy as np
import pytest
import torch

from service.codec import (
    BatchRejected,
    InputSpec,
    decode_json_batch,
    decode_safetensors_batch,
    encode_json_batch,
    encode_safetensors_batch,
    from_stream_fields,
    to_stream_fields,
)

SPEC = InputSpec(input_shape=(3, 4, 4), num_classes=10, max_samples=8)


def _stream(fields: dict) -> dict:
    return {k.encode(): v.encode() if isinstance(v, str) else v for k, v in fields.items()}


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("encoding", ["json", "safetensors"])
def test_round_trip_gives_the_values_the_learner_expects(dtype, encoding):
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, size=(5, 3, 4, 4)).astype(np.uint8)
    x = raw if dtype == "uint8" else (raw / 255.0).astype(np.float32)
    y = [0, 9, 3, 3, 1]
    if encoding == "json":
        batch = decode_json_batch(json.loads(json.dumps(encode_json_batch("b-1", x, y))), SPEC)
    else:
        batch = decode_safetensors_batch(encode_safetensors_batch(x, y, batch_id="b-1"), SPEC)
    assert batch.batch_id == "b-1" and batch.y.tolist() == y and batch.x.dtype == np.dtype(dtype)
    # uint8 scales exactly as ArrayDataset.tensors() does: x / 255 in float32
    expected = torch.from_numpy(raw).float() / 255.0 if dtype == "uint8" else torch.from_numpy(x)
    assert torch.equal(batch.inputs(), expected)
    again = from_stream_fields(_stream(to_stream_fields(batch)), SPEC)
    assert again.batch_id == "b-1" and np.array_equal(again.x, batch.x) and np.array_equal(again.y, batch.y)


def _json(x=None, y=None, **tensor):
    x = np.zeros((2, 3, 4, 4), np.uint8) if x is None else x
    body = encode_json_batch("b", x, [1, 2] if y is None else y)
    body["x"].update(tensor)
    return body


@pytest.mark.parametrize(("body", "reason", "status", "message"), [
    (_json(shape=[2, 1, 4, 4]), "shape", 422, "[N, 3, 4, 4]"),
    (_json(shape=[2, 3, 4]), "shape", 422, "[N, 3, 4, 4]"),
    (_json(dtype="float64"), "dtype", 422, "uint8, float32"),
    (_json(x=np.full((2, 3, 4, 4), np.nan, np.float32)), "values", 422, "finite"),
    (_json(x=np.full((2, 3, 4, 4), 1.5, np.float32)), "values", 422, "[0, 1]"),
    (_json(x=np.full((2, 3, 4, 4), -0.1, np.float32)), "values", 422, "[0, 1]"),
    (_json(y=[1, 10]), "labels", 422, "[0, 10)"),
    (_json(y=[-1, 0]), "labels", 422, "[0, 10)"),
    (_json(y=[1]), "labels", 422, "one label per sample"),
    (_json(shape=[0, 3, 4, 4], data=""), "batch_size", 422, "1 to 8"),
    (_json(shape=[9, 3, 4, 4]), "batch_size", 422, "1 to 8"),
    (_json(data="!" * 128), "encoding", 400, "not valid base64"),
    (_json(data="AAAA"), "encoding", 400, "base64 of 96 bytes"),
], ids=["channels", "rank", "dtype", "nan", "above-1", "below-0", "label-high", "label-negative", "label-count",
        "empty", "too-many", "bad-base64", "short-data"])
def test_bad_json_batches_are_rejected_with_the_reason(body, reason, status, message):
    with pytest.raises(BatchRejected) as caught:
        decode_json_batch(body, SPEC)
    assert (caught.value.reason, caught.value.status_code) == (reason, status)
    assert message in caught.value.message


def test_size_is_checked_against_the_declared_shape_before_decoding():
    # a declared batch far beyond the limit is refused from its shape alone, whatever the data
    with pytest.raises(BatchRejected, match="1 to 8 samples") as caught:
        decode_json_batch(_json(shape=[10**9, 3, 4, 4], data="not even base64"), SPEC)
    assert caught.value.reason == "batch_size"


def _safetensors_with_header(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.mark.parametrize(("body", "need_labels", "reason", "message"), [
    (b"\x01\x02", True, "encoding", "shorter than its 8-byte header"),
    (struct.pack("<Q", 10**9) + b"{}", True, "encoding", "does not fit"),
    (encode_safetensors_batch(np.zeros((2, 3, 4, 4), np.uint8)), True, "encoding", "exactly the tensors ['x', 'y']"),
    (_safetensors_with_header({"x": {"dtype": "F64", "shape": [1, 3, 4, 4], "data_offsets": [0, 384]},
                               "y": {"dtype": "I64", "shape": [1], "data_offsets": [384, 392]}}, bytes(392)),
     True, "dtype", "uint8, float32"),
    (_safetensors_with_header({"x": {"dtype": "U8", "shape": [2, 3, 4, 4], "data_offsets": [0, 10]},
                               "y": {"dtype": "I64", "shape": [2], "data_offsets": [10, 26]}}, bytes(26)),
     True, "encoding", "data_offsets"),
    (encode_safetensors_batch(np.zeros((2, 3, 4, 4), np.uint8), [0, 1]), True, "batch_id", "batch_id"),
    (encode_safetensors_batch(np.zeros((2, 3, 4, 4), np.uint8), [0, 1], batch_id="a b"), True, "batch_id", ""),
    (encode_safetensors_batch(np.zeros((2, 3, 4, 4), np.uint8), [0, 1], batch_id="b"), False, "encoding",
     "exactly the tensors ['x']"),
], ids=["short", "header-too-long", "no-labels", "float64", "offsets", "no-batch-id", "bad-batch-id", "extra-y"])
def test_bad_safetensors_bodies_are_rejected(body, need_labels, reason, message):
    with pytest.raises(BatchRejected) as caught:
        decode_safetensors_batch(body, SPEC, need_labels=need_labels)
    assert caught.value.reason == reason
    assert message in caught.value.message


def test_float64_inputs_are_sent_as_float32_and_checked():
    # clients may pass float64 arrays: they travel as float32, and out-of-range values are still refused
    x = np.full((1, 3, 4, 4), 0.25)
    batch = decode_safetensors_batch(encode_safetensors_batch(x, [0], batch_id="b"), SPEC)
    assert batch.x.dtype == np.float32 and float(batch.x.max()) == 0.25


def test_predict_bodies_need_no_labels():
    x = np.zeros((3, 3, 4, 4), np.uint8)
    assert decode_json_batch(encode_json_batch(None, x), SPEC, need_labels=False).y is None
    assert decode_safetensors_batch(encode_safetensors_batch(x), SPEC, need_labels=False).y is None


@pytest.mark.parametrize(("change", "message"), [
    ({"shape": "2,3,4"}, "[N, 3, 4, 4]"),
    ({"x": b"\x00" * 5}, "input bytes"),
    ({"y": base64.b64encode(b"x")}, "label bytes"),
    ({"dtype": "int16"}, "dtype"),
])
def test_malformed_stream_entries_are_refused(change, message):
    batch = decode_json_batch(_json(), SPEC)
    fields = {**to_stream_fields(batch), **change}
    with pytest.raises(BatchRejected) as caught:
        from_stream_fields(_stream(fields), SPEC)
    assert message in caught.value.message


def test_stream_entry_without_fields_is_refused():
    with pytest.raises(BatchRejected, match="missing or has malformed fields") as caught:
        from_stream_fields({b"batch_id": b"b"}, SPEC)
    assert caught.value.reason == "entry"
