"""The prompt-caching layer: hit/partial/miss/bypass, minimum prefix, tenant isolation, flush."""

from __future__ import annotations

from llmpath.gateway.prompt_cache import MAX_SEEDS, CacheKey, CacheMode, CacheResult, PromptCache
from llmpath.gateway.routing import PrefixIndex, Tokenization

SYSTEM = "S" * 256  # 16 blocks of 16 bytes at 1 char/token


def make_cache(min_prefix: int = 64) -> PromptCache:
    index = PrefixIndex(max_blocks_per_backend=10_000, ttl_s=60)
    return PromptCache(index, Tokenization(block_tokens=16, chars_per_token=1), min_prefix_tokens=min_prefix)


def key(cache: PromptCache, text: str, tenant: str = "t1", mode: CacheMode = CacheMode.TENANT) -> CacheKey:
    return cache.key(text, tenant=tenant, route="r", model="m", mode=mode)


def test_miss_then_hit_then_partial() -> None:
    cache = make_cache()
    first = key(cache, SYSTEM + "question one")
    assert first.prompt_tokens == 268 and len(first.hashes) == 16
    lookup = cache.lookup(first, ["a", "b"])
    assert lookup.result is CacheResult.MISS and lookup.matches == {"a": 0, "b": 0}
    cache.record(first, "a")
    again = cache.lookup(key(cache, SYSTEM + "question one"), ["a", "b"])
    assert again.result is CacheResult.HIT and again.best_blocks == 16
    assert cache.predicted_tokens(again, "a") == 256 and cache.predicted_tokens(again, "b") == 0
    longer = cache.lookup(key(cache, SYSTEM + "x" * 100), ["a", "b"])
    assert longer.result is CacheResult.PARTIAL and longer.matches["a"] == 16 and longer.total_blocks == 22


def test_below_minimum_prefix_is_a_miss() -> None:
    cache = make_cache(min_prefix=128)
    k = key(cache, "P" * 100)  # 6 blocks = 96 tokens < 128
    cache.record(k, "a")
    lookup = cache.lookup(key(cache, "P" * 100), ["a"])
    assert lookup.result is CacheResult.MISS and lookup.best_blocks == 6
    assert cache.predicted_tokens(lookup, "a") == 0


def test_tenants_are_isolated_in_index_and_backend_salt() -> None:
    cache = make_cache()
    k1, k2 = key(cache, SYSTEM, "t1"), key(cache, SYSTEM, "t2")
    assert k1.hashes != k2.hashes and k1.cache_salt != k2.cache_salt
    cache.record(k1, "a")
    assert cache.lookup(k2, ["a"]).result is CacheResult.MISS
    # shared mode: tenants share the route's prefixes
    s1, s2 = key(cache, SYSTEM, "t1", CacheMode.SHARED), key(cache, SYSTEM, "t2", CacheMode.SHARED)
    assert s1.hashes == s2.hashes and s1.cache_salt == s2.cache_salt


def test_off_mode_bypasses_with_fresh_salt() -> None:
    cache = make_cache()
    k1, k2 = key(cache, SYSTEM, mode=CacheMode.OFF), key(cache, SYSTEM, mode=CacheMode.OFF)
    assert k1.hashes == () and k1.cache_salt != k2.cache_salt
    cache.record(k1, "a")
    assert cache.lookup(k1, ["a"]).result is CacheResult.BYPASS
    assert cache.index.size("a") == 0


def test_flush_one_tenant_or_everyone() -> None:
    cache = make_cache()
    k1, k2 = key(cache, SYSTEM, "t1"), key(cache, SYSTEM, "t2")
    cache.record(k1, "a")
    cache.record(k2, "a")
    cache.flush("t1")
    new1 = key(cache, SYSTEM, "t1")
    assert new1.cache_salt != k1.cache_salt  # the backend will not reuse t1's old KV either
    assert cache.lookup(new1, ["a"]).result is CacheResult.MISS
    assert cache.lookup(key(cache, SYSTEM, "t2"), ["a"]).result is CacheResult.HIT
    cache.flush()
    assert cache.index.size("a") == 0
    assert key(cache, SYSTEM, "t2").cache_salt != k2.cache_salt


def test_flushing_one_tenant_again_and_again_keeps_memory_bounded() -> None:
    cache = make_cache()
    salts = set()
    for _ in range(50):
        salts.add(key(cache, SYSTEM, "t1").cache_salt)
        key(cache, SYSTEM, "t2")
        cache.flush("t1")
    assert len(salts) == 50  # every flush moved t1 to a new salt
    assert len(cache._seeds) == 1  # t2's seed only: t1's old epochs' seeds were dropped with each flush


def test_distinct_model_names_keep_the_seed_memo_bounded_and_the_salts_stable() -> None:
    """In passthrough mode clients choose the model names: each new one must not be remembered for ever."""
    cache = make_cache()
    first = cache.key(SYSTEM, tenant="t1", route="default", model="model-0", mode=CacheMode.TENANT)
    for i in range(1, MAX_SEEDS + 500):
        cache.key(SYSTEM, tenant="t1", route="default", model=f"model-{i}", mode=CacheMode.TENANT)
    assert len(cache._seeds) == MAX_SEEDS
    again = cache.key(SYSTEM, tenant="t1", route="default", model="model-0", mode=CacheMode.TENANT)
    assert (again.cache_salt, again.hashes) == (first.cache_salt, first.hashes)  # forgotten, computed the same
    cache.flush("t1")
    flushed = cache.key(SYSTEM, tenant="t1", route="default", model="model-0", mode=CacheMode.TENANT)
    assert flushed.cache_salt != first.cache_salt  # a flush still moves the tenant to new salts


def test_disabled_layer_bypasses_the_index_but_keeps_the_backends_isolation() -> None:
    """``prompt_cache.enabled: false`` turns off the gateway's index (lookups `bypass`, nothing recorded, no
    prediction); the backend still reuses prefixes: the same salt for a tenant's requests, another tenant's differs,
    `shared` routes share one, and `cache: off` still gets a fresh salt per request."""
    index = PrefixIndex(max_blocks_per_backend=10_000, ttl_s=60)
    cache = PromptCache(index, Tokenization(block_tokens=16, chars_per_token=1), min_prefix_tokens=64, enabled=False)
    first, again, other = key(cache, SYSTEM, "t1"), key(cache, SYSTEM + "more", "t1"), key(cache, SYSTEM, "t2")
    assert first.hashes == () and first.prompt_tokens == 256
    assert first.cache_salt is not None and first.cache_salt == again.cache_salt != other.cache_salt
    enabled = make_cache()
    assert first.cache_salt == key(enabled, SYSTEM, "t1").cache_salt  # the same isolation as with the layer on
    cache.record(first, "a")
    lookup = cache.lookup(again, ["a"])
    assert lookup.result is CacheResult.BYPASS and cache.predicted_tokens(lookup, "a") == 0
    assert cache.index.size("a") == 0 and cache.extend(first, SYSTEM + "reply") is first
    s1, s2 = key(cache, SYSTEM, "t1", CacheMode.SHARED), key(cache, SYSTEM, "t2", CacheMode.SHARED)
    assert s1.cache_salt == s2.cache_salt != first.cache_salt
    o1, o2 = key(cache, SYSTEM, mode=CacheMode.OFF), key(cache, SYSTEM, mode=CacheMode.OFF)
    assert o1.cache_salt != o2.cache_salt
    cache.flush("t1")
    assert key(cache, SYSTEM, "t1").cache_salt != first.cache_salt  # a flush still moves the backend's salt
