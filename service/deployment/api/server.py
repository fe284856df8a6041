"""Serving the API under uvicorn, with what uvicorn's h11 protocol lacks against slow or greedy clients.

uvicorn bounds the idle time between two requests on a connection (`timeout_keep_alive`) and the
size of a request head (`h11_max_incomplete_event_size`), but not the time a request head may take:
a client that connects and sends nothing, part of a request line, or its headers a byte at a time,
holds a connection for ever (slowloris). `GuardedH11Protocol` adds:

- a deadline for every request head (`DSCGUARD_HEADER_TIMEOUT_SECONDS`), counted from the
  connection's start, or from the first byte of the next request on a kept-alive connection: when
  it passes, a 408 (or nothing, if not a byte came) and the connection is closed;
- the connection limit (`DSCGUARD_MAX_CONNECTIONS`, uvicorn's `limit_concurrency`: connections
  and requests in flight) answered by the app as a JSON 503 `overloaded` (counted in the metrics)
  instead of uvicorn's plain-text one;
- its 400 for bytes that are not HTTP as JSON `{"detail", "reason"}`.

A body that stalls once the head is in is the app's to time out (`DSCGUARD_BODY_TIMEOUT_SECONDS`:
`service.deployment.api.middleware.RequestGuard`). `dscguard serve` and the tests run the API through
`ServeConfig`, so both get the same limits.
"""

from __future__ import annotations

import asyncio
import copy
import json
import sys

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.deployment.settings import ServiceSettings

OVERLOADED = "dscguard.overloaded"  # set in the scope of a request over the connection limit


def _raw_response(status: str, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail, "reason": reason}, separators=(",", ":")).encode()
    return (f"HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode() + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol plus a request-head deadline and a JSON answer over the connection limit."""

    def __init__(self, config: uvicorn.Config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        self.head_timeout_seconds: float | None = getattr(config, "header_timeout_seconds", None)
        self._head_timer: asyncio.TimerHandle | None = None
        # uvicorn's own check answers in plain text, outside the app; do it here, through the app
        self.max_concurrency, self.limit_concurrency = self.limit_concurrency, None
        if self.max_concurrency is not None:
            self.app = self._limited(self.app)

    def _limited(self, app):
        async def limited(scope, receive, send):
            # uvicorn's test; the running task is in `tasks` already, so `>` here is its `>=` before creating it
            if scope["type"] == "http" and (len(self.connections) >= self.max_concurrency
                                            or len(self.tasks) > self.max_concurrency):
                scope[OVERLOADED] = True
            await app(scope, receive, send)

        return limited

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.IDLE:  # a request head has started and is not complete yet
            self._arm_head_timer()
        else:
            self._cancel_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # between requests, uvicorn's keep-alive timer runs
        self._cancel_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and self.head_timeout_seconds is not None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(self.head_timeout_seconds, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
            return
        if self.conn.trailing_data[0]:  # part of a request came: say why it is cut off
            self.transport.write(_raw_response("408 Request Timeout", "head_timeout",
                                               f"the request line and headers did not arrive within "
                                               f"{self.head_timeout_seconds:g} s"))
        self.transport.close()

    def send_400_response(self, msg: str) -> None:
        self.transport.write(_raw_response("400 Bad Request", "bad_http", f"{msg} (not HTTP/1.1)"))
        self.transport.close()


class ServeConfig(uvicorn.Config):
    """A uvicorn config with the API's limits from `settings` (timeouts, connection limit, head size)."""

    def __init__(self, app, settings: ServiceSettings, **kwargs):
        super().__init__(app, http=GuardedH11Protocol, timeout_keep_alive=settings.keep_alive_timeout_seconds,
                         limit_concurrency=settings.max_connections,
                         h11_max_incomplete_event_size=settings.max_header_bytes, **kwargs)
        self.header_timeout_seconds = settings.header_timeout_seconds


def serve(settings: ServiceSettings, *, host: str, port: int, workers: int, log_level: str, access_log: bool) -> None:
    """`dscguard serve`: what `uvicorn.run` does, with `ServeConfig` (the app reads its settings itself)."""
    from uvicorn.supervisors import Multiprocess

    # uvicorn's logging, plus the API's own logger (dscguard.api: requests a client abandoned, ...) at the same level
    log_config = copy.deepcopy(LOGGING_CONFIG)
    log_config["loggers"]["dscguard"] = {"handlers": ["default"], "level": log_level.upper(), "propagate": False}
    config = ServeConfig("service.deployment.api.app:create_app", settings, factory=True, host=host, port=port,
                         workers=workers, log_level=log_level, log_config=log_config, access_log=access_log)
    if workers > 1:
        Multiprocess(config, sockets=[config.bind_socket()]).run()
        return
    server = uvicorn.Server(config)
    server.run()
    if not server.started:
        sys.exit(3)  # uvicorn's STARTUP_FAILURE
