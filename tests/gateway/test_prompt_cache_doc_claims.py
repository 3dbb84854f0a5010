"""docs/prompt-caching.md, claim by claim, where an operator relies on it: the documented defaults, the idle TTL and
its sweep, the LRU bound, per-tenant isolation (index seed and ``cache_salt``), what a flush does (one tenant,
everyone, ``shared`` routes), what a reload and an ejection do to the index, the disabled layer, and that a
prediction is counted whenever the backend's cached tokens are (a stream cut short included).

The index's own behaviour is tested in-process (a fake clock, no waiting); what the engine does with the salt, and
the metrics of requests it answered, against a real tiny engine behind a real gateway process."""

from __future__ import annotations

import asyncio
import inspect
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import CollectorRegistry

from llmpath.backends.base import ChatMessage
from llmpath.gateway.app import _expire_loop, build_gateway, create_app
from llmpath.gateway.config import GatewayConfig, PromptCacheConfig, RouteConfig, load_config
from llmpath.gateway.prompt_cache import CacheKey, CacheMode, CacheResult, PromptCache
from llmpath.gateway.reload import apply_config
from llmpath.gateway.routing import Candidate, PrefixIndex, Router, RouteReason, Tokenization
from tests.gateway.stack import FakeClock

DOC = Path(__file__).parents[2] / "docs" / "prompt-caching.md"
SYSTEM = "S" * 256  # 16 blocks of 16 bytes at 1 byte per token


def make_cache(
    clock: FakeClock, *, max_blocks: int = 65_536, ttl_s: float = 600.0, min_prefix: int = 64
) -> PromptCache:
    index = PrefixIndex(max_blocks_per_backend=max_blocks, ttl_s=ttl_s, clock=clock)
    return PromptCache(index, Tokenization(block_tokens=16, chars_per_token=1), min_prefix_tokens=min_prefix)


def key(cache: PromptCache, text: str, tenant: str = "acme", *, route: str = "r", model: str = "m",
        mode: CacheMode = CacheMode.TENANT) -> CacheKey:  # fmt: skip
    return cache.key(text, tenant=tenant, route=route, model=model, mode=mode)


def held(cache: PromptCache, k: CacheKey, backend: str = "a") -> int:
    """Leading blocks of ``k`` the index believes ``backend`` holds."""
    return cache.lookup(k, [backend]).matches[backend]


# ---- defaults and lifetime -------------------------------------------------------------------------------------


def test_the_documented_defaults_are_the_configurations() -> None:
    doc = " ".join(DOC.read_text(encoding="utf-8").split())
    defaults = PromptCacheConfig()

    def number(pattern: str) -> int:
        found = re.search(pattern, doc)
        assert found, pattern
        return int(found[1].replace(",", ""))

    assert number(r"blocks\*\* of `prompt_cache\.block_tokens` tokens \(default (\d+)") == defaults.block_tokens
    assert number(r"`prompt_cache\.min_prefix_tokens` \(default (\d+)\)") == defaults.min_prefix_tokens
    assert number(r"`prompt_cache\.ttl_s` seconds \(default (\d+)\)") == defaults.ttl_s
    assert number(r"\(default ([\d,]+) blocks ≈ 1M tokens") == defaults.max_blocks_per_backend
    assert 0.95e6 < defaults.max_blocks_per_backend * defaults.block_tokens < 1.1e6  # "≈ 1M tokens"
    sweep_interval = inspect.signature(_expire_loop).parameters["interval_s"].default
    assert number(r"Expired blocks are swept every (\d+) s") == sweep_interval
    assert "By default (`routes[].cache: tenant`)" in doc and RouteConfig(name="r").cache == "tenant"
    assert defaults.enabled is True


def test_the_ttl_is_an_idle_time_refreshed_by_every_use() -> None:
    clock = FakeClock()
    cache = make_cache(clock)  # ttl_s 600, the default
    first = key(cache, SYSTEM + "question one")
    cache.record(first, "a")
    clock.now += 599
    assert cache.lookup(key(cache, SYSTEM + "question two"), ["a"]).result is CacheResult.HIT  # every full block
    cache.record(key(cache, SYSTEM + "question two"), "a")  # that request used the system prompt's blocks again
    clock.now += 599  # 1198 s after the first request, 599 s after the last use
    assert held(cache, key(cache, SYSTEM + "question three")) == 16
    assert held(cache, first) == 16
    clock.now += 2  # 601 s idle: forgotten, whether or not the sweep ran yet
    assert cache.lookup(key(cache, SYSTEM + "question three"), ["a"]).result is CacheResult.MISS
    assert cache.index.size("a") == 16  # still in memory until the sweep ...
    assert cache.index.expire() == 16 and cache.index.size("a") == 0  # ... which drops them


