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

from service.checkpoint import load_meta
from service.codec import Batch, encode_json_batch, to_stream_fields
from service.metrics import WorkerMetrics, render
from service.redis_queue import RedisQueue
from service.settings import ServiceSettings
from service.worker import Worker, checkpoints
from tests.service_harness import (
    API_KEY,
    ROOT,
    ApiProcess,
    ApiServer,
    free_port,
    make_settings,
    needs_redis,
    publish_model,
    redis_namespace,
    settings_env,
    wait_until,
)

SAFETENSORS = {"Content-Type": "application/vnd.safetensors"}


@pytest.fixture
def namespace():
    with redis_namespace() as name:
        yield name


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
