"""Claims of docs/backends.md a gateway owner relies on that no other test checked: error classes of timeouts and
busy answers, the metrics' default buckets and SGLang's bucket rules, what the counters leave out (aborted
requests, health checks, ``log_metrics: false``), cache isolation by ``extra_key``, ``--disable-radix-cache``, the
KV-pool refusal, ``/flush_cache`` refusing while requests run, and ``/health_generate`` on a full queue."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from pathlib import Path

import aiohttp
import httpx
import pytest

from llmpath.backends import (
    BackendBadRequest,
    BackendRequest,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    ChatMessage,
    FirstToken,
    OpenAIBackend,
    SamplingParams,
    SGLangBackend,
)
from llmpath.backends.engine.metrics import DEFAULT_BUCKETS, parse_buckets
from tests.backends.engine_loads import wait_loads
from tests.backends.test_engine_http import metric

FIXTURES = Path(__file__).parent / "fixtures"
PROMPT = "Doc claims hold when a real engine says so. " * 3
LONG = {"max_new_tokens": 3000, "ignore_eos": True}

#: SGLang 0.5.23's default buckets (shared/reference/sglang.md §5.1), written out independently of the engine.
SGLANG_DEFAULT_BUCKETS: dict[str, list[float]] = {
    "sglang:time_to_first_token_seconds": [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400],
    "sglang:inter_token_latency_seconds": [0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.025, 0.03, 0.035, 0.04,
                                           0.06, 0.08, 0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8],
    "sglang:e2e_request_latency_seconds": [0.1, 0.2, 0.4, 0.6, 0.8, 1, 2, 4, 6, 8, 10, 20, 40, 60, 80, 100, 200, 400,
                                           600, 1200, 1800, 2400],
    "sglang:queue_time_seconds": [0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.2, 0.5, 1, 2, 3, 4, 5, 10, 15, 20, 30, 40, 50,
                                  60, 70, 80, 90, 100, 200, 300, 400, 500, 600, 700, 800, 900, 1000, 1200, 1400, 1600,
                                  1800, 2000, 2500, 3000],
    "sglang:per_stage_req_latency_seconds": [0.001 * 1.62**i for i in range(30)],
}  # fmt: skip


def bucket_bounds(text: str, name: str) -> list[float]:
    """The ``le`` bounds (without +Inf) of the first series of histogram ``name`` in a /metrics text."""
    bounds: list[float] = []
    for line in text.splitlines():
        if line.startswith(name + "_bucket{"):
            le = re.search(r'le="([^"]+)"', line)
            assert le is not None
            if le.group(1) == "+Inf":
                return bounds
            bounds.append(float(le.group(1)))
    return bounds


# ------------------------------------------------------------------ bucket rules (no engine)


@pytest.mark.parametrize(
    ("rule", "want"),
    [
        # SGLang's two_sides_exponential_buckets: ceil(count / 2) steps each side, the lower side clamped at 0.
        ("tse 1 1.5 5", [0.0, 1.0, 2.5, 3.25, 4.375]),
        ("tse 0.5 2 4", [0.0, 0.5, 2.5, 4.5]),
        ("tse 10 2 3", [6.0, 8.0, 10.0, 12.0, 14.0]),
        ("custom 0.5 0.1 0.5 2", [0.1, 0.5, 2.0]),
        ("default", SGLANG_DEFAULT_BUCKETS["sglang:time_to_first_token_seconds"]),
    ],
)
def test_bucket_rules_give_sglangs_bounds(rule: str, want: list[float]) -> None:
    got = parse_buckets(rule.split(), DEFAULT_BUCKETS["sglang:time_to_first_token_seconds"])
    assert list(got) == pytest.approx(want)


def test_a_tse_base_not_above_one_is_refused_as_by_sglang() -> None:
    with pytest.raises(ValueError, match="base must be greater than 1"):
        parse_buckets(["tse", "1", "1", "4"], ())


# ------------------------------------------------------------------ error classes (loopback server)


@pytest.mark.parametrize(
    ("status", "kind", "gateway_status"),
    [(408, BackendTimeout, 504), (504, BackendTimeout, 504), (429, BackendUnavailable, 503),
     (502, BackendServerError, 502), (500, BackendServerError, 502), (404, BackendBadRequest, 404)],
)  # fmt: skip
async def test_http_statuses_map_to_the_documented_error_classes(loopback, status, kind, gateway_status) -> None:
    loopback.reply("/generate", b'{"error": {"message": "nope"}}', status=status, headers={"Retry-After": "3"})
    backend = SGLangBackend(loopback.url)
    try:
        with pytest.raises(kind) as info:
            [ev async for ev in backend.generate(BackendRequest("r", "m", prompt="x"))]
    finally:
        await backend.aclose()
    assert info.value.status_code == gateway_status
    if kind is BackendUnavailable:
        assert info.value.retry_after == 3.0
    if kind is BackendServerError:
        assert info.value.upstream_status == status


async def test_a_session_passed_in_is_not_closed_by_the_backend(loopback) -> None:
    loopback.reply("/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes())
    session = aiohttp.ClientSession()
    try:
        backend = SGLangBackend(loopback.url, session=session)
        [ev async for ev in backend.generate(BackendRequest("r", "m", prompt="x"))]
        await backend.aclose()
        assert not session.closed
    finally:
        await session.close()


async def test_openai_model_override_and_a_non_streamed_first_token_has_the_counts(loopback) -> None:
    """``model=`` replaces the request's model upstream; without a stream the usage arrives with the answer, so
    ``FirstToken`` carries the prompt and cached counts (a stream's only with ``continuous_usage=True``)."""
    loopback.reply("/v1/chat/completions", (FIXTURES / "chat_nonstream.json").read_bytes())
    backend = OpenAIBackend(loopback.url + "/v1", model="upstream-id")
    request = BackendRequest("r", "gateway-name", messages=[ChatMessage("user", "Capital?")], stream=False)
    try:
        events = [ev async for ev in backend.generate(request)]
    finally:
        await backend.aclose()
    assert json.loads(loopback.requests[0].body)["model"] == "upstream-id"
    first = events[1]
    assert isinstance(first, FirstToken) and (first.prompt_tokens, first.cached_tokens) == (42, 32)


# ------------------------------------------------------------------ the engine's metrics and cache


@pytest.fixture(scope="module")
def url(engine) -> str:
    return engine.url


@pytest.mark.slow
def test_histograms_have_sglangs_default_buckets_and_every_series_exists_at_start(url: str) -> None:
    text = httpx.get(f"{url}/metrics").text
    for name, want in SGLANG_DEFAULT_BUCKETS.items():
        assert bucket_bounds(text, name) == pytest.approx(want), name
    for name, labels in [
        ("sglang:num_aborted_requests_total", {}),
        ("sglang:cached_tokens_total", {"cache_source": "device"}),
        ("sglang:evicted_tokens_total", {"cache_type": "RadixCache", "dp_rank": "0"}),
        ("sglang:per_stage_req_latency_seconds_count", {"stage": "chunked_prefill"}),
        ("sglang:num_requests_total", {"is_streaming": "true"}),
    ]:
        pattern = "|".join(f'{k}="{v}"' for k, v in labels.items()) or "model_name"
        assert re.search(rf"^{re.escape(name)}\{{.*({pattern})", text, re.M), name


@pytest.mark.slow
async def test_aborted_requests_health_checks_and_log_metrics_false_count_in_no_request_counter(url: str) -> None:
    # (An aborted request that reached prefill still observed its queue time and TTFT, as in SGLang.)
    counters = ("sglang:num_requests_total", "sglang:prompt_tokens_total", "sglang:generation_tokens_total",
                "sglang:cached_tokens_total", "sglang:e2e_request_latency_seconds_count")  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        before = (await client.get("/metrics")).text
        call = asyncio.create_task(client.post("/generate", json={"text": PROMPT, "rid": "dc-abort",
                                                                  "sampling_params": LONG}))  # fmt: skip
        await wait_loads(client, num_running_reqs=1)
        assert (await client.post("/abort_request", json={"rid": "dc-abort"})).status_code == 200
        aborted = (await call).json()["meta_info"]
        assert aborted["finish_reason"]["type"] == "abort" and aborted["completion_tokens"] > 0
        assert (await client.get("/health_generate")).status_code == 200
        quiet = {
            "text": "not counted",
            "log_metrics": False,
            "sampling_params": {"max_new_tokens": 3, "ignore_eos": True},
        }
        assert (await client.post("/generate", json=quiet)).json()["meta_info"]["completion_tokens"] == 3
        after = (await client.get("/metrics")).text
    assert {n: metric(after, n) - metric(before, n) for n in counters} == dict.fromkeys(counters, 0.0)
    assert metric(after, "sglang:num_aborted_requests_total") - metric(before, "sglang:num_aborted_requests_total") == 1


@pytest.mark.slow
def test_extra_key_isolates_cached_prefixes_as_cache_salt_does(url: str) -> None:
    body = {"text": "A shared system prompt for every tenant. " * 3, "sampling_params": {"max_new_tokens": 1}}

    def cached(**extra: str) -> int:
        return httpx.post(f"{url}/generate", json={**body, **extra}).json()["meta_info"]["cached_tokens"]

    cached(extra_key="tenant-a")
    prompt = len(body["text"]) + 1
    assert cached(extra_key="tenant-a") == prompt - 1
    assert cached(extra_key="tenant-b") == 0
    assert cached(cache_salt="tenant-a") == 0  # same value, other field: another key


@pytest.mark.slow
async def test_flush_cache_is_refused_while_a_request_runs(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        call = asyncio.create_task(client.post("/generate", json={"text": PROMPT, "rid": "dc-flush",
                                                                  "sampling_params": LONG}))  # fmt: skip
        await wait_loads(client, num_running_reqs=1)
        refused = await client.post("/flush_cache")
        await client.post("/abort_request", json={"rid": "dc-flush"})
        await call
        accepted = await client.get("/flush_cache")
    assert refused.status_code == 400 and "not flushed" in refused.text
    assert accepted.status_code == 200 and accepted.text.startswith("Cache flushed.")


# ------------------------------------------------------------------ an engine with non-default flags


@pytest.fixture(scope="module")
def strict(engine_factory: Callable[..., object]) -> str:
    """No radix cache, a 64-slot KV pool, one running and one queued request, faults allowed, SGLang TTFT rule."""
    return engine_factory(  # type: ignore[attr-defined]
        "--disable-radix-cache", "--kv-tokens", "64", "--max-running", "1", "--max-queued-requests", "1",
        "--enable-fault-injection", "--bucket-time-to-first-token", "tse 1 1.5 5", name="strict",
    ).url  # fmt: skip


@pytest.mark.slow
def test_disable_radix_cache_never_reuses_a_prefix(strict: str) -> None:
    body = {"text": "same prompt twice", "sampling_params": {"max_new_tokens": 1}}
    metas = [httpx.post(f"{strict}/generate", json=body).json()["meta_info"] for _ in range(2)]
    assert [m["cached_tokens"] for m in metas] == [0, 0]


@pytest.mark.slow
async def test_a_request_the_kv_pool_cannot_hold_is_a_bad_request(strict: str) -> None:
    backend = SGLangBackend(strict)
    request = BackendRequest("big", "m", prompt="x" * 40, sampling=SamplingParams(max_tokens=40))
    try:
        with pytest.raises(BackendBadRequest) as info:
            [ev async for ev in backend.generate(request)]
    finally:
        await backend.aclose()
    assert info.value.status_code == 400
    assert str(info.value).startswith("The request needs 81 KV slots but the engine's KV pool has 64")


@pytest.mark.slow
def test_the_ttft_bucket_flag_follows_sglangs_tse_rule(strict: str) -> None:
    text = httpx.get(f"{strict}/metrics").text
    assert bucket_bounds(text, "sglang:time_to_first_token_seconds") == [0.0, 1.0, 2.5, 3.25, 4.375]


@pytest.mark.slow
async def test_health_generate_answers_503_while_the_queue_is_full(strict: str) -> None:
    body = {"text": "wait", "sampling_params": {"max_new_tokens": 1}}
    async with httpx.AsyncClient(base_url=strict, timeout=30) as client:
        await client.post("/debug/fault", json={"queue_delay_s": 30})
        try:
            queued = asyncio.create_task(client.post("/generate", json=body))
            await wait_loads(client, num_waiting_reqs=1)
            health = await client.get("/health_generate")
            plain = await client.get("/health")
        finally:
            await client.delete("/debug/fault")
        assert (await queued).status_code == 200
    assert health.status_code == 503 and health.headers["retry-after"] == "1"
    assert "queue is full" in health.json()["error"]["message"]
    assert plain.status_code == 200  # the scheduler runs


@pytest.mark.slow
async def test_v1_loads_has_sglangs_shape_and_counts_the_queued_prompt(strict: str) -> None:
    body = {"text": "wait", "sampling_params": {"max_new_tokens": 1}}  # 5 tokens: 4 bytes and BOS
    async with httpx.AsyncClient(base_url=strict, timeout=30) as client:
        await client.post("/debug/fault", json={"queue_delay_s": 30})
        try:
            queued = asyncio.create_task(client.post("/generate", json=body))
            await wait_loads(client, num_waiting_reqs=1)
            response = (await client.get("/v1/loads")).json()
            every = (await client.get("/v1/loads", params={"include": "all"})).json()["loads"][0]
            text = (await client.get("/v1/loads", params={"include": "queues", "format": "prometheus"})).text
        finally:
            await client.delete("/debug/fault")
        assert (await queued).status_code == 200
        bad_section = await client.get("/v1/loads", params={"include": "core,bogus"})
        bad_rank = await client.get("/v1/loads", params={"dp_rank": 1})
    assert set(response) == {"timestamp", "version", "accelerator", "num_accelerators", "loads"}
    assert response["timestamp"].endswith("+00:00") and response["accelerator"] is None  # ISO 8601 UTC; CPU
    load = response["loads"][0]
    assert list(load) == [  # LoadSnapshot's core keys, in its order; no section without include=
        "dp_rank", "num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens", "num_used_tokens",
        "num_total_tokens", "max_total_num_tokens", "max_running_requests", "token_usage", "gen_throughput",
        "cache_hit_rate", "utilization",
    ]  # fmt: skip
    assert load["num_waiting_uncached_tokens"] == 5  # the queued prompt, nothing of it matched yet
    assert load["num_total_tokens"] == load["num_used_tokens"] + 5  # SGLang's load scalar: KV in use + queued
    assert load["max_total_num_tokens"] == 64 and load["max_running_requests"] == 1
    assert every["queues"] == {"waiting": 1, "grammar": 0, "paused": 0, "retracted": 0}
    assert every["memory"]["token_capacity"] == 64 and every["disaggregation"]["mode"] == "null"
    assert 'sglang_num_waiting_uncached_tokens{dp_rank="0"} 5' in text.splitlines()
    assert 'sglang_queues_waiting{dp_rank="0"} 1' in text.splitlines()
    assert bad_section.status_code == 400 and "Invalid include sections" in bad_section.json()["detail"]
    assert bad_rank.status_code == 400


@pytest.mark.slow
def test_metrics_have_no_created_series_as_sglangs_multiprocess_exposition(strict: str) -> None:
    text = httpx.get(f"{strict}/metrics").text
    assert "sglang:time_to_first_token_seconds_bucket" in text
    assert "_created" not in text


@pytest.mark.slow
def test_health_probes_leave_the_cache_hit_rate_of_the_traffic(url: str) -> None:
    body = {"text": "a prompt long enough to be worth caching " * 4, "sampling_params": {"max_new_tokens": 1}}
    for _ in range(2):  # the second one reuses the first one's prefix
        assert httpx.post(f"{url}/generate", json=body).status_code == 200

    def hit_rate() -> float:
        return httpx.get(f"{url}/v1/loads").json()["loads"][0]["cache_hit_rate"]

    traffic = hit_rate()
    assert traffic > 0.9
    for _ in range(2):  # the probe's own prompt: a miss, then a hit, in its own namespace
        assert httpx.get(f"{url}/health_generate").status_code == 200
    assert hit_rate() == traffic
    assert metric(httpx.get(f"{url}/metrics").text, "sglang:cache_hit_rate") == pytest.approx(traffic, abs=1e-4)
