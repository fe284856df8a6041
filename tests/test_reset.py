"""The admin reset (POST /v1/admin/reset): the route (admin only, validated, audited, nothing enqueued when refused)
against real Redis and uvicorn, and its semantics through a real worker: batches before it meet the old model,
batches after it a learner rebuilt from the seed's starting state, under new model versions, checkpointed, and a
crash before the reset's checkpoint replays it to the same model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from service.core.experiment import Experiment
from service.deployment.checkpoint_store import checkpoints
from service.deployment.codec import Batch, to_stream_fields
from service.deployment.model_store import model_from_bytes
from service.deployment.redis_queue import RedisQueue
from service.deployment.worker import Worker
from tests.service_harness import ADMIN_TOKEN, API_KEY, ApiServer, assert_settled, make_settings, needs_redis

pytestmark = needs_redis

ADMIN = {"X-API-Key": ADMIN_TOKEN}


@pytest.fixture
def service(namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, queue_max_length=3)
    queue = RedisQueue.from_settings(settings)
    with ApiServer(settings) as api:
        yield api, queue


def test_the_reset_route_is_admin_only_validated_audited_and_queued_in_the_stream(service):
    api, queue = service
    # the client key is refused (403) and a missing key is 401, whatever the body: nothing is enqueued
    assert api.client.post("/v1/admin/reset", json={"seed": 1}).status_code == 403
    assert api.client.post("/v1/admin/reset", json={"seed": 1}, headers={"X-API-Key": "wrong"}).status_code == 401
    for body in ({}, {"seed": -1}, {"seed": "1"}, {"seed": 1.5}, {"seed": 2**31}, {"seed": 1, "extra": 1},
                 {"seed": 1, "reset_id": "has space"}):
        response = api.client.post("/v1/admin/reset", json=body, headers=ADMIN)
        assert response.status_code == 422 and response.json()["reason"] == "schema", (body, response.text)
    bad_json = api.client.post("/v1/admin/reset", content=b"{", headers={**ADMIN, "Content-Type": "application/json"})
    assert 400 <= bad_json.status_code < 500
    assert queue.client.xlen(queue.stream) == 0 and queue.admin_audit_tail(10) == []

    accepted = api.client.post("/v1/admin/reset", json={"seed": 2, "reset_id": "reset-a"}, headers=ADMIN)
    assert accepted.status_code == 202, accepted.text
    assert accepted.json() == {"reset_id": "reset-a", "entry_id": accepted.json()["entry_id"], "seed": 2,
                               "state": "queued"}
    again = api.client.post("/v1/admin/reset", json={"seed": 2, "reset_id": "reset-a"}, headers=ADMIN)
    assert again.status_code == 200 and again.json()["state"] == "duplicate"
    generated = api.client.post("/v1/admin/reset", json={"seed": 0}, headers=ADMIN).json()
    assert generated["reset_id"].startswith("reset-")

    entries = queue.client.xrange(queue.stream)
    assert [(e[0].decode(), e[1][b"control"], e[1][b"seed"]) for e in entries] == [
        (accepted.json()["entry_id"], b"reset", b"2"), (generated["entry_id"], b"reset", b"0")]
    # its state is a batch's: queued until the worker applies it (the client key may read it)
    assert api.client.get("/v1/batches/reset-a").json()["state"] == "queued"
    audit = queue.admin_audit_tail(10)  # newest first: who asked, for what, and what came of it
    assert [(r["action"], r["reset_id"], r["seed"], r["state"]) for r in audit] == [
        ("reset", generated["reset_id"], 0, "queued"), ("reset", "reset-a", 2, "duplicate"),
        ("reset", "reset-a", 2, "queued")]
    assert audit[-1]["entry_id"] == accepted.json()["entry_id"] and audit[-1]["client"] == "127.0.0.1"
    # like a batch, a reset is refused when the stream is full (max length 3 here), and not recorded as accepted
    queue.enqueue_reset("reset-fill", 0)
    full = api.client.post("/v1/admin/reset", json={"seed": 0}, headers=ADMIN)
    assert full.status_code == 429 and queue.client.xlen(queue.stream) == 3
    assert len(queue.admin_audit_tail(10)) == 3
    assert API_KEY != ADMIN_TOKEN


def _enqueue(queue: RedisQueue, batch_id: str, x: torch.Tensor, y: torch.Tensor) -> None:
    queue.enqueue(batch_id, to_stream_fields(Batch(batch_id, x.numpy(), y.numpy())))


def _records(queue: RedisQueue) -> list[dict]:
    return [json.loads(fields[b"record"]) for _, fields in queue.client.xrange(queue.audit_stream)]


def _assert_same_weights(model: torch.nn.Module, reference: torch.nn.Module) -> None:
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def seed_one(digits_config, cache_dir) -> Experiment:
    return Experiment.prepare(digits_config.model_copy(update={"seed": 1}), cache_dir=cache_dir, progress=False)


def _stream(digits_experiment, queue: RedisQueue) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """b0 and b1, the reset to seed 1 (reset-1), b2 and b3, in that order in the stream."""
    batches = list(digits_experiment.stream_batches(4, seed=31))
    _enqueue(queue, "b0", *batches[0])
    _enqueue(queue, "b1", *batches[1])
    assert queue.enqueue_reset("reset-1", 1).state == "queued"
    _enqueue(queue, "b2", *batches[2])
    _enqueue(queue, "b3", *batches[3])
    return batches


def _reference(digits_experiment, seed_one, batches) -> tuple[torch.nn.Module, torch.nn.Module]:
    """In process: the old model after b0 and b1, and seed 1's fresh learner after b2 and b3."""
    old, new = digits_experiment.new_learner(), seed_one.new_learner()
    for x, y in batches[:2]:
        old.step(x, y)
    for x, y in batches[2:]:
        new.step(x, y)
    return old.model, new.model


