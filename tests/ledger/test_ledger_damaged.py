"""Damaged and malformed ledgers: every entry the reports cannot use stops the read with ``file:line: reason``
(exit code 2 on the command line), never a traceback: bytes that are not UTF-8, a damaged or cut gzip stream, JSON
nested too deeply, fields of the wrong type, numbers that are not finite."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from llmpath.instrumentation import JsonlUsageSink, LedgerFormatError, SqliteUsageSink, StageTiming, UsageRecord
from llmpath.ledger import read_ledger

NOW = time.time()


def record(i: int) -> UsageRecord:
    return UsageRecord(
        request_id=f"r-{i}", trace_id=None, time=NOW - i, tenant="t", route="chat", model="m", input_tokens=10,
        cached_tokens=1, output_tokens=3, stages=[StageTiming("auth", 0.0, 0.001), StageTiming("prefill", 0.001, 0.05)],
        ttft_s=0.05, duration_s=0.2, status_code=200,
    )  # fmt: skip


def good_lines(tmp_path: Path) -> bytes:
    (tmp_path / "good.jsonl").unlink(missing_ok=True)  # the sink appends
    sink = JsonlUsageSink(tmp_path / "good.jsonl")
    for i in range(3):
        sink.write(record(i))
    sink.close()
    return (tmp_path / "good.jsonl").read_bytes()


def with_fourth(tmp_path: Path, **changes: Any) -> Path:
    """Three good lines, then a record with ``changes`` (as JSON: NaN and Infinity are what json writes)."""
    good = good_lines(tmp_path)
    data = {**json.loads(good.splitlines()[0]), **changes}
    path = tmp_path / "bad.jsonl"
    path.write_bytes(good + json.dumps(data).encode() + b"\n" + good)
    return path


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"time": float("inf")}, "time is inf, not a finite number"),
        ({"duration_s": float("nan")}, "duration_s is nan, not a finite number"),
        ({"ttft_s": float("-inf")}, "ttft_s is -inf, not a finite number"),
        ({"route": None}, "route is None, not a string"),
        ({"request_id": 5}, "request_id is 5, not a string"),
        ({"tenant": 5}, "tenant is 5, not a string or null"),
        ({"extra": [1]}, "extra is [1], not an object"),
        ({"stages": [{"name": 1, "start_s": 0, "duration_s": 1}]}, "stages[0]: name and source must be strings"),
        (
            {"stages": [{"name": "a", "start_s": "0", "duration_s": 1}]},
            "stages[0]: start_s and duration_s must be finite numbers, not '0'",
        ),
    ],
)
def test_fields_the_reports_cannot_use_name_the_line(tmp_path: Path, changes: dict[str, Any], reason: str) -> None:
    """Each of these crashed summary, slowest or show (OverflowError, TypeError, AttributeError)."""
    path = with_fourth(tmp_path, **changes)
    with pytest.raises(LedgerFormatError) as err:
        list(read_ledger(path))
    assert str(err.value) == f"{path}:4: not a usage record: {reason}"


def test_a_sqlite_row_the_reports_cannot_use_names_its_id(tmp_path: Path) -> None:
    path = tmp_path / "usage.db"
    sink = SqliteUsageSink(path)
    for i in range(4):
        sink.write(record(i))
    sink.close()
    with sqlite3.connect(path) as conn:
        conn.execute("DELETE FROM usage WHERE id = 2")  # pruned in place: ids have gaps
        conn.execute("UPDATE usage SET duration_s = 1e999 WHERE id = 4")  # SQLite keeps infinities
    with pytest.raises(LedgerFormatError) as err:
        list(read_ledger(path))
    assert str(err.value) == f"{path}:4: not a usage record: duration_s is inf, not a finite number"


def usage(llmpath_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run([llmpath_bin, "usage", *map(str, args)], capture_output=True, text=True, timeout=60, env=env)


def test_damaged_files_are_named_with_the_line_on_the_command_line(llmpath_bin: str, tmp_path: Path) -> None:
    """Non-UTF-8 bytes, a damaged or cut gzip stream and deep nesting were tracebacks (a cut gzip: "Aborted.",
    exit code 1)."""
    good = good_lines(tmp_path)
    packed = gzip.compress(good)
    files = {
        "latin1.jsonl": (good + b'{"request_id": "caf\xe9"}\n', ":4: not UTF-8 text (byte 0xe9 at column 20)"),
        "deep.jsonl": (good + b"[" * 100_000 + b"\n", ":4: not a usage record: JSON nested too deeply"),
        "cut.jsonl.gz": (packed[:-12], ":3: the compressed data is damaged or cut short"),
        "damaged.jsonl.gz": (packed[:20] + bytes(40) + packed[60:], ":1: the compressed data is damaged or cut short"),
        "inf.jsonl": (with_fourth(tmp_path, time=float("inf")).read_bytes(), ":4: not a usage record: time is inf"),
    }
    for name, (content, reason) in files.items():
        path = tmp_path / name
        path.write_bytes(content)
        for command in (["summary"], ["slowest"], ["show", "r-1"]):
            out = usage(llmpath_bin, *command, path)
            assert out.returncode == 2, (name, command, out.stderr)
            assert out.stderr.startswith(f"llmpath usage: {path}{reason}"), (name, command, out.stderr)
            assert "Traceback" not in out.stderr


@pytest.mark.parametrize("ident", ["", "  ", "None"])
def test_show_refuses_an_empty_id(llmpath_bin: str, tmp_path: Path, ident: str) -> None:
    """``show ''`` printed every request without a trace id (their missing trace id compared equal to it)."""
    path = tmp_path / "usage.jsonl"
    path.write_bytes(good_lines(tmp_path))
    out = usage(llmpath_bin, "show", ident, path)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"llmpath usage: {ident!r} is no id"), out.stderr
