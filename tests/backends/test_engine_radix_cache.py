"""The radix tree and the token-slot pool: matching, splitting, ref-counting, LRU eviction, namespaces."""

from __future__ import annotations

import time

import pytest
import torch

from llmpath.backends.engine.kv_pool import KVPoolFull, TokenSlotPool
from llmpath.backends.engine.radix_cache import RadixCache


@pytest.fixture
def pool() -> TokenSlotPool:
    return TokenSlotPool(64, num_layers=1, kv_heads=1, head_dim=2, dtype=torch.float32, device=torch.device("cpu"))


@pytest.fixture
def tree(pool: TokenSlotPool) -> RadixCache:
    return RadixCache(pool.free, torch.device("cpu"))


def put(tree: RadixCache, pool: TokenSlotPool, tokens: list[int], ns: str = "") -> torch.Tensor:
    """Insert a sequence the way the scheduler does: allocate, insert, free the duplicate slots."""
    slots = pool.alloc(len(tokens))
    existing = tree.insert(ns, tokens, slots)
    pool.free(slots[:existing])
    return tree.match_prefix(ns, tokens).slots


def sequences(tree: RadixCache) -> set[tuple[int, ...]]:
    """Every root-to-leaf token sequence, read without touching access times."""
    out: set[tuple[int, ...]] = set()
    stack = [(child, tuple(child.key)) for child in tree.root.children.values()]
    while stack:
        node, seq = stack.pop()
        if not node.children:
            out.add(seq)
        stack.extend((c, seq + tuple(c.key)) for c in node.children.values())
    return out


def test_pool_alloc_and_free_round_trip(pool: TokenSlotPool) -> None:
    a = pool.alloc(60)
    assert pool.available == 4 and 0 not in a.tolist()  # slot 0 is the padding slot
    with pytest.raises(KVPoolFull):
        pool.alloc(5)
    pool.free(a)
    assert pool.available == 64
    assert sorted(pool.alloc(64).tolist()) == list(range(1, 65))


def test_longest_prefix_match_and_split(tree: RadixCache, pool: TokenSlotPool) -> None:
    slots = put(tree, pool, [1, 2, 3, 4, 5])
    match = tree.match_prefix("", [1, 2, 3, 9])
    assert match.length == 3 and match.slots.tolist() == slots[:3].tolist()
    assert tree.node_count() == 2  # the match split [1..5] into [1,2,3] + [4,5]
    assert tree.match_prefix("", [1, 2, 3, 4, 5, 6]).slots.tolist() == slots.tolist()
    assert tree.match_prefix("", [7]).length == 0
    assert tree.total_size == 5 and tree.evictable_size == 5


def test_insert_reports_the_already_cached_prefix(tree: RadixCache, pool: TokenSlotPool) -> None:
    put(tree, pool, [1, 2, 3, 4])
    slots = pool.alloc(6)
    assert tree.insert("", [1, 2, 3, 4, 5, 6], slots) == 4  # the caller frees slots[:4]
    pool.free(slots[:4])
    assert tree.total_size == 6
    assert pool.available == 64 - 6


def test_namespaces_isolate_identical_prefixes(tree: RadixCache, pool: TokenSlotPool) -> None:
    put(tree, pool, [1, 2, 3], ns="tenant-a")
    assert tree.match_prefix("tenant-b", [1, 2, 3]).length == 0
    assert tree.match_prefix("", [1, 2, 3]).length == 0
    assert tree.match_prefix("tenant-a", [1, 2, 3]).length == 3
    put(tree, pool, [1, 2, 3], ns="tenant-b")
    assert tree.total_size == 6  # the same tokens are stored twice, once per tenant


def test_locked_nodes_are_never_evicted(tree: RadixCache, pool: TokenSlotPool) -> None:
    put(tree, pool, [1, 2, 3, 4])
    put(tree, pool, [1, 2, 9, 9])
    locked = tree.match_prefix("", [1, 2, 3, 4])
    tree.inc_lock_ref(locked.node)
    assert tree.protected_size == 4 and tree.evictable_size == 2
    assert tree.evict(100) == 2  # only the unlocked [9, 9] leaf can go
    assert tree.match_prefix("", [1, 2, 3, 4]).length == 4
    tree.dec_lock_ref(locked.node)
    assert tree.protected_size == 0 and tree.evictable_size == 4
    assert tree.evict(100) == 4
    assert tree.total_size == 0 and pool.available == 64


def test_eviction_is_lru_by_leaf_and_frees_parents(tree: RadixCache, pool: TokenSlotPool) -> None:
    for seq in ([1, 2, 3], [1, 2, 4], [5, 6]):
        put(tree, pool, seq)
        time.sleep(0.002)
    tree.match_prefix("", [1, 2, 3])  # touch: leaves by last use are now [4] < [5, 6] < [3]
    assert tree.evict(1) == 1
    assert sequences(tree) == {(1, 2, 3), (5, 6)}  # [4] went first
    assert tree.evict(1) == 2
    assert sequences(tree) == {(1, 2, 3)}  # then [5, 6]
    tree.evict(100)
    assert tree.total_size == 0 and tree.node_count() == 0 and pool.available == 64
    assert tree.evicted_tokens_total == 6


def test_evicting_the_last_child_makes_the_parent_evictable(tree: RadixCache, pool: TokenSlotPool) -> None:
    put(tree, pool, [1, 2, 3, 4])
    tree.match_prefix("", [1, 2])  # split: [1,2] → [3,4]
    assert tree.node_count() == 2
    assert tree.evict(4) == 4  # the leaf, then its now-childless parent
    assert tree.node_count() == 0
