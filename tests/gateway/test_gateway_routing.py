"""The pure routing layer: chained block hashes, the per-backend prefix index and the policies."""

from __future__ import annotations

from collections import Counter

import pytest

from llmpath.gateway.routing import (
    Candidate,
    PrefixIndex,
    Router,
    RouteReason,
    Tokenization,
    block_hashes,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_block_hashes_chain_and_share_prefixes() -> None:
    a = block_hashes(b"0123456789abcdefXYZ", 4)
    b = block_hashes(b"0123456789abZZZZZZZ", 4)
    assert len(a) == 4  # the partial trailing block is not hashed
    assert a[:3] == b[:3] and a[3] != b[3]
    # chained: the same block after a different prefix hashes differently
    assert block_hashes(b"AAAAxxxx", 4)[1] != block_hashes(b"BBBBxxxx", 4)[1]
    assert block_hashes(b"abcd", 4, seed=1) != block_hashes(b"abcd", 4, seed=2)


def test_tokenization_estimates() -> None:
    t = Tokenization(block_tokens=16, chars_per_token=4)
    assert t.block_bytes == 64
    assert t.estimate_tokens("a" * 9) == 3
    assert Tokenization(chars_per_token=1).estimate_tokens("é") == 2  # UTF-8 bytes


def test_index_match_ttl_and_lru() -> None:
    clock = Clock()
    index = PrefixIndex(max_blocks_per_backend=6, ttl_s=10, clock=clock)
    hashes = block_hashes(b"x" * 40, 4)  # 10 blocks
    index.insert("a", hashes[:4])
    assert index.match(hashes, ["a", "b"]) == {"a": 4, "b": 0}
    clock.now += 11
    assert index.match(hashes, ["a"]) == {"a": 0}  # idle TTL
    index.insert("a", hashes[:4])
    index.insert("a", block_hashes(b"y" * 16, 4))  # 4 more blocks: over the bound of 6
    assert index.size("a") == 6
    # the *tail* of the older prompt was evicted first, its head survives (radix-like)
    assert index.match(hashes, ["a"]) == {"a": 2}
    clock.now += 11
    assert index.expire() == 6 and index.size("a") == 0


def test_prefix_policy_prefers_longest_match() -> None:
    router = Router("prefix", min_match_ratio=0.2, balance_abs=4, balance_rel=1.5)
    cands = [Candidate("a", 1), Candidate("b", 0), Candidate("c", 0)]
    d = router.choose(cands, {"a": 8, "b": 2, "c": 0}, total_blocks=10)
    assert (d.backend, d.reason, d.matched_blocks, d.best_matched_blocks) == ("a", RouteReason.PREFIX, 8, 8)
    # too little of the prompt matched: least loaded instead
    d = router.choose(cands, {"a": 1}, total_blocks=10)
    assert (d.backend, d.reason) == ("b", RouteReason.NO_PREFIX)


def test_prefix_policy_falls_back_when_imbalanced() -> None:
    router = Router("prefix", balance_abs=4, balance_rel=1.5)
    matches = {"a": 10}
    # gap 4 is not beyond the absolute threshold
    assert router.choose([Candidate("a", 5), Candidate("b", 1)], matches, 10).backend == "a"
    # gap 5 > 4 and 6 > 1.5 × 1
    d = router.choose([Candidate("a", 6), Candidate("b", 1)], matches, 10)
    assert (d.backend, d.reason, d.matched_blocks, d.best_matched_blocks) == ("b", RouteReason.IMBALANCED, 0, 10)
    # gap 6 > 4 but 26 < 1.5 × 20: relatively balanced, keep affinity
    assert router.choose([Candidate("a", 26), Candidate("b", 20)], matches, 10).backend == "a"
    # weights: a has twice the capacity, so 6 in flight is a normalized load of 3
    assert router.choose([Candidate("a", 6, weight=2), Candidate("b", 1)], matches, 10).backend == "a"


def test_new_prefixes_spread_evenly() -> None:
    router = Router("prefix")
    cands = [Candidate(n) for n in "abcd"]
    picks = Counter(router.choose(cands, {}, 10).backend for _ in range(40))
    assert set(picks.values()) == {10}


def test_round_robin_is_smooth_and_weighted() -> None:
    router = Router("round_robin")
    cands = [Candidate("a", weight=2), Candidate("b"), Candidate("c")]
    picks = [router.choose(cands, {"b": 99}, 100).backend for _ in range(8)]
    assert Counter(picks) == {"a": 4, "b": 2, "c": 2}
    assert picks[:4] == ["a", "b", "c", "a"]
    assert router.choose(cands, {}, 1).reason is RouteReason.ROUND_ROBIN


def test_least_load() -> None:
    router = Router("least_load")
    d = router.choose([Candidate("a", 3), Candidate("b", 2), Candidate("c", 5, weight=4)], {"a": 5}, 5)
    assert (d.backend, d.reason) == ("c", RouteReason.LEAST_LOAD)


def test_no_candidates() -> None:
    with pytest.raises(ValueError):
        Router().choose([], {}, 0)
