"""Faults, end to end on loopback: the worker killed (-9) or stopped (SIGTERM) mid-stream, Redis crashing
during ingestion, a truncated checkpoint, and a short load run of benchmarks/load_test.py.

Each fault is judged by what must hold afterwards: every batch acknowledged with 202 is applied exactly
once. "Exactly once" is checked four ways that must all agree: the batches-applied counter and model
version (status and final checkpoint), the recent batch ids the checkpoint holds, each batch's state and
audit record (one per batch, none repeated), and the weights, equal to an in-process learner's that took
each batch once, in order (a lost or a doubled update would change them).
"""

import json
import random
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
import torch

from service.core.checkpoint import load_checkpoint
from service.deployment.checkpoint_store import checkpoints
from service.deployment.codec import Batch, encode_safetensors_batch, to_stream_fields
from service.deployment.model_store import model_from_bytes
from service.deployment.redis_queue import GROUP, RedisQueue, entry_id_key
from service.deployment.worker import Worker, WorkerError
from tests.service_harness import (
    ADMIN_TOKEN,
    DIGITS_OVERRIDES,
    ROOT,
    ApiServer,
    RedisServer,
    WorkerProcess,
    assert_settled,
    make_settings,
    needs_redis,
    wait_until,
)

pytestmark = needs_redis
SAFETENSORS = {"Content-Type": "application/vnd.safetensors"}


def _post(client: httpx.Client, batch_id: str, x: torch.Tensor, y: torch.Tensor) -> httpx.Response:
    return client.post("/v1/ingest", content=encode_safetensors_batch(x, y, batch_id=batch_id), headers=SAFETENSORS)


def _status(api: ApiServer) -> dict:
    return api.client.get("/v1/status").json()


def _wait_applied(api: ApiServer, count: int, worker: WorkerProcess, timeout: float = 120) -> dict:
    return wait_until(lambda: (s := _status(api))["batches_applied"] == count and s, timeout,
                      f"{count} batches applied", interval=0.1, diagnostics=worker.output)


def _wait_serving(worker: WorkerProcess, timeout: float = 90) -> None:
    wait_until(lambda: "serving namespace" in worker.output(), timeout, "the worker to serve", interval=0.05,
               diagnostics=worker.output, watch=[worker.process])


def _assert_applied_exactly_once(api: ApiServer, queue: RedisQueue, settings, batch_ids: list[str], batches,
                                 digits_experiment) -> None:
    """The four views of 'each batch once, in order' agree (see the module docstring)."""
    count = len(batch_ids)
    status = _status(api)
    assert (status["batches_applied"], status["model_version"]) == (count, count)
    newest = checkpoints(Path(settings.checkpoint_dir))[0]
    _, meta = load_checkpoint(newest)
    assert (meta["batches_applied"], meta["model_version"]) == (count, count)
    assert meta["extra"]["recent_batch_ids"] == batch_ids
    states = [queue.batch_state(batch_id) for batch_id in batch_ids]
    assert [s["state"] for s in states] == ["applied"] * count
    assert [s["committed"] for s in states] == [True] * count  # the final checkpoint holds every update
    assert [s["record"]["batch_index"] for s in states] == list(range(count))
    audit = [json.loads(fields[b"record"]) for _, fields in queue.client.xrange(queue.audit_stream)]
    assert [r["batch_id"] for r in audit] == batch_ids, "the audit stream lost or repeated a record"
    assert [r["model_version"] for r in audit] == list(range(1, count + 1))
    assert queue.client.xlen(queue.dead_letters) == 0
    reference = digits_experiment.new_learner()
    for x, y in batches:
        reference.step(x, y)
    served = api.client.get("/v1/model", headers={"X-API-Key": ADMIN_TOKEN})
    weights = model_from_bytes(served.content).model.state_dict()
    # float noise only (another process, other kernels' summation order; guard's lookahead steps the weights and
    # puts them back). A capped update moves its largest weight by exactly lr x cap, so a lost, repeated or shrunk
    # one moves some weight by about that much: a tenth of the smallest cap's step is the tolerance (3.1e-4 with
    # the cap at the 0.1 level, following the model). Measured then in-process on these batches: one batch lost or
    # repeated at 100 or 199 leaves 8.0e-4 to 1.4e-3; the served weights of this run differ from the reference's by
    # up to 1.2e-4 at that level (7e-6 with the median cap), while every step's loss, flags and threshold agree
    caps = [entry["cap"] for entry in reference.strategy.gate.history]
    tolerance = digits_experiment.config.stream.lr * min(caps) / 10
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(weights[name], tensor.cpu(), rtol=0, atol=tolerance, msg=f"weights {name} differ")


