"""The usage ledger: one record per finished request, written to durable sinks (JSON lines, SQLite).

Records carry ids, labels, token counts and timings only — never prompt or completion text, never API keys.
"""

from __future__ import annotations

import gzip
import inspect
import json
import logging
import math
import os
import re
import sqlite3
import threading
import weakref
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from operator import itemgetter
from pathlib import Path
from random import random
from time import monotonic, sleep
from typing import IO, Any, NamedTuple, Protocol, runtime_checkable

from .append import append_all

logger = logging.getLogger("llmpath.instrumentation.usage")


class StageTiming(NamedTuple):
    """One occurrence of a stage in a request: offset from the request start, duration, and who measured it."""

    name: str
    start_s: float
    duration_s: float
    source: str = "gateway"


@dataclass(slots=True)
class UsageRecord:
    """Token accounting and timings of one finished request (success or failure)."""

    request_id: str
    trace_id: str | None
    #: Request start, seconds since the epoch.
    time: float
    tenant: str | None
    route: str
    model: str
    input_tokens: int
    cached_tokens: int
    output_tokens: int
    stages: list[StageTiming]
    ttft_s: float | None
    duration_s: float
    status_code: int
    #: Pre-first-token time no stage covers (``None`` without a first token).
    unattributed_s: float | None = None
    #: Mean time per output token after the first (``None`` with fewer than two output tokens).
    tpot_s: float | None = None
    #: ``None`` on success; else a short, content-free error type (exception class, ``client_disconnect``).
    error: str | None = None
    #: Fields the gateway added with ``annotate_request`` (backend, routing reason, matched prefix tokens, ...).
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (stages as a list of dicts)."""
        return {
            "request_id": self.request_id,
            "trace_id": self.trace_id,
            "time": self.time,
            "tenant": self.tenant,
            "route": self.route,
            "model": self.model,
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "output_tokens": self.output_tokens,
            "stages": [s._asdict() for s in self.stages],
            "ttft_s": self.ttft_s,
            "duration_s": self.duration_s,
            "status_code": self.status_code,
            "unattributed_s": self.unattributed_s,
            "tpot_s": self.tpot_s,
            "error": self.error,
            "extra": self.extra,
        }

    def to_json(self) -> str:
        """One compact JSON line (no trailing newline); times in seconds with microsecond precision."""
        return self.json_line()[:-1].decode()

    def json_line(self) -> bytes:
        """:meth:`to_json` as the ledger writes it: UTF-8 with the newline. Hand-rolled for the hot path (several
        times faster than ``json.dumps(to_dict())``) with the same keys."""
        return usage_line(
            self.request_id,
            self.trace_id,
            self.time,
            self.tenant,
            self.route,
            self.model,
            self.input_tokens,
            self.cached_tokens,
            self.output_tokens,
            self.stages,
            None,
            self.ttft_s,
            self.duration_s,
            self.status_code,
            self.unattributed_s,
            self.tpot_s,
            self.error,
            self.extra,
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UsageRecord:
        """The inverse of :meth:`to_dict` (unknown keys are ignored, for forward compatibility)."""
        known = {f: data[f] for f in cls.__dataclass_fields__ if f in data}
        known["stages"] = [StageTiming(**s) for s in data.get("stages", ())]
        known.setdefault("extra", {})
        return cls(**known)


_LINE_HEAD = (
    '{"request_id":%s,"trace_id":%s,"time":%.6f,"tenant":%s,"route":%s,"model":%s,'
    '"input_tokens":%d,"cached_tokens":%d,"output_tokens":%d,"stages":['
)
_LINE_TAIL = '],"ttft_s":%s,"duration_s":%.6f,"status_code":%d,"unattributed_s":%s,"tpot_s":%s,"error":%s,"extra":%s}\n'
_STAGE_JSON = '{"name":%s,"start_s":%%.6f,"duration_s":%%.6f,"source":%s}'
#: Stage shape (the ``(name, source)`` of each stage, in order) → the whole line's template with every value left
#: to fill. Requests of one code path share a shape, so a line is one ``%`` operation.
_LINE_TEMPLATES: dict[tuple[tuple[str, str], ...], str] = {}
_MAX_LINE_TEMPLATES = 1024
_SHAPE = itemgetter(0, 3)


def _template_string(text: str) -> str:
    """``text`` as a JSON string inside a ``%`` template: a ``%`` in it is a literal, not a conversion."""
    return encode_basestring(text).replace("%", "%%")


def _line_template(shape: tuple[tuple[str, str], ...]) -> str:
    lit = _template_string
    stages = ",".join(_STAGE_JSON % (lit(name), lit(source)) for name, source in shape)
    template = _LINE_HEAD + stages + _LINE_TAIL
    if len(_LINE_TEMPLATES) < _MAX_LINE_TEMPLATES:
        _LINE_TEMPLATES[shape] = template
    return template


def usage_line(
    request_id: str,
    trace_id: str | None,
    time: float,
    tenant: str | None,
    route: str,
    model: str,
    input_tokens: int,
    cached_tokens: int,
    output_tokens: int,
    stages: Sequence[tuple[str, float, float, str]],
    origin: float | None,
    ttft_s: float | None,
    duration_s: float,
    status_code: int,
    unattributed_s: float | None,
    tpot_s: float | None,
    error: str | None,
    extra: dict[str, Any] | None,
) -> bytes:
    """A usage record as one JSON line with its newline, the same bytes as :meth:`UsageRecord.json_line`, made
    without building a :class:`UsageRecord`. ``stages`` are ``(name, start, end, source)`` intervals in the clock
    of ``origin`` (the request start), or, with ``origin=None``, :class:`StageTiming` offsets and durations.
    Times are in seconds with microsecond precision."""
    shape = tuple(map(_SHAPE, stages))
    template = _LINE_TEMPLATES.get(shape) or _line_template(shape)
    enc = encode_basestring
    values: list[Any] = [
        enc(request_id),
        "null" if trace_id is None else enc(trace_id),
        time,
        "null" if tenant is None else enc(tenant),
        enc(route),
        enc(model),
        input_tokens,
        cached_tokens,
        output_tokens,
    ]
    append = values.append
    if origin is None:
        for _, start, duration, _ in stages:
            append(start)
            append(duration)
    else:
        for _, s, e, _ in stages:
            append(s - origin)
            append(e - s)
    values += (
        "null" if ttft_s is None else format(ttft_s, ".6f"),
        duration_s,
        status_code,
        "null" if unattributed_s is None else format(unattributed_s, ".6f"),
        "null" if tpot_s is None else format(tpot_s, ".6f"),
        "null" if error is None else enc(error),
        extra_json(extra),
    )
    return (template % tuple(values)).encode()


def extra_json(extra: dict[str, Any] | None) -> str:
    """A record's ``extra`` as compact JSON (values JSON cannot hold, and keys of nested dicts it cannot hold such as
    tuples, are written with ``str``). A non-finite number (``NaN``, ``inf``: JSON has no spelling for them, and strict
    readers such as ``jq`` refuse the line) is ``null``."""
    if not extra:
        return "{}"
    try:
        return json.dumps(extra, separators=(",", ":"), default=str, allow_nan=False)
    except (ValueError, TypeError):  # a non-finite number, or a key json refuses
        return json.dumps(_plain(extra), separators=(",", ":"), default=str)


_JSON_KEYS = (str, int, float, bool, type(None))


def _plain(value: Any) -> Any:
    """``value`` with every non-finite float, however deep in dicts, lists and tuples, replaced by ``None``, and
    every dict key json cannot write replaced by its ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k if isinstance(k, _JSON_KEYS) else str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def stages_json(stages: Iterable[StageTiming]) -> str:
    """The ``stages`` list as JSON (microsecond precision), as in a usage line."""
    lit = _template_string
    return "[" + ",".join(_STAGE_JSON % (lit(n), lit(src)) % (s, d) for n, s, d, src in stages) + "]"


