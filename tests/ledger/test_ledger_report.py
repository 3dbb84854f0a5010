"""What `llmpath usage` prints, through the real command line: ledger values are printed literally (never as rich
markup), TTFT without a sample is "no data", one rule for which requests count towards TTFT, columns of `slowest`
that add up to the figure they are sorted by, and no rows for stages nobody observed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest

from llmpath.instrumentation import JsonlUsageSink, StageTiming, UsageRecord

NOW = time.time()


def record(rid: str, *, status: int = 200, ttft: float | None = 0.02, decode: float = 0.1, tenant: str = "acme",
           model: str = "m", route: str = "chat") -> UsageRecord:  # fmt: skip
    """auth 1 ms, prefill to the first token, decode ``decode`` s, then 3 ms in no stage; without a first token:
    auth and a 4 ms schedule, then 5 ms in no stage."""
    if ttft is None:
        stages = [StageTiming("auth", 0.0, 0.001, "gateway"), StageTiming("schedule", 0.001, 0.004, "gateway")]
        duration, unattributed = 0.010, None
    else:
        stages = [
            StageTiming("auth", 0.0, 0.001, "gateway"),
            StageTiming("prefill", 0.001, ttft - 0.001, "backend"),
            StageTiming("decode", ttft, decode, "gateway"),
        ]
        duration, unattributed = ttft + decode + 0.003, 0.0
    return UsageRecord(
        request_id=rid, trace_id=None, time=NOW - 60, tenant=tenant, route=route, model=model, input_tokens=100,
        cached_tokens=40, output_tokens=10, stages=stages, ttft_s=ttft, duration_s=duration, status_code=status,
        unattributed_s=unattributed, extra={"note": "[bold]x"},
    )  # fmt: skip


def ledger(tmp_path: Path, *records: UsageRecord) -> Path:
    path = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(path)
    for r in records:
        sink.write(r)
    sink.close()
    return path


def usage(llmpath_bin: str, *args: str | Path) -> str:
    env = {**os.environ, "COLUMNS": "250"}
    out = subprocess.run([llmpath_bin, "usage", *map(str, args)], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def rows(text: str, first: str) -> list[list[str]]:
    """The table rows whose first cell is ``first`` (cells split on whitespace)."""
    return [line.split() for line in text.splitlines() if line.split()[:1] == [first]]


def test_ledger_values_and_hints_print_literally(llmpath_bin: str, tmp_path: Path) -> None:
    path = ledger(
        tmp_path,
        record("req[0]", tenant="team[eu]", model="[org]/llama", route="r[1]"),
        record("req-1", tenant="[red]ops", model="[org]/llama", route="r[1]", ttft=0.01),
        record("req-2", tenant=":thumbs_up:", model="priced", ttft=0.005),
    )
    prices = tmp_path / "prices.toml"
    prices.write_text('[models."priced"]\ninput = 1.0\noutput = 2.0\n')

    summary = usage(llmpath_bin, "summary", path, "--prices", prices)
    for tenant in ("team[eu]", "[red]ops", ":thumbs_up:"):
        assert rows(summary, tenant)[0][1:4] == ["1", "0", "0"]  # by tenant: requests, 429, 5xx
    assert rows(summary, "r[1]")[0][1] == "2"  # by route, prompt cache, cost by route
    assert 'no price for [org]/llama (2 requests): left out of the cost (add them, or a [models."*"] entry, ' in (
        summary.replace("\n", " ")
    )

    slowest = usage(llmpath_bin, "slowest", path)
    listed = [cells[:3] for cells in map(str.split, slowest.splitlines()) if cells[:1] in (["req[0]"], ["req-1"])]
    assert listed == [["req[0]", "–", "r[1]"], ["req-1", "–", "r[1]"]]

    show = usage(llmpath_bin, "show", "req[0]", path)
    assert "req[0]  trace –  tenant team[eu]  route r[1]  model [org]/llama  status 200" in show
    assert "annotations: note=[bold]x" in show and "request req[0] — " in show


def test_no_first_token_means_no_ttft(llmpath_bin: str, tmp_path: Path) -> None:
    path = ledger(tmp_path, record("ok"), record("t1", status=429, ttft=None), record("t2", status=429, ttft=None))
    text = usage(llmpath_bin, "summary", path, "--status", "429")
    assert text.splitlines()[0] == "2 requests, 0 server errors — TTFT p50 –, p95 –, p99 –"
    assert "no stage timings: none of these requests got a first token" in text
    assert rows(text, "chat")[0] == ["chat", "2", "0", "2", "–", "–", "10.0", "ms"]
    figures = json.loads(usage(llmpath_bin, "summary", path, "--status", "429", "--json"))
    assert [figures[k] for k in ("ttft_p50_s", "ttft_p95_s", "ttft_p99_s")] == [None, None, None]
    assert figures["stages"] == [] and figures["cache"] == [] and figures["routes"][0]["ttft_p50_s"] is None


def test_headline_and_routes_count_the_same_requests(llmpath_bin: str, tmp_path: Path) -> None:
    """A stream cut off after its first token (499) counts towards TTFT everywhere; a 500 before it nowhere."""
    path = ledger(
        tmp_path, record("a", ttft=0.02), record("gone", status=499, ttft=0.06), record("e", status=500, ttft=None)
    )
    figures = json.loads(usage(llmpath_bin, "summary", path, "--json"))
    (route,) = figures["routes"]
    assert figures["ttft_p50_s"] == route["ttft_p50_s"] == pytest.approx(0.04)
    assert figures["ttft_p95_s"] == route["ttft_p95_s"] == pytest.approx(0.058)
    prefill = next(s for s in figures["stages"] if s["stage"] == "prefill")
    assert prefill["mean_s"] == pytest.approx(0.039)  # both requests with a first token
    assert figures["cache"][0]["requests"] == 2
    text = usage(llmpath_bin, "summary", path)
    assert text.splitlines()[0] == "3 requests, 1 server errors — TTFT p50 40.0 ms, p95 58.0 ms, p99 59.6 ms"
    assert rows(text, "chat")[0][4:8] == ["40.0", "ms", "58.0", "ms"]


def test_slowest_by_duration_columns_add_up_to_the_duration(llmpath_bin: str, tmp_path: Path) -> None:
    path = ledger(tmp_path, record("long", status=499, ttft=0.005, decode=0.155), record("e", status=503, ttft=None))
    text = usage(llmpath_bin, "slowest", path, "--by", "duration")
    header = next(line.split() for line in text.splitlines() if line.split()[:1] == ["request"])
    assert header[5:] == ["auth", "prefill", "schedule", "unattributed", "decode", "untracked"]
    long, failed = rows(text, "long")[0], rows(text, "e")[0]
    assert long[3:] == ["499", "163.0", "ms", "1.0", "4.0", "–", "0.0", "155.0", "3.0"]
    assert failed[3:] == ["503", "10.0", "ms", "1.0", "–", "4.0", "–", "–", "5.0"]
    by_ttft = usage(llmpath_bin, "slowest", path)
    header = next(line.split() for line in by_ttft.splitlines() if line.split()[:1] == ["request"])
    assert header[5:] == ["auth", "prefill", "unattributed"]  # adds up to TTFT
    assert rows(by_ttft, "long")[0][3:] == ["499", "5.0", "ms", "1.0", "4.0", "0.0"]


def test_stages_nobody_observed_are_left_out(llmpath_bin: str, tmp_path: Path) -> None:
    catalog = tmp_path / "stages.toml"
    catalog.write_text(
        '[[stages]]\nname = "moderation"\nmeaning = "Content moderation."\nowner = "trust-safety"\n'
        "before_first_token = true\n"
    )
    path = ledger(tmp_path, record("a"), record("b", ttft=0.04))
    figures = json.loads(usage(llmpath_bin, "summary", path, "--catalog", catalog, "--json"))
    assert [s["stage"] for s in figures["stages"]] == ["auth", "prefill", "unattributed", "decode"]
    text = usage(llmpath_bin, "summary", path, "--catalog", catalog)
    assert not rows(text, "moderation") and not rows(text, "schedule")
    assert rows(text, "prefill")[0][:4] == ["prefill", "serving", "29.0", "ms"]


def test_custom_stages_after_the_first_token_are_not_counted_in_ttft(llmpath_bin: str, tmp_path: Path) -> None:
    base = record("r", ttft=0.005, decode=0.02)
    after = StageTiming("moderate_output", 0.01, 0.002, "gateway")  # a custom stage while streaming
    before = StageTiming("moderate_input", 0.0, 0.0005, "gateway")
    path = ledger(tmp_path, replace(base, stages=[before, *base.stages, after]))
    by_ttft = usage(llmpath_bin, "slowest", path)
    header = next(line.split() for line in by_ttft.splitlines() if line.split()[:1] == ["request"])
    assert "moderate_input" in header and "moderate_output" not in header  # the columns add up to TTFT
    text = usage(llmpath_bin, "slowest", path, "--by", "duration")
    header = next(line.split() for line in text.splitlines() if line.split()[:1] == ["request"])
    assert header.index("moderate_input") < header.index("unattributed") < header.index("moderate_output")
