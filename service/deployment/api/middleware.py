"""Pure ASGI middleware at the edge: the request guard (503 over the connection limit, 413 for a body over
the limit, 408 for a body that does not arrive in time) and the request metrics (which count a request
whose client went away as 499, nginx's "client closed request")."""

from __future__ import annotations

import asyncio
import json
import logging
import time

from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.deployment.api.server import OVERLOADED
from service.deployment.metrics import ApiMetrics

log = logging.getLogger("dscguard.api")
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a request whose client closed the connection first


class _Refused(Exception):
    def __init__(self, status: int, reason: str, detail: str, headers: tuple = ()):
        self.status, self.reason, self.detail, self.headers = status, reason, detail, headers


class RequestGuard:
    """Refuse, before the routes see them: requests over the connection limit (503, flagged by
    `GuardedH11Protocol`), bodies over `max_bytes` (413: by Content-Length before reading, else while
    reading), and bodies not complete `body_timeout` seconds after the request head (408)."""

    def __init__(self, app: ASGIApp, max_bytes: int, body_timeout: float, retry_after_seconds: int,
                 metrics: ApiMetrics):
        self.app, self.max_bytes, self.body_timeout, self.metrics = app, max_bytes, body_timeout, metrics
        self.retry_after = str(retry_after_seconds).encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        try:
            self._check_head(scope)
        except _Refused as refused:
            await self._refuse(send, refused)
            return
        deadline = asyncio.get_running_loop().time() + self.body_timeout
        received = 0
        body_complete = False
        started = False

        async def guarded_receive() -> Message:
            nonlocal received, body_complete
            if body_complete:  # after the body: a wait for the disconnect, which may last
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except TimeoutError:
                raise _Refused(408, "body_timeout", f"the request body did not arrive within "
                                                    f"{self.body_timeout:g} s") from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self._too_large()
                body_complete = not message.get("more_body", False)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except _Refused as refused:
            if started:
                raise
            await self._refuse(send, refused)

    def _check_head(self, scope: Scope) -> None:
        if scope.get(OVERLOADED):
            raise _Refused(503, "overloaded", "the API is at its connection limit (DSCGUARD_MAX_CONNECTIONS); retry "
                                              "later", ((b"retry-after", self.retry_after),))
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            raise self._too_large()

    def _too_large(self) -> _Refused:
        return _Refused(413, "body_too_large", f"the request body is larger than the limit of {self.max_bytes} bytes")

    async def _refuse(self, send: Send, refused: _Refused) -> None:
        self.metrics.rejected.labels(reason=refused.reason).inc()
        body = json.dumps({"detail": refused.detail, "reason": refused.reason}, separators=(",", ":")).encode()
        await send({"type": "http.response.start", "status": refused.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *refused.headers]})
        await send({"type": "http.response.body", "body": body})


class RequestMetrics:
    """Count every answered request by route template (never by raw path) and status, and time it.

    A request whose client closed the connection before its body was in (`ClientDisconnect`) is no
    server error: it is counted as 499, logged at INFO without a traceback, and nothing is processed.
    """

    def __init__(self, app: ASGIApp, metrics: ApiMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def tracking_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except ClientDisconnect:
            status = CLIENT_CLOSED_REQUEST
            log.info("%s %s: the client closed the connection before its request body was complete; not processed "
                     "(counted as %d)", scope["method"], scope["path"], CLIENT_CLOSED_REQUEST)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.metrics.requests.labels(route=route, method=method, status=str(status)).inc()
            self.metrics.latency.labels(route=route, method=method).observe(time.perf_counter() - started)