CRASHES, CRASH_BATCHES = 10, 200


@pytest.mark.slow
def test_ten_kill_9s_at_random_points_neither_lose_nor_repeat_a_batch(digits_experiment, cache_dir, namespace,
                                                                      tmp_path):
    # checkpoints every 7 batches: most kills leave applied (and published) updates that no checkpoint
    # holds, which the next worker must replay, once, without a second audit record
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=7, heartbeat_ttl_seconds=1.0)
    queue = RedisQueue.from_settings(settings)
    batches = list(digits_experiment.stream_batches(CRASH_BATCHES, seed=21))
    batch_ids = [f"c{i:03d}" for i in range(CRASH_BATCHES)]
    rng = random.Random(6)
    kills, posted = [], 0
    with ApiServer(settings) as api:
        for crash in range(CRASHES):
            with WorkerProcess(settings) as worker:
                _wait_serving(worker)
                for index in range(posted, CRASH_BATCHES * (crash + 1) // (CRASHES + 1)):
                    assert _post(api.client, batch_ids[index], *batches[index]).status_code == 202
                    posted += 1
                if crash % 2:
                    time.sleep(rng.uniform(0.0, 1.0))  # anywhere: mid-step, between steps, idle
                else:  # right after an update that no checkpoint holds yet, whatever the machine's speed
                    wait_until(lambda: (queue.worker_status() or {}).get("batches_applied", 0) > int(
                        checkpoints(Path(settings.checkpoint_dir))[0].name.rsplit("-", 1)[-1]), 30,
                        "an applied update past the last checkpoint", interval=0.005, diagnostics=worker.output)
                worker.kill()
            published = (queue.worker_status() or {}).get("batches_applied", 0)
            held = int(checkpoints(Path(settings.checkpoint_dir))[0].name.rsplit("-", 1)[-1])
            kills.append({"posted": posted, "published": published, "checkpointed": held})
        for index in range(posted, CRASH_BATCHES):
            assert _post(api.client, batch_ids[index], *batches[index]).status_code == 202
        with WorkerProcess(settings) as final:
            _wait_applied(api, CRASH_BATCHES, final)
            assert final.terminate() == 0, final.output()
        assert_settled(queue)
        _assert_applied_exactly_once(api, queue, settings, batch_ids, batches, digits_experiment)
    # the kills did land mid-stream: at least the five timed ones left published updates no checkpoint held
    assert sum(k["published"] > k["checkpointed"] for k in kills) >= CRASHES // 2, kills
    print(f"\n{CRASHES} kill -9s survived, {CRASH_BATCHES} batches applied once each: {kills}")


@pytest.mark.slow
def test_sigterm_mid_stream_finishes_the_batch_checkpoints_and_the_restart_continues(digits_experiment, cache_dir,
                                                                                     namespace, tmp_path):
    # no checkpoint is due during the run (checkpoint_every 500): the one SIGTERM writes must hold everything
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=500, queue_max_length=1001)
    queue = RedisQueue.from_settings(settings)
    batches = list(digits_experiment.stream_batches(80, seed=22))
    batch_ids = [f"g{i:02d}" for i in range(80)]
    with ApiServer(settings) as api:
        with WorkerProcess(settings) as worker:
            _wait_serving(worker)
            for batch_id, (x, y) in zip(batch_ids, batches, strict=True):
                assert _post(api.client, batch_id, x, y).status_code == 202
            wait_until(lambda: (_status(api)["batches_applied"] or 0) >= 5, 60, "5 batches applied",
                       diagnostics=worker.output)
            assert worker.terminate() == 0, worker.output()
        stopped_at = int(re.search(r"stopped at model version (\d+)", worker.output()).group(1))
        assert 5 <= stopped_at < 80, "the stop did not land mid-stream"
        newest = checkpoints(Path(settings.checkpoint_dir))[0]
        assert newest.name == f"step-{stopped_at:012d}"
        # every batch seen as applied is in the checkpoint, and none beyond: the batch in flight finished
        applied = [b for b in batch_ids if queue.batch_state(b)["state"] == "applied"]
        assert applied == batch_ids[:stopped_at]
        assert load_checkpoint(newest)[1]["extra"]["recent_batch_ids"] == applied
        last = load_checkpoint(newest)[1]["extra"]["last_applied_id"]  # what the checkpoint holds is acknowledged
        pending = queue.client.xpending_range(queue.stream, GROUP, "-", "+", 100)
        assert all(entry_id_key(p["message_id"]) > entry_id_key(last) for p in pending)

        with WorkerProcess(settings) as resumed:
            _wait_applied(api, 80, resumed)
            assert resumed.terminate() == 0, resumed.output()
        assert f"resumed from checkpoint {newest}" in resumed.output()
        _assert_applied_exactly_once(api, queue, settings, batch_ids, batches, digits_experiment)
    print(f"\nSIGTERM after {stopped_at} of 80 batches: checkpoint {newest.name}, the restart applied the other "
          f"{80 - stopped_at} once")


