"""Label and attribute text that every exporter can encode."""

from __future__ import annotations

import re
from typing import Any

#: Surrogate code points: a Python ``str`` holds them only unpaired (a JSON body's ``"\ud800"`` decodes to one), and
#: UTF-8 cannot encode them — the Prometheus exposition, the ledger, SQLite and OTLP would all fail on one.
_SURROGATES = re.compile("[\ud800-\udfff]")


def encodable(value: Any) -> str:
    """``str(value)`` with any unpaired surrogate replaced by U+FFFD (the replacement character)."""
    text = str(value)
    if text.isascii():
        return text
    return _SURROGATES.sub("\ufffd", text)
