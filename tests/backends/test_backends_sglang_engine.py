"""The SGLang backend against a real embedded engine over loopback HTTP."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

import httpx
import pytest

from llmpath.backends import (
    BackendBadRequest,
    BackendRequest,
    BackendUnavailable,
    ChatMessage,
    Done,
    FirstToken,
    SamplingParams,
    Scheduled,
    SGLangBackend,
    TimingSource,
    TokenDelta,
    create_backend,
)

pytestmark = pytest.mark.slow


async def run(backend, request: BackendRequest) -> list:
    return [ev async for ev in backend.generate(request)]


def req(rid: str, **kw) -> BackendRequest:
    kw.setdefault("sampling", SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    if not any(k in kw for k in ("messages", "prompt", "input_ids")):
        kw["prompt"] = "The quick brown fox jumps over the lazy dog. " * 3
    return BackendRequest(rid, "llmpath-tiny", **kw)


@pytest.mark.parametrize("stream", [True, False])
async def test_generate_events_in_order_with_backend_timings(engine, stream: bool) -> None:
    backend = create_backend("sglang", engine.url, name="e0")
    try:
        events = await run(backend, req(f"order-{stream}", stream=stream))
    finally:
        await backend.aclose()
    assert isinstance(events[0], Scheduled) and isinstance(events[1], FirstToken)
    assert isinstance(events[-1], Done)
    deltas = [e for e in events if isinstance(e, TokenDelta)]
    done = events[-1]
    assert sum(d.num_tokens for d in deltas) == done.usage.completion_tokens == 8
    assert done.finish_reason == "length"
    assert events[0].source is events[1].source is done.timings.source is TimingSource.BACKEND
    assert 0 <= events[0].queue_seconds < 5 and 0 < events[1].prefill_seconds < 5
    assert done.usage.prompt_tokens == events[1].prompt_tokens > 100
    assert done.timings.e2e_seconds is not None and done.timings.first_token_seconds is not None
    assert done.timings.e2e_seconds >= done.timings.first_token_seconds > 0


async def test_streamed_text_equals_non_streamed_text(engine) -> None:
    backend = SGLangBackend(engine.url)
    try:
        streamed = await run(backend, req("text-s", stream=True))
        whole = await run(backend, req("text-n", stream=False))
    finally:
        await backend.aclose()
    text_s = "".join(e.text for e in streamed if isinstance(e, TokenDelta))
    text_n = "".join(e.text for e in whole if isinstance(e, TokenDelta))
    assert text_s == text_n and len(text_s) > 0


async def test_second_request_reuses_the_cached_prefix(engine) -> None:
    backend = SGLangBackend(engine.url)
    msgs = [ChatMessage("system", "You are a terse assistant. " * 4), ChatMessage("user", "Tell me about radix trees.")]
    try:
        first = await run(backend, req("pfx-1", messages=msgs, cache_salt="tenant-prefix"))
        second = await run(backend, req("pfx-2", messages=msgs, cache_salt="tenant-prefix"))
        other_tenant = await run(backend, req("pfx-3", messages=msgs, cache_salt="tenant-other"))
    finally:
        await backend.aclose()
    assert first[-1].usage.cached_tokens == 0
    assert second[-1].usage.cached_tokens == second[-1].usage.prompt_tokens - 1
    assert other_tenant[-1].usage.cached_tokens == 0  # cache_salt isolates tenants


async def test_bad_request_is_typed(engine) -> None:
    backend = SGLangBackend(engine.url)
    try:
        with pytest.raises(BackendBadRequest) as info:
            await run(backend, req("bad-1", sampling=SamplingParams(max_tokens=8, top_p=0.0)))
        assert info.value.status_code == 400 and "top_p" in str(info.value)
        with pytest.raises(BackendBadRequest) as info:
            await run(backend, req("bad-2", prompt="x" * 5000))
        assert "context length" in str(info.value)
    finally:
        await backend.aclose()


async def test_unreachable_backend_is_unavailable(free_port) -> None:
    backend = SGLangBackend(f"http://127.0.0.1:{free_port()}", connect_timeout=1.0)
    try:
        with pytest.raises(BackendUnavailable):
            await run(backend, req("down"))
        assert await backend.health() is False
    finally:
        await backend.aclose()


async def test_closing_the_event_stream_aborts_the_request(engine) -> None:
    backend = SGLangBackend(engine.url)
    events = backend.generate(req("cancel-1", sampling=SamplingParams(max_tokens=3000, ignore_eos=True)))
    assert isinstance(events, AsyncGenerator)  # closable, as the gateway closes it
    try:
        async for ev in events:
            if isinstance(ev, TokenDelta):
                break
    finally:
        await events.aclose()  # what a gateway does when its client goes away
        await backend.aclose()
    async with httpx.AsyncClient(base_url=engine.url) as client:
        for _ in range(100):
            loads = (await client.get("/v1/loads")).json()["loads"][0]
            if loads["num_running_reqs"] == 0:
                break
            await asyncio.sleep(0.05)
    assert loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0