@runtime_checkable
class UsageSink(Protocol):
    """Anything with ``write(record)``; ``close()`` is optional. A plain callable ``f(record)`` also works."""

    def write(self, record: UsageRecord) -> None: ...


SinkLike = UsageSink | Callable[[UsageRecord], Any]


class JsonlUsageSink:
    """Appends one JSON line per record to ``path`` and hands it to the kernel before returning.

    Each record is a single ``write(2)`` on an ``O_APPEND`` descriptor (made without releasing the GIL, see
    :mod:`llmpath.instrumentation.append`), so records survive the process being
    killed (SIGKILL) as soon as ``write`` returns, and several worker processes can share one file without
    interleaving lines. ``fsync=True`` also survives power loss, at the cost of a disk flush per record.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self._fd: int | None = None
        self._lock = threading.Lock()
        #: A write failed (a full disk may have taken part of its line): the next record starts on a new line.
        self._cut = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _reopen_after_fork(ref))

    def _forget_descriptor(self) -> None:
        """In a forked child: drop the parent's descriptor; the next write opens the file again."""
        fd, self._fd = self._fd, None
        self._lock = threading.Lock()
        if fd is not None:
            os.close(fd)

    def write(self, record: UsageRecord) -> None:
        """Append ``record`` as one line."""
        self.write_line(record.json_line())

    def write_line(self, line: bytes) -> None:
        """Append one record already serialised by :meth:`UsageRecord.json_line` (with its newline)."""
        with self._lock:
            fd = self._fd
            if fd is None:
                fd = self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            if self._cut:  # end the torn line a failed write may have left, so that this record stays whole
                line = b"\n" + line
            try:
                append_all(fd, line)
            except OSError:
                self._cut = True
                raise
            self._cut = False
            if self.fsync:
                os.fsync(fd)

    def close(self) -> None:
        """Close the file (a later ``write`` reopens it)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)

    def __repr__(self) -> str:
        return f"JsonlUsageSink({str(self.path)!r})"


def _reopen_after_fork(ref: weakref.ref[JsonlUsageSink]) -> None:
    sink = ref()
    if sink is not None:
        sink._forget_descriptor()


#: First bytes of a gzip file (a compressed, rotated ledger).
GZIP_MAGIC = b"\x1f\x8b"


class LedgerFormatError(ValueError):
    """A ledger entry that is not a usage record: ``path``, ``line`` (1-based; the row id in SQLite) and why."""

    def __init__(self, path: str | os.PathLike[str], line: int, reason: str) -> None:
        super().__init__(f"{path}:{line}: {reason}")
        self.path, self.line, self.reason = str(path), line, reason


def read_jsonl(path: str | os.PathLike[str], since: float | None = None) -> Iterator[UsageRecord]:
    """Records of a JSON-lines ledger, gzip-compressed or not (a rotated one); a torn last line (a crash
    mid-write) is skipped, and so is a torn record inside (a write a full disk cut short: the sink ends it with a
    newline), with a warning naming its line. Any other line that is not a record raises
    :class:`LedgerFormatError` naming it.

    ``since`` (epoch seconds): only records that started then or later. Lines written by llmpath that started
    earlier are skipped without being parsed (their time is read from the line's start), so a query over the last
    hour of a large ledger reads it at the speed of the disk."""
    with _open_text(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith("\n"):
                return
            if since is not None and (head := _LINE_TIME.match(line)) is not None and float(head[1]) < since:
                continue
            if line.strip():
                try:
                    record = _record(path, number, json.loads, line)
                except LedgerFormatError:
                    if not _is_damaged_record(line):
                        raise
                    logger.warning("%s:%d: %s: skipped", path, number, _DAMAGED)
                    continue
                if since is None or record.time >= since:
                    yield record


#: The start time of a line written by llmpath (:func:`usage_line` and :meth:`UsageRecord.json_line` put the keys
#: in this order), read without parsing the line.
_LINE_TIME = re.compile(
    r'\{"request_id":"(?:[^"\\]|\\.)*","trace_id":(?:null|"[0-9a-f]*"),"time":(-?[0-9]+(?:\.[0-9]+)?),'
)


_DAMAGED = "a damaged usage record (a write cut short, or corrupted)"


def _is_damaged_record(line: str) -> bool:
    """A line that starts as a record llmpath wrote but is no JSON: one whose write was cut short, or corrupted."""
    if not line.startswith('{"request_id":'):
        return False
    try:
        json.loads(line)
    except ValueError:
        return True
    return False


def _open_text(path: str | os.PathLike[str]) -> IO[str]:
    """``path`` as UTF-8 text, decompressing it when it is gzip."""
    with Path(path).open("rb") as raw:
        compressed = raw.read(len(GZIP_MAGIC)) == GZIP_MAGIC
    return gzip.open(path, "rt", encoding="utf-8") if compressed else Path(path).open(encoding="utf-8")


def read_sqlite(path: str | os.PathLike[str], since: float | None = None) -> Generator[UsageRecord, None, None]:
    """Records of a SQLite ledger (:class:`SqliteUsageSink`), in insertion order, opened read-only (``since``:
    only records that started then or later)."""
    uri = f"{Path(path).resolve().as_uri()}?mode=ro"
    # Read-only and private to this generator, which may be resumed, closed or garbage-collected in another thread
    # than the one that started it (an async caller's worker threads): closing it there must work.
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
        where, args = ("WHERE time >= ?", (since,)) if since is not None else ("", ())
        cur = conn.execute(f"SELECT id, {', '.join(_COLUMNS)} FROM usage {where} ORDER BY id", args)
        for row_id, *row in cur:
            yield _record(path, row_id, _row_dict, row)
    except sqlite3.DatabaseError as exc:  # not a database, or no usage table
        raise LedgerFormatError(path, 0, f"not a llmpath SQLite ledger ({exc})") from None
    finally:
        conn.close()


def _row_dict(row: Sequence[Any]) -> dict[str, Any]:
    data = dict(zip(_COLUMNS, row, strict=True))
    data["stages"] = json.loads(data["stages"])
    data["extra"] = json.loads(data["extra"] or "{}")
    return data


_NUMBERS: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("input_tokens", "cached_tokens", "output_tokens", "status_code"), (int,)),
    **dict.fromkeys(("time", "duration_s"), (int, float)),
    **dict.fromkeys(("ttft_s", "unattributed_s", "tpot_s"), (int, float, type(None))),
}


def _record(path: str | os.PathLike[str], line: int, parse: Callable[[Any], Any], raw: Any) -> UsageRecord:
    """The record ``parse(raw)`` describes, or :class:`LedgerFormatError` at ``path:line`` saying what is wrong."""
    try:
        data = parse(raw)
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
        for name, types in _NUMBERS.items():
            value = data.get(name)
            if name in data and (not isinstance(value, types) or isinstance(value, bool)):
                raise TypeError(f"{name} is {value!r}, not a number")
        return UsageRecord.from_dict(data)
    except (ValueError, TypeError, KeyError) as exc:
        raise LedgerFormatError(path, line, f"not a usage record: {exc}") from None


_SCALAR_COLUMNS: tuple[tuple[str, str], ...] = (
    ("request_id", "TEXT NOT NULL"),
    ("trace_id", "TEXT"),
    ("time", "REAL NOT NULL"),
    ("tenant", "TEXT"),
    ("route", "TEXT NOT NULL"),
    ("model", "TEXT NOT NULL"),
    ("input_tokens", "INTEGER NOT NULL"),
    ("cached_tokens", "INTEGER NOT NULL"),
    ("output_tokens", "INTEGER NOT NULL"),
    ("ttft_s", "REAL"),
    ("duration_s", "REAL NOT NULL"),
    ("status_code", "INTEGER NOT NULL"),
    ("unattributed_s", "REAL"),
    ("tpot_s", "REAL"),
    ("error", "TEXT"),
)
_JSON_COLUMNS: tuple[str, ...] = ("stages", "extra")
_COLUMNS: tuple[str, ...] = (*(c for c, _ in _SCALAR_COLUMNS), *_JSON_COLUMNS)


class SqliteUsageSink:
    """Inserts one row per record into table ``usage`` of a SQLite database in WAL mode, committed per record.

    WAL with ``synchronous=NORMAL`` keeps every committed record across a process crash (SIGKILL); use
    ``synchronous="FULL"`` to survive power loss too. ``stages`` and ``extra`` are JSON text columns.
    Several processes may write to one database (``busy_timeout`` serialises them).
    """

    def __init__(
        self, path: str | os.PathLike[str], *, synchronous: str = "NORMAL", busy_timeout_ms: int = 5000
    ) -> None:
        if synchronous.upper() not in {"OFF", "NORMAL", "FULL", "EXTRA"}:
            raise ValueError(f"synchronous must be OFF, NORMAL, FULL or EXTRA, got {synchronous!r}")
        self.path = Path(path)
        self.synchronous = synchronous.upper()
        self.busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._pid = 0
        self._lock = threading.Lock()
        self._insert = f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)})"
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def _connection(self) -> sqlite3.Connection:
        pid = os.getpid()
        if self._conn is None or self._pid != pid:  # never share a connection across a fork
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            try:
                self._set_up(conn)
            except BaseException:
                conn.close()
                raise
            self._conn, self._pid = conn, pid
        return self._conn

    def _set_up(self, conn: sqlite3.Connection) -> None:
        """Pragmas, table and indexes; retried while the database is busy, for up to ``busy_timeout_ms``.

        SQLite answers "database is locked" at once, without waiting for the busy timeout, where waiting could
        deadlock: several processes switching a new database (rollback journal) to WAL at the same moment, as the
        workers of a server starting together do, run into that."""
        deadline = monotonic() + self.busy_timeout_ms / 1000
        columns = ", ".join(f"{c} {t}" for c, t in _SCALAR_COLUMNS)
        while True:
            try:
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout_ms)}")
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute(f"PRAGMA synchronous={self.synchronous}")
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS usage "
                    f"(id INTEGER PRIMARY KEY, {columns}, stages TEXT NOT NULL, extra TEXT)"
                )
                conn.execute("CREATE INDEX IF NOT EXISTS usage_time ON usage (time)")
                conn.execute("CREATE INDEX IF NOT EXISTS usage_tenant_time ON usage (tenant, time)")
                return
            except sqlite3.OperationalError as exc:
                busy = (getattr(exc, "sqlite_errorcode", 0) & 0xFF) in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
                if not busy or monotonic() >= deadline:
                    raise
                sleep(0.005 + random() * 0.02)  # jittered: the workers that collided try again apart

    def write(self, record: UsageRecord) -> None:
        """Insert and commit ``record``."""
        values = [getattr(record, c) for c, _ in _SCALAR_COLUMNS]
        values.append(stages_json(record.stages))
        values.append(extra_json(record.extra))
        with self._lock:
            self._connection().execute(self._insert, values)  # autocommit: one transaction per record

    def read_all(self) -> list[UsageRecord]:
        """Every record, in insertion order (for tests, exports and small ledgers)."""
        with self._lock:
            cur = self._connection().execute(f"SELECT id, {', '.join(_COLUMNS)} FROM usage ORDER BY id")
            rows = cur.fetchall()
        return [_record(self.path, row_id, _row_dict, row) for row_id, *row in rows]

    def close(self) -> None:
        """Close the connection (a later ``write`` reopens it)."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __repr__(self) -> str:
        return f"SqliteUsageSink({str(self.path)!r})"


#: A failing sink logs at most one line per this many seconds (with how many records it lost meanwhile).
FAILURE_LOG_INTERVAL_S = 60.0


def sink_name(sink: object) -> str:
    """A sink's short, stable name: the ``sink`` label of ``llmpath_usage_record_failures_total`` and its log lines
    (``jsonl``, ``sqlite``, else the class or function name; never a path or a credential)."""
    if isinstance(sink, JsonlUsageSink):
        return "jsonl"
    if isinstance(sink, SqliteUsageSink):
        return "sqlite"
    if inspect.isfunction(sink) or inspect.ismethod(sink) or inspect.isbuiltin(sink):
        return str(sink.__qualname__)
    return type(sink).__name__


class UsageDispatcher:
    """Hands each record to every sink; a failing sink never breaks the request.

    A failure is counted (``on_failure(sink_name)``: the instrumentation's ``llmpath_usage_record_failures_total``)
    and logged with its type and message only: at most one line per sink every :data:`FAILURE_LOG_INTERVAL_S`,
    failures or its recovery, with how many failed meanwhile (a full disk fails every request; a locked database
    fails now and then). A recovery is said with the first record written once the minute is over.

    Sinks with ``write_line(bytes)`` (:class:`JsonlUsageSink`) take the serialised line; when every sink does,
    :attr:`needs_records` is false and the instrumentation serialises requests straight into lines (no
    :class:`UsageRecord` is built).
    """

    __slots__ = (
        "_failing",
        "_line_sinks",
        "_log_lock",
        "_logged_at",
        "_object_sinks",
        "_on_failure",
        "_paths",
        "_sinks",
        "needs_records",
    )

    def __init__(
        self, sinks: SinkLike | Sequence[SinkLike] | None, on_failure: Callable[[str], Any] | None = None
    ) -> None:
        if sinks is None:
            items: Iterable[SinkLike] = ()
        elif isinstance(sinks, list | tuple):
            items = sinks
        else:
            items = (sinks,)  # type: ignore[assignment]  # one sink (a Sequence is handled above)
        lines: list[tuple[str, Callable[[bytes], Any]]] = []
        objects: list[tuple[str, Callable[[UsageRecord], Any]]] = []
        #: Sink name → the ledger's file, for the log (JSON lines and SQLite only: another sink's repr could hold a
        #: credential, a database URL say).
        self._paths: dict[str, str] = {}
        for sink in items:
            name = sink_name(sink)
            if name in self._paths:  # a second sink of the same kind: jsonl_2, ...
                name = next(f"{name}_{i}" for i in range(2, len(self._paths) + 3) if f"{name}_{i}" not in self._paths)
            self._paths[name] = str(sink.path) if isinstance(sink, JsonlUsageSink | SqliteUsageSink) else ""
            write_line = getattr(sink, "write_line", None)
            write = getattr(sink, "write", None)
            if callable(write_line):
                lines.append((name, write_line))
            elif callable(write):
                objects.append((name, write))
            elif callable(sink):
                objects.append((name, sink))
            else:
                raise TypeError(f"usage_sink must be a sink with write(record), a callable or a list; got {sink!r}")
        self._sinks = tuple(items)
        self._line_sinks = tuple(lines)
        self._object_sinks = tuple(objects)
        self._on_failure = on_failure
        #: Sinks whose failures (or recovery) are not all logged yet: name → failures not logged yet.
        self._failing: dict[str, int] = {}
        #: When a line about each sink was last logged (kept after a recovery: one line a minute, whatever it says).
        self._logged_at: dict[str, float] = {}
        self._log_lock = threading.Lock()
        #: Whether a sink needs :class:`UsageRecord` objects (else :meth:`emit_line` is enough).
        self.needs_records = bool(objects)

    def __bool__(self) -> bool:
        return bool(self._sinks)

    @property
    def sink_names(self) -> tuple[str, ...]:
        """The sinks' names: :func:`sink_name`, with ``_2``, ``_3``... for further sinks of the same kind."""
        return tuple(self._paths)

    def emit(self, record: UsageRecord) -> None:
        """Write ``record`` to every sink."""
        for name, write in self._object_sinks:
            self._call(name, write, record, record.request_id)
        if self._line_sinks:
            self.emit_line(record.json_line(), record.request_id)

    def emit_line(self, line: bytes, request_id: str) -> None:
        """Write a serialised record (with its newline) to the line sinks."""
        for name, write_line in self._line_sinks:
            self._call(name, write_line, line, request_id)

    def _call(self, name: str, write: Callable[[Any], Any], item: Any, request_id: str) -> None:
        try:
            write(item)
        except Exception as exc:  # a ledger failure must never break the request
            self._failed(name, exc, request_id)
        else:
            if self._failing and name in self._failing:  # the healthy path: one check of an empty dict
                self._succeeded(name)

    def _where(self, name: str) -> str:
        where = self._paths.get(name)
        return f" ({where})" if where else ""

    def _failed(self, name: str, exc: Exception, request_id: str) -> None:
        if self._on_failure is not None:
            try:
                self._on_failure(name)
            except Exception:  # the counter must not be what breaks the request
                logger.exception("counting a usage sink failure failed")
        with self._log_lock:
            unlogged = self._failing.get(name, 0)
            if not self._may_log(name):
                self._failing[name] = unlogged + 1
                return
            self._failing[name] = 0
        more = f" ({unlogged} more failed since the last message)" if unlogged else ""
        logger.error(
            "usage sink %s%s failed for request %s: %s: %s%s",
            name, self._where(name), request_id, type(exc).__name__, exc, more,
        )  # fmt: skip

    def _succeeded(self, name: str) -> None:
        """A write of a sink whose failure (or recovery) is not logged yet: its recovery, when a line is due."""
        with self._log_lock:
            unlogged = self._failing.get(name)
            if unlogged is None or not self._may_log(name):
                return  # another thread said it; or said at the first record once the minute is over
            del self._failing[name]
        more = f"{unlogged} more failed since the last message; " if unlogged else ""
        logger.warning(
            "usage sink %s%s writes again (%sllmpath_usage_record_failures_total counts every failure)",
            name, self._where(name), more,
        )  # fmt: skip

    def _may_log(self, name: str) -> bool:
        """Whether a line about sink ``name`` may be logged now (then it counts as logged); under the lock."""
        now = monotonic()
        last = self._logged_at.get(name)
        if last is not None and now - last < FAILURE_LOG_INTERVAL_S:
            return False
        self._logged_at[name] = now
        return True

    def close(self) -> None:
        """Close the sinks that have ``close()``; a failure is logged as a failed write is: the sink's name and
        ledger file, never its repr (which could hold a credential)."""
        for sink, name in zip(self._sinks, self._paths, strict=True):
            close = getattr(sink, "close", None)
            if callable(close):
                try:
                    close()
                except Exception as exc:
                    logger.warning(
                        "closing usage sink %s%s failed: %s: %s", name, self._where(name), type(exc).__name__, exc
                    )