class _Poster(threading.Thread):
    """Posts batches in order, as a client that honours Retry-After: a 503 or 429 is retried after it."""

    def __init__(self, api: ApiServer, batch_ids: list[str], batches, deadline_seconds: float = 120):
        super().__init__(name="poster", daemon=True)
        self.api, self.batch_ids, self.batches = api, batch_ids, batches
        self.deadline = time.monotonic() + deadline_seconds
        self.accepted: list[str] = []
        self.statuses: list[int] = []

    def run(self) -> None:
        with httpx.Client(base_url=self.api.url, headers=dict(self.api.client.headers), timeout=30) as client:
            for batch_id, (x, y) in zip(self.batch_ids, self.batches, strict=True):
                while time.monotonic() < self.deadline:
                    response = _post(client, batch_id, x, y)
                    self.statuses.append(response.status_code)
                    if response.status_code in (200, 202):  # 200: a retry of a batch Redis took before it died
                        self.accepted.append(batch_id)
                        break
                    if response.status_code not in (429, 503):
                        return
                    time.sleep(float(response.headers["Retry-After"]))
                time.sleep(0.03)


@pytest.mark.slow
def test_redis_crash_during_ingestion_answers_503_and_loses_nothing_acknowledged(digits_experiment, cache_dir,
                                                                                 tmp_path):
    # a private Redis (append-only file, fsync always), killed with SIGKILL mid-ingestion and restarted
    batches = list(digits_experiment.stream_batches(60, seed=23))
    batch_ids = [f"r{i:02d}" for i in range(60)]
    with RedisServer(tmp_path / "redis") as server:
        settings = make_settings("restart", tmp_path, cache_dir=cache_dir, redis_url=server.url, checkpoint_every=8,
                                 heartbeat_ttl_seconds=15.0, redis_timeout_seconds=1.0)
        queue = RedisQueue.from_settings(settings)
        with ApiServer(settings) as api, WorkerProcess(settings) as worker:
            _wait_serving(worker)
            poster = _Poster(api, batch_ids, batches)
            poster.start()
            wait_until(lambda: len(poster.accepted) >= 20, 60, "20 batches accepted")
            server.kill()
            accepted_before = list(poster.accepted)
            wait_until(lambda: poster.statuses.count(503) >= 2, 30, "the API to answer 503")
            time.sleep(1.0)
            assert api.client.get("/health/ready").status_code == 503
            # down until the worker has backed off three times (checked below): a worker busy in a step sees the
            # outage only when the step ends (its first step measures guard's cap over 256 gradients, seconds on a
            # busy CPU), and after a fixed pause it had seen one failure, or none
            wait_until(lambda: len(re.findall(r"Redis unavailable .*; retrying in", worker.output())) >= 3, 30,
                       "the worker to retry three times")
            server.start()
            poster.join(timeout=120)
            assert not poster.is_alive()
            assert set(poster.statuses) <= {200, 202, 503}, poster.statuses  # 503 while it was gone, never a 500
            assert poster.accepted == batch_ids
            _wait_applied(api, 60, worker)
            assert worker.process.poll() is None, "the worker gave up instead of waiting for Redis"
            assert worker.terminate() == 0, worker.output()
            waits = [float(s) for s in re.findall(r"Redis unavailable .*; retrying in ([0-9.]+) s", worker.output())]
            assert waits[:3] == [0.2, 0.4, 0.8] and max(waits) <= 5.0, waits  # exponential backoff, capped
            assert all(queue.batch_state(b)["state"] == "applied" for b in accepted_before)
            _assert_applied_exactly_once(api, queue, settings, batch_ids, batches, digits_experiment)
    print(f"\nRedis killed after {len(accepted_before)} of 60 batches were accepted: {poster.statuses.count(503)} "
          f"503s while it was gone, worker waits {waits}, all 60 applied once")


