"""The usage ledger: record contents, sinks (JSONL, SQLite, callables, lists), failures and privacy."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI

from llmpath.instrumentation import (
    JsonlUsageSink,
    SqliteUsageSink,
    StageTiming,
    UsageRecord,
    instrument_app,
    read_jsonl,
    read_sqlite,
)
from llmpath.instrumentation.usage import UsageDispatcher, stages_json, usage_line

BODY = {"model": "tiny-llama", "messages": [{"role": "user", "content": "SECRET-PROMPT-TEXT"}]}


def sample_record(**overrides: Any) -> UsageRecord:
    fields: dict[str, Any] = {
        "request_id": "r1",
        "trace_id": "4bf92f3577b34da6a3ce929d0e0e4736",
        "time": 1_790_000_000.25,
        "tenant": "acme",
        "route": "chat",
        "model": "tiny-llama",
        "input_tokens": 120,
        "cached_tokens": 96,
        "output_tokens": 5,
        "stages": [StageTiming("auth", 0.001, 0.002, "gateway"), StageTiming("prefill", 0.01, 0.02, "backend")],
        "ttft_s": 0.031,
        "duration_s": 0.05,
        "status_code": 200,
        "unattributed_s": 0.008,
        "tpot_s": 0.00475,
        "error": None,
        "extra": {"backend": "engine-a", "matched_prefix_tokens": 96},
    }
    fields.update(overrides)
    return UsageRecord(**fields)


async def test_record_contents(harness):
    async with harness.client() as c:
        r = await c.post("/v1/chat/completions", json=BODY)
    [rec] = harness.records
    assert rec.request_id == r.headers["x-request-id"]
    assert rec.trace_id == format(harness.span("POST /v1/chat/completions").context.trace_id, "032x")
    assert (rec.tenant, rec.route, rec.model) == ("acme", "chat", "tiny-llama")
    assert (rec.input_tokens, rec.cached_tokens, rec.output_tokens) == (120, 96, 5)
    assert rec.status_code == 200 and rec.error is None
    names = [s.name for s in rec.stages]
    assert names == ["auth", "validate", "route", "assemble", "cache_lookup", "schedule", "prefill", "decode"]
    assert all(b.start_s >= a.start_s for a, b in zip(rec.stages, rec.stages[1:], strict=False))
    assert rec.stages[0].source == "gateway" and rec.stages[-1].source == "backend"
    assert rec.extra == {"backend": "engine-a", "matched_prefix_tokens": 96}
    assert 0 < rec.ttft_s < rec.duration_s
    assert "SECRET-PROMPT-TEXT" not in rec.to_json()


async def test_every_request_gets_exactly_one_record_success_or_failure(harness):
    async with harness.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
        await c.get("/teapot")
        await c.get("/nowhere")
        await c.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
        with pytest.raises(RuntimeError):
            await c.get("/boom")
    codes = [r.status_code for r in harness.records]
    assert codes == [200, 418, 404, 422, 500]
    assert len({r.request_id for r in harness.records}) == 5
    assert harness.records[-1].error == "RuntimeError"
    assert all(r.error is None for r in harness.records[:-1])


def test_json_roundtrip_and_microsecond_precision():
    rec = sample_record(extra={"odd": {1, 2}, "backend": "a"})
    data = json.loads(rec.to_json())
    assert data["extra"]["backend"] == "a" and isinstance(data["extra"]["odd"], str)
    back = UsageRecord.from_dict(data)
    assert back.stages == rec.stages
    assert back.ttft_s == pytest.approx(rec.ttft_s, abs=1e-6)
    assert json.loads(sample_record().to_json()) == json.loads(json.dumps(sample_record().to_dict()))
    assert UsageRecord.from_dict({**sample_record().to_dict(), "future_field": 1}).request_id == "r1"


def test_non_finite_extra_values_are_written_as_null_in_both_ledgers(tmp_path) -> None:
    def strict(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")  # what jq and other strict readers do with NaN

    extra = {"ratio": float("nan"), "nested": {"wait_s": float("inf"), "tries": [1.5, float("-inf")]}, "ok": 2.5}
    record = sample_record(extra=extra)
    data = json.loads(record.to_json(), parse_constant=strict)
    assert data["extra"] == {"ratio": None, "nested": {"wait_s": None, "tries": [1.5, None]}, "ok": 2.5}
    sink = SqliteUsageSink(tmp_path / "usage.db")
    sink.write(record)
    [back] = sink.read_all()
    sink.close()
    assert back.extra == data["extra"]


def test_jsonl_sink_appends_flushed_lines_and_reader_skips_a_torn_tail(tmp_path):
    path = tmp_path / "ledger" / "usage.jsonl"
    sink = JsonlUsageSink(path)
    sink.write(sample_record(request_id="a"))
    sink.write(sample_record(request_id="b", tenant=None, trace_id=None, ttft_s=None))
    # Without close(): the lines are already in the file.
    assert [r.request_id for r in read_jsonl(path)] == ["a", "b"]
    with path.open("a") as fh:
        fh.write('{"request_id": "torn"')  # a crash mid-write
    assert [r.request_id for r in read_jsonl(path)] == ["a", "b"]
    sink.close()
    sink.write(sample_record(request_id="c"))  # reopens
    assert path.read_text().count("\n") == 3


def test_sqlite_sink_wal_roundtrip(tmp_path):
    path = tmp_path / "usage.sqlite"
    sink = SqliteUsageSink(path)
    sink.write(sample_record(request_id="a"))
    sink.write(sample_record(request_id="b", error="client_disconnect", status_code=499))
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        rows = conn.execute("SELECT request_id, status_code, stages, extra FROM usage ORDER BY id").fetchall()
    assert [r[0] for r in rows] == ["a", "b"]
    assert json.loads(rows[0][2])[1] == {"name": "prefill", "start_s": 0.01, "duration_s": 0.02, "source": "backend"}
    assert json.loads(rows[0][3]) == {"backend": "engine-a", "matched_prefix_tokens": 96}
    back = sink.read_all()
    assert back[1].error == "client_disconnect" and back[1].stages == sample_record().stages
    sink.close()
    with pytest.raises(ValueError, match="synchronous"):
        SqliteUsageSink(path, synchronous="sometimes")


def test_sinks_that_open_a_new_sqlite_ledger_at_once_lose_no_record(tmp_path) -> None:
    """The workers of a server that starts with a new ledger: SQLite refuses some of several connections switching a
    new database to WAL at the same moment at once ("database is locked", without waiting for the busy timeout,
    where waiting could deadlock); the sink tries again instead of losing the record."""
    failures: list[str] = []

    def first_write(sink: SqliteUsageSink, name: str, barrier: threading.Barrier) -> None:
        barrier.wait()
        try:
            sink.write(sample_record(request_id=name))
        except sqlite3.OperationalError as exc:
            failures.append(f"{name}: {exc}")

    for trial in range(60):
        path = tmp_path / f"usage-{trial}.sqlite"
        sinks = [SqliteUsageSink(path) for _ in range(4)]
        barrier = threading.Barrier(len(sinks))
        threads = [
            threading.Thread(target=first_write, args=(sink, f"{trial}-{i}", barrier)) for i, sink in enumerate(sinks)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for sink in sinks:
            sink.close()
        assert not failures, failures
        assert sorted(r.request_id for r in read_sqlite(path)) == [f"{trial}-{i}" for i in range(4)]


async def test_sink_forms_and_a_failing_sink_never_breaks_requests(make_harness, tmp_path, caplog):
    seen: list[str] = []

    class Broken:
        def write(self, record: UsageRecord) -> None:
            raise OSError("disk full")

    jsonl = JsonlUsageSink(tmp_path / "u.jsonl")
    h = make_harness(usage_sink=[Broken(), lambda r: seen.append(r.request_id), jsonl])
    with caplog.at_level(logging.ERROR, logger="llmpath.instrumentation.usage"):
        async with h.client() as c:
            r = await c.post("/v1/chat/completions", json=BODY)
    assert r.status_code == 200
    assert seen == [r.headers["x-request-id"]]
    assert [x.request_id for x in read_jsonl(tmp_path / "u.jsonl")] == seen
    assert "disk full" in caplog.text and r.headers["x-request-id"] in caplog.text
    assert "SECRET-PROMPT-TEXT" not in caplog.text


def test_bad_sink_is_a_clear_error():
    with pytest.raises(TypeError, match="usage_sink"):
        instrument_app(FastAPI(), usage_sink=42)


async def test_no_sink_means_no_records_but_metrics(make_harness):
    h = make_harness(usage_sink=None)
    async with h.client() as c:
        await c.post("/v1/chat/completions", json=BODY)
    assert h.value("llmpath_requests_total", route="chat", model="tiny-llama", code="200") == 1


async def test_jsonl_only_ledgers_get_the_same_lines_without_record_objects(make_harness, tmp_path):
    """With only JSON-lines sinks the record is serialised straight from the request; the line must be what
    ``UsageRecord.to_json`` makes of the record an object sink receives for the same request."""
    lines_only = JsonlUsageSink(tmp_path / "direct.jsonl")
    mixed = JsonlUsageSink(tmp_path / "mixed.jsonl")
    seen: list[UsageRecord] = []
    assert not UsageDispatcher([lines_only]).needs_records and UsageDispatcher([mixed, seen.append]).needs_records
    h = make_harness(usage_sink=[lines_only])
    async with h.client() as c:
        await c.post("/v1/chat/completions", json=BODY, headers={"x-request-id": "req-1"})
    [direct] = (tmp_path / "direct.jsonl").read_text().splitlines()
    record = UsageRecord.from_dict(json.loads(direct))
    assert record.request_id == "req-1" and [s.name for s in record.stages][:2] == ["auth", "validate"]
    assert record.extra == {"backend": "engine-a", "matched_prefix_tokens": 96}
    assert direct == record.to_json()  # the same bytes as the object path (microsecond precision round-trips)
    intervals = [("auth", 10.5, 10.5015, "gateway"), ("prefill", 10.51, 10.53, "backend")]
    timings = [StageTiming("auth", 0.0, 0.0015, "gateway"), StageTiming("prefill", 0.01, 0.02, "backend")]
    head = ("r", None, 1.5, 'te"nant', "chat", "m", 10, 4, 2)
    from_intervals = usage_line(*head, intervals, 10.5, 0.04, 0.05, 200, 0.01, None, None, {"k": 1})
    from_timings = usage_line(*head, timings, None, 0.04, 0.05, 200, 0.01, None, None, {"k": 1})
    assert from_intervals == from_timings and from_intervals.endswith(b"\n")
    parsed = json.loads(from_intervals)
    assert parsed["stages"] == json.loads(stages_json(timings)) and parsed["tenant"] == 'te"nant'
    assert parsed["trace_id"] is None and parsed["tpot_s"] is None and parsed["extra"] == {"k": 1}
    mixed_dispatcher = UsageDispatcher([mixed, seen.append])
    mixed_dispatcher.emit(record)
    assert seen == [record] and (tmp_path / "mixed.jsonl").read_text() == direct + "\n"


@pytest.mark.parametrize("keep_gil", [True, False], ids=["libc-write", "os-write-fallback"])
def test_append_all_writes_whole_lines_and_reports_errors(tmp_path, monkeypatch, keep_gil):
    import errno
    import os

    from llmpath.instrumentation import append
    from llmpath.instrumentation.append import append_all

    if keep_gil:
        assert append._write is not None  # libc is loadable on the platforms CI runs
    else:
        monkeypatch.setattr(append, "_write", None)

    path = tmp_path / "ledger.jsonl"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        lines = [b'{"n":%d,"pad":"%s"}\n' % (i, b"x" * i) for i in range(200)]
        for line in lines:
            append_all(fd, line)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"".join(lines)

    read_only = os.open(path, os.O_RDONLY)
    try:
        with pytest.raises(OSError) as raised:
            append_all(read_only, b"{}\n")
        assert raised.value.errno == errno.EBADF
    finally:
        os.close(read_only)
    assert path.read_bytes() == b"".join(lines)


class FlakySink:
    """Fails with ``OSError`` while ``broken``, else keeps the records."""

    def __init__(self) -> None:
        self.broken = True
        self.records: list[UsageRecord] = []

    def write(self, record: UsageRecord) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        self.records.append(record)


async def test_a_failing_sink_is_counted_and_logged_once(make_harness, caplog) -> None:
    flaky = FlakySink()
    h = make_harness(usage_sink=flaky)
    assert h.registry.get_sample_value("llmpath_usage_record_failures_total", {"sink": "FlakySink"}) == 0.0
    caplog.set_level(logging.WARNING, logger="llmpath.instrumentation.usage")
    async with h.client() as client:
        for _ in range(5):
            assert (await client.get("/items/1")).status_code == 200  # the request never notices
        flaky.broken = False
        assert (await client.get("/items/2")).status_code == 200
    assert h.value("llmpath_usage_record_failures_total", sink="FlakySink") == 5
    assert len(flaky.records) == 1
    [message] = [r.getMessage() for r in caplog.records]  # not one line per lost record
    assert message.startswith("usage sink FlakySink failed for request ")
    assert message.endswith(": OSError: [Errno 28] No space left on device")


async def test_a_full_disk_loses_records_it_counts_for_that_sink_only(make_harness, tmp_path, caplog) -> None:
    """``/dev/full`` answers every write with ENOSPC, as a full disk does; a second ledger keeps working."""
    h = make_harness(usage_sink=[JsonlUsageSink("/dev/full"), JsonlUsageSink(tmp_path / "usage.jsonl")])
    async with h.client() as client:
        for _ in range(3):
            assert (await client.get("/items/1")).status_code == 200
    assert h.value("llmpath_usage_record_failures_total", sink="jsonl") == 3
    assert h.registry.get_sample_value("llmpath_usage_record_failures_total", {"sink": "jsonl_2"}) == 0.0
    assert len(list(read_jsonl(tmp_path / "usage.jsonl"))) == 3
    [logged] = [r.getMessage() for r in caplog.records if r.name == "llmpath.instrumentation.usage"]
    assert logged.startswith("usage sink jsonl (/dev/full) failed for request ")
    assert "No space left on device" in logged


def _failing_clock(monkeypatch) -> list[float]:
    clock = [1000.0]
    monkeypatch.setattr("llmpath.instrumentation.usage.monotonic", lambda: clock[0])
    return clock


def _usage_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "llmpath.instrumentation.usage"]


def test_a_sink_failing_for_minutes_logs_once_a_minute_then_its_recovery(monkeypatch, caplog) -> None:
    clock = _failing_clock(monkeypatch)
    failures: list[str] = []
    flaky = FlakySink()
    dispatcher = UsageDispatcher(flaky, on_failure=failures.append)
    for step in range(130):  # one failure a second for 130 s
        clock[0] = 1000.0 + step
        dispatcher.emit(sample_record(request_id=f"r{step}"))
    assert failures == ["FlakySink"] * 130
    flaky.broken = False
    for step in (131, 150, 180, 181):
        clock[0] = 1000.0 + step
        dispatcher.emit(sample_record(request_id=f"r{step}"))
    lines = _usage_lines(caplog)
    assert len(lines) == 4, lines  # at 0 s, 60 s and 120 s; the recovery once a minute has passed since (180 s)
    assert "for request r0:" in lines[0] and "more failed" not in lines[0]
    assert "for request r60:" in lines[1] and lines[1].endswith("(59 more failed since the last message)")
    assert "for request r120:" in lines[2] and lines[2].endswith("(59 more failed since the last message)")
    assert "writes again (9 more failed since the last message; " in lines[3]
    assert len(flaky.records) == 4


def test_a_sink_failing_now_and_then_logs_at_most_once_a_minute(monkeypatch, caplog) -> None:
    """A locked database fails every other write: that is no reason for a line per request either."""
    clock = _failing_clock(monkeypatch)
    flaky = FlakySink()
    dispatcher = UsageDispatcher(flaky)
    for step in range(100):
        clock[0] = 1000.0 + step
        flaky.broken = step % 2 == 0
        dispatcher.emit(sample_record(request_id=f"r{step}"))
    lines = _usage_lines(caplog)
    assert len(lines) == 2, lines  # the first failure (0 s), then the next failure a minute later (60 s)
    assert "for request r60:" in lines[1] and lines[1].endswith("(29 more failed since the last message)")


def test_a_flapping_sink_still_logs_once_a_minute(monkeypatch, caplog) -> None:
    """Recovered, then failing again a second later: the minute since the last line holds for both kinds of line."""
    clock = _failing_clock(monkeypatch)
    flaky = FlakySink()
    dispatcher = UsageDispatcher(flaky)
    for step, broken in ((0, True), (60, False), (61, True), (62, False), (121, False)):
        clock[0] = 1000.0 + step
        flaky.broken = broken
        dispatcher.emit(sample_record(request_id=f"r{step}"))
    lines = _usage_lines(caplog)
    assert len(lines) == 3, lines  # 0 s (failed), 60 s (writes again), 121 s (writes again, with the one at 61 s)
    assert "writes again (llmpath_usage_record_failures_total" in lines[1]
    assert "writes again (1 more failed since the last message; " in lines[2]


class SecretSink:
    """A user's sink whose repr holds a credential."""

    def __repr__(self) -> str:
        return "SecretSink(dsn='postgresql://bob:hunter2@db/usage')"

    def write(self, record: UsageRecord) -> None:
        raise ConnectionError("database unreachable")

    def close(self) -> None:
        raise ConnectionError("database unreachable")


