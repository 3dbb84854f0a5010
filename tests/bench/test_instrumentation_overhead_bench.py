"""bench/instrumentation_overhead.py runs: P1's side-by-side table, and the cache-interference measurement."""

from __future__ import annotations

import re
from types import ModuleType

import pytest


@pytest.fixture(scope="module")
def bench(bench_script) -> ModuleType:
    return bench_script("instrumentation_overhead")


def test_p1_prints_both_samplings_and_exports_every_sampled_span(bench, capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--requests", "400", "--rounds", "2", "--sink", "memory"])
    out = capsys.readouterr().out
    spans = dict(re.findall(r"^\s+(\w+):.*spans/request ([\d.]+)$", out, re.M))
    # a bare app has no spans; the stock instrumentation 4 per sampled request; llmpath 9 (server + 8 stages)
    assert float(spans["a"]) == 0 and float(spans["b100"]) == 4.0 and float(spans["c100"]) == 9.0
    assert 0 < float(spans["c10"]) < 9.0
    assert re.search(r"^sampling 100%: .* = \d\.\d\d \(target ≤ 1\.0\)", out, re.M)
    assert re.search(r"^sampling  10%: .* = \d\.\d\d \(target ≤ 0\.5\)", out, re.M)


def test_interference_times_the_middleware_alone_and_after_other_work(
    bench, capsys: pytest.CaptureFixture[str]
) -> None:
    assert bench.main(["--interference", "1", "--requests", "300", "--rounds", "1"]) == 0
    rows = re.findall(
        r"^\s+(alone|after FastAPI|after 1 MiB): +([\d.]+) µs/request +×([\d.]+)", capsys.readouterr().out, re.M
    )
    assert [name for name, _, _ in rows] == ["alone", "after FastAPI", "after 1 MiB"]
    assert all(float(us) > 0 for _, us, _ in rows) and rows[0][2] == "1.00"
