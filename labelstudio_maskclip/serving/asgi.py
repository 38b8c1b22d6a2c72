"""The backend as gunicorn's asyncio worker serves it: requests are read whole in the event loop, then the
Flask app answers them in a thread.

gunicorn's ``asgi`` worker parses request heads in its event loop (limits: ``--limit-request-line``,
``--limit-request-fields``, ``--limit-request-field-size``) and closes a kept-alive connection that stays
idle past ``--keep-alive``. :class:`WholeRequests` then reads each admitted request's body in the loop too,
so a thread of a2wsgi's pool (``THREADS`` per worker) is taken only by a complete request: clients that
send slowly cost a socket and a buffer, never a thread, and ``/health`` keeps answering. A body must keep
up with :data:`MIN_RATE` after a grace of :data:`READ_TIMEOUT` seconds or the client is answered ``408``
and disconnected; the bodies buffered at once in a worker are bounded by :data:`BUFFER_BUDGET` (past it:
``503`` with ``Retry-After``). With basic auth on, a request without the credentials is not read at all:
the app answers ``401`` and the connection is closed with its body unread.

Use: ``gunicorn --worker-class asgi 'labelstudio_maskclip.serving.asgi:asgi()'`` (what
``labelstudio-maskclip serve`` runs).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from ..settings import Settings
from .server import credentials_match, wsgi

__all__ = ["WholeRequests", "asgi", "READ_TIMEOUT", "MIN_RATE", "BUFFER_BUDGET"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Seconds of grace a request body gets before it must keep up with :data:`MIN_RATE`.
READ_TIMEOUT = 15.0
#: Bytes per second a body must average after the grace: a 256 MB body may take 15 s + 64 min, a stalled
#: or dripping one is cut after about 15 s.
MIN_RATE = 64 * 1024
#: Bytes of request bodies held at once per worker process (read, or being answered).
BUFFER_BUDGET = 512 * 1024 * 1024


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = ()):
        super().__init__(message)
        self.status, self.headers = status, headers


class _Gone(Exception):
    """The client disconnected before its body arrived."""


class WholeRequests:
    """ASGI middleware: an admitted HTTP request reaches ``app`` with its whole body already read.

    ``admit(scope)`` is False for requests the app refuses without reading their body (wrong credentials):
    those pass through unread. Bodies declared longer than ``max_body`` pass through too (the app answers
    ``413`` before reading). ``app`` then sees ``content-length`` set to the body read (a chunked body too).
    """

    def __init__(self, app: ASGIApp, admit: Callable[[Scope], bool], max_body: int, *,
                 budget: int = BUFFER_BUDGET, clock: Callable[[], float] = time.monotonic):  # fmt: skip
        self.app, self.admit, self.max_body, self.budget, self.clock = app, admit, max_body, budget, clock
        self.buffered = 0  # bytes of bodies held now, all requests of this process together

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.admit(scope):
            return await self.app(scope, receive, send)
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body:
            return await self.app(scope, receive, send)
        held = [0]
        try:
            body = await self._read(receive, declared, held)
        except _Refused as e:
            return await _answer(send, e)
        except _Gone:
            return
        finally:
            self.buffered -= held[0]
        self.buffered += len(body)
        try:
            await self.app(_with_length(scope, len(body)), _replay(body, receive), send)
        finally:
            self.buffered -= len(body)

    async def _read(self, receive: Receive, declared: int | None, held: list[int]) -> bytes:
        """The request's body, or :class:`_Refused` (too slow, too large, over the budget), :class:`_Gone`."""
        start, chunks, size = self.clock(), [], 0
        if self.buffered + (declared or 0) > self.budget:
            raise _Refused(503, "the server is reading too many request bodies", ((b"retry-after", b"5"),))
        while True:
            left = start + READ_TIMEOUT + size / MIN_RATE - self.clock()
            if left <= 0:
                raise _Refused(408, f"request body not received in time (at least {MIN_RATE} bytes/s)")
            try:
                message = await asyncio.wait_for(receive(), left)
            except asyncio.TimeoutError:
                raise _Refused(408, f"request body not received in time (at least {MIN_RATE} bytes/s)") from None
            if message["type"] != "http.request":
                raise _Gone
            chunk = message.get("body", b"")
            size += len(chunk)
            held[0] += len(chunk)
            self.buffered += len(chunk)
            if size > self.max_body:
                raise _Refused(413, f"request body larger than {self.max_body} bytes")
            if self.buffered > self.budget:
                raise _Refused(503, "the server is reading too many request bodies", ((b"retry-after", b"5"),))
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name.lower() == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _with_length(scope: Scope, length: int) -> Scope:
    """``scope`` with ``content-length: length`` and no ``transfer-encoding`` (the body is whole now)."""
    headers = [(n, v) for n, v in scope["headers"] if n.lower() not in (b"content-length", b"transfer-encoding")]
    return {**scope, "headers": [*headers, (b"content-length", str(length).encode())]}


def _replay(body: bytes, receive: Receive) -> Receive:
    """A ``receive`` that gives ``body`` once, then the server's own messages (a disconnect)."""
    sent = [False]

    async def replay() -> Message:
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _answer(send: Send, refused: _Refused) -> None:
    """A JSON error, and the connection closed (its body was not read to the end)."""
    body = json.dumps({"error": str(refused)}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close"), *refused.headers]  # fmt: skip
    await send({"type": "http.response.start", "status": refused.status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def asgi() -> ASGIApp:
    """gunicorn factory (``--worker-class asgi``): the Flask app behind a2wsgi's thread pool and
    :class:`WholeRequests`; settings from the environment, read once per worker."""
    from a2wsgi import WSGIMiddleware

    settings = Settings.from_env()
    app = wsgi()
    user, password = settings.basic_auth_user, settings.basic_auth_pass

    def admit(scope: Scope) -> bool:
        if not user:
            return True
        header = next((v for n, v in scope["headers"] if n.lower() == b"authorization"), None)
        return header is not None and credentials_match(header.decode("latin-1"), user, password)

    threads = WSGIMiddleware(app, workers=settings.threads)  # type: ignore[arg-type]
    return WholeRequests(threads, admit, int(app.config["MAX_CONTENT_LENGTH"]))  # type: ignore[arg-type]
