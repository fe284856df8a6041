"""Issue 16: what an independent probe found, each reproduced with the probe's own request.

1. an upload the client aborts is a 499 (client closed request), not a 500 with a traceback;
2. long-poll waits hold no thread: liveness answers while 200 are open, and each ends on time;
3. slow clients are cut off: a stalled body gets 408, an incomplete request head is closed, and
   connections beyond the limit get 503;
4. what readers see never goes backwards while a restarted worker replays from an older checkpoint,
   and a batch reported committed is in a checkpoint;
5. every error answer is {"detail", "reason"}, and an oversize safetensors header names the cap;
6. metrics say what happens: the step phases the README lists, no canary series while the canary is
   off, a flagged counter that says what it counts;
7. placeholder or empty secrets stop the API and the worker with a one-line message.
"""

import asyncio
import json
import logging
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.core.checkpoint import load_meta
from service.deployment.checkpoint_store import checkpoints
from service.deployment.codec import Batch, encode_json_batch, to_stream_fields
from service.deployment.metrics import WorkerMetrics, render
from service.deployment.redis_queue import RedisQueue
from service.deployment.settings import ServiceSettings
from service.deployment.worker import Worker
from tests.service_harness import (
    API_KEY,
    ROOT,
    ApiProcess,
    ApiServer,
    free_port,
    make_settings,
    needs_redis,
    publish_model,
    settings_env,
    wait_until,
)

SAFETENSORS = {"Content-Type": "application/vnd.safetensors"}


def _metric(text: str, name: str, **labels) -> float:
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()))


def _address(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def _read_until_closed(sock: socket.socket, timeout: float) -> tuple[bytes, float | None]:
    """Everything the server sends until it closes the connection, and when it closed (None: still open)."""
    started, received = time.monotonic(), b""
    sock.settimeout(timeout)
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, None
    except ConnectionResetError:
        pass
    return received, time.monotonic() - started


def _head(method: str, path: str, content_length: int | None = None, media_type: str = "application/json") -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"X-API-Key: {API_KEY}", f"Content-Type: {media_type}"]
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def server_logs():
    """What uvicorn and the API log (uvicorn's loggers do not propagate to the root logger)."""
    handler = _Records()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "dscguard.api")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler.records
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(handler)
        logger.setLevel(level)


# -- 1. an aborted upload -------------------------------------------------------------------------------------
@needs_redis
@pytest.mark.parametrize("path", ["/v1/ingest", "/v1/predict"])
def test_an_upload_the_client_aborts_is_counted_499_and_logged_without_a_traceback(namespace, tmp_path, path,
                                                                                   server_logs):
    settings = make_settings(namespace, tmp_path)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        publish_model(queue)
        with socket.create_connection(_address(api.url)) as sock:  # the probe: 1000 bytes announced, 11 sent
            sock.sendall(_head("POST", path, content_length=1000) + b'{"batch_id"')
        wait_until(lambda: _metric(api.client.get("/metrics").text, "dscguard_http_requests_total", route=path,
                                   status="499") == 1, 10, "the aborted request to be counted as 499",
                   diagnostics=lambda: api.client.get("/metrics").text)
        metrics = api.client.get("/metrics").text
        assert _metric(metrics, "dscguard_http_requests_total", status="500") == 0
        assert queue.client.xlen(queue.stream) == 0
        # the server is fine: the next request is answered
        assert api.client.get("/health/live").status_code == 200
    errors = [r for r in server_logs if r.levelno >= logging.ERROR or r.exc_info]
    assert not errors, [r.getMessage() for r in errors]
    closed = [r for r in server_logs if "closed the connection" in r.getMessage()]
    assert len(closed) == 1 and closed[0].levelno == logging.INFO and path in closed[0].getMessage()


# -- 2. long-poll waits and liveness --------------------------------------------------------------------------
WAITS, WAIT_SECONDS = 200, 5.0


