"""The ``/metrics`` endpoint: OpenMetrics (with exemplars) when the scraper asks for it, Prometheus text otherwise,
and prometheus-client's multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is set."""

from __future__ import annotations

import gzip
import os
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory, if this process runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None  # noqa: SIM112 (legacy name prometheus-client still reads)


def scrape_registry(registry: CollectorRegistry) -> CollectorRegistry:
    """The registry to expose: ``registry`` itself, or in multiprocess mode a fresh one aggregating every
    worker's files (live metrics must not be registered on it, or they would be counted twice)."""
    if multiprocess_dir() is None:
        return registry
    from prometheus_client import multiprocess

    fresh = CollectorRegistry()
    multiprocess.MultiProcessCollector(fresh)
    return fresh


def render(registry: CollectorRegistry, accept: str, query_string: bytes) -> tuple[bytes, str]:
    """The exposition body and content type; ``?name[]=x`` restricts it to some series."""
    encoder, content_type = choose_encoder(accept)
    reg: Any = scrape_registry(registry)
    names = parse_qs(query_string.decode("latin-1")).get("name[]")
    if names:
        reg = reg.restricted_registry(names)
    return encoder(reg), content_type


async def serve_metrics(registry: CollectorRegistry, scope: MutableMapping[str, Any], send: Send) -> None:
    """Answer an ASGI HTTP request with the exposition of ``registry``."""
    method = scope.get("method", "GET")
    if method not in ("GET", "HEAD"):
        await _respond(send, 405, b"method not allowed\n", "text/plain; charset=utf-8", [(b"allow", b"GET, HEAD")])
        return
    accept = ""
    gzip_ok = False
    for key, value in scope.get("headers", ()):
        if key == b"accept":
            accept = value.decode("latin-1")
        elif key == b"accept-encoding":
            gzip_ok = b"gzip" in value
    body, content_type = render(registry, accept, scope.get("query_string", b""))
    extra: list[tuple[bytes, bytes]] = []
    if gzip_ok:
        body = gzip.compress(body, compresslevel=5)
        extra.append((b"content-encoding", b"gzip"))
    await _respond(send, 200, b"" if method == "HEAD" else body, content_type, extra, length=len(body))


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: str,
    extra: list[tuple[bytes, bytes]],
    length: int | None = None,
) -> None:
    headers = [
        (b"content-type", content_type.encode("latin-1")),
        (b"content-length", str(len(body) if length is None else length).encode()),
        *extra,
    ]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
