"""Security properties: who gets in (401 vs 403, constant-time key checks), what is never logged, what is
never unpickled, what is written atomically, and that nothing from a request names a file."""

import ast
import hmac
import os
import signal
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import service.deployment.api.deps
from service.core.atomic import atomic_write_bytes
from service.core.checkpoint import load_checkpoint, save_checkpoint
from service.deployment.codec import encode_json_batch
from service.deployment.redis_queue import RedisQueue
from service.deployment.settings import ServiceSettings
from tests.service_harness import (
    ADMIN_TOKEN,
    API_KEY,
    ROOT,
    ApiProcess,
    ApiServer,
    WorkerProcess,
    make_settings,
    needs_redis,
    publish_model,
    wait_until,
)


def _batch_body(batch_id: str = "sec-1") -> dict:
    return encode_json_batch(batch_id, np.zeros((2, 1, 8, 8), np.uint8), [1, 2])


# -- who gets in ---------------------------------------------------------------------------------------------
PREDICT = encode_json_batch(None, np.zeros((2, 1, 8, 8), np.uint8))
# (method, path, body, who may call it, what the client key gets when allowed, what the admin token gets)
ROUTES = [("POST", "/v1/ingest", _batch_body(), "client", 202, 200),  # the admin's post is a duplicate: 200
          ("POST", "/v1/predict", PREDICT, "client", 200, 200), ("GET", "/v1/status", None, "client", 200, 200),
          ("GET", "/v1/batches/sec-1", None, "client", 200, 200), ("GET", "/v1/model", None, "admin", 403, 200)]
KEYS = {"none": None, "empty": "", "wrong": "not-the-key", "client key with a suffix": API_KEY + "x",
        "client key's prefix": API_KEY[:-1], "client": API_KEY, "admin": ADMIN_TOKEN}


@needs_redis
def test_401_without_a_valid_key_403_with_the_client_key_on_admin_routes(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path)
    with ApiServer(settings) as api:
        publish_model(RedisQueue.from_settings(settings))
        for method, path, body, _, as_client, as_admin in ROUTES:
            for key_name, key in KEYS.items():
                headers = {} if key is None else {"X-API-Key": key}
                response = httpx.request(method, api.url + path, headers=headers, json=body, timeout=30)
                expected = {"client": as_client, "admin": as_admin}.get(key_name, 401)
                assert response.status_code == expected, (method, path, key_name, response.text)
                if expected == 401:  # not authenticated: no key, or one that matches nothing
                    assert response.headers["WWW-Authenticate"] == "ApiKey"
                    assert response.json()["reason"] == "auth"
                if expected == 403:  # authenticated, but this key may not do this
                    assert response.json()["reason"] == "forbidden"


@needs_redis
def test_keys_are_compared_in_constant_time(namespace, tmp_path, monkeypatch):
    compared, original = [], hmac.compare_digest

    def compare_digest(given, secret):
        compared.append((given, secret))
        return original(given, secret)

    monkeypatch.setattr(service.deployment.api.deps.hmac, "compare_digest", compare_digest)
    settings = make_settings(namespace, tmp_path)
    with ApiServer(settings) as api:
        assert api.client.get("/v1/status", headers={"X-API-Key": "guess"}).status_code == 401
        assert api.client.get("/v1/status").status_code == 200
    assert (b"guess", API_KEY.encode()) in compared and (API_KEY.encode(), API_KEY.encode()) in compared
    # and no other comparison of a secret: every get_secret_value() in the API feeds hmac.compare_digest
    for path in (ROOT / "service" / "api").glob("*.py"):
        tree = ast.parse(path.read_text())
        secret_reads = [n for n in ast.walk(tree) if isinstance(n, ast.Attribute) and n.attr == "get_secret_value"]
        digests = [n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
                   and n.func.attr == "compare_digest"]
        inside = {id(sub) for call in digests for sub in ast.walk(call)}
        assert all(id(read) in inside for read in secret_reads), f"{path.name} reads a secret outside compare_digest"


def test_settings_never_show_the_keys():
    settings = ServiceSettings(api_key="visible-if-leaked-1", admin_token="visible-if-leaked-2")
    for text in (repr(settings), str(settings), str(settings.model_dump()), settings.model_dump_json()):
        assert "visible-if-leaked" not in text


