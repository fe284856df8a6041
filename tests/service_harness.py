"""Running the service for tests: real Redis (namespaced per test), uvicorn on loopback, worker processes.

Everything started here is stopped here: the API server thread, worker subprocesses (SIGTERM,
then SIGKILL after a bounded wait), and every Redis key of the test's namespace.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import redis
import uvicorn

from service.api import create_app
from service.redis_queue import RedisQueue, connect
from service.settings import ServiceSettings

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_TOKEN = "test-client-key", "test-admin-token"
# The burn-in of the session's `digits_config` fixture (tests/conftest.py), shared through the cache.
DIGITS_OVERRIDES = {"burnin": {"epochs": 20, "checkpoint_every": 5, "auxiliary_epoch": 10}}


def redis_reachable() -> bool:
    try:
        return bool(connect(REDIS_URL, 1.0).ping())
    except redis.RedisError:
        return False


needs_redis = pytest.mark.skipif(not redis_reachable(), reason="needs Redis at 127.0.0.1:6379 (.ci/run starts one)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(namespace: str, tmp_path: Path, cache_dir: Path | None = None, **fields) -> ServiceSettings:
    base = {"redis_url": REDIS_URL, "namespace": namespace, "api_key": API_KEY, "admin_token": ADMIN_TOKEN,
            "checkpoint_dir": tmp_path / "checkpoints", "cache_dir": cache_dir, "config_overrides": DIGITS_OVERRIDES,
            "worker_metrics_port": 0, "heartbeat_ttl_seconds": 2.0, "read_block_ms": 100}
    return ServiceSettings(**{**base, **fields})


def settings_env(settings: ServiceSettings) -> dict[str, str]:
    """The DSCGUARD_* variables that reproduce `settings` in another process."""
    env = {}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"DSCGUARD_{name.upper()}"] = json.dumps(value) if isinstance(value, dict | list) else str(value)
    return env


@contextmanager
def redis_namespace() -> Iterator[str]:
    """A fresh Redis namespace; all its keys are deleted afterwards."""
    name = f"test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        RedisQueue(connect(REDIS_URL), name).purge()


class ApiServer:
    """uvicorn serving `create_app(settings)` on 127.0.0.1 (a free port) in a thread."""

    def __init__(self, settings: ServiceSettings):
        self.app = create_app(settings)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning",
                                                    lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, name="test-api", daemon=True)

    def __enter__(self) -> ApiServer:
        self.thread.start()
        wait_until(lambda: self.server.started, 20, "the API server to start")
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=30)
        return self

    def __exit__(self, *exc) -> None:
        self.client.close()
        self.server.should_exit = True
        self.thread.join(timeout=20)


class WorkerProcess:
    """`dscguard worker` in a subprocess with `settings` in its environment."""

    def __init__(self, settings: ServiceSettings, *args: str):
        env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
        if settings.cache_dir is not None:
            env["DSCGUARD_CACHE_DIR"] = str(settings.cache_dir)
        self.log = Path(settings.checkpoint_dir).parent / f"worker-{uuid.uuid4().hex[:6]}.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "service.cli", "worker", "--log-level", "info",
                                             *args], env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker did not exit within {timeout} s:\n{self.output()}") from None

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM (finish the batch, checkpoint, exit) and wait, bounded."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: a crash, no checkpoint."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=30)

    def __enter__(self) -> WorkerProcess:
        return self

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02,
               diagnostics: Callable[[], str] = lambda: ""):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{diagnostics()}")
        time.sleep(interval)