class _FailsOnceWhileRecording(RedisQueue):
    """A queue whose first record of applied batches fails as if Redis went away (nothing of it is written)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.failures: list[int] = []

    def record_steps(self, steps, **kwargs) -> None:
        steps = list(steps)
        if steps and not self.failures:
            self.failures.append(len(steps))
            raise redis.ConnectionError("Redis went away")
        super().record_steps(steps, **kwargs)


def test_entries_handed_out_before_a_redis_error_are_applied_once_it_answers(digits_experiment, cache_dir, namespace,
                                                                             tmp_path):
    # one read hands the worker 4 entries; Redis fails while it records the second (a checkpoint is due):
    # the other two stay pending in the group, where a new read (">") never looks
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=2)
    queue = RedisQueue.from_settings(settings)
    batches = list(digits_experiment.stream_batches(4, seed=25))
    for index, (x, y) in enumerate(batches):
        queue.enqueue(f"e{index}", to_stream_fields(Batch(f"e{index}", x.numpy(), y.numpy())))
    flaky = _FailsOnceWhileRecording.from_settings(settings)
    worker = Worker(settings, queue=flaky)  # the worker's Redis: its first record of applied batches fails
    worker.run(idle_timeout=1.0)
    assert flaky.failures == [2]
    assert worker.learner.batches_applied == 4
    assert_settled(queue)
    assert [queue.batch_state(f"e{i}")["state"] for i in range(4)] == ["applied"] * 4
    assert [json.loads(f[b"record"])["batch_id"] for _, f in queue.client.xrange(queue.audit_stream)] == [
        f"e{i}" for i in range(4)]


class _FailsOnceWhileReplaying(RedisQueue):
    """A queue whose status publication fails once, as if Redis went away, when the replaying worker has reached
    `at` batches applied."""

    def __init__(self, *args, at: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.at, self.failed = at, False

    def publish_status(self, status: dict) -> None:
        replaying = status.get("replaying") or {}
        if not self.failed and replaying.get("batches_applied") == self.at:
            self.failed = True
            raise redis.ConnectionError("Redis went away")
        super().publish_status(status)


def _applied_by_a_worker(settings, batches, prefix: str) -> RedisQueue:
    """`batches` enqueued as `<prefix><index>` and applied by a worker that then stops (checkpointing); the queue."""
    queue = RedisQueue.from_settings(settings)
    for index, (x, y) in enumerate(batches):
        queue.enqueue(f"{prefix}{index}", to_stream_fields(Batch(f"{prefix}{index}", x.numpy(), y.numpy())))
    assert Worker(settings).run(idle_timeout=0.5) == len(batches)
    return queue


def test_an_outage_mid_replay_after_a_fallback_skips_no_acknowledged_entry(digits_experiment, cache_dir, namespace,
                                                                          tmp_path):
    """A worker replays from an older checkpoint the entries that the group handed out and a newer checkpoint
    acknowledged; Redis fails in the middle of that replay. Once it answers, the entries still to replay are
    neither pending (they were acknowledged) nor new (">" never hands them out again): the consumer must take back
    those after the last applied entry, not only the pending ones (the bug: they were skipped for good)."""
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=2, checkpoints_kept=3)
    batches = list(digits_experiment.stream_batches(8, seed=26))
    queue = _applied_by_a_worker(settings, batches, "r")
    directory = Path(settings.checkpoint_dir)
    assert [p.name for p in checkpoints(directory)] == ["step-000000000008", "step-000000000006", "step-000000000004"]
    for name in ("step-000000000008", "step-000000000006"):  # lost with a disk: the fallback is to step 4
        shutil.rmtree(directory / name)
    assert queue.client.xpending(queue.stream, GROUP)["pending"] == 0  # entries 5-8 acknowledged, kept

    flaky = _FailsOnceWhileReplaying.from_settings(settings)
    flaky.at = 6  # after 2 of the 4 replayed entries: the commit's status publication fails
    resumed = Worker(settings, queue=flaky)
    resumed.run(idle_timeout=1.0)
    assert flaky.failed
    assert resumed.learner.batches_applied == 8, "acknowledged entries after the outage were skipped"
    assert_settled(queue)
    reference = digits_experiment.new_learner()
    for x, y in batches:
        reference.step(x, y)
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.learner.model.state_dict()[name], tensor, rtol=0, atol=1e-6)


@pytest.mark.parametrize("damaged", ["tensors.safetensors", "meta.json"])
def test_a_truncated_checkpoint_is_refused_and_the_previous_one_loaded_and_replayed(
        digits_experiment, cache_dir, namespace, tmp_path, caplog, damaged):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=3, checkpoints_kept=2)
    batches = list(digits_experiment.stream_batches(6, seed=24))
    queue = _applied_by_a_worker(settings, batches, "k")
    directory = Path(settings.checkpoint_dir)
    assert [p.name for p in checkpoints(directory)] == ["step-000000000006", "step-000000000003"]
    path = directory / "step-000000000006" / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])

    resumed = Worker(settings)
    with caplog.at_level("ERROR", logger="dscguard.worker"):
        resumed.start()
    try:
        assert resumed.learner.batches_applied == 3
        assert resumed.last_applied_id == load_checkpoint(directory / "step-000000000003")[1]["extra"][
            "last_applied_id"]
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert re.search(rf"refusing checkpoint step-000000000006 \(CheckpointError: .*{damaged}.*\); moved to "
                         r"refused-step-000000000006", errors[0]), errors
        assert "fell back to checkpoint step-000000000003: the 3 updates after it" in errors[1], errors
        assert [p.name for p in checkpoints(directory)] == ["step-000000000003"]
        assert (directory / "refused-step-000000000006" / damaged).is_file()  # kept aside for inspection
        # nothing lost: the three updates after the fallback are replayed from the entries the stream kept
        assert resumed.run(idle_timeout=0.5) == 3
    finally:
        resumed.shutdown()
    assert resumed.learner.batches_applied == 6
    audit = [json.loads(f[b"record"])["batch_id"] for _, f in queue.client.xrange(queue.audit_stream)]
    assert audit == [f"k{i}" for i in range(6)]  # replayed batches keep their one audit record
    reference = digits_experiment.new_learner()
    for x, y in batches:
        reference.step(x, y)
    for name, tensor in reference.model.state_dict().items():
        torch.testing.assert_close(resumed.learner.model.state_dict()[name], tensor, rtol=0, atol=1e-6)


def test_the_worker_refuses_a_queue_that_checkpoints_could_never_drain(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, queue_max_length=50, checkpoint_every=25, checkpoints_kept=2)
    with pytest.raises(WorkerError, match=r"QUEUE_MAX_LENGTH \(50\) must exceed DSCGUARD_CHECKPOINTS_KEPT x "
                                          r"DSCGUARD_CHECKPOINT_EVERY \(50\)"):
        Worker(settings).start()
    assert RedisQueue.from_settings(settings).lease_holder() is None


@pytest.mark.slow
def test_short_load_run_holds(cache_dir, digits_experiment, tmp_path):
    """benchmarks/load_test.py for 5 s with 4 clients: no 5xx, bounded queue, 429s honoured, all applied."""
    out = tmp_path / "load.json"
    command = [sys.executable, "benchmarks/load_test.py", "--clients", "4", "--duration", "5", "--queue-max-length",
               "24", "--checkpoint-every", "8", "--cache-dir", str(cache_dir), "--config-overrides",
               json.dumps(DIGITS_OVERRIDES), "--json", str(out)]
    run = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    result = json.loads(out.read_text())["results"]
    assert result["status_5xx"] == 0 and result["other_errors"] == 0
    assert result["accepted"] > 0 and result["status_429"] > 0 and result["accepted_after_429"] > 0
    assert result["max_queue_depth"] <= 24
    assert result["applied"] == result["accepted"] and result["lost"] == 0 and result["doubled"] == 0
    for process in ("api", "worker"):  # a few MB in practice (docs/reliability.md); a leak per request shows
        rss = result["rss_mb"][process]
        assert rss["samples"] >= 5 and rss["peak"] - rss["start"] < 100, (process, rss)
