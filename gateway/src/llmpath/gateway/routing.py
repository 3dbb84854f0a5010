"""Prefix-aware routing, pure (no I/O): block hashing, a per-backend prefix index, and routing policies.

The gateway has no model tokenizer, so a prompt is cut into blocks of ``block_tokens × chars_per_token``
UTF-8 bytes and each block's hash chains the previous one (as llm-d's approximate prefix scorer does): two
prompts share their first *n* block hashes exactly when they share their first *n* blocks of bytes. The
:class:`PrefixIndex` remembers, per backend, the block hashes recently sent to it (idle TTL + LRU bound),
which approximates what that backend's radix cache holds. The :class:`Router` sends a request to the backend
holding its longest prefix unless that backend's load is imbalanced against the least loaded one.

Everything here is deterministic given its inputs and a clock, so simulations (bench/) can reuse it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class RouteReason(StrEnum):
    """Why a backend was chosen (the ``reason`` label of ``llmpath_route_decisions_total``)."""

    PREFIX = "prefix"  #: it holds the longest cached prefix
    NO_PREFIX = "no_prefix"  #: no backend holds enough of the prefix: least loaded
    IMBALANCED = "imbalanced"  #: the affine backend is overloaded: least loaded instead
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"
    RETRY = "retry"  #: a retry after the first choice failed to connect


class Policy(StrEnum):
    PREFIX = "prefix"
    ROUND_ROBIN = "round_robin"
    LEAST_LOAD = "least_load"


@dataclass(frozen=True, slots=True)
class Tokenization:
    """How text is cut into blocks: ``block_tokens`` tokens of ``chars_per_token`` bytes each."""

    block_tokens: int = 16
    chars_per_token: float = 4.0

    @property
    def block_bytes(self) -> int:
        return max(1, round(self.block_tokens * self.chars_per_token))

    def estimate_tokens(self, text: str) -> int:
        """Approximate token count of ``text`` (UTF-8 bytes / chars_per_token, rounded up)."""
        n = len(text.encode("utf-8", "surrogatepass"))
        return int(-(-n // self.chars_per_token))


def block_hashes(data: bytes, block_bytes: int, seed: int = 0) -> list[int]:
    """Chained hashes of the full ``block_bytes`` blocks of ``data`` (a trailing partial block is not hashed).

    Hashes use Python's ``hash`` (fast, 64-bit, randomised per process): the index lives in one process.
    """
    out: list[int] = []
    h = seed
    for i in range(0, len(data) - block_bytes + 1, block_bytes):
        h = hash((h, data[i : i + block_bytes]))
        out.append(h)
    return out


class PrefixIndex:
    """Per backend, the chained block hashes recently sent to it, with an idle TTL and an LRU bound.

    Blocks of one prompt are inserted deepest first, so under LRU pressure a prompt's tail is forgotten
    before its head, as a radix cache evicts leaves before their parents.
    """

    __slots__ = ("_blocks", "clock", "max_blocks", "ttl_s")

    def __init__(
        self, *, max_blocks_per_backend: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_blocks = max_blocks_per_backend
        self.ttl_s = ttl_s
        self.clock = clock
        self._blocks: dict[str, OrderedDict[int, float]] = {}

    def match(self, hashes: Sequence[int], backends: Iterable[str]) -> dict[str, int]:
        """Number of leading blocks of ``hashes`` each backend holds (expired blocks count as absent)."""
        now = self.clock()
        horizon = now - self.ttl_s
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

    def insert(self, backend: str, hashes: Sequence[int]) -> None:
        """Record that ``backend`` was sent a prompt with these block hashes (refreshing their TTL)."""
        blocks = self._blocks.get(backend)
        if blocks is None:
            blocks = self._blocks[backend] = OrderedDict()
        now = self.clock()
        for h in reversed(hashes):
            blocks[h] = now
            blocks.move_to_end(h)
        overflow = len(blocks) - self.max_blocks
        for _ in range(max(0, overflow)):
            blocks.popitem(last=False)

    def expire(self) -> int:
        """Drop expired blocks; returns how many were dropped (call periodically to bound memory)."""
        horizon = self.clock() - self.ttl_s
        dropped = 0
        for blocks in self._blocks.values():
            while blocks:
                h, seen = next(iter(blocks.items()))
                if seen >= horizon:
                    break
                del blocks[h]
                dropped += 1
        return dropped

    def forget(self, backend: str | None = None) -> None:
        """Forget one backend's blocks (e.g. it restarted) or everything."""
        if backend is None:
            self._blocks.clear()
        else:
            self._blocks.pop(backend, None)

    def size(self, backend: str) -> int:
        blocks = self._blocks.get(backend)
        return len(blocks) if blocks else 0


