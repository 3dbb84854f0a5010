"""Checked reading of the numbers a backend reports: token counts and durations.

A server's figures go into counters, histograms, the usage ledger and the client's ``usage``, so a value that
cannot be one (``null``, a boolean, a negative, ``NaN``, ``1e300``, a duration of more than a day) is refused here
instead of turning into a Python exception, an overflow or a counter that jumps.
"""

from __future__ import annotations

import math
from typing import Any

#: The largest token count taken from a backend: far above any model's context, far below what breaks a JSON
#: encoder (64-bit integers) or makes a counter meaningless.
MAX_TOKEN_COUNT = 100_000_000
#: The longest duration taken from a backend: no request runs for a day (a ``1e300`` queue time would make the
#: stage histograms' sums, and every rate derived from them, meaningless).
MAX_SECONDS = 86_400.0


def token_count(value: Any) -> int | None:
    """``value`` as a token count, or ``None`` when it is none: an ``int`` (or an integral float such as ``12.0``, or
    a string of ASCII digits) from 0 to :data:`MAX_TOKEN_COUNT`; booleans, negatives, fractions, ``NaN`` and ``inf`` are
    not counts."""
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        value = int(text) if text.isascii() and text.isdigit() and len(text) <= 10 else None
    elif isinstance(value, float):
        value = int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, int) and 0 <= value <= MAX_TOKEN_COUNT:
        return value
    return None


def seconds(value: Any, at_most: float = MAX_SECONDS) -> float | None:
    """``value`` as a duration in seconds, or ``None`` when it is none: a finite, non-negative number (not a
    boolean) no longer than ``at_most``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and 0.0 <= value <= at_most else None


def between(start: Any, end: Any, at_most: float = MAX_SECONDS) -> float | None:
    """Seconds from the server timestamp ``start`` to ``end`` (0 when ``end`` is earlier: the server's clock moved),
    if both are finite numbers and the span is no longer than ``at_most``."""
    if isinstance(start, bool) or isinstance(end, bool):
        return None
    if not (isinstance(start, int | float) and isinstance(end, int | float)):
        return None
    span = float(end) - float(start)
    if not math.isfinite(span):
        return None
    return seconds(max(span, 0.0), at_most)
