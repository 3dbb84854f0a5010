"""``PrefixIndex.match``: the reverse index and binary search against the plain walk they replaced, side by side.

The plain walk asked every backend for the prompt's blocks one by one, so its cost grew with backends × matched
blocks: about 0.27 ms per request at 256 workers in ``bench/scaling_sim.py``, where hot system prompts are cached on
many workers. The index now asks only the backends holding the prompt's first block, and finds each one's deepest
block by binary search. Both indexes here get the same inserts; every match is checked to be identical, then match
and insert are timed (median of ``--rounds``).

Workload, per backend count B: 4 × B apps with 1,000–4,000-token system prompts (16-token blocks) and Zipf
popularity; the app of rank r (from 1) is cached on ``--hot-share`` × B / r backends (the most popular one on an
eighth of them by default: about what one gateway does in the simulation), each backend also holds conversations
continuing its apps; queries are a popular app's prompt with a new user turn, or the next turn of a held
conversation, matched against all B backends.

    .venv/bin/python bench/prefix_index.py                 # 8, 64, 256 backends: seconds
    .venv/bin/python bench/prefix_index.py --backends 512 --hot-share 1   # the hottest prompt on every backend
"""

from __future__ import annotations

import argparse
import bisect
import os
import random
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate

from llmpath.gateway.routing import PrefixIndex, Tokenization, block_hashes

BLOCK_BYTES = Tokenization().block_bytes


class LinearPrefixIndex(PrefixIndex):
    """The index with its former ``match``: every backend, block by block, until a block is missing or expired."""

    __slots__ = ()

    def match(self, hashes: Sequence[int], backends: Iterable[str]) -> dict[str, int]:
        horizon = self.clock() - self.ttl_s
        result: dict[str, int] = {}
        for name in backends:
            blocks = self._blocks.get(name)
            n = 0
            if blocks:
                for h in hashes:
                    seen = blocks.get(h)
                    if seen is None or seen < horizon:
                        break
                    n += 1
            result[name] = n
        return result


@dataclass(frozen=True, slots=True)
class Workload:
    names: list[str]
    inserts: list[tuple[str, list[int]]]
    queries: list[list[int]]


def build_workload(backends: int, queries: int, hot_share: float, seed: int) -> Workload:
    rng = random.Random(f"llmpath-prefix-index/{seed}/{backends}")
    names = [f"w{i:04d}" for i in range(backends)]
    apps = [block_hashes(rng.randbytes(rng.randint(62, 250) * BLOCK_BYTES), BLOCK_BYTES) for _ in range(4 * backends)]
    popularity = list(accumulate(1 / (rank + 1) for rank in range(len(apps))))

    def continued(prefix: list[int], min_blocks: int, max_blocks: int) -> list[int]:
        tail = rng.randbytes(rng.randint(min_blocks, max_blocks) * BLOCK_BYTES)
        return prefix + block_hashes(tail, BLOCK_BYTES, prefix[-1])

    inserts: list[tuple[str, list[int]]] = []
    held: list[list[int]] = []  # conversations some backend holds
    for rank, app in enumerate(apps):
        for name in rng.sample(names, max(1, min(backends, round(hot_share * backends / (rank + 1))))):
            inserts.append((name, app))
            for _ in range(rng.randint(0, 3)):
                held.append(continued(app, 10, 60))
                inserts.append((name, held[-1]))
    rng.shuffle(inserts)
    found = []
    for _ in range(queries):
        if rng.random() < 0.5:
            found.append(continued(rng.choice(held), 2, 25))
        else:
            chosen = bisect.bisect_left(popularity, rng.random() * popularity[-1])
            found.append(continued(apps[chosen], 2, 25))
    return Workload(names, inserts, found)


@dataclass(frozen=True, slots=True)
class Timing:
    insert_us: float
    match_us: float


def measure(kind: type[PrefixIndex], workload: Workload, rounds: int) -> tuple[Timing, list[dict[str, int]]]:
    inserts, matches = [], []
    results: list[dict[str, int]] = []
    for _ in range(rounds):
        index = kind(max_blocks_per_backend=3000, ttl_s=600)  # 48,000 tokens: the simulation's worker cache
        started = time.perf_counter()
        for name, hashes in workload.inserts:
            index.insert(name, hashes)
        inserts.append((time.perf_counter() - started) / len(workload.inserts))
        started = time.perf_counter()
        results = [index.match(q, workload.names) for q in workload.queries]
        matches.append((time.perf_counter() - started) / len(workload.queries))
    return Timing(statistics.median(inserts) * 1e6, statistics.median(matches) * 1e6), results


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", type=int, nargs="+", default=[8, 64, 256])
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--hot-share", type=float, default=1 / 8, help="share of backends holding the top app")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)
    if min(args.backends) < 1 or args.queries < 1 or args.rounds < 1 or args.hot_share <= 0:
        parser.error("backends, queries, rounds and the hot share must be positive")

    print(
        f"PrefixIndex.match, plain walk vs reverse index (load avg {os.getloadavg()[0]:.2f}; median of {args.rounds})"
    )
    header = ("backends", "holders/query", "best match", "walk µs/match", "index µs/match", "×faster")
    print(" | ".join(header) + " | walk µs/insert | index µs/insert")
    for backends in args.backends:
        workload = build_workload(backends, args.queries, args.hot_share, args.seed)
        walk, expected = measure(LinearPrefixIndex, workload, args.rounds)
        index, got = measure(PrefixIndex, workload, args.rounds)
        if got != expected:
            sys.exit(f"{backends} backends: the reverse index and the plain walk disagree")
        holders = statistics.mean(sum(1 for n in m.values() if n) for m in got)
        best = statistics.mean(max(m.values()) for m in got)
        print(
            f"{backends} | {holders:.1f} | {best:.0f} blocks | {walk.match_us:.1f} | {index.match_us:.1f} | "
            f"{walk.match_us / index.match_us:.1f} | {walk.insert_us:.1f} | {index.insert_us:.1f}"
        )


if __name__ == "__main__":
    main()
