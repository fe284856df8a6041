"""The Redis side of the service: one namespace, one bounded ingest stream, and what the worker publishes.

Keys, all under `<namespace>:`:

| key | type | what |
|---|---|---|
| `ingest` | stream, group `workers` | batches (and control entries: a reset) waiting, in flight, or applied and kept |
| `batch:<batch_id>` | hash, expires | idempotency key; then the batch's state, audit record, `committed` |
| `audit` | stream, capped | one record per applied batch (and per applied reset) |
| `admin-audit` | stream, capped | one record per admin request accepted by the API (a reset: who, when, which seed) |
| `deadletter` | stream, capped | entries the worker could not decode, with the reason |
| `model` | hash | model spec, version and current weights (safetensors), published by the worker |
| `worker` | string | the worker's status (JSON); `worker:heartbeat` its lease, refreshed while alive |
| `batch-events` | pub/sub channel | the ids of batches whose state changed (space-separated): wakes long-poll waits |

The lease is a redis-py `Lock` on `worker:heartbeat` whose token is the worker's name (`lease_lock`).

An entry is XACKed only once a checkpoint holds its update, and deleted only once the oldest kept
checkpoint holds it, so the stream length bounds everything not yet durable, a crashed worker's
entries are reclaimed on restart, and a fallback to an older checkpoint can replay what followed it.

A control entry (`control=reset`, `POST /v1/admin/reset`) travels in the same stream as the batches, under its own
`batch_id` (the reset's id): the worker meets it in stream order, so the batches before it are applied to the old
model and those after it to the new one, and a replay meets it again at the same place.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import redis

GROUP = "workers"
CONTROL_FIELD = "control"  # present on control entries of the ingest stream (its value: "reset")
RESET = "reset"
# Redis's answer to an XADD whose explicit id is not above the stream's top: the record is already there
AUDIT_ALREADY_RECORDED = "equal or smaller than the target stream top item"

# Atomic: a known batch_id is a duplicate (even when the queue is full); a full stream refuses;
# otherwise append the entry and remember the batch_id with its entry id.
_ENQUEUE = """
local existing = redis.call('HGET', KEYS[2], 'entry_id')
if existing then return {'duplicate', existing} end
if redis.call('XLEN', KEYS[1]) >= tonumber(ARGV[1]) then return {'full', ''} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 3))
redis.call('HSET', KEYS[2], 'entry_id', id, 'state', 'queued')
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[2]))
return {'queued', id}
"""

# A checkpoint holds these batches: say so on those the published model holds (state applied); the others
# (queued: applied by a worker that replays and does not publish yet) get it when their record is published.
_MARK_COMMITTED = """
for _, key in ipairs(KEYS) do
  if redis.call('HGET', key, 'state') == 'applied' then redis.call('HSET', key, 'committed', '1') end
