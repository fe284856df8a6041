"""The API against real Redis and a real uvicorn on loopback; the model is published as the worker does."""

import base64
import json
import os
import sys

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from service.deployment.codec import InputSpec, encode_json_batch, encode_safetensors_batch, from_stream_fields
from service.deployment.model_store import model_from_bytes
from service.deployment.processes import spawn, stop
from service.deployment.redis_queue import RedisQueue, connect
from service.deployment.worker.lease import Lease
from tests.service_harness import (
    ADMIN_TOKEN,
    API_KEY,
    MODEL_SPEC,
    REDIS_URL,
    ROOT,
    ApiServer,
    free_port,
    make_settings,
    needs_redis,
    publish_model,
    redis_namespace,
    settings_env,
    wait_until,
)

pytestmark = needs_redis

SAFETENSORS = {"Content-Type": "application/vnd.safetensors"}


def _batch(n=4, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 1, 8, 8)).astype(np.uint8)
    x = x if dtype == np.uint8 else (x / 255).astype(np.float32)
    return x, rng.integers(0, 10, n).tolist()


def _metric(text: str, name: str, **labels) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


@pytest.fixture
def service(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, max_batch_samples=16, max_body_bytes=64 * 1024,
                             queue_max_length=3)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        yield api, queue


def test_valid_batches_are_enqueued_once_in_either_encoding(service):
    api, queue = service
    publish_model(queue)
    x1, y1 = _batch(4, np.uint8, seed=1)
    x2, y2 = _batch(3, np.float32, seed=2)
    first = api.client.post("/v1/ingest", json=encode_json_batch("batch-1", x1, y1))
    second = api.client.post("/v1/ingest", content=encode_safetensors_batch(x2, y2, batch_id="batch-2"),
                             headers=SAFETENSORS)
    assert (first.status_code, second.status_code) == (202, 202), (first.text, second.text)
    assert first.json()["state"] == "queued"
    again = api.client.post("/v1/ingest", content=encode_safetensors_batch(x1, y1, batch_id="batch-1"),
                            headers=SAFETENSORS)
    assert again.status_code == 200 and again.json() == {**first.json(), "state": "duplicate"}

    entries = queue.client.xrange(queue.stream)
    assert [e[0].decode() for e in entries] == [first.json()["entry_id"], second.json()["entry_id"]]
    spec = InputSpec.from_model_spec(MODEL_SPEC, 16)
    decoded = [from_stream_fields(fields, spec) for _, fields in entries]
    assert decoded[0].batch_id == "batch-1" and np.array_equal(decoded[0].x, x1) and decoded[0].y.tolist() == y1
    assert decoded[1].x.dtype == np.float32 and np.array_equal(decoded[1].x, x2) and decoded[1].y.tolist() == y2
    assert api.client.get("/v1/batches/batch-2").json()["state"] == "queued"
    assert api.client.get("/v1/batches/nope").status_code == 404

    metrics = api.client.get("/metrics").text
    assert _metric(metrics, "dscguard_ingested_samples_total") == 7
    assert _metric(metrics, "dscguard_http_requests_total", route="/v1/ingest", status="202") == 2
    assert _metric(metrics, "dscguard_http_requests_total", route="/v1/ingest", status="200") == 1


def _json_body(**change):
    x, y = _batch(2)
    body = encode_json_batch("bad-batch", x, y)
    body["x"].update(change.pop("x", {}))
    body.update(change)
    return {"json": body}


def _tensor(x: np.ndarray) -> dict:
    return {"dtype": x.dtype.name, "shape": list(x.shape), "data": base64.b64encode(x.tobytes()).decode()}