async def test_expired_blocks_are_swept_by_the_gateway_and_the_gauge_follows() -> None:
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "e0"}],
            "tokenizer": {"chars_per_token": 1},
            "insecure_no_auth": True,
        },
    )
    registry = CollectorRegistry()
    app = create_app(config, registry=registry)
    gateway = app.gateway
    clock = FakeClock()
    gateway.prompt_cache.index.clock = clock
    gateway.prompt_cache.record(key(gateway.prompt_cache, SYSTEM), "e0")
    gateway.publish_index_blocks()
    assert registry.get_sample_value("llmpath_prompt_cache_index_blocks", {"backend": "e0"}) == 16
    clock.now += config.prompt_cache.ttl_s + 1
    sweeper = asyncio.create_task(_expire_loop(gateway, interval_s=0.01))
    try:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if gateway.prompt_cache.index.size("e0") == 0:
                break
    finally:
        sweeper.cancel()
        await asyncio.gather(sweeper, return_exceptions=True)
        await gateway.pool.stop()
    assert gateway.prompt_cache.index.size("e0") == 0
    assert registry.get_sample_value("llmpath_prompt_cache_index_blocks", {"backend": "e0"}) == 0


def test_the_lru_bound_is_per_backend_least_recent_first_deepest_blocks_first() -> None:
    clock = FakeClock()
    cache = make_cache(clock, max_blocks=24)
    a1, a2 = key(cache, "A" * 256), key(cache, "B" * 256)  # 16 blocks each
    cache.record(a1, "a")
    cache.record(a1, "b")
    clock.now += 1
    cache.record(a2, "a")  # 32 blocks sent to a: over its bound of 24
    assert cache.index.size("a") == 24
    assert held(cache, a2) == 16  # the most recent prompt is whole ...
    assert held(cache, a1) == 8  # ... the older one lost its 8 deepest blocks, its first 8 remain
    assert held(cache, a1, "b") == 16  # another backend's blocks are not counted against a's bound
    clock.now += 1
    cache.record(a1, "a")  # used again: now the most recent
    assert cache.index.size("a") == 24 and held(cache, a1) == 16 and held(cache, a2) == 8


# ---- isolation --------------------------------------------------------------------------------------------------


def test_tenants_are_isolated_per_model_and_shared_routes_are_shared_per_route() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    acme, again = key(cache, SYSTEM), key(cache, SYSTEM + "next")
    assert acme.cache_salt == again.cache_salt  # the same salt on every request: the backend reuses the tenant's KV
    beta, other_model = key(cache, SYSTEM, "beta"), key(cache, SYSTEM, model="m2")
    assert len({acme.cache_salt, beta.cache_salt, other_model.cache_salt}) == 3
    cache.record(acme, "a")
    assert held(cache, again) == 16
    assert held(cache, beta) == 0 and held(cache, other_model) == 0  # byte-identical, never matched
    shared = [key(cache, SYSTEM, tenant, route="docs", mode=CacheMode.SHARED) for tenant in ("acme", "beta")]
    assert shared[0].hashes == shared[1].hashes and shared[0].cache_salt == shared[1].cache_salt
    assert shared[0].cache_salt not in (acme.cache_salt, beta.cache_salt)
    other_route = key(cache, SYSTEM, route="faq", mode=CacheMode.SHARED)
    assert other_route.cache_salt != shared[0].cache_salt  # per route, not global
    cache.record(shared[0], "a")
    assert held(cache, shared[1]) == 16 and held(cache, other_route) == 0


def test_a_tenants_flush_moves_its_own_prefixes_and_a_full_flush_moves_every_route() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    tenant_key = key(cache, SYSTEM)
    shared_key = key(cache, SYSTEM, route="docs", mode=CacheMode.SHARED)
    beta_key = key(cache, SYSTEM, "beta")
    for k in (tenant_key, shared_key, beta_key):
        cache.record(k, "a")
    cache.flush("acme")
    assert cache.index.size("a") == 48  # nothing dropped: the old entries age out
    moved = key(cache, SYSTEM)
    assert moved.cache_salt != tenant_key.cache_salt and held(cache, moved) == 0
    assert key(cache, SYSTEM, "beta").cache_salt == beta_key.cache_salt and held(cache, beta_key) == 16
    # a `shared` route's prefixes are the route's, not the tenant's: one tenant's flush leaves them
    still = key(cache, SYSTEM, route="docs", mode=CacheMode.SHARED)
    assert still.cache_salt == shared_key.cache_salt and held(cache, still) == 16
    cache.flush()
    assert cache.index.size("a") == 0
    after = key(cache, SYSTEM, "beta", route="docs", mode=CacheMode.SHARED)
    assert after.cache_salt != shared_key.cache_salt
    assert key(cache, SYSTEM, "beta").cache_salt != beta_key.cache_salt


