"""`llmpath usage`: summaries, the slowest requests and one request's timeline from real JSON-lines and SQLite
ledgers (written by the instrumentation's own sinks), through the real command line."""

from __future__ import annotations

import gzip
import json
import os
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest

from llmpath.instrumentation import JsonlUsageSink, SqliteUsageSink, StageTiming, UsageRecord

NOW = time.time()


def record(i: int, *, ttft: float, route: str = "chat", tenant: str = "acme", status: int = 200,
           age_s: float = 60.0, trace: str | None = None) -> UsageRecord:  # fmt: skip
    """Request ``i``: auth 1 ms, schedule ``ttft/4``, prefill the rest of TTFT, decode 50 ms."""
    stages = [
        StageTiming("auth", 0.0, 0.001, "gateway"),
        StageTiming("schedule", 0.001, ttft / 4, "backend"),
        StageTiming("prefill", 0.001 + ttft / 4, ttft * 3 / 4 - 0.001, "backend"),
        StageTiming("decode", ttft, 0.05, "gateway"),
    ]
    return UsageRecord(
        request_id=f"req-{i:03d}", trace_id=trace or f"{i:032x}", time=NOW - age_s, tenant=tenant, route=route,
        model="m", input_tokens=100, cached_tokens=i % 2 * 60, output_tokens=10, stages=stages,
        ttft_s=ttft if status == 200 else None, duration_s=ttft + 0.05, status_code=status,
        unattributed_s=0.0 if status == 200 else None, extra={"backend": f"engine-{i % 2}"},
    )  # fmt: skip


@pytest.fixture
def ledgers(tmp_path: Path) -> tuple[Path, Path]:
    """Ten requests in a JSON-lines ledger (TTFT 0.1 … 1.0 s) and three in a SQLite one (a 500, an old request
    and one on another route sharing a trace with req-001)."""
    jsonl, db = tmp_path / "usage.jsonl", tmp_path / "usage.db"
    sink = JsonlUsageSink(jsonl)
    for i in range(1, 11):
        sink.write(record(i, ttft=i / 10, tenant="acme" if i <= 6 else "globex"))
    sink.close()
    sql = SqliteUsageSink(db)
    sql.write(record(11, ttft=0.05, status=500))
    sql.write(record(12, ttft=2.0, age_s=7200))
    sql.write(record(13, ttft=0.2, route="rag", trace=f"{1:032x}"))
    sql.close()
    return jsonl, db


def usage(llmpath_bin: str, *args: str | Path, columns: int = 250) -> subprocess.CompletedProcess[str]:
    cmd = [llmpath_bin, "usage", *map(str, args)]
    env = {**os.environ, "COLUMNS": str(columns)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env=env)


