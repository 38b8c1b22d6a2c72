"""gunicorn's threaded worker, with requests read in the event loop before they take a thread.

gunicorn's ``gthread`` worker hands a connection to a worker thread as soon as its first bytes arrive, and
the thread then blocks reading the request line and headers. A dozen clients dripping a header byte every
few seconds hold every thread of every worker, and ``/health`` (Label Studio's probe, the container's
check) times out. :class:`BufferingThreadWorker` reads each request's head, and a body of known length up
to :data:`MAX_BUFFERED_BODY` bytes (webhooks, most predict requests), without blocking, in the worker's
event loop; only a complete request goes to a thread. A client that has not sent it within
:data:`READ_TIMEOUT` seconds is answered ``408`` and disconnected, so idle or dripping connections cost a
socket and a small buffer, never a thread, and are bounded in time. Larger bodies are read by the thread as
before (behind basic auth, an unauthenticated one is refused before its body is read; without auth, see
the reverse proxy in ``docker/nginx.conf``, which buffers whole requests).

Use: ``gunicorn --worker-class labelstudio_maskclip.serving.worker.BufferingThreadWorker`` (what
``labelstudio-maskclip serve`` runs). TLS and HTTP/2 prior-knowledge connections keep gunicorn's own path.
Needs gunicorn >= 27 (its ``gthread`` internals: ``TConn``, ``enqueue_req``, ``murder_pending``).
"""

from __future__ import annotations

import errno
import re
import selectors
import time
from collections import deque
from functools import partial
from typing import Any

from gunicorn.http2 import negotiation
from gunicorn.workers.gthread import TConn, ThreadWorker

__all__ = ["BufferingThreadWorker", "READ_TIMEOUT", "MAX_BUFFERED_BODY", "MAX_HEAD", "MAX_BUFFERED_TOTAL"]

#: Seconds a client has to send a request's head (and a buffered body) once it connected or sent its
#: first byte on a kept-alive connection.
READ_TIMEOUT = 15.0
#: Bodies of known length up to this are read in the event loop too (bytes, per connection).
MAX_BUFFERED_BODY = 4 * 1024 * 1024
#: A head longer than this goes to the thread at once (gunicorn's header limits then refuse it).
MAX_HEAD = 64 * 1024
#: Bytes buffered in the event loop at once per worker, all connections together: past this, a request
#: goes to a thread as soon as it sends more (gunicorn's behaviour), so many connections cannot make the
#: buffers grow the worker.
MAX_BUFFERED_TOTAL = 64 * 1024 * 1024

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]{1,12})[ \t]*\r\n", re.IGNORECASE)
_TIMEOUT_REPLY = b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"


class _Reading:
    """A connection whose request is being read in the event loop."""

    __slots__ = ("conn", "data", "deadline")

    def __init__(self, conn: TConn, deadline: float):
        self.conn = conn
        self.data = bytearray()
        self.deadline = deadline

    def complete(self) -> bool:
        """The head has arrived, and the body too when its length is known and small enough."""
        end = self.data.find(b"\r\n\r\n")
        if end < 0:
            return len(self.data) > MAX_HEAD
        match = _CONTENT_LENGTH.search(bytes(self.data[: end + 2]))
        if match is None:
            return True  # no body, or a chunked one: the thread reads it
        length = int(match.group(1))
        return length > MAX_BUFFERED_BODY or len(self.data) >= end + 4 + length


class BufferingThreadWorker(ThreadWorker):
    """``gthread`` with requests read in the event loop first (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.reading: deque[_Reading] = deque()  # ordered by deadline (constant timeout)
        self.buffered = 0  # bytes held by self.reading

    def _buffering(self, conn: TConn) -> bool:
        return not self.cfg.is_ssl and not negotiation.prior_knowledge_allowed(self.cfg, conn.client)

    def accept(self, listener):
        try:
            client_sock, client_addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, client_sock, client_addr, listener.getsockname())  # non-blocking
        if self._buffering(conn):
            self._read_in_loop(conn)
        else:
            client_sock.setblocking(True)
            self.enqueue_req(conn)

    def on_client_socket_readable(self, conn, client):
        """A kept-alive connection sends its next request: read it in the loop too."""
        self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        if self._buffering(conn):
            self._read_in_loop(conn)
        else:
            self.enqueue_req(conn)

    def _read_in_loop(self, conn: TConn) -> None:
        reading = _Reading(conn, time.monotonic() + READ_TIMEOUT)
        self.reading.append(reading)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_readable, reading))

    def _on_readable(self, reading: _Reading, sock) -> None:
        try:
            chunk = sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if not chunk:  # the client went away
            self._forget(reading)
            self.nr_conns -= 1
            reading.conn.close()
            return
        reading.data += chunk
        self.buffered += len(chunk)
        if reading.complete() or self.buffered > MAX_BUFFERED_TOTAL:
            self._forget(reading)
            conn = reading.conn
            conn.sock.setblocking(True)
            conn.data_ready = True
            conn.init()  # the parser (HTTP/1.x: no socket reads here)
            conn.parser.unreader.unread(bytes(reading.data))
            self.enqueue_req(conn)

    def _forget(self, reading: _Reading) -> None:
        """Stop reading this connection in the loop (once: later calls do nothing)."""
        try:
            self.reading.remove(reading)
        except ValueError:
            return
        self.buffered -= len(reading.data)
        try:
            self.poller.unregister(reading.conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def murder_pending(self):
        """Also answer 408 to, and close, connections whose request did not arrive in time."""
        super().murder_pending()
        now = time.monotonic()
        while self.reading and self.reading[0].deadline <= now:
            reading = self.reading[0]
            self._forget(reading)
            try:
                reading.conn.sock.send(_TIMEOUT_REPLY)
            except OSError:
                pass
            self.nr_conns -= 1
            reading.conn.close()
