"""The OpenAI-compatible backend against the engine's /v1 routes over real HTTP."""

from __future__ import annotations

import pytest

from llmpath.backends import (
    BackendBadRequest,
    BackendRequest,
    ChatMessage,
    Done,
    FirstToken,
    OpenAIBackend,
    SamplingParams,
    Scheduled,
    SGLangBackend,
    TimingSource,
    TokenDelta,
    create_backend,
)

pytestmark = pytest.mark.slow

SYSTEM = "You are a helpful assistant who answers in haiku. " * 4


def request(rid: str, stream: bool = True, **kw) -> BackendRequest:
    kw.setdefault("messages", [ChatMessage("system", SYSTEM), ChatMessage("user", "Write about caches.")])
    kw.setdefault("sampling", SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True))
    return BackendRequest(rid, "llmpath-tiny", stream=stream, **kw)


async def collect(backend, req: BackendRequest) -> list:
    return [ev async for ev in backend.generate(req)]


@pytest.mark.parametrize("stream", [True, False])
async def test_chat_usage_and_cached_tokens(engine, stream: bool) -> None:
    backend = create_backend("openai", engine.url, name="oa")
    try:
        await collect(backend, request(f"warm-{stream}", stream))
        events = await collect(backend, request(f"hit-{stream}", stream))
    finally:
        await backend.aclose()
    assert isinstance(events[0], Scheduled) and isinstance(events[1], FirstToken) and isinstance(events[-1], Done)
    assert {events[0].source, events[1].source, events[-1].timings.source} == {TimingSource.GATEWAY}
    done = events[-1]
    assert done.usage.completion_tokens == 6 and done.finish_reason == "length"
    assert done.usage.cached_tokens == done.usage.prompt_tokens - 1 > 0
    assert sum(e.num_tokens for e in events if isinstance(e, TokenDelta)) == 6
    assert done.timings.e2e_seconds is not None and done.timings.first_token_seconds is not None
    assert done.timings.e2e_seconds >= done.timings.first_token_seconds > 0


async def test_continuous_usage_fills_first_token_counts(engine) -> None:
    backend = OpenAIBackend(engine.url, continuous_usage=True)
    try:
        events = await collect(backend, request("cont-1"))
    finally:
        await backend.aclose()
    assert events[1].prompt_tokens == events[-1].usage.prompt_tokens > 0


async def test_prompt_and_token_ids_use_completions(engine) -> None:
    backend = OpenAIBackend(engine.url)
    try:
        by_text = await collect(backend, request("cmpl-1", messages=None, prompt="Once upon a time"))
        by_ids = await collect(backend, request("cmpl-2", messages=None, input_ids=[256, 79, 110, 99, 101]))
    finally:
        await backend.aclose()
    assert by_text[-1].usage.prompt_tokens == len("Once upon a time") + 1
    assert by_ids[-1].usage.prompt_tokens == 5 and by_ids[-1].usage.completion_tokens == 6


async def test_openai_backend_text_matches_sglang_backend(engine) -> None:
    texts = []
    for backend in (OpenAIBackend(engine.url), SGLangBackend(engine.url)):
        try:
            events = await collect(backend, request(f"same-{type(backend).__name__}"))
        finally:
            await backend.aclose()
        texts.append("".join(e.text for e in events if isinstance(e, TokenDelta)))
    assert texts[0] == texts[1] and texts[0]  # ChatML on both paths: same prompt tokens, same greedy output


async def test_bad_request_is_typed_with_param(engine) -> None:
    backend = OpenAIBackend(engine.url)
    try:
        with pytest.raises(BackendBadRequest) as info:
            await collect(backend, request("oa-bad", sampling=SamplingParams(max_tokens=5000)))
    finally:
        await backend.aclose()
    assert info.value.status_code == 400 and info.value.param == "max_tokens"
    assert "maximum context length" in str(info.value)


@pytest.mark.parametrize("suffix", ["", "/", "/v1", "/v1/"])
async def test_base_url_with_or_without_v1_reaches_the_engine(engine, suffix: str) -> None:
    backend = create_backend("openai", engine.url + suffix)
    try:
        assert backend.url == engine.url and backend.name == engine.url
        assert await backend.health() is True
        chat = await collect(backend, request(f"v1-chat-{suffix}"))
        cmpl = await collect(backend, request(f"v1-cmpl-{suffix}", stream=False, messages=None, prompt="Hello"))
    finally:
        await backend.aclose()
    assert chat[-1].finish_reason == "length" and chat[-1].usage.completion_tokens == 6
    assert cmpl[-1].usage.prompt_tokens == len("Hello") + 1 and cmpl[-1].usage.completion_tokens == 6


def test_base_url_normalisation_strips_one_v1_only() -> None:
    from llmpath.backends.openai import openai_base_url

    assert openai_base_url("https://api.example.com/v1") == "https://api.example.com"
    assert openai_base_url("http://h:8000/proxy/v1/") == "http://h:8000/proxy"
    assert openai_base_url("http://h:8000/v1/v1") == "http://h:8000/v1"
    assert openai_base_url("http://h:8000/v10") == "http://h:8000/v10"
