"""HTTP plumbing shared by the HTTP backends: one aiohttp connection pool per backend with split timeouts, a
streaming SSE reader, and the mapping of HTTP statuses and transport failures to typed errors.

aiohttp rather than httpx: on the gateway's hot path (one streamed backend call per request) it costs about a
third of the CPU per request (C HTTP parser, no per-request client machinery); see ``docs/backends.md``.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Any

import aiohttp
import orjson
from yarl import URL

from llmpath.backends.base import (
    BackendBadRequest,
    BackendError,
    BackendProtocolError,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
)

#: Transport failures that :func:`transport_error` maps (catch these around a request).
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (aiohttp.ClientError, TimeoutError)
#: Close idle connections before a server with uvicorn's default (5 s keep-alive) does, so that a request never
#: goes out on a connection the server is closing at that very moment.
KEEPALIVE_S = 4.0
_JSON = "application/json"


class HttpClient:
    """One backend's HTTP connection pool: ``connect_timeout`` to get a connection, ``read_timeout`` between two
    reads, no overall limit (streams may be long). The aiohttp session is created in the running event loop on
    first use (or pass your own ``session``, e.g. for TLS or proxy settings; it is then not closed here)."""

    __slots__ = ("_headers", "_loop", "_owns", "_session", "_timeout", "base")

    def __init__(
        self,
        url: str,
        connect_timeout: float,
        read_timeout: float,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.base = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._headers = dict(headers or {})
        self._session = session
        self._owns = session is None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def read_timeout(self) -> float | None:
        """Seconds a backend may stay silent (between two reads; between two events for :func:`sse_json`)."""
        return self._timeout.sock_read

    def url(self, path: str) -> URL:
        """The absolute URL of ``path`` (build it once and keep it: parsing URLs per request costs CPU)."""
        return URL(self.base + path)

    def session(self) -> aiohttp.ClientSession:
        """The session of the running event loop (a new one if the loop changed, e.g. between test loops)."""
        session = self._session
        if session is not None and (not self._owns or self._loop is asyncio.get_running_loop()):
            return session
        self._loop = asyncio.get_running_loop()
        connector = aiohttp.TCPConnector(limit=1024, limit_per_host=0, keepalive_timeout=KEEPALIVE_S)
        self._session = session = aiohttp.ClientSession(
            connector=connector,
            timeout=self._timeout,
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),  # a backend's cookies are never wanted; skipping them is cheaper
        )
        return session

    def post_json(self, url: URL, body: Any, headers: Mapping[str, str]) -> Any:
        """``POST`` ``body`` as JSON; use as ``async with client.post_json(...) as resp`` (streams stay open).
        Redirects are not followed (see :func:`raise_for_status`)."""
        return self.session().post(
            url, data=orjson.dumps(body), headers={"content-type": _JSON, **headers}, allow_redirects=False
        )

    async def get(self, url: URL) -> tuple[int, bytes]:
        """``GET`` and read the whole answer: status and body (transport failures are raised as they are; a
        redirect is its own answer, not followed; a body past :data:`MAX_BODY_BYTES` is a protocol error)."""
        async with self.session().get(url, allow_redirects=False) as resp:
            return resp.status, await read_body(resp)

    async def probe(self, path: str) -> str | None:
        """``GET path`` as a health check: ``None`` when it answers 200, else why not (``connection refused``,
        ``timed out``, ``answered HTTP 503``)."""
        try:
            status, _ = await self.get(self.url(path))
        except TRANSPORT_ERRORS as exc:
            return _transport_reason(exc)
        except BackendProtocolError as exc:  # a body without end
            return str(exc)
        return None if status == 200 else f"answered HTTP {status}"

    async def aclose(self) -> None:
        """Close the connections (if the session is ours)."""
        session, self._session = self._session, None
        if session is not None and self._owns and not session.closed:
            await session.close()


@dataclass(frozen=True, slots=True)
class ErrorBody:
    """What an error body says: its message, and OpenAI's ``param`` and (string) ``code`` when it has them."""

    message: str
    param: str | None = None
    code: str | None = None


