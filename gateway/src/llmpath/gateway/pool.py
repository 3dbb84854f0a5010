"""The backend pool: health checks, ejection after consecutive failures, in-flight accounting.

A backend is *available* when its last health check passed and it is not ejected. Failures come from active
health checks and from requests (connections that failed, 5xx answers); after ``eject_after_failures``
consecutive ones the backend is ejected for ``eject_for_s`` seconds, then probed again (one passing probe
reinstates it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from llmpath.backends.base import Backend
from llmpath.gateway.config import BackendConfig, HealthConfig
from llmpath.gateway.routing import Candidate

log = logging.getLogger("llmpath.gateway.pool")


@dataclass(slots=True)
class BackendState:
    """One backend and what the gateway knows about it."""

    backend: Backend
    config: BackendConfig
    name: str
    weight: float
    healthy: bool = True
    consecutive_failures: int = 0
    ejected_until: float = 0.0
    inflight: int = 0
    last_error: str | None = None
    last_check: float | None = field(default=None)

    def available(self, now: float) -> bool:
        return self.healthy and now >= self.ejected_until

    def status(self, now: float) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.config.public_url,  # /readyz has no auth: no credentials from the configured URL
            "kind": self.config.kind,
            "available": self.available(now),
            "healthy": self.healthy,
            "ejected_for_s": round(max(0.0, self.ejected_until - now), 3),
            "consecutive_failures": self.consecutive_failures,
            "inflight": self.inflight,
            "last_error": self.last_error,
        }


class BackendPool:
    """All backends of the gateway; the router's candidates come from here."""

    def __init__(
        self,
        states: Sequence[BackendState],
        health: HealthConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[BackendState], None] | None = None,
        on_eject: Callable[[BackendState], None] | None = None,
    ) -> None:
        self.states = {s.name: s for s in states}
        self.health = health
        self.clock = clock
        #: Called whenever a backend's availability changes (metrics gauges).
        self.on_change = on_change
        #: Called whenever a backend's in-flight count changes (twice per request: keep it cheap).
        self.on_inflight: Callable[[BackendState], None] | None = None
        #: Called when a backend is ejected (the prompt cache forgets what it held).
        self.on_eject = on_eject
        self._task: asyncio.Task[None] | None = None

    def __getitem__(self, name: str) -> BackendState:
        return self.states[name]

    def candidates(self, names: Sequence[str] = (), exclude: Sequence[str] = ()) -> list[Candidate]:
        """Available backends (restricted to ``names`` when given), minus ``exclude``."""
        now = self.clock()
        return [
            Candidate(s.name, s.inflight, s.weight)
            for s in self.states.values()
            if s.available(now) and (not names or s.name in names) and s.name not in exclude
        ]

    def ready(self) -> bool:
        now = self.clock()
        return any(s.available(now) for s in self.states.values())

    def status(self) -> list[dict[str, object]]:
        now = self.clock()
        return [s.status(now) for s in self.states.values()]

    def acquire(self, name: str) -> None:
        state = self.states[name]
        state.inflight += 1
        if self.on_inflight is not None:
            self.on_inflight(state)

    def release(self, name: str) -> None:
        state = self.states[name]
        state.inflight -= 1
        if self.on_inflight is not None:
            self.on_inflight(state)

    def report_answer(self, name: str) -> None:
        """A complete answer: the failures counted toward ejecting a backend in service start again from zero. It
        never reinstates an ejected backend (one still answering a long stream when it was ejected): only a passing
        probe does."""
        state = self.states[name]
        if state.consecutive_failures and state.healthy:
            state.consecutive_failures = 0
            state.last_error = None
            self._changed(state)

    def report_success(self, name: str) -> None:
        """A passing probe: the backend is healthy (reinstated if it was ejected or never seen healthy)."""
        state = self.states[name]
        if state.consecutive_failures or not state.healthy:
            state.consecutive_failures = 0
            state.healthy = True
            state.last_error = None
            self._changed(state)

    def report_failure(self, name: str, reason: str) -> None:
        """A failed health check, connection or 5xx answer; ejects after ``eject_after_failures`` in a row."""
        state = self.states[name]
        state.consecutive_failures += 1
        state.last_error = reason
        if state.consecutive_failures >= self.health.eject_after_failures:
            was_available = state.available(self.clock())
            state.healthy = False
            state.ejected_until = self.clock() + self.health.eject_for_s
            if was_available:
                log.warning(
                    "backend %s ejected for %.0fs after %d consecutive failures (last: %s)",
                    name,
                    self.health.eject_for_s,
                    state.consecutive_failures,
                    reason,
                )
                if self.on_eject is not None:
                    self.on_eject(state)
        self._changed(state)

    async def check(self, state: BackendState) -> bool:
        """Probe one backend now (skipped while it is ejected)."""
        if self.clock() < state.ejected_until:
            return False
        first = state.last_check is None
        state.last_check = self.clock()
        try:
            ok = await asyncio.wait_for(state.backend.health(), self.health.timeout_s)
        except TimeoutError:
            ok = False
            reason = f"health check timed out after {self.health.timeout_s:g} s"
        except Exception as exc:  # a health probe must never take the loop down
            ok = False
            reason = f"health check failed: {type(exc).__name__}"
        else:  # the HTTP backends say why (connection refused, timed out, answered HTTP 503)
            detail = getattr(state.backend, "health_error", None)
            reason = f"health check failed: {detail}" if detail else "health check answered unhealthy"
        if ok:
            if not state.healthy:
                log.info("backend %s is healthy again", state.name)
            self.report_success(state.name)
        else:
            self.report_failure(state.name, reason)
            if first and state.healthy:  # never seen healthy (a wrong URL, an engine still loading): not used yet
                state.healthy = False
                log.warning("backend %s failed its first health check (%s): not used until one passes", state.name,
                            reason)  # fmt: skip
                self._changed(state)
        return ok

    async def check_all(self) -> None:
        await asyncio.gather(*(self.check(s) for s in self.states.values()))

    def start(self) -> None:
        """Start the periodic health checks (in the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="llmpath-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await asyncio.gather(*(s.backend.aclose() for s in self.states.values()), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await self.check_all()
            await asyncio.sleep(self.health.interval_s)

    def _changed(self, state: BackendState) -> None:
        if self.on_change is not None:
            self.on_change(state)
