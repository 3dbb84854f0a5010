"""A radix tree over token ids whose nodes own KV slots (SGLang's RadixAttention ``RadixCache``, page size 1).

* ``match_prefix`` finds the longest cached prefix (splitting a node when the match ends inside it);
* ``insert`` adds a sequence's tokens and slots, returning how much of it was already cached, so the caller
  frees its duplicate slots;
* nodes in use are reference-counted (``lock_ref`` on the path to the root); only unreferenced leaves are
  evicted, least recently used first, and a parent becomes evictable when its last child goes.

A namespace (SGLang's ``cache_salt`` / ``extra_key``) is part of the key: equal tokens under different namespaces
never share a node.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

_ids = itertools.count()


class TreeNode:
    __slots__ = ("children", "id", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(self, key: list[int], value: torch.Tensor, parent: TreeNode | None) -> None:
        self.children: dict[object, TreeNode] = {}
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0
        self.last_access = time.monotonic()
        self.id = next(_ids)

    def __lt__(self, other: TreeNode) -> bool:
        return self.last_access < other.last_access


@dataclass(slots=True)
class MatchResult:
    slots: torch.Tensor
    node: TreeNode

    @property
    def length(self) -> int:
        return int(self.slots.numel())


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class RadixCache:
    """The prefix tree. ``free_slots`` returns evicted or duplicate slots to the KV pool."""

    def __init__(self, free_slots: Callable[[torch.Tensor], None], device: torch.device) -> None:
        self._free_slots = free_slots
        self._device = device
        self.evicted_tokens_total = 0
        self.reset()

    def reset(self) -> None:
        """Drop every node (the caller frees the pool separately)."""
        self.root = TreeNode([], self._empty(), None)
        self.root.lock_ref = 1
        self.evictable_size = 0
        self.protected_size = 0

    def _empty(self) -> torch.Tensor:
        return torch.empty(0, dtype=torch.int64, device=self._device)

    @staticmethod
    def _child_key(node: TreeNode, namespace: str, token: int) -> object:
        return (namespace, token) if node.parent is None else token

    @property
    def total_size(self) -> int:
        """Tokens held by the tree."""
        return self.evictable_size + self.protected_size

    def match_prefix(self, namespace: str, tokens: Sequence[int]) -> MatchResult:
        """The slots of the longest cached prefix of ``tokens`` and the node where it ends."""
        node = self.root
        now = time.monotonic()
        node.last_access = now
        values: list[torch.Tensor] = []
        pos = 0
        while pos < len(tokens):
            child = node.children.get(self._child_key(node, namespace, tokens[pos]))
            if child is None:
                break
            child.last_access = now
            n = _common_prefix(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            values.append(child.value)
            node = child
            pos += n
        slots = torch.cat(values) if values else self._empty()
        return MatchResult(slots, node)

    def _split(self, child: TreeNode, n: int) -> TreeNode:
        """Split ``child`` after ``n`` tokens; return the new upper node."""
        parent = child.parent
        assert parent is not None
        upper = TreeNode(child.key[:n], child.value[:n], parent)
        upper.lock_ref = child.lock_ref
        upper.last_access = child.last_access
        key = next(k for k, v in parent.children.items() if v is child)
        parent.children[key] = upper
        child.key = child.key[n:]
        child.value = child.value[n:]
        child.parent = upper
        upper.children[child.key[0]] = child
        return upper

    def insert(self, namespace: str, tokens: Sequence[int], slots: torch.Tensor) -> int:
        """Insert ``tokens`` with their ``slots``; return the length of the prefix that was already cached
        (whose slots in ``slots`` are duplicates the caller must free)."""
        node = self.root
        now = time.monotonic()
        node.last_access = now
        pos = 0
        while pos < len(tokens):
            key = self._child_key(node, namespace, tokens[pos])
            child = node.children.get(key)
            if child is None:
                leaf = TreeNode(list(tokens[pos:]), slots[pos:].clone(), node)
                node.children[key] = leaf
                self.evictable_size += len(leaf.key)
                return pos
            child.last_access = now
            n = _common_prefix(child.key, tokens[pos : pos + len(child.key)])
            if n < len(child.key):
                child = self._split(child, n)
            node = child
            pos += n
        return pos

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect ``node`` and its ancestors from eviction."""
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Release a protection taken with :meth:`inc_lock_ref`."""
        while node is not self.root:
            if node.lock_ref == 1:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node.lock_ref -= 1
            node = node.parent  # type: ignore[assignment]

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots by dropping unreferenced leaves, LRU first; return tokens freed."""
        heap = [n for n in self._leaves() if n.lock_ref == 0]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)
            self._free_slots(leaf.value)
            freed += len(leaf.key)
            self.evictable_size -= len(leaf.key)
            parent = leaf.parent
            assert parent is not None
            del parent.children[next(k for k, v in parent.children.items() if v is leaf)]
            if parent is not self.root and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, parent)
        self.evicted_tokens_total += freed
        return freed

    def _leaves(self) -> list[TreeNode]:
        out: list[TreeNode] = []
        stack = list(self.root.children.values())
        while stack:
            node = stack.pop()
            if node.children:
                stack.extend(node.children.values())
            else:
                out.append(node)
        return out

    def node_count(self) -> int:
        count, stack = 0, list(self.root.children.values())
        while stack:
            node = stack.pop()
            count += 1
            stack.extend(node.children.values())
        return count