BAD_REQUESTS = {
    "wrong shape": (_json_body(x={"shape": [2, 3, 8, 8]}), 422, "shape"),
    "wrong dtype": (_json_body(x={"dtype": "int16"}), 422, "schema"),
    "NaN": (_json_body(x=_tensor(np.full((2, 1, 8, 8), np.nan, np.float32))), 422, "values"),
    "value above 1": (_json_body(x=_tensor(np.full((2, 1, 8, 8), 1.01, np.float32))), 422, "values"),
    "value below 0": (_json_body(x=_tensor(np.full((2, 1, 8, 8), -0.5, np.float32))), 422, "values"),
    "label out of range": (_json_body(y=[0, 10]), 422, "labels"),
    "negative label": (_json_body(y=[-1, 0]), 422, "labels"),
    "float labels": (_json_body(y=[0.0, 1.0]), 422, "schema"),
    "one label for two samples": (_json_body(y=[1]), 422, "labels"),
    "empty batch": (_json_body(x=_tensor(np.zeros((0, 1, 8, 8), np.uint8)), y=[]), 422, "batch_size"),
    "too many samples": (_json_body(x=_tensor(np.zeros((17, 1, 8, 8), np.uint8)), y=[0] * 17), 422, "batch_size"),
    "oversize body": ({"content": b"{" + b" " * (64 * 1024), "headers": {"Content-Type": "application/json"}},
                      413, "body_too_large"),
    "oversize chunked body": ({"content": iter([b" " * 40_000, b" " * 40_000]),
                               "headers": {"Content-Type": "application/json"}}, 413, "body_too_large"),
    "bad base64": (_json_body(x={"data": "*" * 172}), 400, "encoding"),
    "truncated base64": (_json_body(x={"data": "AAAA"}), 400, "encoding"),
    "not JSON": ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "encoding"),
    "missing key": ({**_json_body(), "headers": {"X-API-Key": ""}}, 401, "auth"),
    "wrong key": ({**_json_body(), "headers": {"X-API-Key": "guess"}}, 401, "auth"),
    "unknown field": (_json_body(extra=1), 422, "schema"),
    "unknown tensor field": (_json_body(x={"order": "C"}), 422, "schema"),
    "bad batch_id": (_json_body(batch_id="no spaces allowed"), 422, "schema"),
    "unsupported media type": ({"content": b"x", "headers": {"Content-Type": "text/plain"}}, 415, "media_type"),
    "safetensors without labels": ({"content": encode_safetensors_batch(_batch(2)[0], batch_id="bad-batch"),
                                    "headers": SAFETENSORS}, 400, "encoding"),
    "safetensors NaN": ({"content": encode_safetensors_batch(np.full((2, 1, 8, 8), np.nan, np.float32), [0, 1],
                                                              batch_id="bad-batch"), "headers": SAFETENSORS},
                        422, "values"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_bad_requests_are_refused_clearly_and_nothing_is_enqueued(service, case):
    api, queue = service
    publish_model(queue)
    request, status, reason = BAD_REQUESTS[case]
    response = api.client.post("/v1/ingest", **request)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["reason"] == reason and len(body["detail"]) > 10
    assert queue.client.xlen(queue.stream) == 0
    assert not queue.client.exists(queue.batch_key("bad-batch"))
    assert _metric(api.client.get("/metrics").text, "dscguard_rejected_requests_total", reason=reason) == 1
    # the refusal left nothing behind: the same batch_id is accepted once the request is right
    assert api.client.post("/v1/ingest", **_json_body()).status_code == 202


def test_full_queue_answers_429_with_retry_after(service):
    api, queue = service
    publish_model(queue)
    x, y = _batch(2)
    for i in range(3):
        assert api.client.post("/v1/ingest", json=encode_json_batch(f"b{i}", x, y)).status_code == 202
    full = api.client.post("/v1/ingest", json=encode_json_batch("b3", x, y))
    assert full.status_code == 429 and full.headers["Retry-After"] == "1" and full.json()["reason"] == "queue_full"
    assert queue.client.xlen(queue.stream) == 3 and not queue.client.exists(queue.batch_key("b3"))
    # a retry of a batch already queued is still recognised while the queue is full
    assert api.client.post("/v1/ingest", json=encode_json_batch("b0", x, y)).json()["state"] == "duplicate"


def test_redis_down_answers_503(tmp_path):
    settings = make_settings("unused", tmp_path, redis_url="redis://127.0.0.1:1/0", redis_timeout_seconds=0.5)
    with ApiServer(settings) as api:
        x, y = _batch(2)
        response = api.client.post("/v1/ingest", json=encode_json_batch("b", x, y))
        assert response.status_code == 503 and response.json()["reason"] == "redis_unavailable"
        assert response.headers["Retry-After"] == "1"
        assert api.client.get("/health/live").status_code == 200
        ready = api.client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] is False


def test_readiness_needs_redis_a_live_worker_and_a_model(service):
    api, queue = service
    ready = api.client.get("/health/ready")
    assert ready.status_code == 503 and ready.json()["checks"] == {"redis": True, "worker": False, "model": False}
    assert api.client.post("/v1/ingest", **_json_body()).json()["reason"] == "no_model"
    publish_model(queue, alive=False)
    assert api.client.get("/health/ready").json()["checks"] == {"redis": True, "worker": False, "model": True}
    Lease(queue, "test-worker", ttl_seconds=30).acquire(wait_seconds=0)
    assert api.client.get("/health/ready").json() == {"ready": True, "checks": {"redis": True, "worker": True,
                                                                                 "model": True}}


def test_keys_guard_the_routes(service):
    api, queue = service
    model = publish_model(queue, version=7)
    assert api.client.get("/v1/status", headers={"X-API-Key": ""}).status_code == 401
    assert api.client.get("/v1/status").json()["model_version"] == 7
    forbidden = api.client.get("/v1/model")
    assert forbidden.status_code == 403 and forbidden.json()["reason"] == "forbidden"
    assert api.client.get("/v1/model", headers={"X-API-Key": "guess"}).status_code == 401
    download = api.client.get("/v1/model", headers={"X-API-Key": ADMIN_TOKEN})
    assert download.status_code == 200 and download.headers["X-Model-Version"] == "7"
    published = model_from_bytes(download.content)
    assert published.version == 7 and published.spec == MODEL_SPEC
    for name, tensor in model.state_dict().items():
        assert torch.equal(published.model.state_dict()[name], tensor)


