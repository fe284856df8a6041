"""Long-poll waits on batch states (`GET /v1/batches/{id}?wait=S`) that hold no thread.

A wait is a coroutine on the event loop, not a thread blocked in a Redis call: hundreds of open waits
cost a little memory each, and the health probes and other routes keep answering. One subscription per
API process to the worker's `batch-events` channel (the ids of batches whose state just changed) wakes
the waits on those batches, which then re-read their batch's state. Redis does not replay what was
published while the subscription was down, so each wait also re-reads at least every
`recheck_seconds` (every 0.1 s while unsubscribed), and every wait looks again on each (re)subscription.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import redis
import redis.asyncio

from service.deployment.redis_queue import RedisQueue, decode_batch_state
from service.deployment.settings import ServiceSettings

log = logging.getLogger("dscguard.api")
RESUBSCRIBE_BACKOFF_SECONDS = (0.2, 5.0)  # first wait after a Redis error, doubled up to the second


class BatchWaits:
    """Batch states read with redis.asyncio, and waits woken by the worker's batch events.

    The async client is made on first use, on the event loop that serves the requests (its
    connections belong to that loop); its pool is bounded (`pool_size`: the subscription holds one).
    """

    def __init__(self, settings: ServiceSettings, queue: RedisQueue, recheck_seconds: float = 1.0,
                 pool_size: int = 32):
        self.settings, self.queue = settings, queue
        self.recheck_seconds, self.pool_size = recheck_seconds, pool_size
        self._client: redis.asyncio.Redis | None = None
        self._listener: asyncio.Task | None = None
        self._subscribed = False
        self._waiters: dict[str, set[asyncio.Event]] = {}

    def _redis(self) -> redis.asyncio.Redis:
        if self._client is None:
            timeout = self.settings.redis_timeout_seconds
            pool = redis.asyncio.BlockingConnectionPool.from_url(
                self.settings.redis_url, max_connections=self.pool_size, timeout=timeout,
                socket_connect_timeout=timeout, socket_timeout=timeout + 5.0)
            self._client = redis.asyncio.Redis(connection_pool=pool)
        return self._client

    async def state(self, batch_id: str) -> dict | None:
        return decode_batch_state(await self._redis().hgetall(self.queue.batch_key(batch_id)))

    async def wait(self, batch_id: str, timeout_seconds: float) -> dict | None:
        """The batch's state once it is no longer queued, or after `timeout_seconds` (None: unknown batch)."""
        if timeout_seconds <= 0:
            return await self.state(batch_id)
        self._ensure_listening()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_seconds
        woken = asyncio.Event()
        self._waiters.setdefault(batch_id, set()).add(woken)
        try:
            while True:
                woken.clear()  # before the read: an event that comes after it wakes the next sleep
                state = await self.state(batch_id)
                remaining = deadline - loop.time()
                if state is None or state["state"] != "queued" or remaining <= 0:
                    return state
                recheck = self.recheck_seconds if self._subscribed else 0.1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(woken.wait(), min(remaining, recheck))
        finally:
            waiters = self._waiters.get(batch_id, set())
            waiters.discard(woken)
            if not waiters:
                self._waiters.pop(batch_id, None)

    def _ensure_listening(self) -> None:
        if self._listener is None or self._listener.done():
            self._listener = asyncio.get_running_loop().create_task(self._listen(), name="dscguard-batch-events")

    def _wake(self, batch_ids) -> None:
        for batch_id in batch_ids:
            for woken in self._waiters.get(batch_id, ()):
                woken.set()

    async def _listen(self) -> None:
        first, cap = RESUBSCRIBE_BACKOFF_SECONDS
        backoff = first
        while True:
            pubsub = self._redis().pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.queue.events_channel)
                self._subscribed, backoff = True, first
                self._wake(list(self._waiters))  # what was published while unsubscribed is lost: look again
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is not None and message["type"] == "message":
                        self._wake(message["data"].decode(errors="replace").split())
            except redis.RedisError as exc:
                log.warning("batch events: Redis unavailable (%s); waits re-read every 0.1 s, resubscribing in "
                            "%.1f s", exc, backoff)
            finally:
                self._subscribed = False
                with contextlib.suppress(redis.RedisError):
                    await pubsub.aclose()
            await asyncio.sleep(backoff)
            backoff = min(cap, 2 * backoff)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._client is not None:
            await self._client.aclose()
            self._client = None
