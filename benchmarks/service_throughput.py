"""End-to-end throughput of the service (HTTP -> Redis -> worker) beside the in-process learner, and ingest latency.

For each workload (digits: DigitsCNN on the profile's 50x1x8x8 batches; cifar10: SmallCNN on
100x3x32x32 batches, the `step_cost.py` burn-in), in one run, from the same starting model and on
the same batches: the in-process learner steps, and a running `dscguard serve` + `dscguard worker`
pair (separate processes, as deployed) is sent the batches over HTTP, taking turns chunk by chunk;
samples per second applied are compared (end to end: from the first POST of a chunk until the
worker has applied its last batch).

Equal compute: the worker and the in-process learner get the same torch threads (`--threads`,
default 1), the rest of the machine serving the API, Redis and this client, as when the API and
the worker share a small machine. The in-process learner with torch's default threads (every
core) is timed too, in the same turns, and reported beside it. Request bodies are encoded before
the clock starts (a load generator's own cost is not the service's); sending them is timed.

Then 100x3x32x32 uint8 batches are POSTed at a fixed request rate while the worker runs, and the
ingest latency (client-side, request to 202) is reported as p50/p99.

Needs Redis (default redis://127.0.0.1:6379/0; a random namespace, deleted afterwards) and, for the
cifar10 workload, CIFAR-10 in the data directory (../shared/data or $DSCGUARD_DATA_DIR).

    python benchmarks/service_throughput.py --json service_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import httpx

# as the service's processes do (`dscguard serve/worker`): idle OpenMP threads sleep rather than spin, or
# the in-process learner on every core collapses whenever another process takes a core
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from service.core.config import ExperimentConfig
from service.core.data import DatasetNotFoundError
from service.core.environment import environment
from service.core.experiment import Experiment
from service.deployment.codec import encode_json_batch
from service.deployment.processes import cpu_seconds, free_port, log_tail, spawn, stop, wait_for
from service.deployment.redis_queue import RedisQueue, connect

ROOT = Path(__file__).resolve().parents[1]
API_KEY = f"bench-{uuid.uuid4().hex}"
WORKLOADS = {
    "digits": {"profile": "digits", "overrides": {}},
    "cifar10": {"profile": "cifar10-small", "overrides": {
        "data": {"burnin": 5000, "stream": 2000, "calibration": 500, "test": 1000},
        "burnin": {"epochs": 4, "checkpoint_every": 1, "auxiliary_epoch": 2}, "stream": {"batch_size": 100}}},
}


class Service:
    """`dscguard serve` and `dscguard worker` as subprocesses on one fresh namespace; stopped on exit."""

    def __init__(self, args, workload: dict, workdir: Path):
        self.namespace = f"bench-{uuid.uuid4().hex[:10]}"
        self.pin = args.pin
        self.port = free_port()
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "DSCGUARD_REDIS_URL": args.redis_url,
                    "DSCGUARD_NAMESPACE": self.namespace, "DSCGUARD_API_KEY": API_KEY,
                    "DSCGUARD_PROFILE": workload["profile"], "DSCGUARD_SEED": str(args.seed),
                    "DSCGUARD_DEVICE": args.device, "DSCGUARD_CONFIG_OVERRIDES": json.dumps(workload["overrides"]),
                    "DSCGUARD_CHECKPOINT_DIR": str(workdir / self.namespace),
                    "DSCGUARD_CHECKPOINT_EVERY": str(args.checkpoint_every), "DSCGUARD_WORKER_METRICS_PORT": "0",
                    "DSCGUARD_QUEUE_MAX_LENGTH": "100000", "DSCGUARD_MAX_BATCH_SAMPLES": "1024",
                    "DSCGUARD_TORCH_THREADS": str(args.threads)}
        self.logs = workdir / f"{self.namespace}.log"
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Service:
        for command in (["worker", "--log-level", "warning"],
                        ["serve", "--port", str(self.port), "--log-level", "warning"]):
            self.processes.append(spawn([sys.executable, "-m", "service.cli", *command], self.logs, env=self.env,
                                        cwd=ROOT, new_session=False))
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", headers={"X-API-Key": API_KEY},
                                   timeout=60)
        try:
            if self.pin:  # the worker alone on core 0; the API (and this client, see _throughput) on the others
                worker, api = self.processes
                os.sched_setaffinity(worker.pid, {0})
                os.sched_setaffinity(api.pid, _other_cores())
            wait_for(self._ready, 600, "the service to be ready", watch=self.processes, log=self.logs)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _ready(self) -> bool:
        try:
            return self.client.get("/health/ready").status_code == 200
        except httpx.TransportError:
            return False

    def __exit__(self, *exc) -> None:
        self.client.close()
        for process in self.processes:  # the worker first: its final checkpoint
            stop(process, timeout=60)
        RedisQueue(connect(self.env["DSCGUARD_REDIS_URL"]), self.namespace).purge()

    def cpu_seconds(self) -> dict[str, float]:
        """CPU time (user + system) so far of the worker, the API and this client."""
        worker, api = (cpu_seconds(process.pid) for process in self.processes)
        if worker is None or api is None:
            raise SystemExit(f"the service exited:\n{log_tail(self.logs)}")
        return {"worker": worker, "api": api, "client": time.process_time()}

    def post(self, body: bytes) -> float:
        """POST one encoded batch (`encode`); returns the client-side latency in seconds."""
        started = time.perf_counter()
        response = self.client.post("/v1/ingest", content=body, headers={"Content-Type": "application/json"})
        elapsed = time.perf_counter() - started
        if response.status_code != 202:
            raise SystemExit(f"ingest refused: {response.status_code} {response.text}")
        return elapsed

    def wait_applied(self, batch_id: str, timeout: float = 1800) -> None:
        """Until the worker has applied `batch_id` (the API holds the request: no polling to steal CPU)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.client.get(f"/v1/batches/{batch_id}", params={"wait": 30}).json()
            if state["state"] == "applied":
                return
            if state["state"] != "queued":
                raise SystemExit(f"batch {batch_id} was not applied: {state}")
        raise SystemExit(f"batch {batch_id} was not applied within {timeout} s")


