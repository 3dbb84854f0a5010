"""HTTP plumbing shared by the HTTP backends: clients with split timeouts, SSE reading and error mapping."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
from httpx_sse import EventSource

from llmpath.backends.base import (
    BackendBadRequest,
    BackendError,
    BackendProtocolError,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
)


def make_client(
    url: str, connect_timeout: float, read_timeout: float, headers: dict[str, str] | None = None
) -> httpx.AsyncClient:
    """An async client for one backend: ``connect_timeout`` to connect, ``read_timeout`` between two reads."""
    timeout = httpx.Timeout(connect=connect_timeout, read=read_timeout, write=read_timeout, pool=connect_timeout)
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=64)
    return httpx.AsyncClient(base_url=url.rstrip("/"), timeout=timeout, limits=limits, headers=headers or {})


def error_message(body: bytes) -> tuple[str, str | None]:
    """The message (and OpenAI ``param``) of an error body: SGLang, OpenAI, FastAPI or plain text."""
    text = body.decode("utf-8", errors="replace").strip()
    try:
        obj: Any = json.loads(text)
    except json.JSONDecodeError:
        return text[:500] or "(empty body)", None
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, str):
            return err, None
        if isinstance(err, dict):
            msg = err.get("message") or err.get("detail") or json.dumps(err)[:500]
            return str(msg), err.get("param")
    return text[:500], None


def error_for_status(status: int, body: bytes, retry_after: str | None = None) -> BackendError:
    """The typed error for an HTTP error status."""
    message, param = error_message(body)
    text = f"backend answered {status}: {message}"
    if status in (429, 503):
        return BackendUnavailable(text, retry_after=_seconds(retry_after))
    if status in (408, 504):
        return BackendTimeout(text)
    if 400 <= status < 500:
        return BackendBadRequest(message, status_code=status, param=param)
    return BackendServerError(text, upstream_status=status)


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def transport_error(exc: httpx.HTTPError, url: str) -> BackendError:
    """The typed error for a transport failure (connect refused, timeout, reset)."""
    if isinstance(exc, httpx.TimeoutException):
        return BackendTimeout(f"{url}: {type(exc).__name__}")
    if isinstance(exc, httpx.TransportError):
        return BackendUnavailable(f"{url}: {type(exc).__name__}: {exc}")
    return BackendProtocolError(f"{url}: {exc}")


async def sse_json(response: httpx.Response) -> AsyncIterator[dict[str, Any]]:
    """The JSON objects of an SSE stream up to ``data: [DONE]``; anything else is a protocol error.

    After ``[DONE]`` the body is read to its end (the chunked encoding's last chunk follows it), so that the
    connection goes back to the pool instead of being closed half-read.
    """
    done = False
    async for event in EventSource(response).aiter_sse():
        data = event.data
        if not data or done:
            continue
        if data.strip() == "[DONE]":
            done = True
            continue
        try:
            obj = json.loads(data)
        except json.JSONDecodeError:
            raise BackendProtocolError(f"stream event is not JSON: {data[:200]!r}") from None
        if not isinstance(obj, dict):
            raise BackendProtocolError(f"stream event is not an object: {data[:200]!r}")
        yield obj
    if not done:
        raise BackendProtocolError("stream ended without data: [DONE]")


def raise_stream_error(obj: dict[str, Any]) -> None:
    """Raise the typed error of an in-stream error event (SGLang ``{"error": {...}}``, OpenAI ``object: error``)."""
    err = obj.get("error") if "error" in obj else (obj if obj.get("object") == "error" else None)
    if err is None:
        return
    if isinstance(err, str):
        err = {"message": err}
    code = err.get("code")
    status = code if isinstance(code, int) else 500
    raise error_for_status(status, json.dumps({"error": err}).encode())
