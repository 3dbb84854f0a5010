"""The gateway's own metrics (catalog names), created on the instrumentation's registry."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmpath.gateway.admission import REJECTION_REASONS
from llmpath.instrumentation import catalog


class GatewayMetrics:
    """Prompt cache, routing, backend, admission and configuration-reload metrics; label children are cached."""

    def __init__(self, metric: Callable[[str], Any]) -> None:
        self._lookups = metric(catalog.PROMPT_CACHE_LOOKUPS_TOTAL)
        self._predicted = metric(catalog.PROMPT_CACHE_PREDICTED_TOKENS_TOTAL)
        self._decisions = metric(catalog.ROUTE_DECISIONS_TOTAL)
        self._backend_up = metric(catalog.BACKEND_UP)
        self._backend_inflight = metric(catalog.BACKEND_INFLIGHT)
        self._index_blocks = metric(catalog.PROMPT_CACHE_INDEX_BLOCKS)
        self._admission_inflight = metric(catalog.ADMISSION_INFLIGHT)
        self._queue_depth = metric(catalog.ADMISSION_QUEUE_DEPTH)
        self._rejections = metric(catalog.ADMISSION_REJECTIONS_TOTAL)
        self._reloads = metric(catalog.CONFIG_RELOADS_TOTAL)
        self._reload_ok = metric(catalog.CONFIG_LAST_RELOAD_SUCCESSFUL)
        # Counters that an alert or a runbook query reads exist at 0 before their first event (an empty result
        # would read as "no data", not "none").
        for result in ("success", "failure"):
            self._reloads.labels(result)
        for reason in REJECTION_REASONS:
            self._rejections.labels(reason)
        self._reload_ok.set(1)
        self._children: dict[tuple[object, ...], Any] = {}
        self._admission_last: tuple[int, int] | None = None

    def _child(self, family: Any, *labels: str) -> Any:
        key = (id(family), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = family.labels(*labels)
        return child

    def cache_lookup(self, route: str, result: str) -> None:
        self._child(self._lookups, route, result).inc()

    def predicted_tokens(self, route: str, tokens: int) -> None:
        child = self._child(self._predicted, route)
        if tokens:
            child.inc(tokens)

    def route_decision(self, backend: str, reason: str) -> None:
        self._child(self._decisions, backend, reason).inc()

    def backend_state(self, backend: str, *, up: bool, inflight: int) -> None:
        self._child(self._backend_up, backend).set(1 if up else 0)
        self.backend_inflight(backend, inflight)

    def backend_inflight(self, backend: str, inflight: int) -> None:
        self._child(self._backend_inflight, backend).set(inflight)

    def index_blocks(self, backend: str, blocks: int) -> None:
        self._child(self._index_blocks, backend).set(blocks)

    def admission(self, inflight: int, queue_depth: int) -> None:
        last = self._admission_last
        if last is None or last[0] != inflight:
            self._admission_inflight.set(inflight)
        if last is None or last[1] != queue_depth:
            self._queue_depth.set(queue_depth)
        self._admission_last = (inflight, queue_depth)

    def rejection(self, reason: str) -> None:
        self._child(self._rejections, reason).inc()

    def config_reload(self, success: bool) -> None:
        self._child(self._reloads, "success" if success else "failure").inc()
        self._reload_ok.set(1 if success else 0)
