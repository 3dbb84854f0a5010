"""The ``/metrics`` endpoint: OpenMetrics (with exemplars) when the scraper asks for it, Prometheus text otherwise,
and prometheus-client's multiprocess collector when ``PROMETHEUS_MULTIPROC_DIR`` is set."""

from __future__ import annotations

import gzip
import os
from collections.abc import Awaitable, Callable, Iterable, Iterator, MutableMapping
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


def multiprocess_dir() -> str | None:
    """The prometheus-client multiprocess directory, if this process runs in multiprocess mode."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None  # noqa: SIM112 (legacy name prometheus-client still reads)


def scrape_registry(registry: CollectorRegistry, names: Iterable[str] | None = None) -> Any:
    """The registry to expose: ``registry`` itself, or in multiprocess mode a fresh one aggregating every
    worker's files (live metrics must not be registered on it, or they would be counted twice). With ``names``,
    only the samples of those names (prometheus-client's ``?name[]=`` semantics)."""
    if multiprocess_dir() is None:
        return registry if names is None else registry.restricted_registry(names)
    from prometheus_client import multiprocess

    collector = multiprocess.MultiProcessCollector(None)
    fresh = CollectorRegistry()
    # The multiprocess collector cannot describe its metrics before reading the files, so the registry's own
    # restriction (which looks collectors up by name) would find nothing: filter its samples instead.
    fresh.register(collector if names is None else _SamplesNamed(collector, frozenset(names)))
    return fresh


class _SamplesNamed:
    """A collector yielding only the samples called ``names`` of another collector's metrics."""

    def __init__(self, collector: Any, names: frozenset[str]) -> None:
        self._collector = collector
        self._names = names

    def collect(self) -> Iterator[Metric]:
        for metric in self._collector.collect():
            samples = [sample for sample in metric.samples if sample.name in self._names]
            if samples:
                kept = Metric(metric.name, metric.documentation, metric.type, metric.unit)
                kept.samples = samples
                yield kept


def render(registry: CollectorRegistry, accept: str, query_string: bytes) -> tuple[bytes, str]:
    """The exposition body and content type; ``?name[]=x`` restricts it to some series."""
    encoder, content_type = choose_encoder(accept)
    names = parse_qs(query_string.decode("latin-1")).get("name[]")
    return encoder(scrape_registry(registry, names or None)), content_type


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
            gzip_ok = accepts_gzip(value.decode("latin-1"))
    body, content_type = render(registry, accept, scope.get("query_string", b""))
    extra: list[tuple[bytes, bytes]] = []
    if gzip_ok:
        body = gzip.compress(body, compresslevel=5)
        extra.append((b"content-encoding", b"gzip"))
    await _respond(send, 200, b"" if method == "HEAD" else body, content_type, extra, length=len(body))


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an ``Accept-Encoding`` value allows gzip: named (or ``*``) without ``q=0`` (RFC 9110 §12.5.3)."""
    allowed: dict[str, bool] = {}
    for item in accept_encoding.split(","):
        coding, *params = (part.strip() for part in item.split(";"))
        quality = next((p.partition("=")[2] for p in params if p.lower().startswith("q=")), "1")
        try:
            allowed[coding.lower()] = float(quality) > 0
        except ValueError:
            allowed[coding.lower()] = False
    return allowed.get("gzip", allowed.get("x-gzip", allowed.get("*", False)))


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
