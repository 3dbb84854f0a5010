"""What chunked prefill changes for requests that are already decoding when a long prompt arrives.

The embedded engine in-process (real model compute, no HTTP), three settings side by side in one run: whole-prompt
prefill (``--chunked-prefill-size -1``), chunked prefill, and chunked prefill with ``--enable-mixed-chunk``. In each
round a few requests are decoding when a long, uncached prompt arrives; printed per setting (medians over rounds):
the long prompt's prefill time, the running requests' longest gap between two tokens, and how many tokens they
decoded while the long prompt was prefilled.

    .venv/bin/python bench/chunked_prefill.py [--preset small] [--chunk 256] [--prompt-tokens 3000] [--rounds 5]

Expected: chunking alone does not shorten the stall (the chunks run back to back ahead of decode, as in SGLang);
mixed chunks bound the gap to about one chunk's forward at some cost in prefill time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid
from typing import Any

from llmpath.backends.engine.runtime import Engine, EngineArgs
from llmpath.backends.engine.sampling import SamplingParams


async def _token_times(stream: Any, times: list[float]) -> None:
    """Append each token's arrival time until cancelled; then abort the request."""
    try:
        async for out in stream:
            times.extend(time.time() for _ in out.new_ids)  # wall clock, as the engine's meta_info times
    finally:
        await stream.aclose()


async def _round(engine: Engine, prompt_tokens: int, running: int) -> tuple[float, float, int]:
    """(prefill seconds, longest gap of a running request during it, tokens they decoded during it)."""
    tok = engine.tokenizer
    decode = SamplingParams(temperature=0.0, ignore_eos=True, max_new_tokens=4000)
    arrivals: list[list[float]] = [[] for _ in range(running)]
    streams = [
        asyncio.create_task(_token_times(engine.submit(tok.encode(f"Story {i}: once upon a time"), decode), times))
        for i, times in enumerate(arrivals)
    ]
    await asyncio.sleep(0.3)  # they are decoding now
    text = f"{uuid.uuid4()} " + " ".join(f"line {i}: value {i * 7 % 13}." for i in range(prompt_tokens // 16))
    ids = tok.encode(text)[:prompt_tokens]
    async for out in engine.submit(ids, SamplingParams(temperature=0.0, max_new_tokens=1)):
        if out.new_ids:
            break
    # The prefill as the engine ran it (not from the submission, which a busy machine may delay by a few steps).
    start, end = out.meta["forward_entry_time"], out.meta["prefill_finished_time"]
    for task in streams:
        task.cancel()
    await asyncio.gather(*streams, return_exceptions=True)
    gaps, during = [], 0
    for times in arrivals:
        inside = [t for t in times if start <= t <= end]
        during += len(inside)
        edges = [max((t for t in times if t < start), default=start), *inside, end]
        gaps.append(max(b - a for a, b in zip(edges, edges[1:], strict=False)))
    return end - start, max(gaps, default=0.0), during


async def _measure(args: argparse.Namespace, chunk: int, mixed: bool) -> list[tuple[float, float, int]]:
    engine = Engine(
        EngineArgs(preset=args.preset, chunked_prefill_size=chunk, enable_mixed_chunk=mixed, threads=args.threads)
    )
    engine.start()
    try:
        await _round(engine, args.prompt_tokens, args.running)  # warm-up
        return [await _round(engine, args.prompt_tokens, args.running) for _ in range(args.rounds)]
    finally:
        engine.scheduler.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--chunk", type=int, default=256, help="--chunked-prefill-size of the chunked settings")
    parser.add_argument("--prompt-tokens", type=int, default=3000)
    parser.add_argument("--running", type=int, default=4, help="requests decoding when the long prompt arrives")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args()
    settings = {"whole prompt": (-1, False), f"chunks of {args.chunk}": (args.chunk, False),
                f"chunks of {args.chunk}, mixed": (args.chunk, True)}  # fmt: skip
    rows = {name: asyncio.run(_measure(args, *setting)) for name, setting in settings.items()}
    print(f"chunked prefill — preset {args.preset}, {args.prompt_tokens}-token prompt arriving while {args.running} "
          f"requests decode; medians of {args.rounds} rounds")  # fmt: skip
    print(f"{'setting':<26} {'prefill ms':>10} {'longest decode gap ms':>22} {'tokens decoded meanwhile':>25}")
    base_gap = None
    for name, values in rows.items():
        prefill = statistics.median(v[0] for v in values) * 1e3
        gap = statistics.median(v[1] for v in values) * 1e3
        during = statistics.median(v[2] for v in values)
        base_gap = base_gap or gap
        print(f"{name:<26} {prefill:>10.1f} {gap:>15.1f} ({gap / base_gap:4.2f}×) {during:>25.0f}")


if __name__ == "__main__":
    main()
