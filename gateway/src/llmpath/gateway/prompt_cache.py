"""Stage ``cache_lookup``: the prompt-caching layer (semantics in docs/prompt-caching.md).

What is cached is the backend's KV for a prompt prefix (in SGLang's radix cache / the embedded engine's);
the gateway keeps an *index* of which prefixes it sent where, per tenant, at block granularity, and uses it
to (1) predict how many prompt tokens the backend will serve from cache, and (2) route to that backend.

Isolation: each tenant's prefixes are hashed under its own seed and sent with its own ``cache_salt``, so
neither the index nor the backend's radix cache ever matches one tenant's prompt against another's. A flush
moves a tenant (or everyone) to a new *epoch*: new seeds and salts, so nothing cached before is reused,
in the gateway or in the backend.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import StrEnum

from llmpath.gateway.routing import PrefixIndex, Tokenization, block_hashes

#: Seeds remembered (one per tenant or route × model × epoch). In passthrough mode clients choose the model names, so
#: past this many the oldest is forgotten: a seed is a pure function of its key, computed again when asked for.
MAX_SEEDS = 4096


class CacheResult(StrEnum):
    """The ``result`` label of ``llmpath_prompt_cache_lookups_total``."""

    HIT = "hit"  #: every full block of the prompt is held by some backend
    PARTIAL = "partial"  #: a prefix of at least ``min_prefix_tokens`` is held
    MISS = "miss"  #: nothing (or less than the minimum) is held
    BYPASS = "bypass"  #: the index is not used: ``cache: off`` on the route, or ``prompt_cache.enabled: false``


class CacheMode(StrEnum):
    TENANT = "tenant"
    SHARED = "shared"
    OFF = "off"


@dataclass(frozen=True, slots=True)
class CacheKey:
    """The prompt as the cache sees it: its block hashes, estimated tokens, and the backend salt."""

    hashes: tuple[int, ...]
    prompt_tokens: int
    #: Sent to the backend as ``cache_salt`` (SGLang isolates radix-cache prefixes by it).
    cache_salt: str | None
    mode: CacheMode
    #: The hashed bytes and the chain's seed (to extend the key without hashing the prefix again).
    data: bytes = b""
    seed: int = 0
    #: Whether the gateway's index is used (False for ``cache: off`` and with ``prompt_cache.enabled: false``).
    indexed: bool = True


@dataclass(frozen=True, slots=True)
class CacheLookup:
    result: CacheResult
    #: Leading blocks each candidate backend holds.
    matches: dict[str, int]
    best_blocks: int
    total_blocks: int


class PromptCache:
    """Per-tenant prefix index with block granularity, minimum prefix, idle TTL, LRU bound and flush."""

    def __init__(
        self,
        index: PrefixIndex,
        tokenization: Tokenization,
        *,
        min_prefix_tokens: int = 64,
        enabled: bool = True,
    ) -> None:
        self.index = index
        self.tokenization = tokenization
        self.min_prefix_tokens = min_prefix_tokens
        self.enabled = enabled
        self._global_epoch = 0
        self._tenant_epochs: dict[str, int] = {}
        self._seeds: dict[tuple[str, int, int], tuple[int, str]] = {}

    @property
    def block_tokens(self) -> int:
        return self.tokenization.block_tokens

    def key(self, text: str, *, tenant: str, route: str, model: str, mode: CacheMode | str) -> CacheKey:
        """Block hashes and backend salt of an assembled prompt for ``tenant`` under the route's cache mode."""
        mode = CacheMode(mode)
        data = text.encode("utf-8", "surrogatepass")
        tokens = int(-(-len(data) // self.tokenization.chars_per_token))
        if mode is CacheMode.OFF:
            # A fresh salt per request: the backend reuses nothing, the index records nothing.
            return CacheKey((), tokens, f"nocache-{uuid.uuid4().hex}", CacheMode.OFF, indexed=False)
        scope = f"tenant:{tenant}" if mode is CacheMode.TENANT else f"route:{route}"
        seed, salt = self._seed(scope, model)
        if not self.enabled:
            # The gateway's layer is off (no index, routing or prediction); the backend still reuses prefixes,
            # isolated as the route says.
            return CacheKey((), tokens, salt, mode, seed=seed, indexed=False)
        hashes = tuple(block_hashes(data, self.tokenization.block_bytes, seed))
        return CacheKey(hashes, tokens, salt, mode, data, seed)

    def extend(self, key: CacheKey, text: str) -> CacheKey:
        """The key of ``text``, a continuation of ``key``'s prompt (e.g. prompt + reply): only the new blocks are
        hashed. Falls back to a full key when ``text`` does not start with the original prompt."""
        if not key.indexed:
            return key
        data = text.encode("utf-8", "surrogatepass")
        tokens = int(-(-len(data) // self.tokenization.chars_per_token))
        if not data.startswith(key.data):
            hashes = tuple(block_hashes(data, self.tokenization.block_bytes, key.seed))
        else:
            size = self.tokenization.block_bytes
            start = len(key.hashes) * size
            tail = block_hashes(data[start:], size, key.hashes[-1] if key.hashes else key.seed)
            hashes = key.hashes + tuple(tail)
        return CacheKey(hashes, tokens, key.cache_salt, key.mode, data, key.seed)

    def lookup(self, key: CacheKey, backends: Iterable[str]) -> CacheLookup:
        """How much of the prompt each backend holds, classified hit / partial / miss / bypass."""
        if not key.indexed:
            return CacheLookup(CacheResult.BYPASS, {}, 0, 0)
        matches = self.index.match(key.hashes, backends)
        best = max(matches.values(), default=0)
        total = len(key.hashes)
        if best and best == total and best * self.block_tokens >= self.min_prefix_tokens:
            result = CacheResult.HIT
        elif best * self.block_tokens >= max(1, self.min_prefix_tokens):
            result = CacheResult.PARTIAL
        else:
            result = CacheResult.MISS
        return CacheLookup(result, matches, best, total)

    def predicted_tokens(self, lookup: CacheLookup, backend: str) -> int:
        """Prompt tokens ``backend`` is predicted to serve from its cache (0 below the minimum prefix)."""
        blocks = lookup.matches.get(backend, 0)
        tokens = blocks * self.block_tokens
        return tokens if tokens >= self.min_prefix_tokens else 0

    def record(self, key: CacheKey, backend: str, hashes: Sequence[int] | None = None) -> None:
        """Remember that ``backend`` now holds the prompt's blocks (call when the request is sent to it)."""
        if key.indexed:
            self.index.insert(backend, key.hashes if hashes is None else hashes)

    def flush(self, tenant: str | None = None) -> None:
        """Invalidate one tenant's cached prefixes (``None``: everyone's) by moving to a new epoch."""
        if tenant is None:
            self._global_epoch += 1
            self._tenant_epochs.clear()
            self._seeds.clear()
            self.index.forget()
        else:
            scope = f"tenant:{tenant}"
            self._tenant_epochs[scope] = self._tenant_epochs.get(scope, 0) + 1
            prefix = f"{scope}\x00"  # the old epoch's seeds are never asked for again
            for memo_key in [k for k in self._seeds if k[0].startswith(prefix)]:
                del self._seeds[memo_key]

    def forget_backend(self, backend: str) -> None:
        """A backend restarted or was ejected: its cache is gone."""
        self.index.forget(backend)

    def _seed(self, scope: str, model: str) -> tuple[int, str]:
        epoch = self._tenant_epochs.get(scope, 0)
        memo_key = (f"{scope}\x00{model}", self._global_epoch, epoch)
        found = self._seeds.get(memo_key)
        if found is None:
            digest = hashlib.sha256(f"llmpath\x00{memo_key[0]}\x00{self._global_epoch}.{epoch}".encode()).digest()
            found = (int.from_bytes(digest[:8], "big"), digest[8:20].hex())
            if len(self._seeds) >= MAX_SEEDS:
                del self._seeds[next(iter(self._seeds))]
            self._seeds[memo_key] = found
        return found
