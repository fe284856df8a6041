"""Soak test: steady clean ingest for N minutes while the worker, Redis and the API are made to fail.

Processes as deployed: `dscguard serve`, `dscguard worker` and a private `redis-server` with the
append-only file fsynced before each reply (the shared Redis is never touched). C clients post clean
digits stream batches (uint8) at a steady total rate, each with a fresh batch_id; a 429 or 503 is
retried after its Retry-After, a connection refused (the API restarting) after 0.5 s, always with the
same batch_id (a retry of a batch that got in is a 200 duplicate). Faults, seeded by the schedule:

- the worker is `kill -9`ed every `--kill-every` seconds and restarted at once;
- Redis is SIGKILLed once (at 1/2 of the run) and restarted on its files;
- the API is stopped (SIGTERM) once (at 3/4 of the run) and restarted on the same port.

Each request is labelled with the phase it started in (`steady`, or the fault, from its injection
until the service has recovered: worker serving and caught up, Redis and the worker ready, API live).
Meanwhile: `/health/live` every 0.5 s, `/v1/status` every second (the served model version and
batches applied must never go back), RSS of the API and the worker every 0.5 s. At the end the worker
drains the queue and every accepted batch is checked: state `applied`, exactly one audit record (lost:
none; doubled: none). The audit stream gives the threshold and the clean flagged rate per window.

    python benchmarks/soak.py --minutes 30 --json soak.json
    python benchmarks/soak.py --minutes 2 --kill-every 40 --window 20 --json soak.json   # a validation run
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the process helpers of the test harness, when run as a script

from load_test import Sampler, _applied, add_run_options, emit  # noqa: E402

from service.codec import encode_json_batch  # noqa: E402
from service.environment import environment  # noqa: E402
from service.redis_queue import RedisQueue, connect  # noqa: E402
from service.settings import ServiceSettings  # noqa: E402
from tests.service_harness import ApiProcess, RedisServer, WorkerProcess, wait_until  # noqa: E402

API_KEY = f"soak-{uuid.uuid4().hex}"
HEADERS = {"X-API-Key": API_KEY}


def _percentiles(values: list[float]) -> dict | None:
    if not values:
        return None
    ordered = sorted(values)
    return {"n": len(ordered), "p50": round(statistics.median(ordered), 4),
            "p99": round(ordered[int(0.99 * (len(ordered) - 1))], 4), "max": round(ordered[-1], 4)}


class Timeline:
    """The phase the service is in: `steady`, or the fault being injected and recovered from."""

    def __init__(self):
        self.phase = "steady"
        self.faults: list[dict] = []
        self.started = time.monotonic()

    def fault(self, name: str) -> dict:
        self.phase = name
        fault = {"fault": name, "at_seconds": round(time.monotonic() - self.started, 1)}
        self.faults.append(fault)
        return fault

    def recovered(self, fault: dict) -> None:
        fault["recovered_after_seconds"] = round(time.monotonic() - self.started - fault["at_seconds"], 2)
        self.phase = "steady"


class Soak:
    def __init__(self, args, settings: ServiceSettings, redis_server: RedisServer, batches):
        self.args, self.settings, self.redis_server, self.batches = args, settings, redis_server, batches
        self.timeline = Timeline()
        self.queue = RedisQueue(connect(settings.redis_url), settings.namespace)
        self.worker = WorkerProcess(settings)
        self.api = ApiProcess(settings)
        self.port = self.api.port
        self.workers_started, self.apis_started = 1, 1
        self.worker_logs: list[str] = []
        self.sampler = ResilientSampler({"api": self.api.pid, "worker": self.worker.pid}, self.queue,
                                        args.sample_interval)
        self.requests: list[tuple[str, str, float]] = []  # (phase, outcome, seconds)
        self.accepted: set[str] = set()
        self.liveness: list[tuple[str, str, float]] = []
        self.served: list[tuple[float, int, int]] = []  # (t, model_version, batches_applied) from /v1/status
        self.stop = threading.Event()

    # -- faults (a thread: they wait on processes) --------------------------------------------------------
    def schedule(self) -> list[tuple[float, str]]:
        duration = self.args.minutes * 60
        planned = [(duration / 2, "redis_restart"), (3 * duration / 4, "api_restart")]
        kill = self.args.kill_every
        while kill < duration - 10:
            if all(abs(kill - at) >= 15 for at, _ in planned):
                planned.append((kill, "worker_kill"))
            kill += self.args.kill_every
        return sorted(planned)

    def inject(self) -> None:
        for at, name in self.schedule():
            if self.stop.wait(max(0.0, self.timeline.started + at - time.monotonic())):
                return
            fault = self.timeline.fault(name)
            getattr(self, name)()
            self.timeline.recovered(fault)
            print(f"  {fault}", flush=True)

    def worker_kill(self) -> None:
        self.worker.kill()
        self.worker_logs.append(self.worker.output())
        self.worker = WorkerProcess(self.settings)
        self.workers_started += 1
        self.sampler.pids["worker"] = self.worker.pid
        self._wait_worker_caught_up()

    def redis_restart(self) -> None:
        self.redis_server.kill()
        time.sleep(1.0)  # a crash, then the time a supervisor takes to restart it
        self.redis_server.start()
        self._wait_worker_caught_up()

    def api_restart(self) -> None:
        self.api.terminate()
        self.api = ApiProcess(self.settings, port=self.port)
        self.apis_started += 1
        self.sampler.pids["api"] = self.api.pid
        self.api.wait_live()

    def _wait_worker_caught_up(self) -> None:
        def serving() -> bool:
            try:
                status = httpx.get(f"http://127.0.0.1:{self.port}/v1/status", headers=HEADERS, timeout=5).json()
            except (httpx.HTTPError, ValueError):
                return False
            worker = status.get("worker") or {}
            return bool(status["worker_alive"] and worker.get("consumer", "").endswith(f"-{self.worker.pid}")
                        and worker.get("replaying") is None)

        wait_until(serving, 300, "the worker to serve and catch up", interval=0.2,
                   diagnostics=lambda: self.worker.output()[-3000:])

    # -- traffic ---------------------------------------------------------------------------------------------
    async def client(self, http: httpx.AsyncClient, index: int, deadline: float) -> None:
        interval = self.args.clients / self.args.rate
        batches = self.batches(index)
        next_at = time.monotonic() + index * interval / self.args.clients
        sent = 0
        while time.monotonic() < deadline:
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            x, y = next(batches)
            batch_id = f"soak-{index}-{sent}"
            sent += 1
            body = json.dumps(encode_json_batch(batch_id, x, y)).encode()
            while time.monotonic() < deadline:
                phase, started = self.timeline.phase, time.perf_counter()
                try:
                    response = await http.post("/v1/ingest", content=body, headers={"Content-Type": "application/json"})
                except httpx.TransportError as exc:
                    self.requests.append((phase, type(exc).__name__, time.perf_counter() - started))
                    await asyncio.sleep(0.5)
                    continue
                self.requests.append((phase, str(response.status_code), time.perf_counter() - started))
                if response.status_code in (200, 202):
                    self.accepted.add(batch_id)
                    break
                if response.status_code in (429, 503):
                    await asyncio.sleep(float(response.headers.get("Retry-After", "1")))
                    continue
                break  # a refusal (4xx) or a 5xx: counted, not retried

    async def probe(self, http: httpx.AsyncClient, deadline: float) -> None:
        """Liveness every 0.5 s; the served status every second."""
        turn = 0
        while time.monotonic() < deadline:
            phase, started = self.timeline.phase, time.perf_counter()
            try:
                response = await http.get("/health/live", timeout=5)
                self.liveness.append((phase, str(response.status_code), time.perf_counter() - started))
                if turn % 2 == 0:
                    status = (await http.get("/v1/status", headers=HEADERS, timeout=5)).json()
                    if status.get("model_version") is not None:
                        self.served.append((time.monotonic(), status["model_version"], status["batches_applied"]))
            except (httpx.HTTPError, ValueError) as exc:
                self.liveness.append((phase, type(exc).__name__, time.perf_counter() - started))
            turn += 1
            await asyncio.sleep(0.5)

    async def traffic(self) -> None:
        limits = httpx.Limits(max_connections=self.args.clients + 2, max_keepalive_connections=self.args.clients + 2)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{self.port}", headers=HEADERS, timeout=60,
                                     limits=limits) as http:
            deadline = time.monotonic() + self.args.minutes * 60
            await asyncio.gather(self.probe(http, deadline),
                                 *(self.client(http, i, deadline) for i in range(self.args.clients)))

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.api.wait_live()
            wait_until(lambda: httpx.get(f"{self.api.url}/health/ready").status_code == 200, self.args.ready_timeout,
                       "the service to be ready", interval=0.2, diagnostics=lambda: self.worker.output()[-3000:])
            self.sampler.sample()
            self.sampler.start()
            self.timeline.started = time.monotonic()
            faults = threading.Thread(target=self.inject, name="faults")
            faults.start()
            asyncio.run(self.traffic())
            self.stop.set()
            faults.join()
            drain_started = time.monotonic()

            def drained() -> bool:
                status = httpx.get(f"{self.api.url}/v1/status", headers=HEADERS, timeout=10).json()
                return status["queue"]["lag_seconds"] == 0 and status["batches_applied"] >= len(self.accepted)

            wait_until(drained, self.args.drain_timeout, "the worker to apply every accepted batch", interval=0.5,
                       diagnostics=lambda: self.worker.output()[-3000:])
            drain_seconds = time.monotonic() - drain_started
            self.sampler.stop.set()
            self.sampler.join()
            self.sampler.sample()
            status = httpx.get(f"{self.api.url}/v1/status", headers=HEADERS, timeout=10).json()
            assert self.worker.terminate() == 0, self.worker.output()[-3000:]
            return self.results(status, drain_seconds)
        finally:
            self.stop.set()
            self.worker.__exit__()
            self.api.__exit__()

    def results(self, status: dict, drain_seconds: float) -> dict:
        applied, audit_records, doubled = _applied(self.queue, sorted(self.accepted))
        outcomes: dict[str, Counter] = defaultdict(Counter)
        latency: dict[str, list[float]] = defaultdict(list)
        for phase, outcome, seconds in self.requests:
            outcomes[phase][outcome] += 1
            if outcome in ("200", "202"):
                latency[phase].append(seconds)
        live = [seconds for _, outcome, seconds in self.liveness if outcome == "200"]
        went_back = sum(1 for (_, v0, a0), (_, v1, a1) in zip(self.served, self.served[1:], strict=False)
                        if v1 < v0 or a1 < a0)
        every = [outcome for _, outcome, _ in self.requests]
        return {
            "accepted": len(self.accepted), "applied_once": applied - doubled, "lost": len(self.accepted) - applied,
            "doubled": doubled, "audit_records_of_accepted": audit_records,
            "batches_applied_counter": status["batches_applied"],
            "requests": len(every), "status_5xx": sum(1 for o in every if o.isdigit() and int(o) >= 500 and o != "503"),
            "status_503": every.count("503"), "status_429": every.count("429"),
            "connection_errors": sum(1 for o in every if not o.isdigit()),
            "by_phase": {phase: {"outcomes": dict(outcomes[phase]), "ingest_latency_seconds":
                                 _percentiles(latency[phase])} for phase in sorted(outcomes)},
            "liveness_seconds": _percentiles(live),
            "liveness_failures": dict(Counter(o for _, o, _ in self.liveness if o != "200")),
            "served_status_samples": len(self.served), "served_status_went_back": went_back,
            "faults": self.timeline.faults, "workers_started": self.workers_started,
            "apis_started": self.apis_started, "drain_seconds": round(drain_seconds, 2),
            "rss_mb": self.sampler.summary(), "max_queue_depth": max(self.sampler.depths, default=0),
            "defense_over_time": self.defense_windows(),
        }

    def defense_windows(self) -> list[dict]:
        """Per window of `--window` seconds of the run: batches, samples, flagged rate, mean threshold."""
        records = [json.loads(fields[b"record"]) for _, fields in self.queue.client.xrange(self.queue.audit_stream)]
        if not records:
            return []
        start = records[0]["applied_at"]
        windows: dict[int, list[dict]] = defaultdict(list)
        for record in records:
            windows[int((record["applied_at"] - start) // self.args.window)].append(record)
        rows = []
        for index in sorted(windows):
            chunk = windows[index]
            samples, flagged = sum(r["samples"] for r in chunk), sum(r["flagged"] for r in chunk)
            thresholds = [r["threshold"] for r in chunk if r["threshold"] is not None]
            rows.append({"from_seconds": index * self.args.window, "batches": len(chunk), "samples": samples,
                         "flagged_rate": round(flagged / samples, 4),
                         "threshold_mean": round(statistics.fmean(thresholds), 5) if thresholds else None})
        return rows


class ResilientSampler(Sampler):
    """The load test's sampler, reading whichever processes are current, through a Redis that may be down."""

    def sample(self) -> None:
        with contextlib.suppress(redis.RedisError):
            super().sample()