def error_body(body: bytes) -> ErrorBody:
    """The message (and OpenAI ``param`` and ``code``) of an error body: SGLang, OpenAI, FastAPI or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = orjson.loads(text)
    except orjson.JSONDecodeError:
        return ErrorBody(text[:500] or "(empty body)")
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, str):
            return ErrorBody(err)
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or orjson.dumps(err).decode()[:500]
            param, code = err.get("param"), err.get("code")
            return ErrorBody(
                str(msg), param if isinstance(param, str) else None, code if isinstance(code, str) else None
            )
    return ErrorBody(text[:500])


def error_for_status(status: int, body: bytes, retry_after: str | None = None) -> BackendError:
    """The typed error for an HTTP error status."""
    err = error_body(body)
    text = f"backend answered {status}: {err.message}"
    if status in (429, 503):
        return BackendUnavailable(text, retry_after=_seconds(retry_after))
    if status in (408, 504):
        return BackendTimeout(text)
    if status in (401, 403, 407):
        # The caller's credentials for the backend (its own fault, not the client's); the body may echo part of
        # the key, so it is not kept.
        return BackendServerError(f"backend answered {status}: the caller's credentials were refused", status)
    if status in (404, 405) and _no_such_route(err.message):
        # The backend has no such route: a wrong backend URL or kind (an OpenAI-only server behind kind "sglang"),
        # the gateway's configuration, not the client's request.
        return BackendServerError(f"{text} (no such route: check the backend's URL and kind)", upstream_status=status)
    if 400 <= status < 500:
        return BackendBadRequest(err.message, status_code=status, param=err.param, code=err.code)
    return BackendServerError(text, upstream_status=status)


#: How servers and proxies word a route they do not have (Starlette, aiohttp, Go's net/http, plain text).
_NO_ROUTE = {"not found", "404 not found", "404 page not found", "method not allowed", "405 method not allowed"}


def _no_such_route(message: str) -> bool:
    """Whether a 404/405 message is a server's or proxy's generic "no such route" (an HTML page, an empty body,
    ``{"detail": "Not Found"}``), not a refusal with its own words (vLLM's "The model `x` does not exist.")."""
    words = message.strip().lower().replace(":", "").rstrip(".")
    return words.startswith("<") or words in _NO_ROUTE or words == "(empty body)"


async def raise_for_status(resp: aiohttp.ClientResponse) -> None:
    """Raise the typed error of an HTTP error answer (reading its body). A redirect is a
    :class:`BackendServerError` too: a backend URL that redirects is misconfigured, and following it would send
    the request, its headers and its credentials to wherever the backend points."""
    if resp.status >= 400:
        raise error_for_status(resp.status, await _error_body(resp), resp.headers.get("retry-after"))
    if 300 <= resp.status < 400:
        raise BackendServerError(
            f"backend answered {resp.status} (a redirect, not followed: check the backend URL)", resp.status
        )


#: How much of an error answer's body is read for its message (an HTML error page, a proxy's endless body) ...
ERROR_BODY_BYTES = 64 << 10
#: ... and for how long: the status is the answer; its body only words it.
ERROR_BODY_TIMEOUT_S = 2.0


async def _error_body(resp: aiohttp.ClientResponse) -> bytes:
    """At most :data:`ERROR_BODY_BYTES` of an error answer's body, within :data:`ERROR_BODY_TIMEOUT_S` (what came
    by then when the body is longer, slower or cut short)."""
    body = b""
    with contextlib.suppress(*TRANSPORT_ERRORS):
        async with asyncio.timeout(ERROR_BODY_TIMEOUT_S):
            while len(body) < ERROR_BODY_BYTES:
                part = await resp.content.read(ERROR_BODY_BYTES - len(body))
                if not part:
                    break
                body += part
    return body


#: The longest ``Retry-After`` taken from a backend: a client is never told to wait longer than this.
MAX_RETRY_AFTER_S = 3600.0


def _seconds(value: str | None) -> float | None:
    """A ``Retry-After`` in seconds, at most :data:`MAX_RETRY_AFTER_S`; ``None`` for anything that is no delay
    (absent, an HTTP date, negative, ``nan``, ``inf``): a backend's header must not break or inflate the
    gateway's."""
    try:
        seconds = float(value) if value is not None else math.nan
    except ValueError:
        return None
    return min(seconds, MAX_RETRY_AFTER_S) if math.isfinite(seconds) and seconds >= 0 else None


def transport_error(exc: BaseException, url: str) -> BackendError:
    """The typed error for a transport failure: a read timeout is :class:`BackendTimeout`; a refused, reset or
    dropped connection (no answer, or an answer cut short), or one not made within the connect timeout (nothing was
    sent: a black-holed host), is :class:`BackendUnreachable`."""
    if isinstance(exc, aiohttp.ConnectionTimeoutError):  # a TimeoutError too, but no request went out
        return BackendUnreachable(f"{url}: {type(exc).__name__}: no connection within the connect timeout")
    if isinstance(exc, TimeoutError):  # aiohttp's read timeouts are TimeoutErrors too
        return BackendTimeout(f"{url}: {type(exc).__name__}")
    if isinstance(exc, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError):
        return BackendUnreachable(f"{url}: {type(exc).__name__}: {exc}")
    return BackendProtocolError(f"{url}: {type(exc).__name__}: {exc}")


def _transport_reason(exc: BaseException) -> str:
    """A short reason for a failed connection, for health reports: ``connection refused``, ``timed out``, ..."""
    if isinstance(exc, TimeoutError):
        return "timed out"
    cause = getattr(exc, "os_error", None) or exc.__cause__
    if isinstance(cause, ConnectionRefusedError):
        return "connection refused"
    if isinstance(cause, OSError) and cause.strerror:
        return f"cannot connect: {cause.strerror}"
    return f"{type(exc).__name__}: {exc}"


def streams(resp: aiohttp.ClientResponse, asked: bool) -> bool:
    """Whether an answer is an SSE stream: one was asked for and the server did not answer one JSON body instead
    (a server or proxy that ignores ``stream``, or answers an error with a 200)."""
    return asked and resp.content_type != _JSON


#: The largest non-streamed answer read from a backend (a whole completion; far above any real one).
MAX_BODY_BYTES = 64 << 20


async def read_body(resp: aiohttp.ClientResponse) -> bytes:
    """A non-streamed answer's body, a protocol error past :data:`MAX_BODY_BYTES` (not memory to fill)."""
    parts: list[bytes] = []
    size = 0
    while size <= MAX_BODY_BYTES:
        part = await resp.content.read(MAX_BODY_BYTES + 1 - size)
        if not part:
            return b"".join(parts)
        parts.append(part)
        size += len(part)
    raise BackendProtocolError(f"answer larger than {MAX_BODY_BYTES} bytes")


def json_object(raw: bytes) -> Any:
    """Parse a JSON body (a protocol error if it is not JSON)."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        raise BackendProtocolError(f"response is not JSON: {raw[:200]!r}") from None


_BOM = b"\xef\xbb\xbf"

#: The largest SSE event a backend may send (a streamed chunk is a token or a few; SGLang's non-incremental chunks
#: repeat the text so far, still far below this): beyond it the stream is a protocol error, not memory to fill.
MAX_EVENT_BYTES = 4 << 20


async def sse_json(resp: aiohttp.ClientResponse, idle_s: float | None = None) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream (LF or CRLF line ends, after an optional byte order mark) up to
    ``data: [DONE]``; anything else is a protocol error. Comments and ``event:``/``id:``/``retry:`` fields are
    ignored; an event larger than :data:`MAX_EVENT_BYTES` is a protocol error. Keep-alive comments are no sign of
    progress: with ``idle_s``, a stream that sends nothing but them for longer than that is a
    :class:`BackendTimeout` (silence is the socket read timeout's).

    After ``[DONE]`` the body is read to its end (the chunked encoding's last chunk follows it), so that the
    connection goes back to the pool instead of being closed half-read.
    """
    # The pieces of an event still incomplete: kept apart and joined once its end came, so that an event arriving
    # in many small reads costs linear time, not a copy and a scan of everything so far per read.
    pending: list[bytes] = []
    size = 0
    head: bytes | None = b""  # the start of the body while it may still be a byte order mark
    cr = False  # a chunk ended with CR: its LF may start the next
    quiet_since: float | None = None  # when comments began to come instead of events
    done = False
    async for chunk in resp.content.iter_any():
        if done:
            continue
        if head is not None:  # a UTF-8 byte order mark before the first field is not part of it (the SSE spec)
            chunk = head + chunk
            if len(chunk) < len(_BOM) and _BOM.startswith(chunk):
                head = chunk
                continue
            chunk, head = chunk.removeprefix(_BOM), None
        if cr:
            chunk, cr = b"\r" + chunk, False
        if b"\r" in chunk:
            if chunk.endswith(b"\r"):
                chunk, cr = chunk[:-1], True
            chunk = chunk.replace(b"\r\n", b"\n")
        if not chunk:  # a read that was only a CR (or a byte order mark)
            continue
        if pending:
            if b"\n\n" not in chunk and not (chunk[:1] == b"\n" and pending[-1].endswith(b"\n")):
                pending.append(chunk)
                size += len(chunk)
                if size > MAX_EVENT_BYTES:
                    raise BackendProtocolError(f"stream event larger than {MAX_EVENT_BYTES} bytes")
                continue
            chunk = b"".join(pending) + chunk
            pending.clear()
        if b"\n\n" not in chunk:
            pending.append(chunk)
            size = len(chunk)
            if size > MAX_EVENT_BYTES:
                raise BackendProtocolError(f"stream event larger than {MAX_EVENT_BYTES} bytes")
            continue
        *events, rest = chunk.split(b"\n\n")
        if rest:
            pending.append(rest)
        size = len(rest)
        if size > MAX_EVENT_BYTES:
            raise BackendProtocolError(f"stream event larger than {MAX_EVENT_BYTES} bytes")
        for block in events:
            data = _event_data(block)
            if data is None:
                if quiet_since is None:
                    quiet_since = monotonic()
                elif idle_s is not None and monotonic() - quiet_since > idle_s:
                    raise BackendTimeout(f"no stream event for {idle_s:g} s, only comments")
                continue
            quiet_since = None
            if data.strip() == b"[DONE]":
                done = True
                break
            try:
                obj = orjson.loads(data)
            except orjson.JSONDecodeError:
                raise BackendProtocolError(f"stream event is not JSON: {data[:200]!r}") from None
            if not isinstance(obj, dict):
                raise BackendProtocolError(f"stream event is not an object: {data[:200]!r}")
            yield obj
    if not done:
        raise BackendProtocolError("stream ended without data: [DONE]")


def _event_data(block: bytes) -> bytes | None:
    """The ``data`` of one SSE event block (its ``data:`` lines joined by LF), or ``None`` if it has none."""
    if block.startswith(b"data: ") and b"\n" not in block:  # the common case: one data line
        return block[6:]
    lines = [line[5:].removeprefix(b" ") for line in block.split(b"\n") if line.startswith(b"data:")]
    return b"\n".join(lines) if lines else None


#: The HTTP status of an in-stream error that has an OpenAI error ``type`` but no numeric ``code``.
_STATUS_OF_ERROR_TYPE = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "permission_error": 403,
    "not_found_error": 404,
    "rate_limit_error": 429,
    "server_error": 500,
    "internal_error": 500,
}


def raise_stream_error(obj: dict[str, Any], default_status: int = 500) -> None:
    """Raise the typed error of an in-stream error event (SGLang ``{"error": {...}}``, OpenAI ``object: error``).

    Its status is the event's ``code`` when that is an HTTP error status (``429`` or ``"429"``), else the one its
    ``type`` stands for (``invalid_request_error`` → 400), else ``default_status``.
    """
    err = obj.get("error") if "error" in obj else (obj if obj.get("object") == "error" else None)
    if err is None or err is False:  # `"error": null` on a normal chunk is no error
        return
    if not isinstance(err, dict):  # TGI sends a string; anything else is an error all the same
        err = {"message": err if isinstance(err, str) else orjson.dumps(err).decode()[:500]}
    code = err.get("code")
    if isinstance(code, str) and (digits := code.strip()).isascii() and digits.isdigit() and len(digits) == 3:
        code = int(digits)  # LiteLLM-style proxies send "429"
    if isinstance(code, int) and not isinstance(code, bool) and 400 <= code <= 599:
        status = code
    else:
        status = _STATUS_OF_ERROR_TYPE.get(str(err.get("type")), default_status)
    raise error_for_status(status, orjson.dumps({"error": err}))