def _other_cores() -> set[int]:
    return (os.sched_getaffinity(0) - {0}) or {0}


def encode(batch_id: str, x: torch.Tensor, y: torch.Tensor) -> bytes:
    """One batch as the JSON body of /v1/ingest, inputs as uint8 (what a camera or a dataset sends)."""
    return json.dumps(encode_json_batch(batch_id, (x * 255).round().to(torch.uint8), y)).encode()


def _throughput(args, name: str, workload: dict, workdir: Path) -> dict:
    config = ExperimentConfig.from_profile(workload["profile"], seed=args.seed, device=args.device,
                                           **workload["overrides"])
    experiment = Experiment.prepare(config, progress=not args.no_progress)
    batches = list(experiment.stream_batches(args.warmup + args.batches, seed=args.seed + 1))
    samples = sum(len(y) for _, y in batches[args.warmup :])

    default_threads = torch.get_num_threads()
    learners = {args.threads: experiment.new_learner(), default_threads: experiment.new_learner()}
    seconds = dict.fromkeys(["end_to_end", *learners], 0.0)
    bodies = [encode(f"b{index}", x, y) for index, (x, y) in enumerate(batches)]
    flagged = 0
    cpu = dict.fromkeys(["worker", "api", "client"], 0.0)  # CPU seconds spent while the service was timed
    in_process_cpu = 0.0
    with Service(args, workload, workdir) as service:
        for index, (x, y) in enumerate(batches[: args.warmup]):
            for threads, learner in learners.items():
                _steps(learner, [(x, y)], threads)
            service.post(bodies[index])
        if args.warmup:
            service.wait_applied(f"b{args.warmup - 1}")
        # take turns chunk by chunk, so that machine noise hits every side alike
        for start in range(args.warmup, len(batches), args.chunk):
            chunk = range(start, min(start + args.chunk, len(batches)))
            if args.pin:  # in process: core 0, as the worker
                os.sched_setaffinity(0, {0})
            for threads, learner in learners.items():
                cpu_before = time.process_time()
                elapsed, chunk_flagged = _steps(learner, [batches[i] for i in chunk], threads)
                seconds[threads] += elapsed
                in_process_cpu += time.process_time() - cpu_before if threads == args.threads else 0.0
                flagged += chunk_flagged if threads == args.threads else 0
            if args.pin:  # the client sends from the API's cores
                os.sched_setaffinity(0, _other_cores())
            started, cpu_before = time.perf_counter(), service.cpu_seconds()
            for index in chunk:
                service.post(bodies[index])
            service.wait_applied(f"b{chunk[-1]}")
            seconds["end_to_end"] += time.perf_counter() - started
            cpu = {name: cpu[name] + spent - cpu_before[name] for name, spent in service.cpu_seconds().items()}
        audit = service.client.get("/v1/status", params={"audit": args.batches}).json()["audit"]
    torch.set_num_threads(default_threads)
    served_flagged = sum(record["flagged"] for record in audit)
    return {"workload": name, "model": config.model.name, "input_shape": list(batches[0][0].shape[1:]),
            "batch_size": config.stream.batch_size, "batches": args.batches, "samples": samples,
            "threads": args.threads, "default_threads": default_threads,
            "in_process_samples_per_second": samples / seconds[args.threads],
            "in_process_default_threads_samples_per_second": samples / seconds[default_threads],
            "end_to_end_samples_per_second": samples / seconds["end_to_end"],
            "ratio_end_to_end_to_in_process": seconds[args.threads] / seconds["end_to_end"],
            "ratio_end_to_end_to_in_process_default_threads": seconds[default_threads] / seconds["end_to_end"],
            "flagged_in_process": flagged, "flagged_end_to_end": served_flagged,
            # where the CPU goes (ms per batch): the service's overhead is what its processes spend beyond a step
            "cpu_ms_per_batch": {"in_process": 1000 * in_process_cpu / args.batches,
                                 **{name: 1000 * spent / args.batches for name, spent in cpu.items()}}}