@needs_redis
def test_liveness_answers_while_200_waits_are_open_and_each_wait_ends_on_time(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path)
    queue = RedisQueue.from_settings(settings)
    publish_model(queue, alive=False)  # no worker: the batch stays queued, every wait runs to its end
    with ApiProcess(settings) as api:  # its own process, as deployed: the clients here do not share its GIL
        api.wait_live()
        x = np.zeros((1, 1, 8, 8), np.uint8)
        ingest = httpx.post(f"{api.url}/v1/ingest", json=encode_json_batch("waited", x, [0]),
                            headers={"X-API-Key": API_KEY}, timeout=30)
        assert ingest.status_code == 202, ingest.text

        async def probe() -> tuple[list, list]:
            limits = httpx.Limits(max_connections=WAITS + 10, max_keepalive_connections=WAITS + 10)
            async with httpx.AsyncClient(base_url=api.url, headers={"X-API-Key": API_KEY}, limits=limits,
                                         timeout=60) as client:
                async def wait_once():
                    started = time.monotonic()
                    response = await client.get("/v1/batches/waited", params={"wait": WAIT_SECONDS})
                    return response.status_code, response.json().get("state"), time.monotonic() - started

                waits = [asyncio.create_task(wait_once()) for _ in range(WAITS)]
                await asyncio.sleep(1.0)  # every wait is open now (each lasts 3 s)
                probes = []
                for _ in range(3):
                    started = time.monotonic()
                    response = await client.get("/health/live")
                    probes.append((response.status_code, time.monotonic() - started))
                    await asyncio.sleep(0.3)
                return probes, await asyncio.gather(*waits)

        probes, waits = asyncio.run(probe())
    print(f"liveness with {WAITS} waits open: {[round(t, 3) for _, t in probes]} s; waits took "
          f"{min(t for *_, t in waits):.2f}-{max(t for *_, t in waits):.2f} s")
    assert all(status == 200 and took < 1.0 for status, took in probes), probes
    assert all(status == 200 and state == "queued" for status, state, _ in waits), waits[:3]
    took = [t for *_, t in waits]
    # waits that held threads would run in rounds of the thread pool (40 threads: 200 waits take 5 rounds, 5x the
    # wait; the probe's 60 waits took 2x); on a loaded 2-core machine 200 requests and their connections take up
    # to 3 s to be answered (a clean-clone CI run saw 8.01 s), so the bound sits at 2x, below any second round
    assert min(took) >= WAIT_SECONDS - 0.2 and max(took) < 2 * WAIT_SECONDS, (min(took), max(took))


@needs_redis
def test_a_wait_ends_when_the_batch_leaves_the_queue(namespace, tmp_path):
    """The wait is woken by the worker's state change, not by its timeout."""
    settings = make_settings(namespace, tmp_path)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        publish_model(queue, alive=False)
        x = np.zeros((1, 1, 8, 8), np.uint8)
        entry_id = api.client.post("/v1/ingest", json=encode_json_batch("soon-gone", x, [0])).json()["entry_id"]
        timer = threading.Timer(0.5, queue.dead_letter, (entry_id, {b"batch_id": b"soon-gone"}, "entry", "test"))
        timer.start()
        started = time.monotonic()
        answer = api.client.get("/v1/batches/soon-gone", params={"wait": 20}).json()
        took = time.monotonic() - started
        timer.join()
    assert answer["state"] == "dead_letter" and took < 5, (answer, took)


# -- 3. slow clients ------------------------------------------------------------------------------------------
@needs_redis
def test_a_stalled_body_is_answered_408_within_the_body_timeout(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, body_timeout_seconds=1.0)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        publish_model(queue)
        with socket.create_connection(_address(api.url)) as sock:
            sock.sendall(_head("POST", "/v1/ingest", content_length=1000) + b'{"batch_id"')  # then nothing
            answer, closed_after = _read_until_closed(sock, timeout=10)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        body = json.loads(answer.split(b"\r\n\r\n", 1)[1])
        assert body["reason"] == "body_timeout" and "1 s" in body["detail"]
        assert closed_after is not None and closed_after < 1.0 + 3.0, closed_after
        assert queue.client.xlen(queue.stream) == 0
        assert _metric(api.client.get("/metrics").text, "dscguard_http_requests_total", route="/v1/ingest",
                       status="408") == 1


@needs_redis
def test_an_incomplete_request_head_is_closed_within_the_head_timeout(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, header_timeout_seconds=1.0)
    with ApiServer(settings) as api:
        partial_line, partial_headers, silent = (socket.create_connection(_address(api.url)) for _ in range(3))
        partial_line.sendall(b"GET /health/li")
        partial_headers.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        for sock in (partial_line, partial_headers, silent):
            with sock:
                answer, closed_after = _read_until_closed(sock, timeout=10)
                assert closed_after is not None and closed_after < 1.0 + 3.0, (answer, closed_after)
                if sock is not silent:
                    assert answer.startswith(b"HTTP/1.1 408 ") and b'"reason":"head_timeout"' in answer, answer
        # a keep-alive connection whose next request head stalls is cut off too
        with socket.create_connection(_address(api.url)) as sock:
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            sock.settimeout(5)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: 1")
            _, closed_after = _read_until_closed(sock, timeout=10)
            assert closed_after is not None and closed_after < 1.0 + 3.0


