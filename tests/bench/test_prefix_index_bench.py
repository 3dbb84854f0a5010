"""bench/prefix_index.py: the plain walk it times the index against gives the same matches, and the script runs."""

from __future__ import annotations

from types import ModuleType

import pytest

from llmpath.gateway.routing import PrefixIndex


@pytest.fixture(scope="module")
def bench(bench_script) -> ModuleType:
    return bench_script("prefix_index")


def test_workload_has_shared_prefixes_and_both_indexes_agree(bench) -> None:
    workload = bench.build_workload(32, 300, 0.5, seed=3)
    _, walk = bench.measure(bench.LinearPrefixIndex, workload, rounds=1)
    timing, index = bench.measure(PrefixIndex, workload, rounds=1)
    assert index == walk
    assert timing.match_us > 0 and timing.insert_us > 0
    # hot prompts are held by several backends, and most queries find a long prefix somewhere
    assert max(sum(1 for n in m.values() if n) for m in index) >= 8
    assert sum(1 for m in index if max(m.values()) >= 62) > 0.9 * len(index)


def test_cli_prints_the_side_by_side_table(bench, capsys: pytest.CaptureFixture[str]) -> None:
    bench.main(["--backends", "4", "16", "--queries", "50", "--rounds", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].startswith("backends | holders/query | best match | walk µs/match | index µs/match | ×faster")
    assert [line.split(" | ")[0] for line in lines[2:]] == ["4", "16"]
    with pytest.raises(SystemExit) as exc:
        bench.main(["--backends", "0"])
    assert exc.value.code == 2
