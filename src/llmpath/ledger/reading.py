"""Opening a usage ledger whatever its format: JSON lines (gzip-compressed or not) or SQLite, told apart by the
file's first bytes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from llmpath.instrumentation.usage import GZIP_MAGIC, LedgerFormatError, UsageRecord, read_jsonl, read_sqlite

_SQLITE_MAGIC = b"SQLite format 3\x00"


def read_ledger(path: str | os.PathLike[str], since: float | None = None) -> Iterator[UsageRecord]:
    """The records of a JSON-lines (plain or gzip) or SQLite ledger (``since``: only those that started then or
    later, skipped cheaply). Raises ``OSError`` when the file cannot be read and
    :class:`~llmpath.instrumentation.usage.LedgerFormatError` (``path:line: reason``) at the first entry that is not
    a usage record."""
    with Path(path).open("rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head == _SQLITE_MAGIC:
        return read_sqlite(path, since)
    if head[:1] not in (b"", b"{", b" ", b"\n", b"\t", b"\r") and not head.startswith(GZIP_MAGIC):  # JSON or gzip
        raise LedgerFormatError(path, 1, "neither a JSON-lines nor a SQLite usage ledger")
    return read_jsonl(path, since)
