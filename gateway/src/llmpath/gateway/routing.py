"""Prefix-aware routing, pure (no I/O): block hashing, a per-backend prefix index, and routing policies.

The gateway has no model tokenizer, so a prompt is cut into blocks of ``block_tokens × chars_per_token``
UTF-8 bytes and each block's hash chains the previous one (as llm-d's approximate prefix scorer does): two
prompts share their first *n* block hashes exactly when they share their first *n* blocks of bytes. The
:class:`PrefixIndex` remembers, per backend, the block hashes recently sent to it (idle TTL + LRU bound),
which approximates what that backend's radix cache holds. The :class:`Router` sends a request to the backend
holding its longest prefix unless that backend's load is imbalanced against the least loaded one, and a new prefix
to the backend whose index holds the least.

Everything here is deterministic given its inputs, a clock and the router's ``seed``, so simulations (bench/) can
reuse it.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum


class RouteReason(StrEnum):
    """Why a backend was chosen (the ``reason`` label of ``llmpath_route_decisions_total``)."""

    PREFIX = "prefix"  #: it holds the longest cached prefix
    NO_PREFIX = "no_prefix"  #: no backend holds enough of the prefix: the one caching least
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
    before its head, as a radix cache evicts leaves before their parents. Because every insert is a prompt's
    chain from its first block, what a backend holds is closed under prefixes and a block is never fresher
    than its parent: ``match`` finds each backend's deepest block by binary search, and asks only the backends
    holding the prompt's first block (a reverse index of first blocks), so its cost does not grow with
    backends × matched blocks.
    """

    __slots__ = ("_blocks", "_roots", "clock", "max_blocks", "ttl_s")

    def __init__(
        self, *, max_blocks_per_backend: int, ttl_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_blocks = max_blocks_per_backend
        self.ttl_s = ttl_s
        self.clock = clock
        self._blocks: dict[str, OrderedDict[int, float]] = {}
        #: A prompt's first block → the backends holding it.
        self._roots: dict[int, set[str]] = {}

    def match(self, hashes: Sequence[int], backends: Iterable[str]) -> dict[str, int]:
        """Number of leading blocks of ``hashes`` each backend holds (expired blocks count as absent)."""
        result = dict.fromkeys(backends, 0)
        holders = self._roots.get(hashes[0]) if hashes else None
        if not holders:
            return result
        horizon = self.clock() - self.ttl_s
        names = [n for n in holders if n in result] if len(holders) <= len(result) else holders.intersection(result)
        for name in names:
            blocks = self._blocks[name]
            # Invariant: blocks 0..lo are held and fresh; none beyond hi is.
            lo, hi = -1, len(hashes) - 1
            while lo < hi:
                mid = (lo + hi + 1) // 2
                seen = blocks.get(hashes[mid])
                if seen is not None and seen >= horizon:
                    lo = mid
                else:
                    hi = mid - 1
            result[name] = lo + 1
        return result

    def insert(self, backend: str, hashes: Sequence[int]) -> None:
        """Record that ``backend`` was sent a prompt with these block hashes, from its first block (refreshing
        their TTL)."""
        if not hashes:
            return
        blocks = self._blocks.get(backend)
        if blocks is None:
            blocks = self._blocks[backend] = OrderedDict()
        now = self.clock()
        for h in reversed(hashes):
            blocks[h] = now
            blocks.move_to_end(h)
        holders = self._roots.get(hashes[0])
        if holders is None:
            self._roots[hashes[0]] = {backend}
        else:
            holders.add(backend)
        for _ in range(len(blocks) - self.max_blocks):
            self._unroot(blocks.popitem(last=False)[0], backend)

    def expire(self) -> int:
        """Drop expired blocks; returns how many were dropped (call periodically to bound memory)."""
        horizon = self.clock() - self.ttl_s
        dropped = 0
        for backend, blocks in self._blocks.items():
            while blocks:
                h, seen = next(iter(blocks.items()))
                if seen >= horizon:
                    break
                del blocks[h]
                self._unroot(h, backend)
                dropped += 1
        return dropped

    def forget(self, backend: str | None = None) -> None:
        """Forget one backend's blocks (e.g. it restarted) or everything."""
        if backend is None:
            self._blocks.clear()
            self._roots.clear()
            return
        for h in self._blocks.pop(backend, ()):
            self._unroot(h, backend)

    def size(self, backend: str) -> int:
        blocks = self._blocks.get(backend)
        return len(blocks) if blocks else 0

    def _unroot(self, h: int, backend: str) -> None:
        holders = self._roots.get(h)
        if holders is not None:
            holders.discard(backend)
            if not holders:
                del self._roots[h]


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
    ``min_match_ratio`` of the prompt's blocks (and ``min_blocks``), unless it is *overloaded*: its load exceeds
    the least loaded candidate's by more than ``balance_abs`` requests *and* by more than ``balance_rel`` times;
    then the least loaded wins. A prompt that nothing matches starts a new prefix: it goes to the backend holding
    the fewest prefix blocks (``footprint``, per weight) among those not overloaded, as sglang-router's
    ``cache_aware`` sends it to the smallest tree, then the least loaded, then the one sent the fewest requests
    so far. New prefixes so spread by what each backend already caches, not by which backend happens to be idle
    the moment one arrives: a prefix's later requests follow it, so one unlucky placement weighs on a backend for
    as long as the prefix is used. ``round_robin``: smooth weighted round robin. ``least_load``: lowest
    in-flight/weight.

    Remaining ties are broken in an order of the backends' names that is this router's own (a keyed hash of
    ``seed``, random per instance by default), so gateway replicas with the same configuration do not all
    place new prefixes on the same backends. Pass ``seed`` for a reproducible order (tests, simulations).
    """

    def __init__(
        self,
        policy: Policy | str = Policy.PREFIX,
        *,
        min_match_ratio: float = 0.1,
        min_blocks: int = 1,
        balance_abs: float = 4.0,
        balance_rel: float = 1.5,
        seed: int | None = None,
    ) -> None:
        self.policy = Policy(policy)
        #: What the tie-break order derives from (random per instance unless given).
        self.seed = secrets.randbits(64) if seed is None else seed
        self._order = _TieBreakOrder(self.seed)
        self.min_match_ratio = min_match_ratio
        self.min_blocks = max(1, min_blocks)
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._sent: dict[str, int] = {}
        self._rr_current: dict[str, float] = {}

    def choose(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, int],
        total_blocks: int,
        footprint: Callable[[str], int] | None = None,
    ) -> RouteDecision:
        """Pick one of ``candidates`` (non-empty) for a prompt of ``total_blocks`` full blocks. ``footprint``: a
        backend's prefix blocks in the index (where new prefixes go; none: every backend counts as empty)."""
        if not candidates:
            raise ValueError("no candidates")
        best_match = max((matches.get(c.name, 0) for c in candidates), default=0)
        if self.policy is Policy.ROUND_ROBIN:
            chosen, reason = self._round_robin(candidates), RouteReason.ROUND_ROBIN
        elif self.policy is Policy.LEAST_LOAD:
            chosen, reason = self._least_loaded(candidates), RouteReason.LEAST_LOAD
        else:
            chosen, reason = self._prefix(candidates, matches, total_blocks, best_match, footprint)
        self._sent[chosen.name] = self._sent.get(chosen.name, 0) + 1
        return RouteDecision(chosen.name, reason, matches.get(chosen.name, 0), best_match)

    def sent(self, backend: str) -> int:
        """Requests routed to ``backend`` so far."""
        return self._sent.get(backend, 0)

    def _prefix(
        self,
        candidates: Sequence[Candidate],
        matches: Mapping[str, int],
        total_blocks: int,
        best_match: int,
        footprint: Callable[[str], int] | None,
    ) -> tuple[Candidate, RouteReason]:
        least = self._least_loaded(candidates)
        if best_match < self.min_blocks or best_match < self.min_match_ratio * max(1, total_blocks):
            return self._new_prefix(candidates, least, footprint), RouteReason.NO_PREFIX
        affine = [c for c in candidates if matches.get(c.name, 0) == best_match]
        best = self._least_loaded(affine)
        if self._overloaded(best, least):
            return least, RouteReason.IMBALANCED
        return best, RouteReason.PREFIX

    def _overloaded(self, candidate: Candidate, least: Candidate) -> bool:
        load = candidate.normalized_load
        return load - least.normalized_load > self.balance_abs and load > self.balance_rel * least.normalized_load

    def _new_prefix(
        self, candidates: Sequence[Candidate], least: Candidate, footprint: Callable[[str], int] | None
    ) -> Candidate:
        if footprint is None:
            return least
        eligible = (c for c in candidates if not self._overloaded(c, least))
        return min(eligible, key=lambda c: (footprint(c.name) / c.weight, *self._load_order(c)))

    def _least_loaded(self, candidates: Sequence[Candidate]) -> Candidate:
        return min(candidates, key=self._load_order)

    def _load_order(self, c: Candidate) -> tuple[float, float, tuple[int, str]]:
        """Least loaded first, then the one sent the fewest requests (per weight), then this router's order."""
        return c.normalized_load, self._sent.get(c.name, 0) / c.weight, self._order[c.name]

    def _round_robin(self, candidates: Sequence[Candidate]) -> Candidate:
        # nginx's smooth weighted round robin: even interleaving, proportional to weight.
        total = 0.0
        best: Candidate | None = None
        best_key: tuple[float, tuple[int, str]] | None = None
        for c in candidates:
            cur = self._rr_current.get(c.name, 0.0) + c.weight
            self._rr_current[c.name] = cur
            total += c.weight
            key = (-cur, self._order[c.name])  # the highest current weight; ties in this router's order
            if best_key is None or key < best_key:
                best, best_key = c, key
        assert best is not None
        self._rr_current[best.name] -= total
        return best


class _TieBreakOrder(dict[str, tuple[int, str]]):
    """Backend name → its rank in one router's tie-break order: a keyed hash of the name (the name itself
    settles a collision), computed on first use."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        self._key = hashlib.blake2b(str(seed).encode(), digest_size=32).digest()

    def __missing__(self, name: str) -> tuple[int, str]:
        digest = hashlib.blake2b(name.encode(), digest_size=8, key=self._key).digest()
        rank = self[name] = (int.from_bytes(digest, "big"), name)
        return rank