@needs_redis
def test_connections_beyond_the_limit_are_answered_503_overloaded(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, max_connections=4)
    with ApiServer(settings) as api:
        held = [socket.create_connection(_address(api.url)) for _ in range(4)]
        try:
            for sock in held:
                sock.sendall(b"GET /health/li")
            wait_until(lambda: len(api.server.server_state.connections) >= 4, 5, "the held connections")
            with httpx.Client(base_url=api.url) as client:
                refused = client.get("/health/live")
        finally:
            for sock in held:
                sock.close()
        assert refused.status_code == 503, refused.text
        assert refused.json()["reason"] == "overloaded" and refused.headers["Retry-After"] == "1"
        wait_until(lambda: len(api.server.server_state.connections) <= 1, 5, "the held connections to go")
        assert httpx.get(f"{api.url}/health/live").status_code == 200


@needs_redis
def test_dscguard_serve_applies_the_timeouts(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, header_timeout_seconds=1.0, body_timeout_seconds=1.0)
    publish_model(RedisQueue.from_settings(settings))
    with ApiProcess(settings) as api:
        api.wait_live()
        with socket.create_connection(_address(api.url)) as head, socket.create_connection(_address(api.url)) as body:
            head.sendall(b"POST /v1/ingest HT")
            body.sendall(_head("POST", "/v1/ingest", content_length=1000) + b"{")
            for sock, status in ((head, b"408"), (body, b"408")):
                answer, closed_after = _read_until_closed(sock, timeout=10)
                assert answer.startswith(b"HTTP/1.1 " + status) and closed_after is not None and closed_after < 4.0, (
                    answer, closed_after, api.output())


# -- 4. a restart from an older checkpoint --------------------------------------------------------------------
@needs_redis
def test_readers_never_see_the_model_go_back_while_a_restarted_worker_replays(digits_experiment, cache_dir,
                                                                              namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=4)
    queue = RedisQueue.from_settings(settings)
    batches = list(digits_experiment.stream_batches(9, seed=16))
    x = [(xb * 255).round().byte().numpy() for xb, _ in batches]
    with ApiServer(settings) as api:
        crashed = Worker(settings)
        crashed.start()
        for index in range(6):
            assert api.client.post("/v1/ingest", json=encode_json_batch(f"b{index}", x[index],
                                                                        batches[index][1])).status_code == 202
        for entry_id, fields in queue.read(crashed.consumer, 10, 1000):
            crashed.process(entry_id, fields)  # checkpoints after the 4th
        crashed.flush()
        crashed.request_stop()  # the crash: b4 and b5 are applied and published, in no checkpoint; its lease expires
        assert queue.model_version() == 6 and [p.name[-2:] for p in checkpoints(Path(settings.checkpoint_dir))] == [
            "04", "00"]

        seen: list[tuple[int, int]] = []
        stop = threading.Event()

        def read() -> None:  # a reader polling what the API serves, all along the restart
            with httpx.Client(base_url=api.url, headers={"X-API-Key": API_KEY}, timeout=10) as client:
                while not stop.is_set():
                    status = client.get("/v1/status").json()
                    seen.append((status["model_version"], status["batches_applied"]))

        reader = threading.Thread(target=read)
        reader.start()
        try:
            restarted = Worker(settings)
            restarted.start()
            # the restarted worker holds the step-4 model; readers still see the model of step 6
            assert queue.model_version() == 6 and queue.worker_status()["batches_applied"] == 6
            assert queue.worker_status()["replaying"]["model_version"] == 4
            assert queue.batch_state("b5")["state"] == "applied"  # true of the served model
            for index in range(6, 9):
                api.client.post("/v1/ingest", json=encode_json_batch(f"b{index}", x[index], batches[index][1]))
            assert restarted.run(max_batches=5, idle_timeout=5) == 5  # b4, b5 replayed, b6-b8 new
        finally:
            stop.set()
            reader.join()
    versions = [v for v, _ in seen]
    applied = [a for _, a in seen]
    assert versions == sorted(versions) and applied == sorted(applied), seen
    assert versions[0] == 6 and versions[-1] == 9
    assert queue.worker_status().get("replaying") is None
    newest = checkpoints(Path(settings.checkpoint_dir))[0]
    held = load_meta(newest)["extra"]["recent_batch_ids"]
    for index in range(9):
        state = queue.batch_state(f"b{index}")
        assert state["state"] == "applied" and state["committed"] is True, state
        assert f"b{index}" in held


