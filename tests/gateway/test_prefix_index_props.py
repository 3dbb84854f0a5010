"""The gateway's prefix index and prompt-cache keys against reference models (hypothesis).

The index model keeps, per backend, each block's last use as ``(time, insert number, -depth)``: the LRU order the
docs promise (least recently used first, a prompt's deepest blocks before its first ones), an idle TTL refreshed
by every insert, and the per-backend bound.
"""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from llmpath.gateway.prompt_cache import CacheMode, PromptCache
from llmpath.gateway.routing import PrefixIndex, Tokenization, block_hashes
from tests.gateway.stack import FakeClock

TTL_S = 10.0
BACKENDS = ["a", "b", "c"]
#: Prompts of one-byte blocks from a three-letter alphabet, so that they share prefixes often.
PROMPTS = st.binary(max_size=6).map(lambda b: bytes(x % 3 for x in b))


def _chain(prompt: bytes) -> list[int]:
    return block_hashes(prompt, 1)


class PrefixIndexModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.max_blocks = 0
        self.index: PrefixIndex | None = None  # made by the initialize rule
        #: backend → block hash → (last use, insert number, -depth): smallest is the least recently used.
        self.held: dict[str, dict[int, tuple[float, int, int]]] = {}
        self.inserts = itertools.count()

    @property
    def idx(self) -> PrefixIndex:
        assert self.index is not None
        return self.index

    @initialize(max_blocks=st.integers(1, 8))
    def start(self, max_blocks: int) -> None:
        self.max_blocks = max_blocks
        self.index = PrefixIndex(max_blocks_per_backend=max_blocks, ttl_s=TTL_S, clock=self.clock)

    def _fresh(self, backend: str) -> dict[int, tuple[float, int, int]]:
        horizon = self.clock.now - TTL_S
        return {h: stamp for h, stamp in self.held.get(backend, {}).items() if stamp[0] >= horizon}

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, TTL_S, 7.5]))
    def advance(self, dt: float) -> None:
        self.clock.now += dt

    @rule(backend=st.sampled_from(BACKENDS), prompt=PROMPTS)
    def insert(self, backend: str, prompt: bytes) -> None:
        chain = _chain(prompt)
        self.idx.insert(backend, chain)
        if not chain:
            return
        n = next(self.inserts)
        blocks = self.held.setdefault(backend, {})
        for depth, h in enumerate(chain):
            blocks[h] = (self.clock.now, n, -depth)
        while len(blocks) > self.max_blocks:
            del blocks[min(blocks, key=blocks.__getitem__)]

    @rule(prompt=PROMPTS, asked=st.lists(st.sampled_from([*BACKENDS, "d"]), unique=True))
    def match(self, prompt: bytes, asked: list[str]) -> None:
        chain = _chain(prompt)
        expected = {}
        for backend in asked:
            fresh = self._fresh(backend)
            expected[backend] = next((k for k, h in enumerate(chain) if h not in fresh), len(chain))
        assert self.idx.match(chain, asked) == expected

    @rule()
    def expire(self) -> None:
        before = sum(len(b) for b in self.held.values())
        self.held = {backend: self._fresh(backend) for backend in self.held}
        assert self.idx.expire() == before - sum(len(b) for b in self.held.values())

    @rule(backend=st.sampled_from([*BACKENDS, None]))
    def forget(self, backend: str | None) -> None:
        self.idx.forget(backend)
        if backend is None:
            self.held.clear()
        else:
            self.held.pop(backend, None)

    @invariant()
    def sizes_and_bound(self) -> None:
        for backend in [*BACKENDS, "d"]:
            size = self.idx.size(backend)
            assert size == len(self.held.get(backend, {})) and size <= self.max_blocks

    @invariant()
    def reverse_index_names_only_holders(self) -> None:
        """Every (first block, backend) in the reverse index is held by that backend: forgotten ones do not leak."""
        for h, holders in self.idx._roots.items():
            assert holders and all(h in self.held.get(b, {}) for b in holders)


TestPrefixIndexModel = PrefixIndexModel.TestCase
TestPrefixIndexModel.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)

TEXT = st.text(st.sampled_from("ab\u00e9\U0001f600\ud800"), max_size=12)
MODES = st.sampled_from([CacheMode.TENANT, CacheMode.SHARED])


def _cache(block_tokens: int) -> PromptCache:
    index = PrefixIndex(max_blocks_per_backend=100, ttl_s=TTL_S)
    return PromptCache(index, Tokenization(block_tokens=block_tokens, chars_per_token=1), min_prefix_tokens=1)


@settings(max_examples=300, deadline=None)
@given(prompt=TEXT, reply=TEXT, other=TEXT, block_tokens=st.integers(1, 5), mode=MODES)
def test_extending_a_key_equals_keying_the_whole_text(
    prompt: str, reply: str, other: str, block_tokens: int, mode: CacheMode
) -> None:
    cache = _cache(block_tokens)
    first = cache.key(prompt, tenant="t", route="r", model="m", mode=mode)
    for text in (prompt + reply, other):
        assert cache.extend(first, text) == cache.key(text, tenant="t", route="r", model="m", mode=mode)


@settings(max_examples=200, deadline=None)
@given(text=TEXT, block_tokens=st.integers(1, 5))
def test_tenants_and_epochs_never_share_a_block(text: str, block_tokens: int) -> None:
    cache = _cache(block_tokens)
    one, two = (cache.key(text, tenant=t, route="r", model="m", mode=CacheMode.TENANT) for t in ("t1", "t2"))
    cache.flush("t1")
    again = cache.key(text, tenant="t1", route="r", model="m", mode=CacheMode.TENANT)
    for a, b in ((one, two), (one, again)):
        assert not set(a.hashes) & set(b.hashes) and a.cache_salt != b.cache_salt
    assert cache.key(text, tenant="t2", route="r", model="m", mode=CacheMode.TENANT) == two
