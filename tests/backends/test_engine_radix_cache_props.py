"""The radix tree against a reference model: a map from every cached (namespace, token prefix) to its KV slot.

Random sequences of insert / match / lock / unlock / evict check that matches are the longest cached prefix with
the slots first inserted for it, that locked prefixes survive eviction, that evicted slots are freed exactly once
and leave a prefix-closed set, that eviction is LRU over the leaves, and that the size counters add up.
"""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from llmpath.backends.engine import radix_cache
from llmpath.backends.engine.radix_cache import RadixCache, TreeNode

NAMESPACES = st.sampled_from(["", "a", "b"])
#: A tiny alphabet and short sequences, so that prompts share prefixes and split nodes often.
TOKENS = st.lists(st.integers(0, 3), max_size=7)

Key = tuple[str, tuple[int, ...]]


def _nodes(tree: RadixCache) -> Iterator[tuple[TreeNode, str, tuple[int, ...]]]:
    """Every node below the root with its namespace and the tokens from the root to its end."""
    stack: list[tuple[TreeNode, str, tuple[int, ...]]] = []
    for root_key, child in tree.root.children.items():
        assert isinstance(root_key, tuple)  # a root child is keyed by (namespace, first token)
        stack.append((child, root_key[0], tuple(child.key)))
    while stack:
        node, ns, seq = stack.pop()
        yield node, ns, seq
        stack.extend((c, ns, seq + tuple(c.key)) for c in node.children.values())


class RadixCacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self._saved_time = radix_cache.time
        radix_cache.time = SimpleNamespace(monotonic=self._tick)  # type: ignore[assignment]
        self.freed: list[int] = []
        self.tree = RadixCache(lambda slots: self.freed.extend(slots.tolist()), torch.device("cpu"))
        self.slot_ids = itertools.count(1)
        #: (namespace, prefix) → the slot of the prefix's last token.
        self.cached: dict[Key, int] = {}
        #: Locks held: the node match_prefix returned and the (namespace, prefix) it covers.
        self.locks: list[tuple[TreeNode, str, tuple[int, ...]]] = []

    def _tick(self) -> float:
        self.now += 1.0
        return self.now

    def teardown(self) -> None:
        radix_cache.time = self._saved_time

    def _cached_len(self, ns: str, tokens: list[int]) -> int:
        n = 0
        while n < len(tokens) and (ns, tuple(tokens[: n + 1])) in self.cached:
            n += 1
        return n

    def _protected(self) -> set[Key]:
        return {(ns, seq[:k]) for _, ns, seq in self.locks for k in range(1, len(seq) + 1)}

    @rule(ns=NAMESPACES, tokens=TOKENS)
    def insert(self, ns: str, tokens: list[int]) -> None:
        expected = self._cached_len(ns, tokens)
        slots = torch.tensor([next(self.slot_ids) for _ in tokens], dtype=torch.int64)
        assert self.tree.insert(ns, tokens, slots) == expected
        for k in range(expected, len(tokens)):
            self.cached[(ns, tuple(tokens[: k + 1]))] = int(slots[k])

    @rule(ns=NAMESPACES, tokens=TOKENS)
    def match(self, ns: str, tokens: list[int]) -> None:
        n = self._cached_len(ns, tokens)
        result = self.tree.match_prefix(ns, tokens)
        assert result.length == n
        assert result.slots.tolist() == [self.cached[(ns, tuple(tokens[: k + 1]))] for k in range(n)]

    @rule(ns=NAMESPACES, tokens=TOKENS)
    def lock(self, ns: str, tokens: list[int]) -> None:
        result = self.tree.match_prefix(ns, tokens)
        self.tree.inc_lock_ref(result.node)
        self.locks.append((result.node, ns, tuple(tokens[: result.length])))

    @precondition(lambda self: bool(self.locks))
    @rule(data=st.data())
    def unlock(self, data: st.DataObject) -> None:
        node, _, _ = self.locks.pop(data.draw(st.integers(0, len(self.locks) - 1)))
        self.tree.dec_lock_ref(node)

    @rule(num_tokens=st.integers(0, 12))
    def evict(self, num_tokens: int) -> None:
        evictable_before = self.tree.evictable_size
        leaves = [
            (n.last_access, int(n.value[-1])) for n, _, _ in _nodes(self.tree) if not n.children and n.lock_ref == 0
        ]
        self.freed.clear()
        freed = self.tree.evict(num_tokens)
        assert freed == len(self.freed) and len(set(self.freed)) == freed, "a slot freed twice"
        assert freed >= min(num_tokens, evictable_before)
        gone = set(self.freed)
        dropped = {key for key, slot in self.cached.items() if slot in gone}
        assert len(dropped) == freed, "freed a slot the tree did not hold"
        assert not dropped & self._protected(), "evicted a locked prefix"
        for key in dropped:
            del self.cached[key]
        # LRU: no leaf evictable before is kept while a less recently used one went.
        went = [t for t, last in leaves if last in gone]
        kept = [t for t, last in leaves if last not in gone]
        assert not went or not kept or max(went) <= min(kept)

    @invariant()
    def closed_under_prefixes(self) -> None:
        for ns, seq in self.cached:
            assert len(seq) == 1 or (ns, seq[:-1]) in self.cached

    @invariant()
    def tree_holds_exactly_the_model(self) -> None:
        held: dict[Key, int] = {}
        for node, ns, seq in _nodes(self.tree):
            assert node.key and len(node.key) == node.value.numel()
            for k, slot in enumerate(node.value.tolist()):
                held[(ns, seq[: len(seq) - len(node.key) + k + 1])] = slot
        assert held == self.cached

    @invariant()
    def sizes_add_up(self) -> None:
        nodes = list(_nodes(self.tree))
        assert self.tree.total_size == sum(len(n.key) for n, _, _ in nodes) == len(self.cached)
        protected = self._protected()
        assert self.tree.protected_size == len(protected)
        assert self.tree.evictable_size == len(self.cached) - len(protected)
        uses = Counter(key for _, ns, seq in self.locks for key in {(ns, seq[:k]) for k in range(1, len(seq) + 1)})
        for node, ns, seq in nodes:
            assert node.lock_ref == uses[(ns, seq)]


TestRadixCacheModel = RadixCacheModel.TestCase
TestRadixCacheModel.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