def test_a_reset_applies_the_batches_before_it_to_the_old_model_and_after_it_to_the_new_one(
        digits_experiment, seed_one, cache_dir, namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=100)
    queue = RedisQueue.from_settings(settings)
    batches = _stream(digits_experiment, queue)
    published: list[tuple[int, torch.nn.Module]] = []

    class Watching(RedisQueue):  # every model the worker publishes, with its version
        def record_steps(self, steps, **kwargs) -> None:
            super().record_steps(steps, **kwargs)
            if kwargs.get("weights") is not None:
                published.append((kwargs["version"], model_from_bytes(kwargs["weights"]).model))

    worker = Worker(settings, queue=Watching.from_settings(settings))
    assert worker.run(idle_timeout=1.0) == 4
    old, new = _reference(digits_experiment, seed_one, batches)

    records = {r["batch_id"]: r for r in _records(queue)}
    assert list(records) == ["b0", "b1", "reset-1", "b2", "b3"]
    assert [records[b]["model_version"] for b in records] == [1, 2, 3, 4, 5]
    assert [records[b]["batch_index"] for b in ("b0", "b1", "b2", "b3")] == [0, 1, 0, 1]  # counted from the reset
    assert records["reset-1"]["seed"] == 1 and records["reset-1"]["previous_batches_applied"] == 2
    assert queue.batch_state("reset-1")["state"] == "applied"
    # readers never see a mix: the old model went out with b1 before the reset, the new one under version 3+
    versions = dict(published)
    _assert_same_weights(versions[2], old)
    _assert_same_weights(versions[3], seed_one.new_learner().model)
    _assert_same_weights(worker.learner.model, new)
    assert queue.model_version() == 5 and queue.worker_status()["seed"] == 1
    assert worker.learner.batches_applied == 2
    assert_settled(queue)
    # checkpoints are named by model version (batches applied start again at a reset); the newest is resumed,
    # with the seed it records (its fingerprint is seed 1's, not the configured seed's)
    directory = Path(settings.checkpoint_dir)
    assert [p.name for p in checkpoints(directory)] == ["step-000000000005", "step-000000000003"]
    resumed = Worker(settings)
    resumed.start()
    try:
        assert (resumed.seed, resumed.learner.model_version, resumed.learner.batches_applied) == (1, 5, 2)
        _assert_same_weights(resumed.learner.model, new)
    finally:
        resumed.shutdown()


class _Crash(Exception):
    pass


class _CrashesBeforeTheResetCheckpoint(Worker):
    """Dies (no shutdown checkpoint) right after publishing the reset, before its checkpoint is written."""

    crashed = False

    def commit(self) -> None:
        if self.seed == 1 and not self.crashed:
            self.flush()
            self.crashed = True
            raise _Crash
        super().commit()

    def shutdown(self) -> None:
        if self.crashed:  # a crash writes nothing more: only the lease is let go (as its expiry would)
            self._started = False
            self.request_stop()  # the heartbeat thread ends
            self.lease.release()
            return
        super().shutdown()


def test_a_reset_that_no_checkpoint_holds_is_replayed_after_a_crash(digits_experiment, seed_one, cache_dir,
                                                                    namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=100)
    queue = RedisQueue.from_settings(settings)
    batches = _stream(digits_experiment, queue)
    crashing = _CrashesBeforeTheResetCheckpoint(settings)
    with pytest.raises(_Crash):
        crashing.run(idle_timeout=1.0)
    assert queue.model_version() == 3  # the reset was published, no checkpoint holds it
    assert [p.name for p in checkpoints(Path(settings.checkpoint_dir))] == ["step-000000000000"]

    restarted = Worker(settings)
    assert restarted.run(idle_timeout=1.0) == 4  # b0, b1 replayed (not published: behind), the reset, b2, b3
    _, new = _reference(digits_experiment, seed_one, batches)
    _assert_same_weights(restarted.learner.model, new)
    assert (restarted.seed, restarted.learner.model_version) == (1, 5)
    records = [r["batch_id"] for r in _records(queue)]
    assert records == ["b0", "b1", "reset-1", "b2", "b3"]  # each recorded once, the reset included
    assert queue.model_version() == 5
    assert_settled(queue)
