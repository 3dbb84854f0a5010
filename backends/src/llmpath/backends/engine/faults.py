"""Fault injection for tests and demos: slower prefill or decode, an added queue delay, and injected server errors.

Off unless the engine runs with ``--enable-fault-injection``; controlled by ``POST|GET|DELETE /debug/fault``.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class FaultState:
    #: Prefill takes this many times its real duration (the engine sleeps for the difference after the forward).
    prefill_slowdown: float = 1.0
    #: Each decode step takes this many times its real duration (a slow or throttled GPU: time per output token).
    decode_slowdown: float = 1.0
    #: Seconds every request waits in the queue before it may be scheduled.
    queue_delay_s: float = 0.0
    #: Probability that a request is answered with an injected HTTP 500.
    error_rate: float = 0.0
    #: Probability that a forward step raises, as a device error would: every request in flight fails (HTTP 500).
    step_error_rate: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


_LIMITS = {
    "prefill_slowdown": (1.0, 1000.0, "a factor ≥ 1"),
    "decode_slowdown": (1.0, 1000.0, "a factor ≥ 1"),
    "queue_delay_s": (0.0, 3600.0, "seconds ≥ 0"),
    "error_rate": (0.0, 1.0, "a probability in [0, 1]"),
    "step_error_rate": (0.0, 1.0, "a probability in [0, 1]"),
}


class FaultInjector:
    """Thread-safe fault state shared by the HTTP server and the scheduler thread."""

    def __init__(self, seed: int | None = None) -> None:
        self._lock = threading.Lock()
        self._state = FaultState()
        self._rng = random.Random(seed)

    @property
    def state(self) -> FaultState:
        return self._state

    def update(self, changes: Mapping[str, Any]) -> FaultState:
        """Apply a partial update; a ``ValueError`` names the bad field and leaves the state unchanged."""
        if not isinstance(changes, Mapping):
            raise ValueError("the body must be a JSON object")
        values = self._state.to_dict()
        for key, value in changes.items():
            if key not in _LIMITS:
                raise ValueError(f"unknown fault {key!r}; known: {', '.join(_LIMITS)}")
            lo, hi, what = _LIMITS[key]
            if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
                raise ValueError(f"{key} must be {what} (≤ {hi:g}), got {value!r}")
            values[key] = float(value)
        with self._lock:
            self._state = FaultState(**values)
        return self._state

    def clear(self) -> FaultState:
        with self._lock:
            self._state = FaultState()
        return self._state

    def should_fail(self) -> bool:
        """Whether to answer this request with an injected HTTP 500 (``error_rate``)."""
        return self._draw(self._state.error_rate)

    def check_step(self) -> None:
        """Raise :class:`InjectedStepFailure` for a forward step drawn to fail (``step_error_rate``)."""
        if self._draw(self._state.step_error_rate):
            raise InjectedStepFailure("injected forward step failure (step_error_rate)")

    def _draw(self, rate: float) -> bool:
        if rate <= 0.0:
            return False
        with self._lock:
            return self._rng.random() < rate


class InjectedStepFailure(RuntimeError):
    """A forward step failed on purpose (fault injection)."""
