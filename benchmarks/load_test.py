"""Bounded load test of the running service: `dscguard serve` + `dscguard worker` as deployed (subprocesses).

C concurrent clients (asyncio + httpx) POST digits-shaped batches for D seconds, each with a fresh
batch_id, as fast as the service lets them. A small queue bound (DSCGUARD_QUEUE_MAX_LENGTH) makes
the API answer 429 with Retry-After once the worker falls behind; the clients honour it and retry
the same batch. Meanwhile the resident memory (RSS) of the API and the worker and the stream length
are sampled. At the end the worker drains the queue, and every accepted batch_id is checked: its
state is `applied`, the batches-applied counter equals the number accepted, and the audit stream
holds one record per batch (none lost, none doubled).

Needs Redis (default redis://127.0.0.1:6379/0; a fresh namespace, deleted afterwards).

    python benchmarks/load_test.py --json load_test.json                  # 16 clients, 60 s
    python benchmarks/load_test.py --clients 4 --duration 5               # the CI variant's size
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the service and its test harness, when run as a script

from service.core.environment import environment  # noqa: E402
from service.deployment.codec import encode_json_batch  # noqa: E402
from service.deployment.processes import resident_megabytes  # noqa: E402
from service.deployment.redis_queue import RedisQueue, connect  # noqa: E402
from service.deployment.settings import ServiceSettings  # noqa: E402
from tests.service_harness import ApiProcess, WorkerProcess, wait_until  # noqa: E402

API_KEY = f"load-{uuid.uuid4().hex}"


class Sampler(threading.Thread):
    """Every `interval` seconds: the resident memory of each process (MiB) and the stream length."""

    def __init__(self, pids: dict[str, int], queue: RedisQueue, interval: float = 0.5):
        super().__init__(name="sampler", daemon=True)
        self.pids, self.queue, self.interval = pids, queue, interval
        self.rss: dict[str, list[float]] = {name: [] for name in pids}
        self.depths: list[int] = []
        self.stop = threading.Event()

    def sample(self) -> None:
        for name, pid in self.pids.items():
            value = resident_megabytes(pid)
            if value is not None:
                self.rss[name].append(value)
        self.depths.append(int(self.queue.client.xlen(self.queue.stream)))

    def run(self) -> None:
        while not self.stop.wait(self.interval):
            self.sample()

    def summary(self) -> dict:
        return {name: {"start": round(values[0], 1), "peak": round(max(values), 1), "end": round(values[-1], 1),
                       "samples": len(values)} for name, values in self.rss.items() if values}


class Clients:
    """The load: `clients` coroutines posting until the deadline, honouring Retry-After on 429 and 503."""

    def __init__(self, url: str, clients: int, duration: float, batch_size: int, seed: int):
        self.url, self.clients, self.duration, self.batch_size, self.seed = url, clients, duration, batch_size, seed
        self.statuses: Counter = Counter()
        self.accepted: list[str] = []
        self.accepted_after_429 = 0
        self.latencies: list[float] = []  # request to 202, seconds
        self.other_errors: list[str] = []

    async def client(self, http: httpx.AsyncClient, index: int, deadline: float) -> None:
        rng = np.random.default_rng([self.seed, index])
        sent = 0
        while time.monotonic() < deadline:
            batch_id = f"load-{index}-{sent}"
            sent += 1
            x = rng.integers(0, 256, (self.batch_size, 1, 8, 8), dtype=np.uint8)
            body = json.dumps(encode_json_batch(batch_id, x, rng.integers(0, 10, self.batch_size))).encode()
            refused = False
            while time.monotonic() < deadline:
                started = time.perf_counter()
                try:
                    response = await http.post("/v1/ingest", content=body,
                                                headers={"Content-Type": "application/json"})
                except httpx.TransportError as exc:
                    self.other_errors.append(f"{type(exc).__name__}: {exc}")
                    return
                self.statuses[response.status_code] += 1
                if response.status_code in (200, 202):
                    self.latencies.append(time.perf_counter() - started)
                    self.accepted.append(batch_id)
                    self.accepted_after_429 += refused
                    break
                if response.status_code in (429, 503):
                    refused = refused or response.status_code == 429
                    await asyncio.sleep(float(response.headers["Retry-After"]))
                    continue
                if response.status_code < 500:
                    self.other_errors.append(f"{response.status_code}: {response.text[:200]}")
                break

    async def run(self) -> float:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        async with httpx.AsyncClient(base_url=self.url, headers={"X-API-Key": API_KEY}, timeout=60,
                                     limits=limits) as http:
            started = time.monotonic()
            deadline = started + self.duration
            await asyncio.gather(*(self.client(http, i, deadline) for i in range(self.clients)))
            return time.monotonic() - started


def _settings(args, namespace: str, workdir: Path) -> ServiceSettings:
    return ServiceSettings(redis_url=args.redis_url, namespace=namespace, api_key=API_KEY,
                           checkpoint_dir=workdir / "checkpoints", cache_dir=args.cache_dir,
                           config_overrides=json.loads(args.config_overrides), worker_metrics_port=0,
                           queue_max_length=args.queue_max_length, checkpoint_every=args.checkpoint_every,
                           max_batch_samples=max(args.batch_size, 1), audit_max_length=10_000_000,
                           torch_threads=args.worker_threads)


def _applied(queue: RedisQueue, accepted: list[str]) -> tuple[int, int, int]:
    """(accepted batches whose state is applied, audit records of accepted batches, batch ids with 2+ records)."""
    with queue.client.pipeline(transaction=False) as pipe:
        for batch_id in accepted:
            pipe.hget(queue.batch_key(batch_id), "state")
        states = pipe.execute()
    records = Counter()
    last = "-"
    while True:  # the whole audit stream, page by page
        page = queue.client.xrange(queue.audit_stream, min=last, count=1000)
        page = [entry for entry in page if entry[0].decode() != last]
        if not page:
            break
        records.update(json.loads(fields[b"record"])["batch_id"] for _, fields in page)
        last = page[-1][0].decode()
    applied = sum(state == b"applied" for state in states)
    return applied, sum(records[b] for b in accepted), sum(count > 1 for count in records.values())


def run(args) -> dict:
    namespace = f"load-{uuid.uuid4().hex[:10]}"
    queue = RedisQueue(connect(args.redis_url), namespace)
    with tempfile.TemporaryDirectory(prefix="dscguard-load-") as tmp:
        settings = _settings(args, namespace, Path(tmp))
        try:
            with WorkerProcess(settings) as worker, ApiProcess(settings) as api:
                api.wait_live()
                wait_until(lambda: httpx.get(f"{api.url}/health/ready").status_code == 200, args.ready_timeout,
                           "the service to be ready (the worker burns in on a cold cache)", interval=0.2,
                           diagnostics=lambda: worker.output()[-3000:] + api.output()[-3000:],
                           watch=[worker.process, api.process])
                sampler = Sampler({"api": api.pid, "worker": worker.pid}, queue, args.sample_interval)
                sampler.sample()
                sampler.start()
                clients = Clients(api.url, args.clients, args.duration, args.batch_size, args.seed)
                load_seconds = asyncio.run(clients.run())
                drain_started = time.monotonic()
                status = lambda: httpx.get(f"{api.url}/v1/status", headers={"X-API-Key": API_KEY}).json()  # noqa: E731
                wait_until(lambda: status()["batches_applied"] >= len(clients.accepted), args.drain_timeout,
                           "the worker to apply every accepted batch", interval=0.2,
                           diagnostics=lambda: worker.output()[-3000:], watch=[worker.process])
                drain_seconds = time.monotonic() - drain_started
                sampler.stop.set()
                sampler.join()
                sampler.sample()
                final = status()
                assert worker.terminate() == 0, worker.output()[-3000:]
            applied, audit_records, doubled = _applied(queue, clients.accepted)
        finally:
            queue.purge()
    accepted = len(clients.accepted)
    latencies = sorted(clients.latencies)
    statuses = clients.statuses
    return {
        "results": {
            "requests": sum(statuses.values()), "statuses": {str(k): v for k, v in sorted(statuses.items())},
            "accepted": accepted, "status_429": statuses[429], "status_503": statuses[503],
            "status_5xx": sum(v for k, v in statuses.items() if k >= 500 and k != 503),
            "other_errors": len(clients.other_errors), "other_error_examples": clients.other_errors[:5],
            "accepted_after_429": clients.accepted_after_429,
            "load_seconds": round(load_seconds, 2), "drain_seconds": round(drain_seconds, 2),
            "accepted_batches_per_second": round(accepted / load_seconds, 1),
            "accepted_samples_per_second": round(accepted * args.batch_size / load_seconds, 1),
            "latency_202_seconds": {"p50": round(statistics.median(latencies), 4),
                                    "p99": round(latencies[int(0.99 * (len(latencies) - 1))], 4)} if latencies
            else None,
            "applied": applied, "batches_applied_counter": final["batches_applied"],
            "audit_records": audit_records, "lost": accepted - applied, "doubled": doubled,
            "max_queue_depth": max(sampler.depths), "queue_max_length": args.queue_max_length,
            "rss_mb": sampler.summary(),
        },
        "config": {k: v for k, v in vars(args).items() if k not in ("json",)},
        "environment": {**environment(), "httpx": httpx.__version__},
    }


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options every service benchmark shares: the worker's cache and config, the seed, sampling, timeouts."""
    parser.add_argument("--cache-dir", default=os.environ.get("DSCGUARD_CACHE_DIR"), help="burn-in cache")
    parser.add_argument("--config-overrides", default="{}", help="DSCGUARD_CONFIG_OVERRIDES (JSON)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sample-interval", type=float, default=0.5, help="seconds between RSS samples")
    parser.add_argument("--ready-timeout", type=float, default=900.0)
    parser.add_argument("--drain-timeout", type=float, default=600.0)
    parser.add_argument("--json", help="write the figures here")


def emit(result: dict, path: str | None) -> None:
    """Print the figures, and write them to `path` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if path:
        from service.core.atomic import atomic_write_text

        atomic_write_text(path, text + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--batch-size", type=int, default=50, help="samples per batch (digits: 1x8x8 uint8)")
    parser.add_argument("--queue-max-length", type=int, default=64, help="DSCGUARD_QUEUE_MAX_LENGTH: small, so "
                        "that the queue fills and 429s happen")
    parser.add_argument("--checkpoint-every", type=int, default=16)
    parser.add_argument("--worker-threads", type=int, default=1, help="DSCGUARD_TORCH_THREADS (one core left to "
                        "the API and Redis)")
    parser.add_argument("--redis-url", default=os.environ.get("DSCGUARD_REDIS_URL", "redis://127.0.0.1:6379/0"))
    add_run_options(parser)
    args = parser.parse_args(argv)
    result = run(args)
    emit(result, args.json)
    r = result["results"]
    held = r["status_5xx"] == 0 and r["other_errors"] == 0 and r["lost"] == 0 and r["doubled"] == 0 and (
        r["max_queue_depth"] <= r["queue_max_length"])
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
