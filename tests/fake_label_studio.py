"""The one fake Label Studio: a loopback HTTP server whose replies a test writes as a plain function.

For what the real Label Studio (the ``label_studio`` fixture) will not do on cue: a download that drips or
hangs, a 503 then a 200, a presigned redirect to a bucket, an answer held until the test lets it go. Clients
talk to it over real HTTP (the package's :class:`~labelstudio_maskclip.labelstudio.api.LabelStudioAPI`, the
image fetcher), so only Label Studio's side is played. ``answer(request)`` replies through the request's
helpers (:meth:`Request.json`, :meth:`Request.reply`, :meth:`Request.redirect`, :meth:`Request.stream`); every
request is kept in ``requests``.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

__all__ = ["FakeLabelStudio", "Request", "fake_label_studio", "routes"]


class Request:
    """One request to the fake: what it carries, and how to answer it (once)."""

    def __init__(self, handler: BaseHTTPRequestHandler, body: bytes):
        self._handler = handler
        self.method = handler.command
        self.path = handler.path  # with the query
        parts = urlsplit(handler.path)
        self.route = parts.path
        self.query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        self.headers = handler.headers
        self.authorization = handler.headers.get("Authorization")
        self.host = handler.headers.get("Host")
        self.body = body
        self.port = handler.server.server_address[1]

    def data(self) -> Any:
        """The body as JSON (None when empty)."""
        return json.loads(self.body) if self.body else None

    def reply(self, status: int, body: bytes = b"", content_type: str = "application/json", **headers: str) -> None:
        self.stream(status, [body], len(body), content_type, **headers)

    def json(self, status: int, value: Any) -> None:
        self.reply(status, json.dumps(value).encode())

    def redirect(self, location: str, code: int = 302) -> None:
        self.reply(code, b"", "text/plain", Location=location)

    def stream(
        self, status: int, chunks: Iterable[bytes], length: int | None = None, content_type: str = "image/png",
        **headers: str,
    ) -> int:  # fmt: skip
        """Send ``chunks`` one by one (flushed), with a Content-Length when given; the number of chunks
        written before the client hung up."""
        h = self._handler
        h.send_response(status)
        h.send_header("Content-Type", content_type)
        if length is not None:
            h.send_header("Content-Length", str(length))
        for name, value in headers.items():
            h.send_header(name, value)
        h.end_headers()
        sent = 0
        try:
            for chunk in chunks:
                h.wfile.write(chunk)
                h.wfile.flush()
                sent += 1
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeouts, size caps): expected
        return sent


class FakeLabelStudio:
    """The server: ``answer(request)`` for every request, on ``127.0.0.1`` at a free port (``url``)."""

    def __init__(self, answer: Callable[[Request], None]):
        self.answer = answer
        self.requests: list[Request] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(self, self.rfile.read(length) if length else b"")
                fake.requests.append(request)
                fake.answer(request)

            do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = _any

            def log_message(self, *args: Any) -> None:  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, name="fake-label-studio", daemon=True).start()
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def fake_label_studio(answer: Callable[[Request], None]) -> Iterator[FakeLabelStudio]:
    """A :class:`FakeLabelStudio` for a ``with`` block (a fixture's ``yield``), closed afterwards."""
    fake = FakeLabelStudio(answer)
    try:
        yield fake
    finally:
        fake.close()


def routes(table: Mapping[tuple[str, str], Callable[[Request], None]]) -> Callable[[Request], None]:
    """An ``answer`` from ``{(method, path): answer}`` (the path without its query); 404 for the rest."""

    def answer(request: Request) -> None:
        found = table.get((request.method, request.route))
        if found is None:
            return request.json(404, {"detail": "Not found."})
        return found(request)

    return answer
