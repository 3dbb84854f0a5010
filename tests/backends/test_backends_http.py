"""The HTTP backends over a real loopback server: connection reuse, error mapping and timeouts."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmpath.backends import BackendRequest, ChatMessage, Done, OpenAIBackend, SGLangBackend

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
