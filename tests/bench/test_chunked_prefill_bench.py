"""bench/chunked_prefill.py at a small size: the stall it measures, and mixed chunks removing it."""

from __future__ import annotations

import argparse
import asyncio
import statistics

import pytest

pytestmark = pytest.mark.slow


def test_mixed_chunks_bound_the_decode_gap_that_whole_prompts_cause(bench_script) -> None:
    """Medians of three rounds, as the benchmark reports: the longest gap of one round is one sample, which a
    preemption of the process (two busy cores) can stretch."""
    bench = bench_script("chunked_prefill")
    args = argparse.Namespace(preset="tiny", prompt_tokens=2000, running=2, rounds=3, threads=1)
    whole_prefill, whole_gap, whole_during = _medians(asyncio.run(bench._measure(args, -1, False)))
    _, mixed_gap, mixed_during = _medians(asyncio.run(bench._measure(args, 32, True)))

    # Nothing decodes during a whole-prompt prefill (at most the step under way when the prompt arrived).
    assert whole_during <= args.running and whole_gap >= 0.8 * whole_prefill
    assert mixed_during >= 2 * (2000 // 32) // 2  # both running requests decode along most of the 63 chunks
    assert mixed_gap < whole_gap / 3


def _medians(rounds: list[tuple[float, float, int]]) -> tuple[float, float, float]:
    """Per field, the median over the rounds: prefill seconds, longest decode gap seconds, tokens decoded."""
    prefill, gap, during = (statistics.median(field) for field in zip(*rounds, strict=True))
    return prefill, gap, during
