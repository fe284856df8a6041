"""Running the service for tests: real Redis (namespaced per test), uvicorn on loopback, worker processes.

Everything started here is stopped here: the API server thread, `dscguard worker` and `dscguard
serve` subprocesses (SIGTERM, then SIGKILL after a bounded wait), private `redis-server`s, and
every Redis key of the test's namespace.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Self

import httpx
import pytest
import torch
import uvicorn

from service.core.models import build_model
from service.deployment.api import create_app
from service.deployment.api.server import ServeConfig
from service.deployment.model_store import weights_to_bytes
from service.deployment.processes import ProcessFailed, free_port, redis_answers, spawn, stop, wait_for
from service.deployment.processes import RedisServer as RedisServer  # a private redis-server to kill and restart
from service.deployment.redis_queue import GROUP, RedisQueue, connect
from service.deployment.settings import ServiceSettings
from service.deployment.worker.lease import Lease
from tests.profiles import DIGITS_OVERRIDES  # the session's burn-in (tests/conftest.py), shared through the cache

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[1]
API_KEY, ADMIN_TOKEN = "test-client-key", "test-admin-token"
MODEL_SPEC = {"name": "digitscnn", "num_classes": 10, "input_shape": [1, 8, 8]}  # the digits profile's model

needs_redis = pytest.mark.skipif(not redis_answers(REDIS_URL),
                                 reason="needs Redis at 127.0.0.1:6379 (.ci/run starts one)")


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


def assert_settled(queue: RedisQueue) -> None:
    """Every entry is acknowledged, and those the stream still keeps (for a checkpoint fallback) were applied."""
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0
    kept = [fields[b"batch_id"].decode() for _, fields in queue.client.xrange(queue.stream)]
    assert all(queue.batch_state(batch_id)["state"] == "applied" for batch_id in kept), kept


def publish_model(queue: RedisQueue, version: int = 1, seed: int = 0, alive: bool = True) -> torch.nn.Module:
    """Publish a fresh MODEL_SPEC model as the worker does (and hold the worker's lease when `alive`)."""
    torch.manual_seed(seed)
    model = build_model(**MODEL_SPEC)
    queue.publish_spec(MODEL_SPEC)
    queue.record_steps([], version=version, weights=weights_to_bytes(model, version, MODEL_SPEC),
                       status={"model_version": version, "batches_applied": version, "strategy": "dsc"})
    if alive:
        Lease(queue, "test-worker", ttl_seconds=30).acquire(wait_seconds=0)
    return model.eval()


class ApiServer:
    """uvicorn serving `create_app(settings)` on 127.0.0.1 (a free port) in a thread, configured as `dscguard
    serve` configures it (`ServeConfig`: timeouts, connection limit, the guarded h11 protocol)."""

    def __init__(self, settings: ServiceSettings):
        self.app = create_app(settings)
        self.server = uvicorn.Server(ServeConfig(self.app, settings, host="127.0.0.1", port=0, log_level="warning"))
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


class ServiceProcess:
    """`dscguard <command>` in a subprocess with `settings` in its environment, its output in a log file."""

    command = "worker"

    def __init__(self, settings: ServiceSettings, *args: str):
        env = {**os.environ, **settings_env(settings), "PYTHONPATH": str(ROOT)}
        if settings.cache_dir is not None:
            env["DSCGUARD_CACHE_DIR"] = str(settings.cache_dir)
        self.log = Path(settings.checkpoint_dir).parent / f"{self.command}-{uuid.uuid4().hex[:6]}.log"
        # in pytest's session: a Ctrl-C reaches the service too
        self.process = spawn([sys.executable, "-m", "service.cli", self.command, *args], self.log, env=env, cwd=ROOT,
                             new_session=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait(self, timeout: float = 60) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"{self.command} did not exit within {timeout} s:\n{self.output()}") from None

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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        stop(self.process, timeout=30)


class WorkerProcess(ServiceProcess):
    """`dscguard worker` (logging at info level)."""

    def __init__(self, settings: ServiceSettings, *args: str):
        super().__init__(settings, "--log-level", "info", *args)


class ApiProcess(ServiceProcess):
    """`dscguard serve` on a free loopback port, as deployed (its own process, so its memory can be watched)."""

    command = "serve"

    def __init__(self, settings: ServiceSettings, *args: str, port: int | None = None):
        self.port = port or free_port()  # a given port: a restart where the clients expect it
        self.url = f"http://127.0.0.1:{self.port}"
        super().__init__(settings, "--port", str(self.port), "--log-level", "warning", *args)

    def wait_live(self, timeout: float = 60) -> None:
        def live() -> bool:
            try:
                return httpx.get(f"{self.url}/health/live", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_until(live, timeout, "the API to answer", interval=0.1, diagnostics=self.output, watch=[self.process])


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.02,
               diagnostics: Callable[[], str] = lambda: "", watch: Iterable[subprocess.Popen] = ()):
    """Poll `condition` until it returns something truthy, and return that; fail (AssertionError, quoting
    `diagnostics()`) after `timeout` seconds, or as soon as a process in `watch` has exited."""
    try:
        return wait_for(condition, timeout, what, watch=watch, log=diagnostics, interval=interval)
    except ProcessFailed as exc:
        raise AssertionError(str(exc)) from None


def wait_ready(api: ApiServer, worker: WorkerProcess, timeout: float = 90) -> None:
    """Until the API says ready (the worker serves its namespace); fails at once if the worker exits."""
    wait_until(lambda: api.client.get("/health/ready").status_code == 200, timeout, "the service to be ready",
               interval=0.1, diagnostics=worker.output, watch=[worker.process])
