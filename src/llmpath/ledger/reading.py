"""Opening a usage ledger whatever its format: JSON lines (gzip-compressed or not) or SQLite, told apart by the
file's first bytes."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import math
import os
import sqlite3
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llmpath.instrumentation.usage import GZIP_MAGIC, LedgerFormatError, UsageRecord, read_jsonl, read_sqlite

_SQLITE_MAGIC = b"SQLite format 3\x00"
#: What reading a damaged file raises past the instrumentation's per-record checks: bytes that are not UTF-8, a
#: damaged or cut gzip stream, JSON nested too deeply for the parser.
_DAMAGE = (UnicodeDecodeError, zlib.error, EOFError, RecursionError)


def read_ledger(path: str | os.PathLike[str], since: float | None = None) -> Iterator[UsageRecord]:
    """The records of a JSON-lines (plain or gzip) or SQLite ledger (``since``: only those that started then or
    later, skipped cheaply). Raises ``OSError`` when the file cannot be read and
    :class:`~llmpath.instrumentation.usage.LedgerFormatError` (``path:line: reason``) at the first entry that is not
    a usage record: one whose fields have the wrong types, or a number that is not finite, included."""
    with Path(path).open("rb") as fh:
        head = fh.read(len(_SQLITE_MAGIC))
    if head == _SQLITE_MAGIC:
        return _checked(path, read_sqlite(path, since), sqlite=True, since=since)
    if head[:1] not in (b"", b"{", b" ", b"\n", b"\t", b"\r") and not head.startswith(GZIP_MAGIC):  # JSON or gzip
        raise LedgerFormatError(path, 1, "neither a JSON-lines nor a SQLite usage ledger")
    return _checked(path, read_jsonl(path, since), sqlite=False, since=since)


def record_problem(record: UsageRecord) -> str | None:
    """What makes ``record`` no usage record that the reports can use (types the instrumentation's reader does not
    check, numbers that are not finite), or None."""
    for name in ("request_id", "route", "model"):
        if not isinstance(getattr(record, name), str):
            return f"{name} is {getattr(record, name)!r}, not a string"
    for name in ("trace_id", "tenant", "error"):
        if not isinstance(getattr(record, name), str | None):
            return f"{name} is {getattr(record, name)!r}, not a string or null"
    for name in ("time", "duration_s", "ttft_s", "unattributed_s", "tpot_s"):
        value = getattr(record, name)
        if value is not None and not math.isfinite(value):
            return f"{name} is {value!r}, not a finite number"
    if not isinstance(record.extra, dict):
        return f"extra is {record.extra!r}, not an object"
    for i, stage in enumerate(record.stages):
        if not isinstance(stage.name, str) or not isinstance(stage.source, str):
            return f"stages[{i}]: name and source must be strings"
        for value in (stage.start_s, stage.duration_s):
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
                return f"stages[{i}]: start_s and duration_s must be finite numbers, not {value!r}"
    return None


def _checked(
    path: str | os.PathLike[str], records: Iterator[UsageRecord], *, sqlite: bool, since: float | None
) -> Iterator[UsageRecord]:
    """``records``, stopped with a :class:`LedgerFormatError` at the first that :func:`record_problem` refuses or at
    damage the reader did not name (located by reading the file again: only on that error path)."""
    count = 0
    try:
        for record in records:
            problem = record_problem(record)
            if problem is not None:
                where = _row_id(path, count, since) if sqlite else _first_bad_line(path)[0]
                raise LedgerFormatError(path, where, f"not a usage record: {problem}")
            count += 1
            yield record
    except _DAMAGE as exc:
        if sqlite:
            raise LedgerFormatError(path, _row_id(path, count, since), f"not a usage record: {exc}") from None
        line, reason = _first_bad_line(path)
        raise LedgerFormatError(path, line, reason or f"unreadable ({type(exc).__name__}: {exc})") from None


def _row_id(path: str | os.PathLike[str], offset: int, since: float | None) -> int:
    """The id of the row after the first ``offset`` rows a read (with ``since``) returned; 0 when unknown."""
    where, args = ("WHERE time >= ?", [since]) if since is not None else ("", [])
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as conn:
        try:
            row = conn.execute(f"SELECT id FROM usage {where} ORDER BY id LIMIT 1 OFFSET ?", [*args, offset]).fetchone()
        except sqlite3.Error:
            return 0
    return int(row[0]) if row is not None else 0


def _open_lines(path: str | os.PathLike[str]) -> io.BufferedIOBase:
    with Path(path).open("rb") as raw:
        compressed = raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return gzip.open(path, "rb") if compressed else Path(path).open("rb")


def _first_bad_line(path: str | os.PathLike[str]) -> tuple[int, str | None]:
    """The first line of a JSON-lines ledger that is no usable record, and why (``(0, None)`` if none is found).
    Mirrors the instrumentation's reader: a torn last line and llmpath's own damaged records are skipped."""
    number = 0
    try:
        with _open_lines(path) as fh:
            for number, raw in enumerate(fh, 1):  # noqa: B007 - the line reached is reported after the loop
                if not raw.endswith(b"\n"):
                    return 0, None
                problem = _line_problem(raw)
                if problem is not None:
                    return number, problem
    except (zlib.error, EOFError, gzip.BadGzipFile) as exc:
        return number + 1, f"the compressed data is damaged or cut short ({exc})"
    return 0, None


def _line_problem(raw: bytes) -> str | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (byte 0x{raw[exc.start]:02x} at column {exc.start + 1})"
    if not line.strip():
        return None
    try:
        data: Any = json.loads(line)
    except RecursionError:
        return "not a usage record: JSON nested too deeply"
    except ValueError:
        return None  # the reader reports (or skips, as a damaged record of its own) what is no JSON
    if not isinstance(data, dict):
        return None
    try:
        record = UsageRecord.from_dict(data)
    except (TypeError, ValueError, KeyError):
        return None  # reported by the reader
    problem = record_problem(record)
    return f"not a usage record: {problem}" if problem is not None else None