def as_json(out: subprocess.CompletedProcess[str]):
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_summary_reads_both_formats_together(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    s = as_json(usage(llmpath_bin, "summary", *ledgers, "--json"))
    assert s["requests"] == 13 and s["errors"] == 1
    assert s["statuses"] == {"200": 12, "500": 1}
    ttfts = sorted([i / 10 for i in range(1, 11)] + [2.0, 0.2])
    assert s["ttft_p50_s"] == pytest.approx((ttfts[5] + ttfts[6]) / 2)
    assert s["ttft_p95_s"] == pytest.approx(ttfts[10] + (ttfts[11] - ttfts[10]) * 0.45)
    assert s["tokens"] == {"input": 1300, "cached": 7 * 60, "output": 130}
    assert s["tokens_by_tenant"]["globex"] == {"input": 400, "cached": 120, "output": 40}
    assert [(t["tenant"], t["requests"], t["throttled"], t["server_errors"]) for t in s["tenants"]] == [
        ("acme", 9, 0, 1),
        ("globex", 4, 0, 0),
    ]
    assert s["tenants"][1]["tokens"] == s["tokens_by_tenant"]["globex"]
    prefill = next(row for row in s["stages"] if row["stage"] == "prefill")
    assert prefill["owner"] == "serving"
    assert prefill["mean_s"] == pytest.approx(sum(t * 3 / 4 - 0.001 for t in ttfts) / 12)
    rag, chat_route = sorted(s["routes"], key=lambda r: r["route"] != "rag")
    assert (rag["route"], rag["requests"], rag["ttft_p50_s"]) == ("rag", 1, pytest.approx(0.2))
    assert (chat_route["requests"], chat_route["server_errors"], chat_route["client_errors"]) == (12, 1, 0)
    assert chat_route["ttft_p95_s"] == pytest.approx(1.0 + (2.0 - 1.0) * 0.5)  # 11 TTFTs: 0.1 … 1.0 and 2.0
    chat = next(c for c in s["cache"] if c["route"] == "chat")
    assert (chat["requests"], chat["cached_tokens"], chat["input_tokens"]) == (
        11,
        5 * 60,
        1100,
    )  # the 500 is left out of the cache figures


def test_one_ledger_given_twice_is_refused(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    """As ``usage.jsonl`` and ``./usage.jsonl``, or through a link: its requests counted twice (13 became 23)."""
    jsonl, db = ledgers
    link = jsonl.with_name("link.jsonl")
    link.symlink_to(jsonl)
    for again in (jsonl.parent / "." / jsonl.name, link):
        out = usage(llmpath_bin, "summary", jsonl, db, again, "--json")
        assert (out.returncode, out.stdout) == (2, ""), out.stderr
        assert out.stderr.strip() == (
            f"llmpath usage: {again}: the same file as {jsonl}, given before: its records would count twice"
        )


def test_throttled_requests_are_counted_per_tenant(llmpath_bin: str, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(ledger)
    for i, (tenant, status) in enumerate([("acme", 200), ("acme", 429), ("acme", 429), ("beta", 429), ("beta", 503)]):
        sink.write(record(i, ttft=0.1, tenant=tenant, status=status))
    sink.close()
    out = usage(llmpath_bin, "summary", ledger)
    assert out.returncode == 0, out.stderr
    rows = {line.split()[0]: line.split()[1:4] for line in out.stdout.splitlines() if line.strip()}
    assert rows["acme"] == ["3", "2", "0"] and rows["beta"] == ["2", "1", "1"]  # requests, 429, 5xx
    assert rows["total"] == ["5", "3", "1"]


def test_reasoning_tokens_are_totalled_per_tenant(llmpath_bin: str, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(ledger)
    for i, (tenant, thinking) in enumerate([("acme", 7), ("acme", 2), ("beta", None), ("beta", "9"), ("beta", True)]):
        r = record(i, ttft=0.1, tenant=tenant)
        if thinking is not None:
            r.extra["reasoning_tokens"] = thinking  # a string or a bool (another writer's ledger) is no count
        sink.write(r)
    sink.close()
    s = as_json(usage(llmpath_bin, "summary", ledger, "--json"))
    assert s["reasoning_tokens"] == 9 and s["tokens"]["output"] == 50
    assert [(t["tenant"], t["reasoning_tokens"]) for t in s["tenants"]] == [("acme", 9), ("beta", 0)]
    out = usage(llmpath_bin, "summary", ledger)
    assert out.returncode == 0, out.stderr
    assert "of which reasoning" in out.stdout
    rows = {line.split()[0]: line.split()[4:] for line in out.stdout.splitlines() if line.strip()}
    assert rows["acme"] == ["200", "60", "20", "9"]  # input, cached, output, of which reasoning
    assert rows["total"] == ["500", "120", "50", "9"]
    plain = tmp_path / "plain.jsonl"
    JsonlUsageSink(plain).write(record(1, ttft=0.1))
    assert "reasoning" not in usage(llmpath_bin, "summary", plain).stdout  # no column without a reasoning model


def test_summary_tables(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    out = usage(llmpath_bin, "summary", *ledgers)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("13 requests, 1 server errors — TTFT p50 550.0 ms")
    assert "status codes 200: 12, 500: 1" in lines[1]
    rag = next(line.split() for line in lines if line.strip().startswith("rag "))
    assert rag[:4] == ["rag", "1", "0", "0"]  # requests, 5xx, 4xx
    prefill = next(line.split() for line in lines if line.strip().startswith("prefill "))
    assert prefill[1] == "serving"


def test_filters_by_age_route_and_tenant(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    assert as_json(usage(llmpath_bin, "summary", *ledgers, "--since", "1h", "--json"))["requests"] == 12
    assert as_json(usage(llmpath_bin, "summary", *ledgers, "--route", "rag", "--json"))["requests"] == 1
    by_tenant = as_json(usage(llmpath_bin, "summary", *ledgers, "--tenant", "globex", "--json"))
    assert by_tenant["requests"] == 4 and set(by_tenant["tokens_by_tenant"]) == {"globex"}
    # a status class or one code: req-011 is the only 500
    failed = as_json(usage(llmpath_bin, "slowest", *ledgers, "--by", "duration", "--status", "5xx", "--json"))
    assert [r["request_id"] for r in failed] == ["req-011"]
    assert as_json(usage(llmpath_bin, "summary", *ledgers, "--status", "200", "--json"))["requests"] == 12
    assert as_json(usage(llmpath_bin, "summary", *ledgers, "--status", "4XX", "--json"))["requests"] == 0


def test_slowest_orders_by_ttft_or_duration(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    top = as_json(usage(llmpath_bin, "slowest", *ledgers, "-n", "3", "--json"))
    assert [r["request_id"] for r in top] == ["req-012", "req-010", "req-009"]
    recent = as_json(usage(llmpath_bin, "slowest", *ledgers, "-n", "2", "--since", "1h", "--json"))
    assert [r["request_id"] for r in recent] == ["req-010", "req-009"]
    # The 500 has no TTFT: only --by duration ranks it.
    by_ttft = as_json(usage(llmpath_bin, "slowest", *ledgers, "-n", "20", "--json"))
    by_duration = as_json(usage(llmpath_bin, "slowest", *ledgers, "-n", "20", "--by", "duration", "--json"))
    assert "req-011" not in {r["request_id"] for r in by_ttft}
    assert by_duration[-1]["request_id"] == "req-011"

    table = usage(llmpath_bin, "slowest", *ledgers, "-n", "2")
    assert table.returncode == 0
    header = next(line for line in table.stdout.splitlines() if "request" in line and "prefill" in line)
    assert header.split()[-4:] == ["auth", "schedule", "prefill", "unattributed"]
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("req-012"))
    assert row.split()[-3:] == ["500.0", "1,499.0", "0.0"]  # schedule, prefill, unattributed in ms


def test_tables_keep_every_column_in_a_narrow_terminal(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    """Rich squeezes columns that may wrap to nothing when a table is wider than the terminal (80 columns when
    piped): the tables are printed at their own width instead."""
    table = usage(llmpath_bin, "slowest", *ledgers, "-n", "2", columns=60)
    assert table.returncode == 0
    row = next(line for line in table.stdout.splitlines() if line.strip().startswith("req-012"))
    assert row.split()[3:] == ["200", "2,000.0", "ms", "1.0", "500.0", "1,499.0", "0.0"]
    show = usage(llmpath_bin, "show", "req-012", *ledgers, columns=30)
    prefill = ["prefill", "501.0", "ms", "1,499.0", "ms", "backend"]
    assert any(line.split() == prefill for line in show.stdout.splitlines())


def test_show_finds_a_request_or_every_request_of_a_trace(llmpath_bin: str, ledgers: tuple[Path, Path]) -> None:
    one = as_json(usage(llmpath_bin, "show", "req-004", *ledgers, "--json"))
    assert [r["request_id"] for r in one] == ["req-004"] and one[0]["extra"] == {"backend": "engine-0"}
    trace = as_json(usage(llmpath_bin, "show", f"{1:032X}", *ledgers, "--json"))
    assert [r["request_id"] for r in trace] == ["req-001", "req-013"]

    text = usage(llmpath_bin, "show", "req-004", *ledgers)
    assert text.returncode == 0
    assert "TTFT 400.0 ms" in text.stdout and "annotations: backend=engine-0" in text.stdout
    assert [line.split()[0] for line in text.stdout.splitlines() if line.strip().endswith(("gateway", "backend"))] == [
        "auth", "schedule", "prefill", "decode"
    ]  # fmt: skip

    missing = usage(llmpath_bin, "show", "req-999", *ledgers)
    assert missing.returncode == 1 and "no request or trace 'req-999'" in missing.stderr
    # the "–" the tables print for a request without a trace id, copied as an id: pointed at the request id
    for placeholder in ("–", "None"):
        no_id = usage(llmpath_bin, "show", placeholder, *ledgers)
        assert no_id.returncode == 2 and "show it by request id" in no_id.stderr


def test_bad_input_names_the_file_line_and_reason(llmpath_bin: str, ledgers: tuple[Path, Path], tmp_path: Path) -> None:
    jsonl, db = ledgers
    lines = jsonl.read_text().splitlines(keepends=True)
    broken = tmp_path / "broken.jsonl"
    broken.write_text("".join(lines[:2]) + '{"request_id": "x", "input_tokens": "many"}\n' + "".join(lines[2:]))
    out = usage(llmpath_bin, "summary", broken)
    assert out.returncode == 2
    assert f"{broken}:3: not a usage record" in out.stderr and "input_tokens" in out.stderr

    rotated = tmp_path / "usage.jsonl.1.gz"  # what logrotate's compress leaves
    rotated.write_bytes(gzip.compress(jsonl.read_bytes()))
    assert as_json(usage(llmpath_bin, "summary", rotated, db, "--json"))["requests"] == 13

    torn = tmp_path / "torn.jsonl"  # a crash mid-write leaves a partial last line: skipped, not an error
    torn.write_text("".join(lines) + lines[0][:40])
    assert as_json(usage(llmpath_bin, "summary", torn, "--json"))["requests"] == 10

    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE t (x)")
    out = usage(llmpath_bin, "summary", other)
    assert out.returncode == 2 and "not a llmpath SQLite ledger" in out.stderr

    cases: tuple[tuple[list[str | Path], str], ...] = (
        (["summary", tmp_path / "absent.jsonl"], "absent.jsonl: No such file or directory"),
        (["summary", jsonl, "--since", "yesterday"], "--since 'yesterday': not a duration"),
        (["slowest", jsonl, "--by", "tokens"], "--by 'tokens': use ttft or duration"),
        (["summary", jsonl, "--status", "50x"], "--status '50x': use a status code (503) or a class (5xx)"),
        (["summary", tmp_path / "notes.txt"], "neither a JSON-lines nor a SQLite usage ledger"),
    )
    for args, message in cases:
        if str(args[1]).endswith("notes.txt"):
            Path(args[1]).write_text("hello\n")
        out = usage(llmpath_bin, *args)
        assert out.returncode == 2 and message in out.stderr, out.stderr
