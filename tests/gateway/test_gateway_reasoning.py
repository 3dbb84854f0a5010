"""Reasoning models behind the gateway: the thinking an OpenAI-compatible server streams apart from the answer
(``reasoning_content``, or vLLM's ``reasoning``) reaches the client as ``reasoning_content``, streamed and not;
the first token is the first token of either kind; reasoning tokens are reported in ``usage``, the ledger and the
model-call span; an earlier answer sent back with its thinking is accepted and its thinking not passed on. Real
gateway over loopback HTTP in front of a scripted backend (:mod:`tests.gateway.hostile`)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from tests.gateway.hostile import (
    RawBackend,
    RawRequest,
    chunk,
    head,
    serving_gateway,
    sglang_answer,
    sglang_chunks,
    sse,
    sse_answer,
)
from tests.gateway.test_gateway_hostile_backends import assert_released, sse_events, tokens

THINKING = ("The user ", "greets me.", " Reply briefly.")
USAGE = {
    "prompt_tokens": 7,
    "completion_tokens": 5,
    "total_tokens": 12,
    "completion_tokens_details": {"reasoning_tokens": 3},
}
#: How long the scripted backend thinks between its last reasoning chunk and its first answer chunk.
PAUSE_S = 0.4


def delta_chunk(delta: dict[str, Any], finish: str | None = None, usage: dict[str, Any] | None = None) -> bytes:
    obj: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    obj["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}]
    if usage is not None:
        obj["usage"] = usage
    return sse(obj)


def reasoning_stream(field: str, answer: tuple[str, ...] = ("Hel", "lo"), finish: str = "stop") -> Any:
    """A vLLM-style stream: the role, the thinking in ``field``, a pause, the answer, usage, ``[DONE]``."""

    async def answer_fn(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head(chunked=True))
        events = [delta_chunk({"role": "assistant", "content": None})]
        events += [delta_chunk({field: piece}) for piece in THINKING]
        for event in events:
            writer.write(chunk(event))
        await writer.drain()
        await asyncio.sleep(PAUSE_S)
        for piece in answer:
            writer.write(chunk(delta_chunk({"content": piece, field: None})))
        writer.write(chunk(delta_chunk({}, finish=finish, usage=USAGE)))
        writer.write(chunk(b"data: [DONE]\n\n") + chunk(b""))
        await writer.drain()

    return answer_fn


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_streamed_thinking_reaches_the_client_and_starts_the_ttft(field: str) -> None:
    spans = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    async with (
        RawBackend(reasoning_stream(field)) as backend,
        serving_gateway(backend.url, kind="openai", tracer_provider=provider) as gw,
    ):
        resp = await gw.chat(stream=True, stream_options={"include_usage": True})
        assert resp.status_code == 200, resp.text
        events = sse_events(resp.text)
        assert events[-1] == "[DONE]"
        deltas = [e["choices"][0]["delta"] for e in events[:-2]]
        assert deltas[0]["role"] == "assistant"
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "".join(THINKING)
        assert "".join(d.get("content") or "" for d in deltas) == "Hello"
        assert all("reasoning" not in d for d in deltas)  # one name for it, whatever the backend's
        thinking_ends = max(i for i, d in enumerate(deltas) if d.get("reasoning_content"))
        assert thinking_ends < min(i for i, d in enumerate(deltas) if d.get("content"))
        assert events[-2]["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
        [record] = gw.records()
        assert record.status_code == 200
        assert record.extra["reasoning_tokens"] == 3
        # The first token is the first thought, not the first word of the answer after the pause.
        assert record.ttft_s is not None and record.ttft_s < record.duration_s - PAUSE_S * 0.75
        assert await tokens(gw) == {"input": 7, "cached": 0, "output": 5}
        await assert_released(gw)
    [call] = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]
    assert call.attributes is not None and call.attributes["gen_ai.usage.reasoning.output_tokens"] == 3


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_a_non_streamed_answer_has_its_thinking_in_the_message(field: str) -> None:
    async with (
        RawBackend(reasoning_stream(field)) as backend,
        serving_gateway(backend.url, kind="openai") as gw,
    ):
        resp = await gw.chat()
        assert resp.status_code == 200, resp.text
        body = resp.json()
        message = body["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hello", "reasoning_content": "".join(THINKING)}
        assert body["usage"]["completion_tokens_details"] == {"reasoning_tokens": 3}
        [record] = gw.records()
        assert record.ttft_s is not None and record.ttft_s < record.duration_s - PAUSE_S * 0.75


async def test_a_server_sending_both_names_has_its_thinking_passed_on_once() -> None:
    """vLLM's transition releases send the thinking under both names: it is passed on once, not twice."""
    events = [
        delta_chunk({"role": "assistant", "reasoning_content": "Hm.", "reasoning": "Hm."}),
        delta_chunk({"content": "Hi", "reasoning_content": None, "reasoning": None}, "stop", USAGE),
        b"data: [DONE]\n\n",
    ]
    async with RawBackend(sse_answer(events)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        message = (await gw.chat()).json()["choices"][0]["message"]
        assert message == {"role": "assistant", "content": "Hi", "reasoning_content": "Hm."}
        deltas = [e["choices"][0]["delta"] for e in sse_events((await gw.chat(stream=True)).text)[:-1]]
        assert "".join(d.get("reasoning_content", "") for d in deltas) == "Hm."


async def test_thinking_cut_by_max_tokens_is_an_answer_without_content() -> None:
    """All the tokens went to thinking (``finish_reason: length``): a complete answer, its thinking and an empty
    content — not an error, not a response without a first token."""
    async with (
        RawBackend(reasoning_stream("reasoning", answer=(), finish="length")) as backend,
        serving_gateway(backend.url, kind="openai") as gw,
    ):
        streamed = sse_events((await gw.chat(stream=True)).text)
        assert streamed[-1] == "[DONE]" and "error" not in streamed[-2]
        assert streamed[-2]["choices"][0]["finish_reason"] == "length"
        assert "".join(e["choices"][0]["delta"].get("reasoning_content", "") for e in streamed[:-1]) == "".join(
            THINKING
        )
        whole = (await gw.chat()).json()
        assert whole["choices"][0]["message"]["content"] == ""
        assert whole["choices"][0]["finish_reason"] == "length"
        assert all(r.status_code == 200 and r.ttft_s is not None for r in gw.records())


async def test_an_answer_sent_back_with_its_thinking_is_accepted_and_the_thinking_not_passed_on() -> None:
    """Clients append the assistant message they got (``reasoning_content`` included) to the next request; vLLM's
    clients call it ``reasoning``. Both are accepted (they were 400s: unknown fields) and dropped, as reasoning
    models' chat templates drop earlier turns' thinking."""
    sent: list[Any] = []

    async def answer(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        sent.append(request.json()["messages"])
        await reasoning_stream("reasoning_content")(writer, request)

    history = [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "The user greets me."},
        {"role": "user", "content": "and again"},
        {"role": "assistant", "content": "Hi", "reasoning": "Again."},
        {"role": "user", "content": "once more"},
    ]
    async with RawBackend(answer) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat(messages=history)
        assert resp.status_code == 200, resp.text
        assert sent == [[{"role": m["role"], "content": m["content"]} for m in history]]


async def test_thinking_that_is_not_text_is_a_backend_error() -> None:
    """(It was ignored: an answer without its thinking.)"""
    events = [delta_chunk({"reasoning_content": {"steps": 3}}), delta_chunk({}, "stop", USAGE), b"data: [DONE]\n\n"]
    async with RawBackend(sse_answer(events)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat()
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "backend_error"
        [record] = gw.records()
        assert record.error == "backend_error"
        await assert_released(gw)


@pytest.mark.parametrize(("reported", "answered"), [(2, 2), (9, 2), ("x", None), (0, None)])
async def test_sglang_reasoning_tokens_are_in_the_usage(reported: Any, answered: int | None) -> None:
    """SGLang's ``meta_info.reasoning_tokens`` (with a reasoning parser): in ``usage`` when there are any, never more
    than the completion; a value that is no count is none."""
    outputs = sglang_chunks(("Hel", "lo"), reasoning_tokens=reported)
    async with RawBackend(sglang_answer(outputs)) as backend, serving_gateway(backend.url) as gw:
        body = (await gw.chat()).json()
        assert body["usage"].get("completion_tokens_details") == (
            None if answered is None else {"reasoning_tokens": answered}
        )
        [record] = gw.records()
        assert record.extra.get("reasoning_tokens") == answered