def _clean_batches(settings: ServiceSettings, seed: int):
    """A factory of endless clean digits stream batches (uint8 on the wire), one stream per client."""
    import torch

    from service.experiment import Experiment

    experiment = Experiment.prepare(settings.experiment_config(), cache_dir=settings.cache_dir, progress=False)

    def batches(index: int):
        for x, y in experiment.stream_batches(10**9, seed=seed * 1000 + index):
            yield (x * 255).round().to(torch.uint8).numpy(), y.numpy()  # the stream's pixels are k/255

    return batches


def run(args) -> dict:
    namespace = f"soak-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="dscguard-soak-") as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        settings = ServiceSettings(
            redis_url=redis_server.url, namespace=namespace, api_key=API_KEY, checkpoint_dir=Path(tmp) / "checkpoints",
            cache_dir=args.cache_dir, config_overrides=json.loads(args.config_overrides), worker_metrics_port=0,
            queue_max_length=args.queue_max_length, checkpoint_every=args.checkpoint_every,
            torch_threads=args.worker_threads, heartbeat_ttl_seconds=args.heartbeat_ttl, audit_max_length=10_000_000)
        batches = _clean_batches(settings, args.seed)  # burns in (cached) before the worker needs it
        soak = Soak(args, settings, redis_server, batches)
        print(f"soak: {args.minutes} min, {args.clients} clients, {args.rate} batches/s; faults at "
              f"{[(round(at), name) for at, name in soak.schedule()]}", flush=True)
        results = soak.run()
    return {"results": results, "config": {k: v for k, v in vars(args).items() if k != "json"},
            "environment": {**environment(), "httpx": httpx.__version__}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="length of the run")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--rate", type=float, default=8.0, help="batches per second, all clients together")
    parser.add_argument("--kill-every", type=float, default=180.0, help="seconds between worker kill -9s")
    parser.add_argument("--window", type=float, default=60.0, help="seconds per row of the defense over time")
    parser.add_argument("--queue-max-length", type=int, default=200)
    parser.add_argument("--checkpoint-every", type=int, default=16)
    parser.add_argument("--heartbeat-ttl", type=float, default=3.0, help="the worker's lease: a killed worker's "
                        "successor waits this long")
    parser.add_argument("--worker-threads", type=int, default=1)
    add_run_options(parser)
    args = parser.parse_args(argv)
    result = run(args)
    emit(result, args.json)
    r = result["results"]
    held = (r["status_5xx"] == 0 and r["lost"] == 0 and r["doubled"] == 0 and r["served_status_went_back"] == 0)
    return 0 if held else 1


if __name__ == "__main__":
    sys.exit(main())