def test_admin_route_is_disabled_without_an_admin_token(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, admin_token=None)
    with ApiServer(settings) as api:
        publish_model(RedisQueue.from_settings(settings))
        response = api.client.get("/v1/model", headers={"X-API-Key": API_KEY})
        assert response.status_code == 403 and "DSCGUARD_ADMIN_TOKEN" in response.json()["detail"]


def test_predict_follows_the_published_version(service):
    api, queue = service
    x, _ = _batch(6, np.float32, seed=3)
    for version, seed in ((1, 0), (2, 1)):
        model = publish_model(queue, version=version, seed=seed)
        expected = model(torch.from_numpy(x)).argmax(1).tolist()
        by_json = api.client.post("/v1/predict", json=encode_json_batch(None, x)).json()
        by_safetensors = api.client.post("/v1/predict", content=encode_safetensors_batch(x),
                                         headers=SAFETENSORS).json()
        assert by_json == by_safetensors == {"labels": expected, "model_version": version}
    bad = api.client.post("/v1/predict", json=encode_json_batch(None, np.zeros((2, 1, 4, 4), np.uint8)))
    assert bad.status_code == 422 and bad.json()["reason"] == "shape"


def test_status_reports_queue_and_audit(service):
    api, queue = service
    publish_model(queue, version=3)
    x, y = _batch(2)
    api.client.post("/v1/ingest", json=encode_json_batch("b0", x, y))
    record = {"batch_id": "b-old", "samples": 2, "flagged": 1, "model_version": 3}
    queue.client.xadd(queue.audit_stream, {"record": json.dumps(record)})
    status = api.client.get("/v1/status", params={"audit": 5}).json()
    assert status["model_version"] == 3 and status["strategy"] == "dsc" and status["worker_alive"]
    assert status["queue"]["depth"] == 1 and status["queue"]["lag_seconds"] >= 0
    assert status["audit"] == [record]


def test_openapi_documents_both_encodings(service):
    api, _ = service
    spec = api.client.get("/openapi.json").json()
    content = spec["paths"]["/v1/ingest"]["post"]["requestBody"]["content"]
    assert content["application/json"]["schema"] == {"$ref": "#/components/schemas/IngestRequest"}
    assert content["application/vnd.safetensors"]["schema"]["format"] == "binary"
    ingest = spec["components"]["schemas"]["IngestRequest"]
    assert set(ingest["required"]) == {"batch_id", "x", "y"} and ingest["additionalProperties"] is False
    assert spec["components"]["schemas"]["TensorPayload"]["properties"]["dtype"]["enum"] == ["uint8", "float32"]


def test_namespaces_are_isolated(namespace, tmp_path):
    with redis_namespace() as other_name:
        other = RedisQueue(connect(REDIS_URL), other_name)
        settings = make_settings(namespace, tmp_path)
        with ApiServer(settings) as api:
            publish_model(RedisQueue.from_settings(settings))
            assert api.client.post("/v1/ingest", **_json_body()).status_code == 202
        assert other.client.xlen(other.stream) == 0 and other.model_spec() is None
        assert RedisQueue(connect(REDIS_URL), namespace).client.xlen(f"{namespace}:ingest") == 1


def test_metrics_add_up_over_several_api_processes(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path)
    publish_model(RedisQueue.from_settings(settings))
    port, metrics_dir, log = free_port(), tmp_path / "metrics", tmp_path / "serve.log"
    metrics_dir.mkdir()
    env = {**os.environ, **settings_env(settings), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
    command = [sys.executable, "-m", "service.cli", "serve", "--port", str(port), "--workers", "2",
               "--log-level", "warning"]
    server = spawn(command, log, env=env, cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        # each process writes its own metric files once its app exists: wait for both
        wait_until(lambda: _answers(url) and len(_pids(metrics_dir)) == 2, 60, "two API processes to start",
                   interval=0.1, diagnostics=log.read_text, watch=[server])
        x, y = _batch(2)
        for index in range(12):  # a new connection each time: the processes share them out
            with httpx.Client(base_url=url, headers={"X-API-Key": API_KEY}) as client:
                assert client.post("/v1/ingest", json=encode_json_batch(f"b{index}", x, y)).status_code == 202
        for _ in range(3):
            metrics = httpx.get(f"{url}/metrics").text
            assert _metric(metrics, "dscguard_http_requests_total", route="/v1/ingest", status="202") == 12
            assert _metric(metrics, "dscguard_ingested_samples_total") == 24
    finally:
        stop(server)


def _pids(metrics_dir) -> set[str]:
    return {path.stem.rsplit("_", 1)[-1] for path in metrics_dir.glob("counter_*.db")}


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health/live").status_code == 200
    except httpx.TransportError:
        return False