async def test_the_flush_endpoint_one_tenant_or_everyone(keys) -> None:
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "e0"}],
            "tokenizer": {"chars_per_token": 1},
            "api_keys": keys.config(),
        },
    )
    registry = CollectorRegistry()
    app = create_app(config, registry=registry)
    pc = app.gateway.prompt_cache
    auth = keys.auth(keys.admin)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
            for body in (b"{}", b""):  # `{}` and no body: everyone
                acme, beta = key(pc, SYSTEM * 2, "acme"), key(pc, SYSTEM * 2, "beta")
                pc.record(acme, "e0")
                pc.record(beta, "e0")
                resp = await client.post("/admin/prompt-cache/flush", json={"tenant": "acme"}, headers=auth)
                assert resp.json() == {"flushed": True, "tenant": "acme"}
                assert pc.index.size("e0") == 64  # acme's entries age out; beta's still match
                assert held(pc, key(pc, SYSTEM * 2, "acme"), "e0") == 0
                assert held(pc, key(pc, SYSTEM * 2, "beta"), "e0") == 32
                resp = await client.post("/admin/prompt-cache/flush", content=body, headers=auth)
                assert resp.status_code == 200 and resp.json() == {"flushed": True, "tenant": None}
                assert pc.index.size("e0") == 0
                assert registry.get_sample_value("llmpath_prompt_cache_index_blocks", {"backend": "e0"}) == 0
                assert key(pc, SYSTEM * 2, "beta").cache_salt != beta.cache_salt
            denied = await client.post("/admin/prompt-cache/flush", json={}, headers=keys.auth(keys.user))
            assert denied.status_code == 403
    finally:
        await app.gateway.pool.stop()


# ---- reload, ejection, the disabled layer, routing away from the match -----------------------------------------


def _config(**sections: Any) -> GatewayConfig:
    base: dict[str, Any] = {
        "backends": [{"url": "http://127.0.0.1:9", "name": "e0"}, {"url": "http://127.0.0.1:10", "name": "e1"}],
        "tokenizer": {"chars_per_token": 1},
        "routes": [{"name": "bot", "model": "m", "system_prompt": "You are the bot of {{ tenant }}. " * 8}],
        "insecure_no_auth": True,
    }
    return load_config(None, {**base, **sections})


async def test_a_reload_keeps_the_index_and_a_changed_system_prompt_is_a_new_prefix() -> None:
    gateway = build_gateway(_config())
    pc = gateway.prompt_cache

    def prompt_key() -> CacheKey:
        route = gateway.routes["bot"]
        text = route.assembler.assemble_chat([ChatMessage("user", "hello " * 20)], tenant="acme").cache_text
        return pc.key(text, tenant="acme", route="bot", model="m", mode=route.config.cache)

    try:
        before = prompt_key()
        pc.record(before, "e0")
        blocks = pc.index.size("e0")
        # a reload that changes nothing of the prompt: the index is kept (a reload is no flush)
        limits = {"max_tokens": 100, "default_max_tokens": 50}
        change = apply_config(gateway, _config(limits=limits))
        assert change.applied == ("limits",)
        assert pc.index.size("e0") == blocks and held(pc, prompt_key(), "e0") == len(before.hashes)
        # the route's system prompt changes: a different prefix, no flush needed; it matches only up to where the
        # text differs (the chat template's "<|im_start|>syst", the one block before the system prompt's words)
        routes = [{"name": "bot", "model": "m", "system_prompt": "You are the new bot of {{ tenant }}. " * 8}]
        assert apply_config(gateway, _config(routes=routes, limits=limits)).applied == ("routes",)
        assert held(pc, prompt_key(), "e0") == 1 and pc.index.size("e0") == blocks
        # the route's cache mode is live too: `shared` gives every tenant the route's salt
        shared = [{**routes[0], "cache": "shared"}]
        apply_config(gateway, _config(routes=shared, limits=limits))
        assert prompt_key().cache_salt == pc.key("", tenant="beta", route="bot", model="m", mode="shared").cache_salt
        # the prompt_cache section needs a restart: the running index keeps its TTL and bound
        cache_section = {"ttl_s": 5, "max_blocks_per_backend": 8}
        change = apply_config(gateway, _config(routes=shared, limits=limits, prompt_cache=cache_section))
        assert change.restart_required == ("prompt_cache",)
        assert (pc.index.ttl_s, pc.index.max_blocks) == (600.0, 65_536)
    finally:
        await gateway.pool.stop()