@needs_redis
def test_committed_means_in_a_checkpoint(digits_experiment, cache_dir, namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=3)
    queue = RedisQueue.from_settings(settings)
    batches = list(digits_experiment.stream_batches(5, seed=17))
    with ApiServer(settings) as api:
        worker = Worker(settings)
        worker.start()
        try:
            for index, (xb, yb) in enumerate(batches):
                pixels = (xb * 255).round().byte().numpy()
                api.client.post("/v1/ingest", json=encode_json_batch(f"c{index}", pixels, yb))
                for entry_id, fields in queue.read(worker.consumer, 10, 1000):
                    worker.process(entry_id, fields)
                worker.flush()
                newest = checkpoints(Path(settings.checkpoint_dir))[0]
                held = set(load_meta(newest)["extra"]["recent_batch_ids"])
                for seen in range(index + 1):
                    answer = api.client.get(f"/v1/batches/c{seen}").json()
                    assert answer["state"] == "applied"
                    assert answer["committed"] == (f"c{seen}" in held), (index, seen, answer)
            assert [api.client.get(f"/v1/batches/c{i}").json()["committed"] for i in range(5)] == [True] * 3 + [
                False] * 2
        finally:
            worker.shutdown()
    assert all(queue.batch_state(f"c{i}")["committed"] for i in range(5))  # the shutdown checkpointed them


# -- 5. the error format ----------------------------------------------------------------------------------------
@needs_redis
def test_every_error_answer_has_detail_and_reason(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path)
    with ApiServer(settings) as api:
        publish_model(RedisQueue.from_settings(settings))
        not_found = api.client.get("/no/such/route")
        wrong_method = api.client.delete("/v1/ingest")
        with socket.create_connection(_address(api.url)) as sock:
            sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
            garbage, _ = _read_until_closed(sock, timeout=10)
    assert not_found.status_code == 404 and not_found.json()["reason"] == "not_found", not_found.text
    assert wrong_method.status_code == 405 and wrong_method.json()["reason"] == "method_not_allowed"
    assert "POST" in wrong_method.headers["Allow"]
    for answer in (not_found, wrong_method):
        assert set(answer.json()) == {"detail", "reason"} and answer.json()["detail"]
    assert garbage.startswith(b"HTTP/1.1 400 "), garbage
    body = json.loads(garbage.split(b"\r\n\r\n", 1)[1])
    assert set(body) == {"detail", "reason"} and body["reason"] == "bad_http"


@needs_redis
def test_an_oversize_safetensors_header_is_refused_by_naming_the_cap(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path)
    with ApiServer(settings) as api:
        publish_model(RedisQueue.from_settings(settings))
        header = 10 * 2**20  # the probe: a 10 MB header, all of it in the body
        response = api.client.post("/v1/ingest", content=struct.pack("<Q", header) + b" " * header, headers=SAFETENSORS)
    assert response.status_code == 400 and response.json()["reason"] == "encoding"
    detail = response.json()["detail"]
    assert "1 MiB" in detail and str(header) in detail and "does not fit" not in detail, detail


# -- 6. metrics that say what happens ---------------------------------------------------------------------------
def _readme_phases() -> set[str]:
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"`step_duration_seconds\{phase\}` \(([^);]*)[;)]", readme)
    assert listed, "README no longer lists the phases of step_duration_seconds"
    return {phase.strip() for phase in listed.group(1).split(",")}


