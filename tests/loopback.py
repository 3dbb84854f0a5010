"""A small HTTP server on 127.0.0.1 for the tests: the stand-in for a backend, Prometheus, an exporter, a webhook
receiver or an OTLP collector. A test gives a function from each :class:`Request` to its :class:`Answer`; the server
records the requests, and closing it waits for the requests being answered and closes its socket. :func:`black_hole`
is the opposite: an address no connection can be made to in time.

:class:`PostRecorder` is such a server keeping the JSON bodies posted to it (webhook receivers, Grafana's API).

``tests/gateway/hostile.py`` and ``tests/backends/canned_server.py`` are raw asyncio servers instead: they control the
bytes on the wire (broken framing, hangs, keep-alive), which this one leaves to :mod:`http.server`."""

from __future__ import annotations

import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request the server received."""

    method: str
    #: The request target as sent (path and query string).
    path: str
    #: Header names are lower-cased.
    headers: dict[str, str]
    body: bytes
    #: ``time.monotonic()`` once its body was read.
    received: float


@dataclass(frozen=True)
class Answer:
    """What to answer: a status, a body (its ``content-length`` is added) and other headers."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


class Loopback:
    """An HTTP/1.0 server on a free port of 127.0.0.1 answering ``methods`` with ``respond`` (other methods: 501, as
    :mod:`http.server` does), one thread a request. A context manager; :meth:`close` stops it and re-raises the first
    exception ``respond`` raised (answered as a 500), so that a broken fake fails its test."""

    def __init__(self, respond: Callable[[Request], Answer], *, methods: Collection[str] = ("GET",)) -> None:
        self.methods = frozenset(methods)
        self._respond = respond
        self._requests: list[Request] = []
        self._errors: list[Exception] = []
        self._lock = threading.Lock()
        self._server = _Server(self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"loopback {self.url}", daemon=True)
        self._thread.start()

    def requests(self) -> list[Request]:
        """The requests received so far (of ``methods``), in order."""
        with self._lock:
            return list(self._requests)

    def close(self) -> None:
        """Stop serving, wait for the requests being answered, close the socket; re-raise ``respond``'s error."""
        if self._thread.is_alive():
            self._server.shutdown()
            self._thread.join()
            self._server.server_close()
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise errors[0]

    def __enter__(self) -> Loopback:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.close()

    def _answer(self, request: Request) -> Answer:
        with self._lock:
            self._requests.append(request)
        try:
            return self._respond(request)
        except Exception as exc:
            with self._lock:
                self._errors.append(exc)
            return Answer(500, f"the test's fake failed: {exc!r}".encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = False  # server_close() joins the threads still answering

    def __init__(self, loopback: Loopback) -> None:
        self.loopback = loopback
        super().__init__(("127.0.0.1", 0), _Handler)

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that left before its answer was written (it timed out) is no error of the server."""
        if not isinstance(sys.exception(), ConnectionError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def _serve(self) -> None:
        loopback = self.server.loopback
        if self.command not in loopback.methods:
            self.send_error(HTTPStatus.NOT_IMPLEMENTED, f"Unsupported method ({self.command!r})")
            return
        body = self.rfile.read(int(self.headers.get("content-length") or 0))
        headers = {name.lower(): value for name, value in self.headers.items()}
        answer = loopback._answer(Request(self.command, self.path, headers, body, time.monotonic()))
        self.send_response(answer.status)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(answer.body)))
        self.end_headers()
        self.wfile.write(answer.body)

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = _serve

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: a test's output is its own."""


@contextmanager
def black_hole() -> Iterator[str]:
    """The URL of a listening socket whose accept queue is full: the kernel drops further SYNs, so a connection is
    never made (a host that vanished behind a firewall, as seen from a client)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(0)
        filling = []
        for _ in range(4):
            conn = socket.socket()
            conn.setblocking(False)
            conn.connect_ex(sock.getsockname())
            filling.append(conn)
        time.sleep(0.1)  # the first handshake completes and fills the queue
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}"
        finally:
            for conn in filling:
                conn.close()


@dataclass(frozen=True)
class Post:
    """One JSON body posted to a :class:`PostRecorder`."""

    path: str
    authorization: str | None
    body: Any
    #: ``time.monotonic()`` when it arrived.
    received: float


class PostRecorder:
    """An HTTP endpoint on loopback keeping each JSON body posted to it, with its path and ``Authorization`` header:
    the stand-in for webhook receivers (Alertmanager's), Grafana's API, PagerDuty and Slack."""

    def __init__(self) -> None:
        self._endpoint = Loopback(lambda _: Answer(200, b"ok"), methods=("POST",))

    def url(self, path: str) -> str:
        """The address of ``path`` on this endpoint."""
        return f"{self._endpoint.url}/{path}"

    def posts(self) -> list[Post]:
        """What was posted so far, in order."""
        return [
            Post(r.path, r.headers.get("authorization"), json.loads(r.body), r.received)
            for r in self._endpoint.requests()
        ]

    def close(self) -> None:
        self._endpoint.close()