async def test_an_ejected_backend_is_forgotten_one_that_is_not_ejected_is_not() -> None:
    gateway = build_gateway(_config(health={"eject_after_failures": 3}))
    pc = gateway.prompt_cache
    try:
        k = key(pc, SYSTEM, route="bot")
        pc.record(k, "e0")
        pc.record(k, "e1")
        for _ in range(2):  # a restart that fails fewer checks than ejection takes: the index still believes in it
            gateway.pool.report_failure("e0", "connection refused")
        assert held(pc, k, "e0") == 16
        gateway.pool.report_failure("e0", "connection refused")  # ejected: its index is dropped
        assert pc.index.size("e0") == 0 and held(pc, k, "e1") == 16
    finally:
        await gateway.pool.stop()


async def test_the_disabled_layer_routes_about_round_robin_and_predicts_nothing() -> None:
    gateway = build_gateway(_config(prompt_cache={"enabled": False}))
    pc = gateway.prompt_cache
    try:
        picks = []
        for i in range(6):
            k = pc.key(SYSTEM + str(i % 2), tenant="acme", route="bot", model="m", mode="tenant")
            lookup = pc.lookup(k, ["e0", "e1"])
            assert lookup.result is CacheResult.BYPASS
            decision = gateway.router.choose(
                [Candidate("e0"), Candidate("e1")], lookup.matches, lookup.total_blocks, pc.index.size
            )
            assert decision.reason is RouteReason.NO_PREFIX and pc.predicted_tokens(lookup, decision.backend) == 0
            pc.record(k, decision.backend)
            picks.append(decision.backend)
        assert pc.index.size("e0") == pc.index.size("e1") == 0  # nothing recorded
        assert picks[0] != picks[1] and picks[:2] * 3 == picks  # idle backends, ties to the one sent fewer
        # the least loaded first
        assert gateway.router.choose([Candidate("e0", 2), Candidate("e1", 3)], {}, 0, pc.index.size).backend == "e0"
    finally:
        await gateway.pool.stop()


def test_sent_elsewhere_than_the_match_the_prediction_is_the_chosen_backends() -> None:
    clock = FakeClock()
    cache = make_cache(clock)
    k = key(cache, SYSTEM)
    cache.record(k, "a")
    lookup = cache.lookup(k, ["a", "b"])
    assert lookup.result is CacheResult.HIT
    router = Router("prefix", balance_abs=4, balance_rel=1.5, seed=1)
    decision = router.choose([Candidate("a", 9), Candidate("b", 1)], lookup.matches, lookup.total_blocks)
    assert (decision.backend, decision.reason) == ("b", RouteReason.IMBALANCED)
    assert cache.predicted_tokens(lookup, decision.backend) == 0  # a hit, and a prediction of 0
    assert cache.predicted_tokens(lookup, "a") == 256


# ---- against a real engine --------------------------------------------------------------------------------------

LONG_SYSTEM = "You are a careful assistant for the ACME support desk. " * 8  # 440 bytes


@pytest.fixture(scope="module")
def engine(stack) -> Any:
    return stack.start_engines(1)[0]


def _gateway_config(engine: Any, keys: Any, **sections: Any) -> dict[str, Any]:
    return {
        "backends": [{"url": engine.url, "name": engine.name}],
        "tokenizer": {"chars_per_token": 1},
        "prompt_cache": {"block_tokens": 16, "min_prefix_tokens": 32},
        "routes": [{"name": "tiny"}, {"name": "docs", "model": "tiny", "cache": "shared"}],
        "api_keys": keys.config(),
        **sections,
    }


@pytest.fixture(scope="module")
def gw(stack, keys, engine) -> Any:
    return stack.start_gateway("doc-claims", _gateway_config(engine, keys))


@pytest.fixture
def client(gw) -> Iterator[httpx.Client]:
    with gw.client() as c:
        yield c