def test_the_log_names_a_ledger_file_but_never_another_sinks_repr(caplog) -> None:
    UsageDispatcher(SecretSink()).emit(sample_record())
    [line] = _usage_lines(caplog)
    assert line.startswith("usage sink SecretSink failed for request r1: ConnectionError")
    assert "hunter2" not in caplog.text


def test_a_failing_close_is_logged_by_the_sinks_name_never_its_repr(caplog) -> None:
    """On lifespan shutdown too: a DSN in a user's sink repr stays out of the log."""
    caplog.set_level(logging.WARNING, logger="llmpath.instrumentation.usage")
    UsageDispatcher(SecretSink()).close()
    assert _usage_lines(caplog) == ["closing usage sink SecretSink failed: ConnectionError: database unreachable"]
    assert "hunter2" not in caplog.text


def test_a_write_cut_short_by_a_full_disk_does_not_glue_records_together(tmp_path, monkeypatch, caplog) -> None:
    """ENOSPC after part of a line: the next record starts on a new line, and the reader skips the torn one."""
    import os

    from llmpath.instrumentation import usage

    real = usage.append_all
    calls = []

    def half_then_full(fd: int, data: bytes) -> None:
        calls.append(data)
        if len(calls) == 2:
            os.write(fd, data[: len(data) // 2])
            raise OSError(28, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(usage, "append_all", half_then_full)
    path = tmp_path / "usage.jsonl"
    dispatcher = UsageDispatcher(JsonlUsageSink(path))
    for i in range(3):
        dispatcher.emit(sample_record(request_id=f"r{i}"))
    assert calls[2].startswith(b"\n{") and calls[0].startswith(b"{")
    assert [r.request_id for r in read_jsonl(path)] == ["r0", "r2"]
    assert f"{path}:2: a damaged usage record (a write cut short, or corrupted): skipped" in caplog.text


def test_a_sqlite_ledger_read_started_in_one_thread_can_end_in_another(tmp_path: Path) -> None:
    """A reader left unfinished (``usage show`` stops at its match) is closed by whichever thread finalises it."""
    path = tmp_path / "usage.db"
    sink = SqliteUsageSink(path)
    for i in range(3):
        sink.write(sample_record(request_id=f"r{i}"))
    sink.close()
    records = read_sqlite(path)
    first: list[UsageRecord] = []
    done = threading.Event()

    def start() -> None:
        first.append(next(records))
        done.wait(10)  # alive while the other thread closes it (an ended thread's id may be reused)

    started = threading.Thread(target=start)
    started.start()
    while not first and started.is_alive():
        time.sleep(0.01)
    closing_errors: list[BaseException] = []

    def close() -> None:
        try:
            records.close()
        except BaseException as exc:  # noqa: BLE001  # the assertion below says which
            closing_errors.append(exc)

    ended = threading.Thread(target=close)
    ended.start()
    ended.join()
    done.set()
    started.join()
    assert first[0].request_id == "r0" and not closing_errors, closing_errors