end
return 0
"""


def connect(url: str, timeout_seconds: float = 2.0) -> redis.Redis:
    """A client that returns bytes and fails fast when Redis is unreachable."""
    return redis.Redis.from_url(url, socket_connect_timeout=timeout_seconds, socket_timeout=timeout_seconds + 5.0,
                                health_check_interval=30)


def entry_id_key(entry_id: bytes | str) -> tuple[int, int]:
    """Stream ids compare as (milliseconds, sequence)."""
    text = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    ms, _, seq = text.partition("-")
    return int(ms), int(seq or 0)


def decode_batch_state(fields: Mapping[bytes, bytes]) -> dict | None:
    """A `batch:<id>` hash as the API shows it (None when the batch is unknown)."""
    if not fields:
        return None
    state = {k.decode(): v.decode() for k, v in fields.items()}
    for name in ("record", "discrepancy"):
        if name in state:
            state[name] = json.loads(state[name])
    if "committed" in state:
        state["committed"] = state["committed"] == "1"
    return state


@dataclass(frozen=True)
class EnqueueResult:
    state: str  # "queued", "duplicate" or "full"
    entry_id: str | None


@dataclass(frozen=True)
class AppliedBatch:
    """What the worker records about one applied batch (its audit record and per-sample discrepancy).

    `in_audit`: the audit stream already holds this record (a replay, after a crash, of an update
    recorded but not checkpointed): the batch's state is written again, the audit record is not.
    """

    batch_id: str
    record: dict
    discrepancy: list[float] | None
    in_audit: bool = False


@dataclass(frozen=True)
class QueueStats:
    depth: int  # entries in the stream: waiting, in flight, or applied and awaiting a checkpoint
    pending: int  # delivered to the worker, not yet acknowledged
    lag_seconds: float  # age of the oldest entry not yet applied (0 when none)

    def to_dict(self) -> dict:
        return {"depth": self.depth, "pending": self.pending, "lag_seconds": self.lag_seconds}


class RedisQueue:
    """The namespaced keys of one deployment and the operations the API and the worker do on them."""

    def __init__(self, client: redis.Redis, namespace: str, *, max_length: int = 1000, ttl_seconds: int = 86400,
                 audit_max_length: int = 10_000, dead_letter_max_length: int = 10_000):
        self.client, self.namespace = client, namespace
        self.max_length, self.ttl_seconds = max_length, ttl_seconds
        self.audit_max_length, self.dead_letter_max_length = audit_max_length, dead_letter_max_length
        self.stream, self.audit_stream = self.key("ingest"), self.key("audit")
        self.dead_letters, self.model_key = self.key("deadletter"), self.key("model")
        self.status_key, self.heartbeat_key = self.key("worker"), self.key("worker:heartbeat")
        self.events_channel = self.key("batch-events")
        self.admin_audit_stream = self.key("admin-audit")
        self._enqueue = client.register_script(_ENQUEUE)
        self._mark_committed = client.register_script(_MARK_COMMITTED)

    @classmethod
    def from_settings(cls, settings, client: redis.Redis | None = None) -> RedisQueue:
        client = client or connect(settings.redis_url, settings.redis_timeout_seconds)
        return cls(client, settings.namespace, max_length=settings.queue_max_length,
                   ttl_seconds=settings.idempotency_ttl_seconds, audit_max_length=settings.audit_max_length,
                   dead_letter_max_length=settings.dead_letter_max_length)

    def key(self, name: str) -> str:
        return f"{self.namespace}:{name}"

    def batch_key(self, batch_id: str) -> str:
        return self.key(f"batch:{batch_id}")

    def ping(self) -> bool:
        return bool(self.client.ping())

    # -- the API side -----------------------------------------------------------------------------
    def enqueue(self, batch_id: str, fields: Mapping[str, bytes | str]) -> EnqueueResult:
        """Append one batch unless its id is known or the stream is full (one atomic script)."""
        args: list = [self.max_length, self.ttl_seconds]
        for name, value in fields.items():
            args += [name, value]
        state, entry_id = self._enqueue(keys=[self.stream, self.batch_key(batch_id)], args=args)
        return EnqueueResult(state.decode(), entry_id.decode() or None)

    def enqueue_reset(self, reset_id: str, seed: int) -> EnqueueResult:
        """Append a reset to `seed`'s starting state in stream order (the worker rebuilds its learner when it gets
        there); idempotent by `reset_id` like a batch, and refused like one when the stream is full."""
        return self.enqueue(reset_id, {CONTROL_FIELD: RESET, "batch_id": reset_id, "seed": str(seed)})

    def record_admin(self, record: dict) -> None:
        """One admin request, for the record (`admin-audit`, capped like the audit stream)."""
        self.client.xadd(self.admin_audit_stream, {"record": json.dumps(record)}, maxlen=self.audit_max_length,
                         approximate=True)

    def admin_audit_tail(self, count: int) -> list[dict]:
        """The newest admin records, newest first."""
        return [json.loads(fields[b"record"])
                for _, fields in self.client.xrevrange(self.admin_audit_stream, count=count)]

    def batch_state(self, batch_id: str) -> dict | None:
        """What became of a batch: queued, applied (with its audit record), dead_letter or skipped (with the reason)."""
        return decode_batch_state(self.client.hgetall(self.batch_key(batch_id)))

    def model_version(self) -> int | None:
        version = self.client.hget(self.model_key, "version")
        return int(version) if version is not None else None

    def model_spec(self) -> dict | None:
        spec = self.client.hget(self.model_key, "spec")
        return json.loads(spec) if spec is not None else None

    def model_weights(self) -> tuple[int, bytes] | None:
        version, weights = self.client.hmget(self.model_key, ["version", "weights"])
        return (int(version), weights) if version is not None and weights is not None else None

    def worker_status(self) -> dict | None:
        status = self.client.get(self.status_key)
        return json.loads(status) if status is not None else None

    def worker_alive(self) -> bool:
        return bool(self.client.exists(self.heartbeat_key))

    def audit_tail(self, count: int) -> list[dict]:
        if count <= 0:
            return []
        return [json.loads(fields[b"record"]) for _, fields in self.client.xrevrange(self.audit_stream, count=count)]

    def stats(self, last_applied_id: str | None) -> QueueStats:
        with self.client.pipeline(transaction=False) as pipe:
            pipe.xlen(self.stream)
            pipe.xpending(self.stream, GROUP)
            pipe.xrange(self.stream, f"({last_applied_id or '0-0'}", "+", count=1)
            pipe.time()
            depth, pending, oldest, (seconds, micros) = pipe.execute(raise_on_error=False)
        pending = pending["pending"] if isinstance(pending, dict) else 0  # no group yet: nothing pending
        lag = 0.0
        if oldest:
            lag = max(0.0, seconds + micros / 1e6 - entry_id_key(oldest[0][0])[0] / 1000)
        return QueueStats(depth=int(depth), pending=int(pending), lag_seconds=lag)

    # -- the worker side --------------------------------------------------------------------------
    def ensure_group(self) -> None:
        try:
            self.client.xgroup_create(self.stream, GROUP, id="0", mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def read(self, consumer: str, count: int, block_ms: int) -> list[tuple[bytes, dict]]:
        """New entries for this consumer, oldest first (waits up to `block_ms`)."""
        answer = self.client.xreadgroup(GROUP, consumer, {self.stream: ">"}, count=count, block=block_ms)
        return answer[0][1] if answer else []

    def reclaim(self, consumer: str, page: int = 100, max_pages: int = 10_000) -> list[tuple[bytes, dict]]:
        """Every pending entry of the group, claimed by `consumer`, oldest first (there is one worker)."""
        claimed: list[tuple[bytes, dict]] = []
        cursor = "0-0"
        for _ in range(max_pages):
            cursor, entries, deleted = self.client.xautoclaim(self.stream, GROUP, consumer, 0, cursor, count=page)
            claimed += [(entry_id, fields) for entry_id, fields in entries if fields]
            if deleted:
                self.client.xack(self.stream, GROUP, *deleted)
            if cursor in (b"0-0", "0-0"):
                break
        for other in self.client.xinfo_consumers(self.stream, GROUP):  # earlier incarnations, now empty-handed
            name = other["name"].decode() if isinstance(other["name"], bytes) else other["name"]
            if name != consumer and other["pending"] == 0:
                self.client.xgroup_delconsumer(self.stream, GROUP, name)
        return sorted(claimed, key=lambda item: entry_id_key(item[0]))

    def recorded_entries(self, entries: Iterable[tuple[bytes, Mapping]]) -> set[bytes]:
        """Those of `entries` already recorded as applied (batch state and audit record) from that very entry."""
        ids = [(entry_id, fields[b"batch_id"].decode(errors="replace")) for entry_id, fields in entries
               if b"batch_id" in fields]
        with self.client.pipeline(transaction=False) as pipe:
            for _, batch_id in ids:
                pipe.hget(self.batch_key(batch_id), "record")
            records = pipe.execute()
        return {entry_id for (entry_id, _), record in zip(ids, records, strict=True)
                if record is not None and json.loads(record).get("entry_id") == entry_id.decode()}

    def delivered_after(self, entry_id: str) -> list[tuple[bytes, dict]]:
        """Entries after `entry_id` that the group has already handed out (pending, or acknowledged and
        kept for a checkpoint fallback), oldest first: what a worker resuming from that id must replay."""
        groups = {g["name"]: g for g in self.client.xinfo_groups(self.stream)} if self.client.exists(self.stream) \
            else {}
        group = groups.get(GROUP.encode()) or groups.get(GROUP)
        if group is None:
            return []
        last = group["last-delivered-id"]
        if entry_id_key(last) <= entry_id_key(entry_id):
            return []
        return [(i, f) for i, f in self.client.xrange(self.stream, f"({entry_id}", last) if f]

    def settle(self, entry_ids: Iterable[bytes | str], keep_after: str,
               committed_batch_ids: Iterable[str] = ()) -> None:
        """A checkpoint holds these entries: mark their batches committed, acknowledge them, and delete every
        entry up to `keep_after` (the last entry the oldest kept checkpoint holds); later ones stay for a
        fallback replay."""
        ids = list(entry_ids)
        keys = [self.batch_key(batch_id) for batch_id in committed_batch_ids]
        ms, seq = entry_id_key(keep_after)
        with self.client.pipeline() as pipe:
            if keys:
                self._mark_committed(keys=keys, args=[], client=pipe)
            if ids:
                pipe.xack(self.stream, GROUP, *ids)
            pipe.xtrim(self.stream, minid=f"{ms}-{seq + 1}")
            pipe.execute()

    def dead_letter(self, entry_id: bytes | str, fields: Mapping, reason: str, message: str) -> None:
        """Move an entry that cannot be used aside, with why, and acknowledge it."""
        entry = {"entry_id": entry_id, "reason": reason, "message": message,
                 **{f"field.{k.decode() if isinstance(k, bytes) else k}": v for k, v in fields.items()}}
        batch_id = fields.get(b"batch_id")
        with self.client.pipeline() as pipe:
            pipe.xadd(self.dead_letters, entry, maxlen=self.dead_letter_max_length, approximate=True)
            self._settle_unapplied(pipe, entry_id, batch_id.decode(errors="replace") if batch_id else None,
                                   "dead_letter", message)
            pipe.execute()

    def skip(self, entry_id: bytes | str, batch_id: str, reason: str) -> None:
        """A new entry that must not be applied (its batch_id already was): say why, and acknowledge it."""
        with self.client.pipeline() as pipe:
            self._settle_unapplied(pipe, entry_id, batch_id, "skipped", reason)
            pipe.execute()

    def _settle_unapplied(self, pipe, entry_id: bytes | str, batch_id: str | None, state: str, reason: str) -> None:
        """Queue on `pipe`: the batch's final state and why (its waiters told), the entry acknowledged and deleted."""
        if batch_id:
            key = self.batch_key(batch_id)
            pipe.hset(key, mapping={"state": state, "reason": reason})
            pipe.expire(key, self.ttl_seconds)
            pipe.publish(self.events_channel, batch_id)
        pipe.xack(self.stream, GROUP, entry_id)
        pipe.xdel(self.stream, entry_id)

    def publish_spec(self, spec: dict) -> None:
        self.client.hset(self.model_key, "spec", json.dumps(spec, sort_keys=True))

    def record_steps(self, steps: Iterable[AppliedBatch], *, status: dict, version: int | None = None,
                     weights: bytes | None = None, committed_through: str = "0-0") -> None:
        """One round trip for a run of applied batches: their audit records and states, the worker's
        status and, when given, the weights (written first, so a batch seen as applied is in them).
        A batch whose entry is at or before `committed_through` is marked committed (a checkpoint holds it)."""
        steps = list(steps)
        with self.client.pipeline() as pipe:
            if weights is not None:
                pipe.hset(self.model_key, mapping={"version": version, "weights": weights})
            for step in steps:
                record = json.dumps(step.record)
                if not step.in_audit:
                    # the ingest entry's id: a retry after a reply lost with Redis (the transaction applied,
                    # the answer never came) is refused as not newer than the stream's top, not appended twice
                    pipe.xadd(self.audit_stream, {"record": record}, id=step.record["entry_id"],
                              maxlen=self.audit_max_length, approximate=True)
                key = self.batch_key(step.batch_id)
                committed = entry_id_key(step.record["entry_id"]) <= entry_id_key(committed_through)
                mapping = {"state": "applied", "record": record, "committed": "1" if committed else "0"}
                if step.discrepancy is not None:
                    mapping["discrepancy"] = json.dumps(step.discrepancy)
                pipe.hset(key, mapping=mapping)
                pipe.expire(key, self.ttl_seconds)
            pipe.set(self.status_key, json.dumps(status))
            if steps:
                pipe.publish(self.events_channel, " ".join(step.batch_id for step in steps))
            errors = [r for r in pipe.execute(raise_on_error=False)
                      if isinstance(r, Exception) and AUDIT_ALREADY_RECORDED not in str(r)]
        if errors:
            raise errors[0]

    def publish_status(self, status: dict) -> None:
        self.client.set(self.status_key, json.dumps(status))

    def lease_lock(self, ttl_seconds: float) -> redis.lock.Lock:
        """The namespace's lease, `worker:heartbeat`: a redis-py `Lock` (SET NX PX to take it; token-checked
        scripts to refresh and release it) whose token is the holder's name, so `lease_holder` names it and
        `worker_alive` sees it. Not thread-local: the worker takes it and its heartbeat thread refreshes it."""
        return self.client.lock(self.heartbeat_key, timeout=ttl_seconds, sleep=min(0.2, ttl_seconds / 4),
                                thread_local=False)

    def lease_holder(self) -> str | None:
        holder = self.client.get(self.heartbeat_key)
        return holder.decode() if holder is not None else None

    def purge(self, page: int = 1000, max_pages: int = 100_000) -> int:
        """Delete every key of this namespace (tests, or a deliberate reset); returns how many."""
        deleted, cursor = 0, 0
        for _ in range(max_pages):
            cursor, keys = self.client.scan(cursor, match=f"{self.namespace}:*", count=page)
            if keys:
                deleted += self.client.delete(*keys)
            if cursor == 0:
                break
        return deleted