def _steps(learner, batches: list, threads: int) -> tuple[float, int]:
    """Step `learner` through `batches` on `threads` torch threads: (seconds, samples flagged)."""
    torch.set_num_threads(threads)
    started = time.perf_counter()
    flagged = sum(learner.step(x, y).flagged_count for x, y in batches)
    return time.perf_counter() - started, flagged


def _latency(args, workload: dict, workdir: Path) -> dict:
    """Ingest latency for 100x3x32x32 uint8 batches at a fixed request rate, the worker running."""
    config = ExperimentConfig.from_profile(workload["profile"], seed=args.seed, device=args.device,
                                           **workload["overrides"])
    experiment = Experiment.prepare(config, progress=not args.no_progress)
    batches = list(experiment.stream_batches(args.latency_requests, seed=args.seed + 2))
    latencies = []
    with Service(args, workload, workdir) as service:
        for index in range(5):  # connections and code paths warm
            service.post(encode(f"warm{index}", *batches[index]))
        interval = 1.0 / args.rate
        next_at = time.perf_counter()
        bodies = [encode(f"l{index}", x, y) for index, (x, y) in enumerate(batches)]
        for body in bodies:
            delay = next_at - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            latencies.append(service.post(body))
            next_at += interval
    ms = sorted(1000 * t for t in latencies)
    quantile = statistics.quantiles(ms, n=100, method="inclusive")
    return {"batch": [len(batches[0][1]), *batches[0][0].shape[1:]], "encoding": "json uint8 base64",
            "requests": len(ms), "rate_per_second": args.rate, "p50_ms": quantile[49], "p99_ms": quantile[98],
            "max_ms": ms[-1], "mean_ms": statistics.fmean(ms)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    parser.add_argument("--batches", type=int, default=40, help="timed batches per workload")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=20, help="batches per turn (in-process, then end to end)")
    parser.add_argument("--checkpoint-every", type=int, default=50)
    parser.add_argument("--rate", type=float, default=20.0, help="requests per second for the latency test")
    parser.add_argument("--latency-requests", type=int, default=200)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker and of the in-process "
                        "learner it is compared with")
    parser.add_argument("--pin", action="store_true", help="pin the worker and the in-process learner to core 0, "
                        "the API and this client to the other cores (needs --threads 1 and 2+ cores)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    results: dict = {"benchmark": "service_throughput", "config": vars(args), "throughput": [], "latency": None,
                     "environment": {**environment(), "device": args.device,
                                     "load_average_at_start": os.getloadavg()},
                     "skipped": {}}
    workdir = Path(tempfile.mkdtemp(prefix="dscguard-bench-"))
    try:
        for name in args.workloads:
            try:
                row = _throughput(args, name, WORKLOADS[name], workdir)
            except DatasetNotFoundError as exc:
                results["skipped"][name] = str(exc)
                print(f"{name}: skipped ({exc})")
                continue
            results["throughput"].append(row)
            print(f"{name:8s} {row['model']:10s} in-process {row['in_process_samples_per_second']:8.1f} samples/s, "
                  f"end-to-end {row['end_to_end_samples_per_second']:8.1f} samples/s, "
                  f"ratio {row['ratio_end_to_end_to_in_process']:.3f} ({args.threads} thread(s) each); in-process "
                  f"on {row['default_threads']} threads {row['in_process_default_threads_samples_per_second']:8.1f} "
                  f"samples/s, ratio {row['ratio_end_to_end_to_in_process_default_threads']:.3f}")
            print("         CPU ms per batch: " + ", ".join(f"{k} {v:.2f}" for k, v in row["cpu_ms_per_batch"].items()))
        if "cifar10" in args.workloads and "cifar10" not in results["skipped"]:
            latency = results["latency"] = _latency(args, WORKLOADS["cifar10"], workdir)
            print(f"ingest latency, {latency['batch']} uint8 at {args.rate:g} req/s: p50 {latency['p50_ms']:.1f} ms, "
                  f"p99 {latency['p99_ms']:.1f} ms (max {latency['max_ms']:.1f} ms)")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    results["environment"]["load_average_at_end"] = os.getloadavg()  # other work on the machine skews the figures
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
