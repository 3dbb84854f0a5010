"""The HTTP backends over a real loopback server: connection reuse, error mapping and timeouts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llmpath.backends import (
    BackendProtocolError,
    BackendRequest,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
    ChatMessage,
    Done,
    FirstToken,
    OpenAIBackend,
    Scheduled,
    SGLangBackend,
    TokenDelta,
    create_backend,
)
from llmpath.backends._http import MAX_EVENT_BYTES
from tests.loopback import black_hole

FIXTURES = Path(__file__).parent / "fixtures"


def request(**kw) -> BackendRequest:
    kw.setdefault("prompt", "The capital of France is")
    return BackendRequest("9f1c2e7a4b5d4c3e8a7f6b5c4d3e2f1a", "m", **kw)


async def test_sglang_stream_reads_to_the_end_so_the_connection_is_reused(loopback) -> None:
    loopback.reply("/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes())
    backend = SGLangBackend(loopback.url)
    try:
        for _ in range(3):
            events = [ev async for ev in backend.generate(request())]
            assert isinstance(events[-1], Done)
    finally:
        await backend.aclose()
    assert len(loopback.requests) == 3
    assert loopback.connections == 1


async def test_openai_stream_reads_to_the_end_so_the_connection_is_reused(loopback) -> None:
    loopback.reply("/v1/chat/completions", (FIXTURES / "chat_stream_usage.sse").read_bytes())
    backend = OpenAIBackend(loopback.url)
    try:
        for _ in range(3):
            events = [ev async for ev in backend.generate(request(prompt=None, messages=[ChatMessage("user", "?")]))]
            assert isinstance(events[-1], Done)
    finally:
        await backend.aclose()
    assert len(loopback.requests) == 3
    assert loopback.connections == 1


@pytest.mark.parametrize("kind", ["sglang", "openai"])
async def test_refused_connection_is_unreachable_not_a_timeout(kind: str, free_port) -> None:
    backend = create_backend(kind, f"http://127.0.0.1:{free_port()}", connect_timeout=2.0)
    try:
        with pytest.raises(BackendUnreachable) as info:
            [ev async for ev in backend.generate(request(prompt=None, messages=[ChatMessage("user", "?")]))]
        assert not isinstance(info.value, BackendTimeout)
        assert isinstance(info.value, BackendUnavailable)  # retryable on another backend
        assert await backend.health() is False
    finally:
        await backend.aclose()


@pytest.mark.parametrize("kind", ["sglang", "openai"])
async def test_a_connection_not_made_in_time_is_unreachable_not_a_timeout(kind: str) -> None:
    """A host that drops the SYNs (here: a listener whose accept queue is full): ``connect_timeout`` passes and
    nothing was sent, so it is a connection that failed (retried elsewhere, counted toward ejection), not a backend
    that was silent too long."""
    with black_hole() as url:
        backend = create_backend(kind, url, connect_timeout=0.2)
        try:
            with pytest.raises(BackendUnreachable, match="no connection within the connect timeout"):
                [ev async for ev in backend.generate(request(prompt=None, messages=[ChatMessage("user", "?")]))]
        finally:
            await backend.aclose()


async def test_connection_closed_before_the_answer_is_unreachable(loopback) -> None:
    loopback.reply("/generate", close=True)
    backend = SGLangBackend(loopback.url)
    try:
        with pytest.raises(BackendUnreachable):
            [ev async for ev in backend.generate(request())]
    finally:
        await backend.aclose()


async def test_stream_cut_short_is_unreachable_after_the_first_events(loopback) -> None:
    loopback.reply("/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes(), cut=True)
    backend = SGLangBackend(loopback.url)
    seen = []
    try:
        with pytest.raises(BackendUnreachable):
            async for ev in backend.generate(request()):
                seen.append(ev)
    finally:
        await backend.aclose()
    assert [type(e) for e in seen] == [Scheduled, FirstToken, TokenDelta]


async def test_an_oversized_stream_event_is_a_protocol_error_not_memory(loopback) -> None:
    """A backend that streams one event without end (16 MiB, no blank line) is refused past MAX_EVENT_BYTES."""
    first = (FIXTURES / "generate_stream_metrics.sse").read_bytes().split(b"\n\n")[0] + b"\n\n"
    loopback.reply("/generate", first + b"data: {" + b'"x": "' + b"a" * (16 << 20))
    backend = SGLangBackend(loopback.url)
    try:
        with pytest.raises(BackendProtocolError, match=f"larger than {MAX_EVENT_BYTES} bytes"):
            [ev async for ev in backend.generate(request())]
    finally:
        await backend.aclose()


async def test_silent_server_is_a_read_timeout(loopback) -> None:
    loopback.reply("/generate", hang=True)
    backend = SGLangBackend(loopback.url, read_timeout=0.2)
    try:
        with pytest.raises(BackendTimeout):
            [ev async for ev in backend.generate(request())]
    finally:
        await backend.aclose()


async def test_trace_headers_and_json_body_are_sent(loopback) -> None:
    loopback.reply("/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes())
    backend = SGLangBackend(loopback.url, headers={"x-team": "serving"})
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    try:
        [ev async for ev in backend.generate(request(trace_headers={"traceparent": traceparent}))]
    finally:
        await backend.aclose()
    [seen] = loopback.requests
    assert seen.method == "POST" and seen.path == "/generate"
    assert seen.headers["traceparent"] == traceparent and seen.headers["x-team"] == "serving"
    assert seen.headers["content-type"] == "application/json"
    assert json.loads(seen.body)["text"] == "The capital of France is"