@needs_redis
@pytest.mark.slow
def test_keys_never_reach_the_logs(digits_experiment, cache_dir, namespace, tmp_path):
    client_key, admin_token = f"client-{os.urandom(8).hex()}", f"admin-{os.urandom(8).hex()}"
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, api_key=client_key, admin_token=admin_token)
    with WorkerProcess(settings, "--log-level", "debug") as worker, ApiProcess(settings, "--log-level", "debug",
                                                                              "--access-log") as api:
        api.wait_live()
        with httpx.Client(base_url=api.url, timeout=30) as client:
            wait_until(lambda: client.get("/health/ready").status_code == 200, 90, "the service to be ready",
                       interval=0.1, diagnostics=worker.output)
            for key in (client_key, admin_token):
                headers = {"X-API-Key": key}
                assert client.post("/v1/ingest", json=_batch_body(f"log-{key[:5]}"), headers=headers).status_code == 202
                assert client.get("/v1/model", headers={"X-API-Key": admin_token}).status_code == 200
                status = client.get(f"/v1/batches/log-{key[:5]}", params={"wait": 10}, headers=headers)
                assert status.json()["state"] == "applied"
                seen = [status.text, client.get("/v1/status", headers=headers).text, client.get("/metrics").text]
                assert not any(k in text for text in seen for k in (client_key, admin_token))
            for wrong in (client_key[:-1], admin_token + "0"):  # near misses are refused, and not echoed
                refused = client.get("/v1/model", headers={"X-API-Key": wrong})
                assert refused.status_code == 401 and wrong not in refused.text
        assert worker.terminate() == 0
        assert api.terminate() in (0, -signal.SIGTERM)  # uvicorn shuts down, then re-raises the signal
    logs = worker.output() + api.output()
    assert "POST /v1/ingest" in logs and "dscguard.worker" in logs  # the logs were written, at debug level
    assert client_key not in logs and admin_token not in logs
    assert client_key[:-1] not in logs and admin_token not in logs


# -- what is never unpickled ---------------------------------------------------------------------------------
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}


def unsafe_loads(source: str) -> list[str]:
    """Code that could unpickle: pickle-family imports, torch.load without weights_only=True,
    np.load with allow_pickle=True, pandas.read_pickle."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"import {n}" for n in names if n.split(".")[0] in UNSAFE_MODULES]
        if isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
            if name.endswith("torch.load") and keywords.get("weights_only") != "True":
                found.append(f"{name}(...) without weights_only=True")
            if name.split(".")[-1] == "load" and name.split(".")[0] in ("np", "numpy") and (
                    keywords.get("allow_pickle") == "True"):
                found.append(f"{name}(..., allow_pickle=True)")
            if name.split(".")[-1] == "read_pickle":
                found.append(name)
    return found


def test_the_unpickling_check_finds_what_it_looks_for():
    bad = ("import pickle\nfrom joblib import load\nimport torch, numpy as np\ntorch.load('m.pt')\n"
           "torch.load('m.pt', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n")
    assert len(unsafe_loads(bad)) == 5
    assert unsafe_loads("torch.load('m.pt', weights_only=True)\nnp.load('a.npz', allow_pickle=False)\n") == []


def test_no_code_path_unpickles():
    files = [p for package in ("service", "attacker_sim", "benchmarks") for p in (ROOT / package).rglob("*.py")]
    assert len(files) > 20
    found = {str(p.relative_to(ROOT)): hits for p in files if (hits := unsafe_loads(p.read_text()))}
    assert found == {}


# -- what is written atomically ------------------------------------------------------------------------------
def test_a_failed_atomic_write_leaves_the_old_file_and_no_litter(tmp_path, monkeypatch):
    target = atomic_write_bytes(tmp_path / "report.json", b'{"old": true}')

    def fail(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b'{"new": tr')
    assert target.read_bytes() == b'{"old": true}' and os.listdir(tmp_path) == ["report.json"]


def test_a_failed_checkpoint_write_leaves_the_old_checkpoint_and_no_litter(tmp_path, monkeypatch):
    directory = save_checkpoint(tmp_path / "step-1", {"w": torch.ones(3)}, {"batches_applied": 1})

    def crash_mid_write(tensors, path):
        Path(path).write_bytes(b"\x10\x00\x00\x00half a file")
        raise OSError("killed mid-write")

    monkeypatch.setattr("service.core.checkpoint.save_file", crash_mid_write)
    with pytest.raises(OSError, match="killed mid-write"):
        save_checkpoint(directory, {"w": torch.zeros(3)}, {"batches_applied": 2})
    tensors, meta = load_checkpoint(directory)
    assert torch.equal(tensors["w"], torch.ones(3)) and meta == {"batches_applied": 1}
    assert os.listdir(tmp_path) == ["step-1"]


# -- nothing from a request names a file --------------------------------------------------------------------
FILE_NAMES = {"open", "Path", "PurePath", "shutil", "tempfile", "save_file", "load_file", "write_bytes", "write_text",
              "unlink", "mkdir", "rmtree", "fsync_path", "atomic_write_bytes", "atomic_write_text"}


def test_the_api_has_no_file_access():
    for path in (ROOT / "service" / "api").glob("*.py"):
        tree = ast.parse(path.read_text())
        used = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)} | {
            n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
        assert not used & FILE_NAMES, f"{path.name} uses {used & FILE_NAMES}"


@needs_redis
@pytest.mark.parametrize("batch_id", ["../../etc/passwd", "..%2F..%2Fetc", "a\\b", "/abs", "x" * 129, "é"],
                         ids=["parent", "encoded", "backslash", "absolute", "too-long", "non-ascii"])
def test_batch_ids_that_could_be_paths_are_refused(namespace, tmp_path, batch_id):
    settings = make_settings(namespace, tmp_path)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        publish_model(queue)
        response = api.client.post("/v1/ingest", json=_batch_body(batch_id))
        assert response.status_code == 422 and response.json()["reason"] == "schema"
        assert queue.client.xlen(queue.stream) == 0
        looked_up = api.client.get(f"/v1/batches/{batch_id}")
        assert looked_up.status_code == 404, looked_up.text  # a Redis key lookup at most, never a file
