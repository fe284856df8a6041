"""The worker's lease on its namespace: one worker serves a namespace, because the online model is one
sequential state.

The lease is a redis-py `Lock` on `<namespace>:worker:heartbeat` (`RedisQueue.lease_lock`) whose token is the
worker's name: `SET NX PX` takes it (polling, bounded, while a dead holder's lease runs out), `reacquire`
resets its TTL from a heartbeat thread every third of the TTL, and `release` deletes it only if the token
is still this worker's. The key's value stays the holder's name, so the API's liveness
(`RedisQueue.worker_alive`) and `lease_holder` read it as before.

What a `Lock` does not do, and this class adds: an expired lease (a Redis outage longer than the TTL) is
taken back only if no other worker served the namespace meanwhile, i.e. the published status is still
this worker's. `Lock.reacquire` only refreshes a lease still held; taking it back is a fresh `acquire`
with the same token, then that check. Otherwise the lease is lost: the worker stops without
checkpointing or publishing (its state may be stale), and the worker that serves the namespace now
replays what it left pending.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis
from redis.exceptions import LockError, LockNotOwnedError

from service.deployment.redis_queue import RedisQueue

log = logging.getLogger("dscguard.worker")


class Lease:
    """`owner`'s lease on `queue`'s namespace, kept alive by `beat_until(stop)` until `stop` is set; a lease
    lost to another worker sets `lost` and `stop`."""

    def __init__(self, queue: RedisQueue, owner: str, ttl_seconds: float):
        self.queue, self.owner, self.ttl = queue, owner, ttl_seconds
        self.lock = queue.lease_lock(ttl_seconds)
        self.lost = False
        self._thread: threading.Thread | None = None

    def acquire(self, wait_seconds: float) -> bool:
        """Take the lease, waiting up to `wait_seconds` for a dead holder's to expire."""
        self.lost = False
        return self.lock.acquire(blocking_timeout=wait_seconds, token=self.owner)

    def holder(self) -> str | None:
        return self.queue.lease_holder()

    def beat_until(self, stop: threading.Event) -> None:
        """Refresh the lease every third of its TTL, in a daemon thread, until `stop` is set."""
        self._thread = threading.Thread(target=self._beat, args=(stop,), name="dscguard-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat (its `stop` must be set) and give the lease back, unless it was lost."""
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self.lost:
            return
        try:
            self.lock.release()
        except LockError:
            pass  # expired meanwhile (or taken by another): nothing of this worker's to give back
        except redis.RedisError as exc:
            log.warning("could not release the lease: %s", exc)

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(self.ttl / 3):
            try:
                try:
                    self.lock.reacquire()
                except LockNotOwnedError:
                    if not self._take_back():
                        log.error("lost the lease on namespace %r; stopping", self.queue.namespace)
                        self.lost = True
                        stop.set()
            except redis.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    def _take_back(self) -> bool:
        """After the lease expired (a Redis outage longer than its TTL): take it back, but only if no other
        worker served the namespace meanwhile (the published status is still this worker's)."""
        if not self.lock.acquire(blocking=False, token=self.owner):
            return False
        status = self.queue.worker_status() or {}
        if status.get("consumer") != self.owner:
            with contextlib.suppress(LockError):
                self.lock.release()
            return False
        log.warning("the lease on namespace %r had expired (Redis unreachable for longer than its %.0f s TTL?); "
                    "no other worker served meanwhile: taken back", self.queue.namespace, self.ttl)
        return True