def chat(
    client: httpx.Client, key: str, question: str, model: str = "tiny", system: str = LONG_SYSTEM, **extra: Any
) -> httpx.Response:
    messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
    body = {"model": model, "messages": messages, "max_tokens": 4, **extra}
    resp = client.post("/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
    assert resp.status_code == 200, resp.text
    return resp


def cached(resp: httpx.Response) -> int:
    return int(resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"])


@pytest.mark.slow
def test_shared_routes_share_the_engines_kv_and_only_a_full_flush_moves_them(gw, client, keys) -> None:
    chat(client, keys.user, "shared one", model="docs")
    beta = chat(client, keys.other, "shared two", model="docs")
    assert cached(beta) > 400  # another tenant reuses acme's prefix at the engine: one salt for the route
    assert gw.record(beta.headers["x-request-id"])["extra"]["cache_result"] == "partial"
    flush = client.post("/admin/prompt-cache/flush", json={"tenant": "acme"}, headers=keys.auth(keys.admin))
    assert flush.status_code == 200
    assert cached(chat(client, keys.user, "shared three", model="docs")) > 400  # the route's, not acme's
    chat(client, keys.user, "tenant one")
    assert cached(chat(client, keys.user, "tenant two")) > 400
    assert client.post("/admin/prompt-cache/flush", headers=keys.auth(keys.admin)).status_code == 200
    assert gw.metrics()[f'llmpath_prompt_cache_index_blocks{{backend="{gw.config["backends"][0]["name"]}"}}'] == 0
    for resp in (chat(client, keys.user, "tenant three"), chat(client, keys.other, "shared four", model="docs")):
        assert cached(resp) == 0  # new salts everywhere: the engine reuses nothing cached before
        assert gw.record(resp.headers["x-request-id"])["extra"]["cache_result"] == "miss"


def _sum(metrics: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in metrics.items() if k.startswith(name + "{") and all(w in k for w in want))


@pytest.mark.slow
def test_a_stream_cut_short_counts_its_prediction_with_its_cached_tokens(gw, client, keys) -> None:
    """The ratio of the two counters is the index's accuracy: a request whose cached tokens are counted (the
    backend reported them with its first token) has its prediction counted too, even when the client leaves
    before the end (a stop button)."""
    chat(client, keys.other, "cut short, warm")
    before = gw.metrics()
    messages = [{"role": "system", "content": LONG_SYSTEM}, {"role": "user", "content": "cut short, again"}]
    body = {"model": "tiny", "messages": messages, "max_tokens": 200, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=body, headers=keys.auth(keys.other)) as resp:
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if '"content"' in line:
                break  # the client goes away after the first token
    record = gw.record(request_id)
    assert record["extra"].get("usage_partial") is True and record["cached_tokens"] > 400
    deadline = time.monotonic() + 5
    while True:
        after = gw.metrics()
        cached_delta = _sum(after, "llmpath_tokens_total", type="cached") - _sum(
            before, "llmpath_tokens_total", type="cached"
        )
        if cached_delta or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    predicted_delta = _sum(after, "llmpath_prompt_cache_predicted_tokens_total", route="tiny") - _sum(
        before, "llmpath_prompt_cache_predicted_tokens_total", route="tiny"
    )
    assert cached_delta == record["cached_tokens"]
    assert record["extra"].get("predicted_cached_tokens") == predicted_delta
    assert 0 <= cached_delta - predicted_delta <= 32, (predicted_delta, cached_delta)


@pytest.mark.slow
def test_the_disabled_layer_keeps_the_engines_reuse_and_isolation(stack, keys, engine) -> None:
    gw = stack.start_gateway("doc-claims-disabled", _gateway_config(engine, keys, prompt_cache={"enabled": False}))
    system = "Answer in the voice of a lighthouse keeper, briefly and kindly. " * 7  # no other test sends it
    try:
        with gw.client() as client:
            chat(client, keys.user, "disabled one", system=system)
            again = chat(client, keys.user, "disabled two", system=system)
            other = chat(client, keys.other, "disabled two", system=system)
            routed = chat(client, keys.user, "disabled three", model="docs", system=system)
            shared = chat(client, keys.other, "disabled four", model="docs", system=system)
        records = [gw.record(r.headers["x-request-id"]) for r in (again, other, routed, shared)]
        assert {r["extra"]["cache_result"] for r in records} == {"bypass"}
        assert cached(again) > 400 and cached(other) == 0  # the engine still reuses, still per tenant
        assert cached(shared) > 400  # and per route for `shared`
        metrics = gw.metrics()
        assert _sum(metrics, "llmpath_prompt_cache_predicted_tokens_total") == 0
        assert _sum(metrics, "llmpath_prompt_cache_index_blocks") == 0
    finally:
        gw.proc.terminate()
        gw.proc.wait(timeout=20)
