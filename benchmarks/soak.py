"""Soak test: steady clean ingest for N minutes while the worker, Redis and the API are made to fail.

Processes as deployed: `dscguard serve`, `dscguard worker` and a private `redis-server` with the
append-only file fsynced before each reply (the shared Redis is never touched). C clients post clean
digits stream batches (uint8) at a steady total rate, each with a fresh batch_id; a 429 or 503 is
retried after its Retry-After, a connection refused (the API restarting) after 0.5 s, always with the
same batch_id (a retry of a batch that got in is a 200 duplicate). Faults, seeded by the schedule:

- the worker is `kill -9`ed every `--kill-every` seconds and restarted at once;
- Redis is SIGKILLed once (at 1/2 of the run) and restarted on its files;
- the API is stopped (SIGTERM) once (at 3/4 of the run) and restarted on the same port.

Faults planned less than 15 s before the late attack, or after it, are left out.

The late attack (from `--attack-at`, default 85% of the run, once every fault has recovered; off with
`--no-attack`): the accumulative attack of `dscguard attack --scenarios poison`, run against the live stack
over HTTP while the clean clients keep posting (`attacker_sim.http_target.evaluate_target` with an
`HttpTarget`: the service's profile and seed give the attacker's batches, its validation split and the
digits test split it is measured on; white-box, with the admin token's /v1/model, as the profile says).
Its batches are named `attack-<uuid>` (the clean ones `soak-<client>-<n>`) and retried by the same rules.
The clean clients post until the run's end and, should the attack still be running then, until it ends.
Reported: the poison batches and the trigger, test accuracy (over /v1/predict) before the attack, after
the poisons and after the trigger, the share of poison batches and of the trigger flagged (audit records:
`flagged` > 0; for `guard`, the gate's verdict on the whole update, which it shrank), the clean flagged
rate while the attack ran, and whether the late attack was caught. The rule: **caught** when every
trigger batch was flagged and the test accuracy after the trigger is within `--caught-within` points
(default 5) of the accuracy before the attack. The attacker's own requests, batches and 5xx are counted
apart; accepted / lost / doubled / 5xx above them are the clean clients' alone.

Each request is labelled with the phase it started in (`steady`, `late_attack` while the attack runs, or
the fault, from its injection until the service has recovered: worker serving and caught up, Redis and the
worker ready, API live).
Meanwhile: `/health/live` every 0.5 s, `/v1/status` every second (the served model version and
batches applied must never go back), RSS of the API and the worker every 0.5 s. At the end the worker
drains the queue and every accepted batch is checked: state `applied`, exactly one audit record (lost:
none; doubled: none). The audit stream gives the threshold and the clean flagged rate per window. The
figures are printed as JSON (and written to `--json`), then a summary; the exit status is 1 if a 5xx,
a lost or doubled batch, a served status going back, a fault the service did not recover from (within
`--ready-timeout`; no later fault nor the attack is run then) or a failed attack run was seen (whether the
attack was caught is the defense's result, reported, not a failure of the run).

    python benchmarks/soak.py --minutes 30 --json soak.json
    python benchmarks/soak.py --minutes 3 --kill-every 50 --window 20 --json soak.json   # a validation run
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
import traceback
import uuid
from collections import Counter, defaultdict
from pathlib import Path

import httpx
import redis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the service and its test harness, when run as a script

from load_test import Sampler, _applied, add_run_options, emit  # noqa: E402

from attacker_sim.http_target import BATCH_ID_PREFIX as ATTACK_PREFIX  # noqa: E402
from attacker_sim.http_target import HttpTarget, evaluate_target  # noqa: E402
from service.core.environment import environment  # noqa: E402
from service.deployment.codec import encode_json_batch  # noqa: E402
from service.deployment.processes import RedisServer  # noqa: E402
from service.deployment.redis_queue import RedisQueue, connect  # noqa: E402
from service.deployment.settings import ServiceSettings  # noqa: E402
from tests.service_harness import ApiProcess, WorkerProcess, wait_until  # noqa: E402

API_KEY, ADMIN_TOKEN = f"soak-{uuid.uuid4().hex}", f"soak-admin-{uuid.uuid4().hex}"
HEADERS = {"X-API-Key": API_KEY}
CLEAN_PREFIX = "soak-"  # the clean clients' batch ids: soak-<client>-<n>
FAULT_MARGIN = 15.0  # seconds kept free of faults around another fault and before the late attack


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
        self.deadline = float("inf")  # of the clean traffic, set when it starts
        self.attack: dict | None = None  # the late attack's figures, once it has run
        self.attack_answers: list[tuple[str, str, int]] = []  # (method, path, status) of the attacker's requests
        self.attack_done = threading.Event()
        if args.no_attack:
            self.attack_done.set()

    # -- faults (a thread: they wait on processes) --------------------------------------------------------
    def attack_seconds(self) -> float | None:
        """When the late attack is due, in seconds from the start (None: no attack)."""
        return None if self.args.no_attack else self.args.attack_at * self.args.minutes * 60

    def schedule(self) -> list[tuple[float, str]]:
        duration = self.args.minutes * 60
        end = duration - 10 if self.args.no_attack else self.attack_seconds() - FAULT_MARGIN
        planned = [(at, name) for at, name in ((duration / 2, "redis_restart"), (3 * duration / 4, "api_restart"))
                   if at < end]
        kill = self.args.kill_every
        while kill < end:
            if all(abs(kill - at) >= FAULT_MARGIN for at, _ in planned):
                planned.append((kill, "worker_kill"))
            kill += self.args.kill_every
        return sorted(planned)

    def inject(self) -> None:
        """The faults in turn, each until the service has recovered; then the late attack."""
        try:
            for at, name in self.schedule():
                if self.stop.wait(max(0.0, self.timeline.started + at - time.monotonic())):
                    return
                fault = self.timeline.fault(name)
                try:
                    getattr(self, name)()
                except Exception as exc:  # the service did not recover: reported, the run fails, no more faults
                    fault["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                    traceback.print_exc()
                    if not self.args.no_attack:
                        self.attack = {"at_seconds": None, "error": f"not run: {name} did not recover"}
                    return
                self.timeline.recovered(fault)
                print(f"  {fault}", flush=True)
            if not self.args.no_attack and not self.stop.wait(
                    max(0.0, self.timeline.started + self.attack_seconds() - time.monotonic())):
                self.late_attack()
        finally:
            self.attack_done.set()

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
        self.api.wait_live(self.args.ready_timeout)  # an API importing torch on busy cores can take a minute

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
                   diagnostics=lambda: self.worker.output()[-3000:], watch=[self.worker.process])

    # -- the late attack (in the faults' thread, after them) -----------------------------------------------
    def late_attack(self) -> None:
        """The accumulative attack of `dscguard attack --scenarios poison`, over HTTP against the live stack."""
        import torch

        torch.set_num_threads(1)  # the attacker's crafting shares the cores with the stack it attacks
        started, started_wall = time.monotonic(), time.time()
        self.timeline.phase = "late_attack"
        self.attack = {"at_seconds": round(started - self.timeline.started, 1), "error": None}
        print(f"  late attack from {self.attack['at_seconds']} s", flush=True)

        def answered(response: httpx.Response) -> None:
            self.attack_answers.append((response.request.method, response.request.url.path, response.status_code))

        target = HttpTarget(self.api.url, API_KEY, ADMIN_TOKEN, timeout_seconds=self.args.attack_timeout)
        target.client.event_hooks["response"] = [answered]
        try:
            strategy = target.status()["strategy"]
            evaluation = evaluate_target(self.settings.experiment_config(), target, strategy, scenarios=["poison"],
                                         cache_dir=self.settings.cache_dir, progress=False)
            run = evaluation.runs[0]
            self.attack.update({"strategy": strategy, "poison_batches": run.batches, "test_accuracy": {
                "before_attack": round(run.start_acc, 4), "after_poisons": round(run.poison_acc, 4),
                "after_trigger": round(run.trigger_acc, 4)}, "test_accuracy_trace": [round(a, 4) for a in run.trace],
                "poison_samples_flagged_rate": round(run.flagged_rate, 4),
                "trigger_samples_flagged_rate": round(run.trigger_flagged_rate, 4)})
        except Exception as exc:  # reported, and the run fails; the clean traffic and the accounting go on
            self.attack["error"] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        finally:
            target.close()
            self.attack.update({"seconds": round(time.monotonic() - started, 1), "wall_from": started_wall,
                                "wall_to": time.time()})
            self.timeline.phase = "steady"
            print(f"  late attack done after {self.attack['seconds']} s", flush=True)

    def attack_ingested(self) -> int:
        """The attacker's batches the API took (202; a 200 is a retry's duplicate)."""
        return sum(1 for method, path, code in self.attack_answers
                   if method == "POST" and path == "/v1/ingest" and code == 202)

    def attack_figures(self, records: list[dict]) -> dict | None:
        """The late attack's figures, with what the audit records say the defense did with each of its batches."""
        if self.attack is None:
            return None
        attack = dict(self.attack)
        wall_from, wall_to = attack.pop("wall_from", None), attack.pop("wall_to", None)
        ordered = [r for r in records if r["batch_id"].startswith(ATTACK_PREFIX)]
        ids = Counter(r["batch_id"] for r in ordered)
        codes = [code for _, _, code in self.attack_answers]
        clean = [r for r in records if wall_from is not None and r["batch_id"].startswith(CLEAN_PREFIX)
                 and wall_from <= r["applied_at"] <= wall_to]
        clean_samples = sum(r["samples"] for r in clean)
        attack.update({
            "requests": len(codes), "statuses": dict(Counter(str(c) for c in codes)),
            "status_5xx": sum(1 for c in codes if c >= 500 and c != 503),
            "batches_ingested": self.attack_ingested(), "audit_records": len(ordered),
            "doubled": sum(n > 1 for n in ids.values()),
            "clean_in_window": {"batches": len(clean),
                                "flagged_batches_rate": round(sum(r["flagged"] > 0 for r in clean) / len(clean), 4)
                                if clean else None,
                                "flagged_samples_rate": round(sum(r["flagged"] for r in clean) / clean_samples, 4)
                                if clean_samples else None},
        })
        if attack["error"] is not None:
            attack["caught"] = None
            return attack
        poisons, triggers = ordered[:attack["poison_batches"]], ordered[attack["poison_batches"]:]
        attack.update({
            "trigger_batches": len(triggers),
            "poison_batches_flagged": sum(r["flagged"] > 0 for r in poisons),
            "poison_batches_flagged_rate": round(sum(r["flagged"] > 0 for r in poisons) / len(poisons), 4)
            if poisons else None,
            "trigger_flagged": bool(triggers) and all(r["flagged"] > 0 for r in triggers),
            "threshold_at_trigger": triggers[-1]["threshold"] if triggers else None,
        })
        accuracy = attack["test_accuracy"]
        drop_points = 100 * (accuracy["before_attack"] - accuracy["after_trigger"])
        attack["accuracy_drop_points"] = round(drop_points, 2)
        attack["caught"] = attack["trigger_flagged"] and drop_points <= self.args.caught_within
        attack["rule"] = (f"every trigger batch flagged and test accuracy after the trigger within "
                          f"{self.args.caught_within:g} points of before the attack")
        return attack

    # -- traffic ---------------------------------------------------------------------------------------------
    def running(self) -> bool:
        """Clean traffic goes on until the run's end, and past it while the late attack is still running."""
        return time.monotonic() < self.deadline or not self.attack_done.is_set()

    async def client(self, http: httpx.AsyncClient, index: int) -> None:
        interval = self.args.clients / self.args.rate
        batches = self.batches(index)
        next_at = time.monotonic() + index * interval / self.args.clients
        sent = 0
        while self.running():
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))
            next_at += interval
            x, y = next(batches)
            batch_id = f"{CLEAN_PREFIX}{index}-{sent}"
            sent += 1
            body = json.dumps(encode_json_batch(batch_id, x, y)).encode()
            while self.running():
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

    async def probe(self, http: httpx.AsyncClient) -> None:
        """Liveness every 0.5 s; the served status every second."""
        turn = 0
        while self.running():
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
            self.deadline = self.timeline.started + self.args.minutes * 60
            await asyncio.gather(self.probe(http), *(self.client(http, i) for i in range(self.args.clients)))

    # -- the run ----------------------------------------------------------------------------------------------
    def run(self) -> dict:
        try:
            self.api.wait_live(self.args.ready_timeout)
            wait_until(lambda: httpx.get(f"{self.api.url}/health/ready").status_code == 200, self.args.ready_timeout,
                       "the service to be ready", interval=0.2, diagnostics=lambda: self.worker.output()[-3000:],
                       watch=[self.worker.process, self.api.process])
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
                try:
                    status = httpx.get(f"{self.api.url}/v1/status", headers=HEADERS, timeout=10).json()
                except (httpx.HTTPError, ValueError):
                    return False
                return status["queue"]["lag_seconds"] == 0 and (
                    status["batches_applied"] >= len(self.accepted) + self.attack_ingested())

            wait_until(drained, self.args.drain_timeout, "the worker to apply every accepted batch", interval=0.5,
                       diagnostics=lambda: self.worker.output()[-3000:], watch=[self.worker.process])
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
        records = self.audit_records()
        applied, audit_records, _ = _applied(self.queue, sorted(self.accepted))
        # doubled: clean batch ids with two or more audit records (the attacker's are counted in late_attack)
        doubled = sum(n > 1 for n in Counter(r["batch_id"] for r in records
                                             if r["batch_id"].startswith(CLEAN_PREFIX)).values())
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
            "batches_applied_counter": status["batches_applied"], "attack_batches_ingested": self.attack_ingested(),
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
            "defense_over_time": self.defense_windows(records),
            "late_attack": self.attack_figures(records),
        }

    def audit_records(self) -> list[dict]:
        """Every record of the audit stream, oldest first."""
        return [json.loads(fields[b"record"]) for _, fields in self.queue.client.xrange(self.queue.audit_stream)]

    def defense_windows(self, records: list[dict]) -> list[dict]:
        """Per window of `--window` seconds of the run: clean batches, samples, their flagged rate (samples), the
        mean threshold, and the attacker's batches applied in the window."""
        if not records:
            return []
        start = records[0]["applied_at"]
        windows: dict[int, list[dict]] = defaultdict(list)
        for record in records:
            windows[int((record["applied_at"] - start) // self.args.window)].append(record)
        rows = []
        for index in sorted(windows):
            chunk = [r for r in windows[index] if r["batch_id"].startswith(CLEAN_PREFIX)]
            samples, flagged = sum(r["samples"] for r in chunk), sum(r["flagged"] for r in chunk)
            thresholds = [r["threshold"] for r in chunk if r["threshold"] is not None]
            rows.append({"from_seconds": index * self.args.window, "batches": len(chunk), "samples": samples,
                         "flagged_rate": round(flagged / samples, 4) if samples else None,
                         "threshold_mean": round(statistics.fmean(thresholds), 5) if thresholds else None,
                         "attack_batches": len(windows[index]) - len(chunk)})
        return rows


class ResilientSampler(Sampler):
    """The load test's sampler, reading whichever processes are current, through a Redis that may be down."""

    def sample(self) -> None:
        with contextlib.suppress(redis.RedisError):
            super().sample()


def _clean_batches(settings: ServiceSettings, seed: int):
    """A factory of endless clean digits stream batches (uint8 on the wire), one stream per client."""
    import torch

    from service.core.experiment import Experiment

    experiment = Experiment.prepare(settings.experiment_config(), cache_dir=settings.cache_dir, progress=False)

    def batches(index: int):
        for x, y in experiment.stream_batches(10**9, seed=seed * 1000 + index):
            yield (x * 255).round().to(torch.uint8).numpy(), y.numpy()  # the stream's pixels are k/255

    return batches


def run(args) -> dict:
    namespace = f"soak-{uuid.uuid4().hex[:10]}"
    with tempfile.TemporaryDirectory(prefix="dscguard-soak-") as tmp, RedisServer(Path(tmp) / "redis") as redis_server:
        settings = ServiceSettings(
            redis_url=redis_server.url, namespace=namespace, api_key=API_KEY, admin_token=ADMIN_TOKEN,
            checkpoint_dir=Path(tmp) / "checkpoints",
            cache_dir=args.cache_dir, config_overrides=json.loads(args.config_overrides), worker_metrics_port=0,
            queue_max_length=args.queue_max_length, checkpoint_every=args.checkpoint_every,
            torch_threads=args.worker_threads, heartbeat_ttl_seconds=args.heartbeat_ttl, audit_max_length=10_000_000)
        batches = _clean_batches(settings, args.seed)  # burns in (cached) before the worker needs it
        soak = Soak(args, settings, redis_server, batches)
        attack = "no late attack" if args.no_attack else f"late attack at {round(soak.attack_seconds())} s"
        print(f"soak: {args.minutes} min, {args.clients} clients, {args.rate} batches/s; faults at "
              f"{[(round(at), name) for at, name in soak.schedule()]}; {attack}", flush=True)
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
    parser.add_argument("--attack-at", type=float, default=0.85, help="start of the late attack, as a share of the "
                        "run (faults due from 15 s before it on are left out)")
    parser.add_argument("--no-attack", action="store_true", help="clean traffic only, no late attack")
    parser.add_argument("--caught-within", type=float, default=5.0, help="points of test accuracy the trigger may "
                        "cost for the late attack to count as caught (and the trigger must be flagged)")
    parser.add_argument("--attack-timeout", type=float, default=120.0, help="seconds the attacker waits for one of "
                        "its batches to be applied")
    add_run_options(parser)
    args = parser.parse_args(argv)
    if not 0 < args.attack_at < 1:
        parser.error(f"--attack-at must be between 0 and 1 (a share of the run), got {args.attack_at}")
    result = run(args)
    emit(result, args.json)
    r = result["results"]
    print("\n".join(summary(r)), flush=True)
    attack = r["late_attack"]
    attack_ran = attack is None or (attack["error"] is None and attack["status_5xx"] == 0 and attack["doubled"] == 0)
    held = (r["status_5xx"] == 0 and r["lost"] == 0 and r["doubled"] == 0 and r["served_status_went_back"] == 0
            and attack_ran and not any("error" in fault for fault in r["faults"]))
    return 0 if held else 1


def summary(r: dict) -> list[str]:
    """The run's figures in a few lines (the JSON above has them all)."""
    live = r["liveness_seconds"] or {}
    lines = [
        "", "== soak summary ==",
        f"clean batches: {r['accepted']} accepted, {r['applied_once']} applied once, lost {r['lost']}, doubled "
        f"{r['doubled']}; requests {r['requests']}: 5xx {r['status_5xx']}, 503 {r['status_503']}, 429 "
        f"{r['status_429']}, connection errors {r['connection_errors']}",
        "faults: " + ", ".join(f"{f['fault']} at {f['at_seconds']} s " + (
            f"(recovered after {f['recovered_after_seconds']} s)" if "error" not in f else f"(FAILED: {f['error']})")
            for f in r["faults"]),
        f"liveness p50 / p99 / max: {live.get('p50')} / {live.get('p99')} / {live.get('max')} s; failures "
        f"{r['liveness_failures']}; served status went back {r['served_status_went_back']} times",
        "ingest latency p50 / p99 (s) by phase: " + "; ".join(
            f"{phase} {latency.get('p50')} / {latency.get('p99')}"
            for phase, latency in ((p, v["ingest_latency_seconds"] or {}) for p, v in r["by_phase"].items())),
        "RSS MB start / peak / end: " + "; ".join(f"{name} {v['start']} / {v['peak']} / {v['end']}"
                                                  for name, v in r["rss_mb"].items()),
        "clean flagged rate per window: " + ", ".join(
            f"{w['flagged_rate']:.2%}" if w["flagged_rate"] is not None else "-" for w in r["defense_over_time"]),
    ]
    attack = r["late_attack"]
    if attack is None:
        return [*lines, "late attack: off (--no-attack)"]
    if attack["error"] is not None:
        return [*lines, f"late attack at {attack['at_seconds']} s FAILED: {attack['error']}"]
    accuracy, clean = attack["test_accuracy"], attack["clean_in_window"]
    return [*lines,
            f"late attack ({attack['strategy']}) at {attack['at_seconds']} s for {attack['seconds']} s: "
            f"{attack['poison_batches']} poison batches, {attack['trigger_batches']} trigger; attacker requests "
            f"{attack['requests']}, 5xx {attack['status_5xx']}, doubled {attack['doubled']}",
            f"  test accuracy before / after poisons / after trigger: {accuracy['before_attack']:.2%} / "
            f"{accuracy['after_poisons']:.2%} / {accuracy['after_trigger']:.2%}",
            f"  flagged: poison batches {attack['poison_batches_flagged']} of {attack['poison_batches']}, trigger "
            f"{'yes' if attack['trigger_flagged'] else 'no'}; clean batches in the same window "
            + (f"{clean['flagged_batches_rate']:.2%} of {clean['batches']}" if clean["batches"] else "none"),
            f"late attack caught: {'yes' if attack['caught'] else 'no'} (rule: {attack['rule']})"]


if __name__ == "__main__":
    sys.exit(main())
