"""Stream consumption: which entries the worker applies next, oldest first, and how it waits out Redis.

On (re)start the backlog comes first: the group's pending entries (XAUTOCLAIM, by this consumer: there is one
worker) and the entries after the loaded checkpoint that the group handed out before (acknowledged for a newer
checkpoint since refused); those whose records went out before a crash are remembered so that they get no
second audit record. Then new entries (XREADGROUP `>`), waiting up to `read_block_ms` unless asked not to.

Redis going away is waited out with capped exponential backoff (redis-py's `ExponentialBackoff`: 0.2 s doubling
to 5 s); once it answers again, the consumer first takes back what Redis handed out and the worker never
applied (a new read would never look at those pending entries again before a restart), and the entries after the
last applied one that the group handed out before (a replay after a fallback to an older checkpoint reads entries
acknowledged for the newer one: they are not pending, and a new read never hands them out again). The waiting is not
redis-py's `Retry.call_with_retry`: that sleeps in `time.sleep`, which `request_stop` (SIGTERM) could not cut
short, and it repeats the failed call, while what must follow an outage is the reclaim, then reads.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Container
from dataclasses import dataclass, field

from redis.backoff import AbstractBackoff, ExponentialBackoff

from service.deployment.redis_queue import RedisQueue, entry_id_key

log = logging.getLogger("dscguard.worker")

RECONNECT_BACKOFF_SECONDS = (0.2, 5.0)  # first wait after a Redis error, doubled up to the second

Entry = tuple[bytes, dict]


@dataclass
class Backlog:
    """What a (re)start must replay, oldest first, and those of its entries already recorded as applied."""

    entries: list[Entry] = field(default_factory=list)
    recorded: set[bytes] = field(default_factory=set)


class StreamConsumer:
    """Hands out `queue`'s entries to the consumer `name`; `stop` cuts a backoff wait short."""

    def __init__(self, queue: RedisQueue, name: str, *, read_block_ms: int, stop: threading.Event,
                 backoff: AbstractBackoff | None = None):
        self.queue, self.name, self.read_block_ms, self.stop = queue, name, read_block_ms, stop
        first, cap = RECONNECT_BACKOFF_SECONDS
        self.backoff = backoff or ExponentialBackoff(cap=cap, base=first / 2)  # compute(n) = base * 2**n
        self.failures = 0  # Redis errors since it last answered a whole pass
        self._pending: list[Entry] = []

    def backlog(self, last_applied_id: str) -> Backlog:
        """The entries a worker resuming after `last_applied_id` must replay (they are handed out first)."""
        pending = self.queue.reclaim(self.name)
        replay = {entry_id: fields for entry_id, fields in pending}
        replay.update(self.queue.delivered_after(last_applied_id))
        entries = sorted(replay.items(), key=lambda item: entry_id_key(item[0]))
        todo = [e for e in entries if entry_id_key(e[0]) > entry_id_key(last_applied_id)]
        recorded: set[bytes] = set()
        if entries:
            recorded = self.queue.recorded_entries(todo)
            log.info("replaying %d entries after the checkpoint (%d of them applied and recorded before a crash); "
                     "%d pending entries reclaimed", len(todo), len(recorded), len(pending))
        self._pending = entries
        return Backlog(entries, recorded)

    def next(self, count: int, *, wait: bool, applied: Container[bytes], last_applied_id: str = "0-0") -> list[Entry]:
        """The next entries: the backlog, or (after an outage) those handed out and not in `applied`, or up to
        `count` new ones, waiting for them up to `read_block_ms` when `wait`."""
        if self.failures:  # Redis is back: take back what it handed out and this worker never applied
            self._pending = self.taken_back(applied, last_applied_id)
        entries = self._pending or self.queue.read(self.name, count, self.read_block_ms if wait else None)
        self._pending = []
        return entries

    def taken_back(self, applied: Container[bytes], last_applied_id: str) -> list[Entry]:
        """After an outage, oldest first: the group's pending entries, and the entries after `last_applied_id`
        that the group handed out before (acknowledged ones that a replay from an older checkpoint still has to
        apply), less those in `applied`."""
        entries = dict(self.queue.reclaim(self.name))
        entries.update(self.queue.delivered_after(last_applied_id))
        return sorted(((i, f) for i, f in entries.items() if i not in applied),
                      key=lambda item: entry_id_key(item[0]))

    def answered(self) -> None:
        """A whole pass went through: Redis is back (or never left)."""
        self.failures = 0

    def wait_out(self, exc: Exception) -> None:
        """A Redis error: wait the next backoff (cut short by `stop`); the next `next` reclaims first."""
        self.failures += 1
        wait = self.backoff.compute(self.failures)
        log.warning("Redis unavailable (%s); retrying in %.1f s", exc, wait)
        self.stop.wait(wait)
