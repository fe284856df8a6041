import base64
import json
import struct
import tracemalloc

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from service.deployment.codec import (
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


# -- fuzzing: arbitrary and mutated inputs are refused with BatchRejected, never anything else ------------------
# A decode may allocate about what a legal batch of SPEC needs (8 x 3x4x4 float32 = 1.5 KiB, plus numpy's and
# json's overhead), whatever the input declares: a small body that declares a huge shape is refused from the
# declaration, before any tensor exists.
ALLOCATION_LIMIT_BYTES = 256 * 1024
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=4), max_leaves=12)
DIMENSIONS = st.integers(-2, 10) | st.integers(-(2**70), 2**70) | st.sampled_from([3, 4, 8, 10**9, 2**62])


def _decoded_or_rejected(decode, *args, **kwargs):
    """The batch, or the BatchRejected refusal (no other exception may escape); the peak allocation stays small."""
    tracemalloc.start()
    try:
        return decode(*args, **kwargs)
    except BatchRejected as exc:
        assert exc.reason and exc.message and exc.status_code in (400, 422)
        return exc
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < ALLOCATION_LIMIT_BYTES, f"decoding allocated {peak} bytes"


@settings(max_examples=200, deadline=None)
@given(dtype=st.sampled_from(["uint8", "float32"]) | st.text(max_size=8),
       shape=st.lists(DIMENSIONS, max_size=6), data=st.text(max_size=200) | st.binary(max_size=600).map(
           lambda raw: base64.b64encode(raw).decode()),
       y=st.lists(st.integers(-(2**65), 2**65), max_size=10), batch_id=st.text(max_size=140))
def test_any_schema_shaped_json_batch_decodes_or_is_rejected(dtype, shape, data, y, batch_id):
    payload = {"batch_id": batch_id, "x": {"dtype": dtype, "shape": shape, "data": data}, "y": y}
    batch = _decoded_or_rejected(decode_json_batch, payload, SPEC)
    if not isinstance(batch, BatchRejected):  # whatever got through is a batch the learner can take
        assert batch.x.shape[1:] == SPEC.input_shape and 1 <= len(batch) <= SPEC.max_samples
        assert batch.y.tolist() == y and all(0 <= v < SPEC.num_classes for v in y)
        assert batch.inputs().min() >= 0 and batch.inputs().max() <= 1


def _valid_safetensors(n: int, dtype: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.uint8)
    x = raw if dtype == "uint8" else (raw / 255).astype(np.float32)
    return encode_safetensors_batch(x, rng.integers(0, 10, n), batch_id=f"b{seed}")


@settings(max_examples=200, deadline=None)
@given(body=st.builds(_valid_safetensors, st.integers(1, 8), st.sampled_from(["uint8", "float32"]),
                      st.integers(0, 1000)),
       cuts=st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 64), st.binary(max_size=16)), max_size=4),
       need_labels=st.booleans())
def test_mutated_safetensors_bodies_decode_or_are_rejected(body, cuts, need_labels):
    for position, removed, inserted in cuts:  # overwrite, cut out or insert bytes anywhere, header included
        position %= len(body) + 1
        body = body[:position] + inserted + body[position + removed :]
    _decoded_or_rejected(decode_safetensors_batch, body, SPEC, need_labels=need_labels)


def _tensor_header(dtypes: list[str], rank: int) -> st.SearchStrategy:
    """A tensor description with plausible or arbitrary fields."""
    return st.fixed_dictionaries({"dtype": st.sampled_from(dtypes) | JSON_VALUES,
                                  "shape": st.lists(DIMENSIONS, max_size=rank) | JSON_VALUES,
                                  "data_offsets": st.lists(DIMENSIONS, max_size=3) | JSON_VALUES})


@settings(max_examples=200, deadline=None)
@given(header=st.dictionaries(st.sampled_from(["x", "y", "__metadata__", "z"]), JSON_VALUES, max_size=4)
       | st.fixed_dictionaries({"x": _tensor_header(["U8", "F32", "F64"], 5), "y": _tensor_header(["I64", "I32"], 2),
                                "__metadata__": st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=2)}),
       data=st.binary(max_size=2048))
def test_arbitrary_safetensors_headers_are_rejected_before_allocating(header, data):
    _decoded_or_rejected(decode_safetensors_batch, _safetensors_with_header(header, data), SPEC)


@pytest.mark.parametrize("nesting", [10_000, 200_000])
def test_deeply_nested_safetensors_header_is_rejected(nesting):
    header = b"[" * nesting + b"]" * nesting
    with pytest.raises(BatchRejected, match="header"):
        decode_safetensors_batch(struct.pack("<Q", len(header)) + header, SPEC)


def test_a_tiny_body_declaring_a_huge_tensor_is_rejected_without_allocating_it():
    huge = {"x": {"dtype": "U8", "shape": [2**40, 3, 4, 4], "data_offsets": [0, 48 * 2**40]},
            "y": {"dtype": "I64", "shape": [2**40], "data_offsets": [0, 8]}, "__metadata__": {"batch_id": "b"}}
    for refusal in (_decoded_or_rejected(decode_safetensors_batch, _safetensors_with_header(huge, bytes(16)), SPEC),
                    _decoded_or_rejected(decode_json_batch, _json(shape=[2**40, 3, 4, 4], data="AAAA"), SPEC)):
        assert isinstance(refusal, BatchRejected) and "1 to 8 samples" in refusal.message


STREAM_FIELD = st.binary(max_size=64) | st.sampled_from([b"uint8", b"float32", b"2,3,4,4", b"1,3,4,4", b"b"])


@settings(max_examples=200, deadline=None)
@given(fields=st.dictionaries(st.sampled_from([b"batch_id", b"dtype", b"shape", b"x", b"y", b"other"]),
                              STREAM_FIELD, max_size=6),
       keep=st.builds(lambda n, dtype, seed: dict(_stream(to_stream_fields(decode_safetensors_batch(
           _valid_safetensors(n, dtype, seed), SPEC)))), st.integers(1, 8), st.sampled_from(["uint8", "float32"]),
           st.integers(0, 100)))
def test_tampered_stream_entries_decode_or_are_rejected(fields, keep):
    _decoded_or_rejected(from_stream_fields, {**keep, **fields}, SPEC)
