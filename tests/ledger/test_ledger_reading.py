"""Reading large ledgers: ``since`` skips old records (llmpath's own lines without parsing them), and the summary
is one pass over the records, keeping numbers rather than records."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmpath.instrumentation import JsonlUsageSink, SqliteUsageSink, StageTiming, UsageRecord
from llmpath.ledger import read_ledger, summarize

NOW = time.time()


def record(i: int, age_s: float, **extra: object) -> UsageRecord:
    stages = [StageTiming("auth", 0.0, 0.001), StageTiming("prefill", 0.001, 0.05, "backend")]
    return UsageRecord(
        request_id=f"r-{i}", trace_id=f"{i:032x}" if i % 2 else None, time=NOW - age_s, tenant="t\u00e9", route="chat",
        model="m", input_tokens=10 * i, cached_tokens=i, output_tokens=3, stages=stages, ttft_s=0.051, duration_s=0.2,
        status_code=200, unattributed_s=0.0, extra=dict(extra),
    )  # fmt: skip


@pytest.mark.parametrize("kind", ["jsonl", "sqlite"])
def test_since_returns_exactly_the_newer_records(tmp_path: Path, kind: str) -> None:
    path = tmp_path / ("usage.jsonl" if kind == "jsonl" else "usage.db")
    sink = JsonlUsageSink(path) if kind == "jsonl" else SqliteUsageSink(path)
    ages = [3600, 10, 7200, 5, 1800, 1]  # not in time order: workers finish out of order
    for i, age in enumerate(ages):
        sink.write(record(i, age, note='quoted "time":1'))
    sink.close()
    newer = [r.request_id for r in read_ledger(path, since=NOW - 60)]
    assert newer == ["r-1", "r-3", "r-5"]
    assert [r.request_id for r in read_ledger(path)] == [f"r-{i}" for i in range(len(ages))]


def test_old_llmpath_lines_are_skipped_unparsed_and_other_lines_are_still_checked(tmp_path: Path, caplog) -> None:
    path = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(path)
    sink.write(record(0, 7200))
    sink.write(record(1, 5))
    sink.close()
    old = record(2, 3600).json_line().decode()
    with path.open("a") as fh:
        fh.write(old[: old.index('"stages"')] + "CORRUPT\n")  # an old llmpath line, damaged after its time
        fh.write(json.dumps(record(3, 3600).to_dict(), sort_keys=True) + "\n")  # another writer's key order, old
        fh.write(json.dumps(record(4, 1).to_dict(), sort_keys=True) + "\n")  # … and new
    assert [r.request_id for r in read_ledger(path, since=NOW - 60)] == ["r-1", "r-4"]
    assert "a damaged usage record" not in caplog.text  # skipped by its time, never parsed
    # Without since every line is parsed: the damaged llmpath line is reported (and skipped: it is no record) ...
    assert [r.request_id for r in read_ledger(path)] == ["r-0", "r-1", "r-3", "r-4"]
    assert "usage.jsonl:3: a damaged usage record (a write cut short, or corrupted): skipped" in caplog.text
    with path.open("a") as fh:  # ... and a line llmpath never wrote stops the reading, naming it
        fh.write('{"note": "not a record"}\n')
    with pytest.raises(ValueError, match=r"usage.jsonl:6: not a usage record"):
        list(read_ledger(path))


def test_summary_is_one_pass_over_the_records() -> None:
    records = [record(i, 10) for i in range(1, 6)]

    def once() -> Iterator[UsageRecord]:
        yield from records

    streamed = summarize(once())
    assert streamed == summarize(records)
    assert streamed.requests == 5 and streamed.tokens == {"input": 150, "cached": 15, "output": 15}
    assert streamed.tokens_by_tenant == {"t\u00e9": {"input": 150, "cached": 15, "output": 15}}
    prefill = next(s for s in streamed.stages if s.stage == "prefill")
    assert prefill.p50_s == pytest.approx(0.05) and prefill.ttft_share == pytest.approx(0.05 / 0.051)