@needs_redis
def test_the_worker_exports_the_phases_the_readme_lists_and_no_canary_while_it_is_off(digits_experiment, cache_dir,
                                                                                      namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=2, canary_every=0)
    queue = RedisQueue.from_settings(settings)
    worker = Worker(settings)
    worker.start()
    try:
        for index, (xb, yb) in enumerate(digits_experiment.stream_batches(3, seed=18)):
            batch = Batch(f"p{index}", (xb * 255).round().byte().numpy(), yb.numpy())
            queue.client.xadd(queue.stream, to_stream_fields(batch))
        assert worker.run(max_batches=3, idle_timeout=5) == 3
    finally:
        worker.shutdown()
    text = render(worker.metrics.registry)[0].decode()
    phases = {s.labels["phase"] for f in text_string_to_metric_families(text) for s in f.samples
              if s.name == "dscguard_step_duration_seconds_count"}
    assert phases == _readme_phases()
    assert not _samples(text, "dscguard_canary_accuracy")
    assert queue.worker_status()["canary_accuracy"] is None


def _samples(text: str, name: str) -> list:
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples
            if sample.name == name]


def test_the_canary_series_appears_once_it_has_a_value():
    metrics = WorkerMetrics(CollectorRegistry())
    assert not _samples(render(metrics.registry)[0].decode(), "dscguard_canary_accuracy")
    metrics.canary_accuracy.set(0.875)
    assert [s.value for s in _samples(render(metrics.registry)[0].decode(), "dscguard_canary_accuracy")] == [0.875]


def test_the_flagged_counter_says_what_it_counts():
    """With the batch-mean verdict (dsc's default) a flagged batch flags every sample, those below P too."""
    registry = CollectorRegistry()
    WorkerMetrics(registry)
    family = next(f for f in registry.collect() if f.name == "dscguard_samples_flagged")
    assert "exceeded the threshold" not in family.documentation
    assert "batch" in family.documentation and "verdict" in family.documentation, family.documentation


# -- 7. placeholder secrets ----------------------------------------------------------------------------------------
def _env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (ROOT / ".env.example").read_text().splitlines()
             if line and not line.startswith("#")]
    return {key: value for key, value in pairs}


SECRETS = {"client key from .env.example": {"DSCGUARD_API_KEY": _env_example()["DSCGUARD_API_KEY"]},
           "admin token from .env.example": {"DSCGUARD_ADMIN_TOKEN": _env_example()["DSCGUARD_ADMIN_TOKEN"]},
           "empty client key": {"DSCGUARD_API_KEY": ""},
           "empty admin token": {"DSCGUARD_ADMIN_TOKEN": ""},
           "blank client key": {"DSCGUARD_API_KEY": "   "}}


@pytest.mark.parametrize("case", list(SECRETS))
@pytest.mark.parametrize("command", ["serve", "worker"])
def test_placeholder_or_empty_secrets_stop_the_service_with_one_line(tmp_path, command, case):
    env = {key: value for key, value in os.environ.items() if not key.startswith("DSCGUARD_")}
    env.update({"DSCGUARD_API_KEY": "a-real-client-key-3f9c", "DSCGUARD_ADMIN_TOKEN": "a-real-admin-token-8d2e",
                "DSCGUARD_REDIS_URL": "redis://127.0.0.1:1/0", "DSCGUARD_REDIS_TIMEOUT_SECONDS": "0.5",
                "DSCGUARD_CHECKPOINT_DIR": str(tmp_path / "checkpoints"), "DSCGUARD_WORKER_METRICS_PORT": "0",
                "PYTHONPATH": str(ROOT), **SECRETS[case]})
    args = ["--port", str(free_port())] if command == "serve" else []
    try:
        run = subprocess.run([sys.executable, "-m", "service.cli", command, *args], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"dscguard {command} started with {case}") from exc
    variable = next(iter(SECRETS[case]))
    lines = run.stderr.strip().splitlines()
    assert run.returncode != 0 and len(lines) == 1, run.stderr
    assert variable in lines[0] and "Traceback" not in run.stderr, lines
    assert "change-me" not in lines[0]  # the message names the variable, it does not echo its value


def test_settings_refuse_placeholder_and_empty_secrets_but_take_real_ones():
    for field, value in (("api_key", "change-me-client-key"), ("admin_token", "CHANGE-ME"), ("api_key", ""),
                         ("admin_token", " ")):
        with pytest.raises(ValidationError, match=field):
            ServiceSettings(**{field: value})
    settings = ServiceSettings(api_key="k-" + os.urandom(8).hex(), admin_token=None)
    assert settings.api_key is not None and settings.admin_token is None


def test_the_test_harness_keys_are_not_placeholders():
    assert settings_env(make_settings("any", Path("/tmp")))["DSCGUARD_API_KEY"] == API_KEY
