"""`dscguard stack up`: the docker-compose stack without Docker, every process on 127.0.0.1.

Redis (the one at `DSCGUARD_REDIS_URL` when it answers, else a `redis-server` started here), the worker,
the API, and Prometheus (any `prometheus` binary on PATH, e.g. Debian's package) running
deploy/prometheus/prometheus.yml with its targets rewritten to the local ports and alerts.yml loaded.
Logs and state (checkpoints, Prometheus data) go under one directory. Ctrl-C or SIGTERM stops what was
started here, API first and Redis last, so that the worker's final checkpoint reaches Redis.
Grafana is not started: import deploy/grafana/dashboards/dscguard.json into any Grafana that reads this
Prometheus (its datasource uid is `dscguard-prometheus`).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import yaml

from service.deployment.processes import RedisServer, log_tail, redis_answers, spawn, stop, wait_for
from service.deployment.settings import ServiceSettings

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
STOP_TIMEOUT_SECONDS = {"api": 15.0, "worker": 60.0, "prometheus": 15.0, "redis": 10.0}


def prometheus_config(api_target: str, worker_target: str, interval: str | None = None) -> dict:
    """deploy/prometheus/prometheus.yml scraping `api_target` and `worker_target` (host:port); rules by full path."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    targets = {"api": api_target, "worker": worker_target}
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config.get("rule_files", [])]
    if interval:
        config["global"].update(scrape_interval=interval, evaluation_interval=interval)
    return config


def start_redis(url: str, log: Path, timeout: float = 30.0) -> subprocess.Popen | None:
    """A `redis-server` for `url` when nothing answers there; None when Redis already answers.

    Its append-only file (fsynced before each reply) lives in the log's directory, so batches answered
    202 survive a restart of the stack, as in docker-compose.yml.
    """
    if redis_answers(url):
        return None
    parts = urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost") or shutil.which("redis-server") is None:
        raise SystemExit(f"Redis does not answer at {url}, and no local redis-server can be started there "
                         "(install Redis 7, or point DSCGUARD_REDIS_URL at a running one)")
    server = RedisServer(log.parent, port=parts.port or 6379, log=log)
    server.start(timeout)
    return server.process


class Stack:
    """The service's processes, started in dependency order and stopped in reverse.

    >>> Stack(ServiceSettings(api_key="k"), Path("runs/stack")).urls()["api"]
    'http://127.0.0.1:8000'
    """

    def __init__(self, settings: ServiceSettings, run_dir: Path, api_port: int = 8000, prometheus_port: int = 9090,
                 scrape_interval: str | None = None):
        self.settings, self.run_dir = settings, Path(run_dir)
        self.api_port, self.prometheus_port, self.scrape_interval = api_port, prometheus_port, scrape_interval
        self.processes: dict[str, subprocess.Popen] = {}
        self.has_prometheus = shutil.which("prometheus") is not None

    def urls(self) -> dict[str, str]:
        urls = {"api": f"http://127.0.0.1:{self.api_port}",
                "worker metrics": f"http://127.0.0.1:{self.settings.worker_metrics_port}/metrics",
                "redis": self.settings.redis_url}
        if self.has_prometheus:
            urls["prometheus"] = f"http://127.0.0.1:{self.prometheus_port}"
        return urls

    def start(self, timeout: float = 60.0) -> None:
        """Start every process; return once Redis, the API and Prometheus answer (the worker may still burn in)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            redis_server = start_redis(self.settings.redis_url, self.run_dir / "redis.log", timeout)
            if redis_server is not None:
                self.processes["redis"] = redis_server
            self._spawn("worker", [sys.executable, "-m", "service.cli", "worker"])
            self._spawn("api", [sys.executable, "-m", "service.cli", "serve", "--port", str(self.api_port)])
            if self.has_prometheus:
                self._start_prometheus()
            self._wait(f"{self.urls()['api']}/health/live", "api", timeout)
            if self.has_prometheus:
                self._wait(f"{self.urls()['prometheus']}/-/ready", "prometheus", timeout)
        except BaseException:
            self.stop()
            raise

    def exited(self) -> str | None:
        """The name of a process that has exited, if any."""
        return next((name for name, process in self.processes.items() if process.poll() is not None), None)

    def log_tail(self, name: str) -> str:
        return log_tail(self.run_dir / f"{name}.log")

    def stop(self) -> None:
        """SIGTERM each process (API, worker, Prometheus, Redis), wait (bounded), SIGKILL what is left."""
        for name in ("api", "worker", "prometheus", "redis"):
            if (process := self.processes.pop(name, None)) is not None:
                stop(process, STOP_TIMEOUT_SECONDS[name])

    def _spawn(self, name: str, command: list[str]) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               "DSCGUARD_REDIS_URL": self.settings.redis_url,
               "DSCGUARD_WORKER_METRICS_PORT": str(self.settings.worker_metrics_port),
               "DSCGUARD_CHECKPOINT_DIR": str(self.settings.checkpoint_dir)}
        self.processes[name] = spawn(command, self.run_dir / f"{name}.log", env)

    def _start_prometheus(self) -> None:
        config = prometheus_config(f"127.0.0.1:{self.api_port}", f"127.0.0.1:{self.settings.worker_metrics_port}",
                                   self.scrape_interval)
        config_file = self.run_dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config, sort_keys=False))
        self._spawn("prometheus", ["prometheus", f"--config.file={config_file}",
                                   f"--storage.tsdb.path={self.run_dir / 'prometheus-data'}",
                                   f"--web.listen-address=127.0.0.1:{self.prometheus_port}"])

    def _wait(self, url: str, name: str, timeout: float) -> None:
        def answers() -> bool:
            try:
                return httpx.get(url, timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(answers, timeout, f"{name} to answer at {url}", watch=[self.processes[name]],
                 log=self.run_dir / f"{name}.log")


def stack_up(settings: ServiceSettings, run_dir: Path, api_port: int, prometheus_port: int,
             scrape_interval: str | None = None, duration: float | None = None) -> int:
    """Start the stack, print where everything is, and run until Ctrl-C, SIGTERM, `duration` or a process exits."""
    settings.client_key("the stack")
    if not settings.worker_metrics_port:
        raise SystemExit("the stack needs the worker's metrics: set DSCGUARD_WORKER_METRICS_PORT to a port")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    stack = Stack(settings, run_dir, api_port, prometheus_port, scrape_interval)
    try:
        stack.start()
        for name, url in stack.urls().items():
            print(f"{name:>15}: {url}")
        if not stack.has_prometheus:
            print("     prometheus: not started (no `prometheus` on PATH: apt-get install prometheus)")
        print(f"           logs: {stack.run_dir}/*.log (the worker burns in and calibrates on its first start)")
        print("Ctrl-C stops everything.", flush=True)
        deadline = None if duration is None else time.monotonic() + duration
        while not stop.wait(0.5):
            if (exited := stack.exited()) is not None:
                print(f"{exited} exited with status {stack.processes[exited].returncode}:\n{stack.log_tail(exited)}",
                      file=sys.stderr)
                return 1
            if deadline is not None and time.monotonic() >= deadline:
                break
        return 0
    finally:
        print("stopping...", flush=True)
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
