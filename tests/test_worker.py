"""The worker's bookkeeping, driven in-process against real Redis: what it applies, skips and acknowledges."""

from concurrent.futures import ThreadPoolExecutor

import pytest

from service.deployment.checkpoint_store import checkpoints
from service.deployment.codec import InputSpec, decode_safetensors_batch, encode_safetensors_batch, to_stream_fields
from service.deployment.redis_queue import RedisQueue
from service.deployment.worker import Worker, WorkerError
from tests.service_harness import assert_settled, make_settings, needs_redis

pytestmark = needs_redis


def _duplicates(worker: Worker) -> float:
    return worker.metrics.registry.get_sample_value("dscguard_duplicates_skipped_total")


def _enqueue(queue: RedisQueue, batch_id: str, x, y) -> bytes:
    """Append an entry as the API would, but without its idempotency key (as after the key expired)."""
    batch = decode_safetensors_batch(encode_safetensors_batch(x, y, batch_id=batch_id),
                                     InputSpec((1, 8, 8), 10, 1024))
    return queue.client.xadd(queue.stream, to_stream_fields(batch))


def test_a_reused_batch_id_is_skipped_and_a_replayed_entry_is_not_applied_twice(digits_experiment, cache_dir,
                                                                                  namespace, tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=100)
    queue = RedisQueue.from_settings(settings)
    (x1, y1), (x2, y2) = digits_experiment.stream_batches(2, seed=3)
    worker = Worker(settings)
    worker.start()
    try:
        first = _enqueue(queue, "a", x1, y1)
        again = _enqueue(queue, "a", x2, y2)
        entries = queue.read(worker.consumer, 10, 100)
        assert [worker.process(entry_id, fields) for entry_id, fields in entries] == [1, 0]
        assert queue.batch_state("a")["state"] == "skipped"
        assert queue.client.xlen(queue.stream) == 1  # the skipped entry is acknowledged and gone
        assert worker.process(first, dict(entries[0][1])) == 0  # a replay of an applied entry
        assert worker.learner.batches_applied == 1
        assert _duplicates(worker) == 2
        assert again not in [e[0] for e in queue.client.xrange(queue.stream)]
    finally:
        worker.shutdown()
    assert not queue.lease_holder()
    assert_settled(queue)


class _NeverSettles(RedisQueue):
    """A queue on which checkpointed entries are never acknowledged: as if each checkpoint were followed by a
    crash before its XACK."""

    def settle(self, entry_ids, keep_after, committed_batch_ids=()) -> None:
        pass


def test_entries_checkpointed_but_not_acknowledged_are_skipped_on_restart(digits_experiment, cache_dir, namespace,
                                                                          tmp_path):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, checkpoint_every=100)
    queue = RedisQueue.from_settings(settings)
    for index, (x, y) in enumerate(digits_experiment.stream_batches(2, seed=4)):
        _enqueue(queue, f"b{index}", x, y)
    crashed = Worker(settings, queue=_NeverSettles.from_settings(settings))
    crashed.start()
    for entry_id, fields in queue.read(crashed.consumer, 10, 100):
        crashed.process(entry_id, fields)
    crashed.commit()  # a crash between the checkpoint and the XACK
    crashed.request_stop()  # and dies: its heartbeat stops, its lease expires (the restart below waits for that)
    assert queue.client.xpending(queue.stream, "workers")["pending"] == 2

    resumed = Worker(settings)
    assert resumed.run(idle_timeout=0.3) == 0
    assert resumed.learner.batches_applied == 2 and _duplicates(resumed) == 2
    assert_settled(queue)
    # acknowledged, but kept: the oldest kept checkpoint (step 0) does not hold them, so a fallback can replay them
    assert queue.client.xlen(queue.stream) == 2
    assert [p.name for p in checkpoints(tmp_path / "checkpoints")] == ["step-000000000002", "step-000000000000"]


def test_checkpoints_of_another_configuration_are_refused(digits_experiment, cache_dir, namespace, tmp_path):
    first = Worker(make_settings(namespace, tmp_path, cache_dir=cache_dir))
    first.start()
    first.shutdown()
    other = Worker(make_settings(namespace, tmp_path, cache_dir=cache_dir, strategy="st"))
    with pytest.raises(WorkerError, match="written for another configuration"):
        other.start()
    assert not RedisQueue.from_settings(other.settings).lease_holder()


def test_an_expired_lease_is_taken_back_only_if_no_other_worker_served(digits_experiment, cache_dir, namespace,
                                                                       tmp_path, caplog):
    settings = make_settings(namespace, tmp_path, cache_dir=cache_dir, heartbeat_ttl_seconds=0.6)
    queue = RedisQueue.from_settings(settings)
    worker = Worker(settings)
    worker.start()
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(worker.run)  # serves until stopped
        try:
            queue.client.delete(queue.heartbeat_key)  # as after a Redis outage longer than the TTL
            with pytest.raises(TimeoutError):
                running.result(timeout=1.0)  # the heartbeat (every ttl/3) took it back and it carries on
            assert queue.lease_holder() == worker.consumer

            queue.client.delete(queue.heartbeat_key)
            queue.client.set(queue.status_key, '{"consumer": "another-worker"}')  # someone served meanwhile
            assert running.result(timeout=5.0) == 0  # so this worker's state may be stale: it stops
            assert queue.lease_holder() is None
            assert "lost the lease" in caplog.text and "not checkpointing or publishing" in caplog.text
        finally:
            worker.request_stop()
    assert queue.worker_status() == {"consumer": "another-worker"}  # the stale worker published nothing


def test_the_lease_names_its_holder_and_a_late_release_leaves_another_workers_lease(namespace, tmp_path):
    import threading

    from service.deployment.worker.lease import Lease

    queue = RedisQueue.from_settings(make_settings(namespace, tmp_path))
    first, second = Lease(queue, "first", 0.3), Lease(queue, "second", 30)
    assert first.acquire(wait_seconds=0) and queue.lease_holder() == "first" and queue.worker_alive()
    assert not second.acquire(wait_seconds=0)
    assert second.acquire(wait_seconds=2)  # the first one's expired (no heartbeat)
    first.release()  # token-checked: the first worker, late, cannot give back the second one's lease
    assert queue.lease_holder() == "second"
    stop = threading.Event()
    second.beat_until(stop)
    stop.set()
    second.release()
    assert queue.lease_holder() is None and not queue.worker_alive()


def test_a_record_sent_again_after_a_lost_reply_is_audited_once(namespace, tmp_path):
    """Redis applied the transaction and died before answering: the worker sends the same records again. The
    audit stream takes each ingest entry once (its id is the entry's), the rest of the retry still lands."""
    import json

    from service.deployment.redis_queue import AppliedBatch

    queue = RedisQueue.from_settings(make_settings(namespace, tmp_path))
    first = AppliedBatch("a", {"entry_id": "1000-0", "batch_index": 0}, None)
    second = AppliedBatch("b", {"entry_id": "1001-0", "batch_index": 1}, None)
    queue.record_steps([first], status={"model_version": 1})
    queue.record_steps([first, second], status={"model_version": 2})  # the retry, with the next batch
    audit = [(entry.decode(), json.loads(fields[b"record"])["entry_id"])
             for entry, fields in queue.client.xrange(queue.audit_stream)]
    assert audit == [("1000-0", "1000-0"), ("1001-0", "1001-0")]
    assert queue.batch_state("b")["state"] == "applied" and queue.worker_status()["model_version"] == 2
