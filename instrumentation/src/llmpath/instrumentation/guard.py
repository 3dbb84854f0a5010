"""Label-cardinality guard: caps the distinct values each label may take in llmpath's metrics."""

from __future__ import annotations

import threading
from collections.abc import Mapping

from llmpath.instrumentation.catalog import OVERFLOW_LABEL_VALUE, UNKNOWN_LABEL_VALUE, UNMATCHED_ROUTE

#: Default caps per label (distinct values per process). Labels not listed use ``"*"``.
DEFAULT_MAX_LABEL_VALUES: Mapping[str, int] = {"route": 100, "model": 100, "tenant": 1000, "stage": 64, "*": 100}
#: Placeholders llmpath itself puts in labels: admitted without taking one of the N slots.
RESERVED_LABEL_VALUES = frozenset((UNKNOWN_LABEL_VALUE, UNMATCHED_ROUTE, OVERFLOW_LABEL_VALUE))


class CardinalityGuard:
    """Admits the first N distinct values of each label; later new values become ``__other__``. llmpath's own
    placeholders (``unknown``, ``__unmatched__``) are always admitted and take no slot.

    One admitted set per label name, shared by every metric, so that a route or model is either present in all
    llmpath metrics or in none (joins between families stay consistent). ``max_values`` is an ``int`` (one cap for
    every label) or a mapping ``{label: cap}`` whose ``"*"`` entry is the default.
    """

    __slots__ = ("_caps", "_default_cap", "_lock", "_seen")

    def __init__(self, max_values: int | Mapping[str, int] = DEFAULT_MAX_LABEL_VALUES) -> None:
        if isinstance(max_values, int):
            caps: dict[str, int] = {}
            default = max_values
        else:
            caps = {k: v for k, v in max_values.items() if k != "*"}
            default = max_values.get("*", DEFAULT_MAX_LABEL_VALUES["*"])
        for label, cap in (*caps.items(), ("*", default)):
            if not isinstance(cap, int) or cap < 1:
                raise ValueError(f"max_label_values[{label!r}] must be a positive int, got {cap!r}")
        self._caps = caps
        self._default_cap = default
        self._seen: dict[str, set[str]] = {}
        self._lock = threading.Lock()

    def cap(self, label: str) -> int:
        """The cap for ``label``."""
        return self._caps.get(label, self._default_cap)

    def admit(self, label: str, value: str) -> str:
        """``value`` if it is (or can still become) one of the label's admitted values, else ``__other__``."""
        seen = self._seen.get(label)
        if (seen is not None and value in seen) or value in RESERVED_LABEL_VALUES:
            return value
        with self._lock:
            seen = self._seen.setdefault(label, set())
            if value in seen:
                return value
            if len(seen) < self.cap(label):
                seen.add(value)
                return value
        return OVERFLOW_LABEL_VALUE

    def admitted(self, label: str) -> frozenset[str]:
        """The values admitted so far for ``label``."""
        return frozenset(self._seen.get(label, ()))