@dataclass(frozen=True, slots=True)
class Candidate:
    """A backend that may take the request: its name, requests in flight, and relative capacity."""

    name: str
    load: float = 0.0
    weight: float = 1.0

    @property
    def normalized_load(self) -> float:
        return self.load / self.weight


@dataclass(frozen=True, slots=True)
class RouteDecision:
    backend: str
    reason: RouteReason
    #: Leading blocks of the prompt the chosen backend is believed to hold.
    matched_blocks: int
    #: The best match over all candidates (may exceed ``matched_blocks`` when load won).
    best_matched_blocks: int


class Router:
    """Chooses a backend for a request from candidates, their prefix matches and their loads.

    ``prefix``: the backend with the most matched blocks wins if the match covers at least
    ``min_match_ratio`` of the prompt's blocks (and ``min_blocks``), unless its load exceeds the least
    loaded candidate's by more than ``balance_abs`` requests *and* by more than ``balance_rel`` times; then,
    and when nothing matches, the least loaded wins. Ties go to the candidate that was sent the fewest
    requests so far, which spreads new prefixes evenly. ``round_robin``: smooth weighted round robin.
    ``least_load``: lowest in-flight/weight.
    """

    def __init__(
        self,
        policy: Policy | str = Policy.PREFIX,
        *,
        min_match_ratio: float = 0.1,
        min_blocks: int = 1,
        balance_abs: float = 4.0,
        balance_rel: float = 1.5,
    ) -> None:
        self.policy = Policy(policy)
        self.min_match_ratio = min_match_ratio
        self.min_blocks = max(1, min_blocks)
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._sent: dict[str, int] = {}
        self._rr_current: dict[str, float] = {}

    def choose(self, candidates: Sequence[Candidate], matches: Mapping[str, int], total_blocks: int) -> RouteDecision:
        """Pick one of ``candidates`` (non-empty) for a prompt of ``total_blocks`` full blocks."""
        if not candidates:
            raise ValueError("no candidates")
        best_match = max((matches.get(c.name, 0) for c in candidates), default=0)
        if self.policy is Policy.ROUND_ROBIN:
            chosen, reason = self._round_robin(candidates), RouteReason.ROUND_ROBIN
        elif self.policy is Policy.LEAST_LOAD:
            chosen, reason = self._least_loaded(candidates), RouteReason.LEAST_LOAD
        else:
            chosen, reason = self._prefix(candidates, matches, total_blocks, best_match)
        self._sent[chosen.name] = self._sent.get(chosen.name, 0) + 1
        return RouteDecision(chosen.name, reason, matches.get(chosen.name, 0), best_match)

    def sent(self, backend: str) -> int:
        """Requests routed to ``backend`` so far."""
        return self._sent.get(backend, 0)

    def _prefix(
        self, candidates: Sequence[Candidate], matches: Mapping[str, int], total_blocks: int, best_match: int
    ) -> tuple[Candidate, RouteReason]:
        least = self._least_loaded(candidates)
        if best_match < self.min_blocks or best_match < self.min_match_ratio * max(1, total_blocks):
            return least, RouteReason.NO_PREFIX
        affine = [c for c in candidates if matches.get(c.name, 0) == best_match]
        best = self._least_loaded(affine)
        gap = best.normalized_load - least.normalized_load
        if gap > self.balance_abs and best.normalized_load > self.balance_rel * least.normalized_load:
            return least, RouteReason.IMBALANCED
        return best, RouteReason.PREFIX

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=lambda c: (c.normalized_load, self._sent.get(c.name, 0) / c.weight, c.name))

    def _round_robin(self, candidates: Sequence[Candidate]) -> Candidate:
        # nginx's smooth weighted round robin: even interleaving, proportional to weight.
        total = 0.0
        best: Candidate | None = None
        for c in candidates:
            cur = self._rr_current.get(c.name, 0.0) + c.weight
            self._rr_current[c.name] = cur
            total += c.weight
            if best is None or cur > self._rr_current[best.name]:
                best = c
        assert best is not None
        self._rr_current[best.name] -= total
        return best
