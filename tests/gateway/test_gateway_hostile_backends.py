"""Backends that misbehave, or differ from the happy path as real servers do, behind a real gateway over loopback
HTTP: what the client sees (an OpenAI error with the right status before the first byte, an SSE error event after
it, never a 500 or a cut stream), what the ledger and ``llmpath_requests_total`` say, that token counters take no
nonsense, and that the admission slot and the backend's in-flight count are given back."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from llmpath.backends.base import BackendEvent, BackendRequest, Done
from llmpath.backends.sglang import SGLangBackend
from llmpath.gateway.config import BackendConfig, GatewayConfig
from tests.gateway.hostile import (
    Answer,
    RawBackend,
    RawRequest,
    Served,
    chunk,
    head,
    in_turn,
    meta,
    serving_gateway,
    sglang_answer,
    sglang_chunks,
    sse,
    sse_answer,
)

TOKENS = 'llmpath_tokens_total{model="m",route="default",tenant="anonymous",type="%s"}'


def sse_events(text: str) -> list[Any]:
    """The JSON of every ``data:`` event of a gateway stream (``[DONE]`` as the string)."""
    out: list[Any] = []
    for block in text.split("\n\n"):
        if block.startswith("data: "):
            data = block[6:]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def tokens(gw: Served) -> dict[str, float]:
    m = await gw.metrics()
    return {kind: m.get(TOKENS % kind, 0.0) for kind in ("input", "cached", "output")}


async def requests_by_code(gw: Served) -> dict[str, float]:
    m = await gw.metrics()
    out: dict[str, float] = {}
    for series, value in m.items():
        if series.startswith("llmpath_requests_total{") and 'code="' in series:
            code = series.split('code="', 1)[1].split('"', 1)[0]
            out[code] = out.get(code, 0.0) + value
    return out


async def assert_released(gw: Served) -> None:
    """The admission slot and the backend's in-flight count come back (the response's end is awaited)."""
    for _ in range(100):
        if gw.held() == (0, 0):
            return
        await asyncio.sleep(0.02)
    assert gw.held() == (0, 0)


def with_meta(**fields: Any) -> list[dict[str, Any]]:
    outputs = sglang_chunks()
    for out in outputs:
        out["meta_info"].update(fields)
    return outputs


BAD_COUNTS = [None, "many", 12.5, 1e300, -5, True, [3], {"n": 3}, "\u0664\u0662"]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("value", BAD_COUNTS, ids=repr)
async def test_a_token_count_that_is_no_count_is_a_502_before_the_first_byte(stream: bool, value: Any) -> None:
    """SGLang's ``prompt_tokens``/``completion_tokens`` are on every output; one that is not a count (``null``, a
    string, a fraction, ``1e300``, negative, a boolean) makes the answer malformed: 502 ``backend_error``, ledger
    and ``llmpath_requests_total`` say 502, no token is counted, the slot is released and the gateway serves on.
    (It was a 500 with ``TypeError``/``ValueError``, ``1e300`` a 500 after counting 1e300 input tokens, a negative
    count a stream cut without its error event, ``True`` one prompt token.)"""
    answer = in_turn(sglang_answer(with_meta(prompt_tokens=value)), sglang_answer(sglang_chunks()))
    async with RawBackend(answer) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat(stream=stream)
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "backend_error"
        [record] = gw.records()
        assert (record.status_code, record.error) == (502, "backend_error")
        assert await tokens(gw) == {"input": 0, "cached": 0, "output": 0}
        assert (await requests_by_code(gw)).get("502") == 1
        await assert_released(gw)
        good = await gw.chat()
        assert good.status_code == 200 and good.json()["usage"]["prompt_tokens"] == 5


@pytest.mark.parametrize(
    ("fields", "usage"),
    [
        ({"prompt_tokens": 5.0, "completion_tokens": 2.0}, (5, 2, 0)),  # integral floats are counts
        ({"cached_tokens": None}, (5, 2, 0)),
        ({"cached_tokens": -3}, (5, 2, 0)),  # not a count: none cached
        ({"cached_tokens": "x"}, (5, 2, 0)),
        ({"cached_tokens": 50}, (5, 2, 5)),  # more than the prompt: the whole prompt
    ],
)
async def test_odd_cached_counts_are_read_as_what_they_can_mean(fields: dict[str, Any], usage: tuple) -> None:
    """``cached_tokens`` is a detail: missing or not a count is 0 (it was a 500 for a negative), more than the
    prompt is the prompt — in the client's ``usage`` too (it said 50 cached of 5)."""
    outputs = sglang_chunks()
    outputs[-1]["meta_info"].update(fields)
    async with RawBackend(sglang_answer(outputs)) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat()
        assert resp.status_code == 200, resp.text
        body = resp.json()["usage"]
        got = (body["prompt_tokens"], body["completion_tokens"], body["prompt_tokens_details"]["cached_tokens"])
        assert got == usage
        assert await tokens(gw) == {"input": usage[0], "cached": usage[2], "output": usage[1]}


async def test_a_malformed_output_mid_stream_ends_it_with_an_error_event() -> None:
    """The first output is fine (200 and a chunk are sent), the second's text is a number: the stream ends with an
    SSE error event and ``[DONE]`` (it was cut, no error event, and the ledger said 500 ``AttributeError``); the
    ledger and ``llmpath_requests_total`` say 502 and the first token is accounted for."""
    outputs = sglang_chunks()
    outputs[1]["text"] = 12
    async with RawBackend(sglang_answer(outputs)) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat(stream=True)
        assert resp.status_code == 200
        events = sse_events(resp.text)
        assert events[0]["choices"][0]["delta"]["content"] == "Hel"
        assert events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"
        [record] = gw.records()
        assert (record.status_code, record.error) == (502, "BackendProtocolError")
        assert await tokens(gw) == {"input": 5, "cached": 0, "output": 1}
        assert (await requests_by_code(gw)).get("502") == 1
        await assert_released(gw)


@pytest.mark.parametrize(
    ("kind", "error", "status"),
    [
        ("openai", ["boom"], 502),
        ("openai", 42, 502),
        ("openai", {"message": "boom", "code": 500}, 502),
        ("sglang", ["boom"], 400),  # message-only: SGLang's streamed form of a request it refused
        ("sglang", {"message": "boom", "code": 503}, 503),
    ],
)
async def test_an_error_event_of_any_shape_is_a_backend_error(kind: str, error: Any, status: int) -> None:
    """``data: {"error": [...]}`` or ``{"error": 42}`` was a 500 (``AttributeError``); an error event is an error
    whatever its shape, answered as its code (or the backend's default for a message-only one) says."""
    answer = sse_answer([sse({"error": error}), b"data: [DONE]\n\n"])
    async with RawBackend(answer) as backend, serving_gateway(backend.url, kind=kind) as gw:
        resp = await gw.chat()
        assert resp.status_code == status, resp.text
        codes = {502: "backend_error", 400: "backend_rejected", 503: "no_backend"}
        assert resp.json()["error"]["code"] == codes[status]
        await assert_released(gw)


# ---- OpenAI-compatible servers (vLLM, llama.cpp, TGI, LiteLLM) -------------------------------------------------


def openai_chunk(content: Any = None, finish: Any = None, usage: Any = "absent", **extra: Any) -> bytes:
    obj: dict[str, Any] = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m", **extra}
    obj["choices"] = [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]
    if usage != "absent":
        obj["usage"] = usage
    return sse(obj)


USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


async def test_usage_of_nulls_on_every_chunk_then_the_real_one() -> None:
    """LiteLLM-style streams carry ``usage`` with ``null`` counts (or ``usage: null``) on every chunk and the real
    one at the end; ``prompt_tokens_details`` may be ``null`` or ``{}``, finish reasons unknown (TGI's
    ``eos_token``) or not strings. (A ``null`` ``prompt_tokens`` was a 500, a dict ``finish_reason`` too.)"""
    nulls = {"prompt_tokens": None, "completion_tokens": None, "total_tokens": None, "prompt_tokens_details": None}
    events = [
        openai_chunk("He", usage=nulls),
        openai_chunk("llo", usage=None),
        openai_chunk(None, finish={"type": "eos_token"}, usage={**USAGE, "prompt_tokens_details": {}}),
        b"data: [DONE]\n\n",
    ]
    async with RawBackend(sse_answer(events)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat()
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert body["choices"][0]["message"]["content"] == "Hello"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["prompt_tokens"] == 7 and body["usage"]["completion_tokens"] == 2
        assert await tokens(gw) == {"input": 7, "cached": 0, "output": 2}


@pytest.mark.parametrize(
    "bad",
    [
        openai_chunk(None, choices_override=True),
        sse({"id": "c", "object": "chat.completion.chunk", "choices": {"index": 0}}),
        sse({"id": "c", "object": "chat.completion.chunk", "choices": ["x"]}),
        openai_chunk(17),  # content that is not text
    ],
    ids=["extra-field", "choices-object", "choices-strings", "content-number"],
)
async def test_malformed_openai_chunks_are_502_not_500(bad: bytes) -> None:
    """``choices`` that is not a list of objects, or content that is not a string: 502 (they were 500s). An
    unknown extra field is ignored (forward compatibility)."""
    events = [bad, openai_chunk("ok", finish="stop", usage=USAGE), b"data: [DONE]\n\n"]
    async with RawBackend(sse_answer(events)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat()
        if b"choices_override" in bad:
            assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "ok"
        else:
            assert resp.status_code == 502, resp.text
            assert resp.json()["error"]["code"] == "backend_error"
        await assert_released(gw)


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("usage", ["absent", None, {**USAGE, "prompt_tokens": -1}, {**USAGE, "prompt_tokens": 1e300}])
async def test_a_server_that_reports_no_usage_still_answers(stream: bool, usage: Any) -> None:
    """An OpenAI-compatible server that ignores ``stream_options.include_usage`` (older TGI, llama.cpp, Ollama), or
    whose usage is no count: the answer is complete, so the client gets it — with the gateway's estimate of the
    prompt and the streamed chunks as completion tokens, ``input_tokens_estimated`` in the ledger. (Every streamed
    request failed at its end with an error event after the whole answer, a 502 in the SLO; a usage of -1 or 1e300
    was a 500.)"""
    events = [openai_chunk("Hel"), openai_chunk("lo"), openai_chunk(None, finish="stop", usage=usage)]
    async with (
        RawBackend(sse_answer([*events, b"data: [DONE]\n\n"])) as backend,
        serving_gateway(backend.url, kind="openai") as gw,
    ):
        resp = await gw.chat(stream=stream, stream_options={"include_usage": True} if stream else None)
        assert resp.status_code == 200, resp.text
        if stream:
            chunks = sse_events(resp.text)
            assert chunks[-1] == "[DONE]" and "error" not in chunks[-2]
            assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-2]) == "Hello"
            answered = chunks[-2]["usage"]
        else:
            assert resp.json()["choices"][0]["message"]["content"] == "Hello"
            answered = resp.json()["usage"]
        [record] = gw.records()
        assert (record.status_code, record.error) == (200, None)
        assert record.extra["input_tokens_estimated"] is record.extra["output_tokens_estimated"] is True
        counted = await tokens(gw)
        assert counted["output"] == answered["completion_tokens"] == 2  # 5 bytes at 4 a token, or 2 chunks
        assert counted["input"] == answered["prompt_tokens"] and 0 < counted["input"] < 100
        assert counted["cached"] == 0
        await assert_released(gw)


# ---- an adapter that fails on an answer it did not expect -------------------------------------------------------


class FailingAfterFirst(SGLangBackend):
    """The real SGLang backend, except that its adapter raises a plain exception after ``after`` events: any
    exception a backend adapter lets out on a strange answer, not only the typed ones."""

    after = 0
    quoted = "text-the-backend-generated"

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendEvent]:
        n = 0
        async for event in super().generate(request):
            if n == self.after:
                raise KeyError(self.quoted)
            n += 1
            yield event


@pytest.mark.parametrize("after", [0, 3])
async def test_an_adapter_exception_is_a_backend_error_not_a_500(after: int, caplog: pytest.LogCaptureFixture) -> None:
    """Before the first byte: a 502 JSON error (it was uvicorn's plain-text 500); after it: the SSE error event and
    ``[DONE]`` (the stream was cut). Logged with where it was raised, as a gateway bug may be the cause."""

    def factory(config: BackendConfig, gateway: GatewayConfig) -> SGLangBackend:
        backend = FailingAfterFirst(config.base_url, name=config.display_name, read_timeout=2)
        backend.after = after
        return backend

    async with (
        RawBackend(sglang_answer(sglang_chunks())) as backend,
        serving_gateway(backend.url, backend_factory=factory) as gw,
    ):
        resp = await gw.chat(stream=True)
        if after == 0:
            assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error"
        else:
            assert resp.status_code == 200
            events = sse_events(resp.text)
            assert events[-2]["error"]["code"] == "backend_error" and events[-1] == "[DONE]"
        [record] = gw.records()
        assert record.status_code == 502
        assert (await requests_by_code(gw)).get("502") == 1
        await assert_released(gw)
    [line] = [r.getMessage() for r in caplog.records if "backend adapter failed" in r.getMessage()]
    assert "(KeyError)" in line and "in generate" in line  # where it was raised ...
    assert FailingAfterFirst.quoted not in line  # ... not its message, which may quote the backend's answer


class EndingWithoutDone(SGLangBackend):
    """The real SGLang backend, except that its adapter stops before the final event (``Done``): a custom backend
    breaking the Backend interface's ``Scheduled → FirstToken → TokenDelta* → Done``."""

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendEvent]:
        async for event in super().generate(request):
            if isinstance(event, Done):
                return
            yield event


@pytest.mark.parametrize("stream", [False, True])
async def test_an_adapter_that_ends_without_its_final_event_breaks_the_protocol(stream: bool) -> None:
    """A 502 ``backend_error`` (streamed: the error event, recorded as ``BackendProtocolError``), counted toward
    ejection like any answer outside the protocol (it was a plain ``BackendError`` that counted for nothing)."""

    def factory(config: BackendConfig, gateway: GatewayConfig) -> SGLangBackend:
        return EndingWithoutDone(config.base_url, name=config.display_name, read_timeout=2)

    async with (
        RawBackend(sglang_answer(sglang_chunks())) as backend,
        serving_gateway(backend.url, backend_factory=factory) as gw,
    ):
        resp = await gw.chat(stream=stream)
        error = sse_events(resp.text)[-2]["error"] if stream else resp.json()["error"]
        assert error["code"] == "backend_error", resp.text
        [record] = gw.records()
        assert (record.status_code, record.error) == (502, "BackendProtocolError" if stream else "backend_error")
        assert gw.app.gateway.pool.states["b0"].consecutive_failures == 1
        await assert_released(gw)


# ---- timings ------------------------------------------------------------------------------------------------------


async def stage_seconds(gw: Served) -> float:
    """The sum of every ``llmpath_stage_duration_seconds`` observation."""
    m = await gw.metrics()
    return sum(v for k, v in m.items() if k.startswith("llmpath_stage_duration_seconds_sum"))


@pytest.mark.parametrize(
    "fields",
    [
        {"queue_time": 1e300},
        {"queue_time": -4.0},
        {"queue_time": True},
        {"queue_time": "0.1"},
        {"prefill_finished_time": 1e300, "first_token_latency": 1e300},
        {"request_received_ts": 0.0, "api_server_dispatch_finish_ts": 1e300},
        {"forward_entry_time": "soon", "e2e_latency": -1, "first_token_latency": None},
    ],
    ids=["queue-1e300", "queue-negative", "queue-true", "queue-string", "prefill-1e300", "dispatch-1e300", "junk"],
)
async def test_timings_that_are_no_durations_do_not_reach_the_stage_histograms(fields: dict[str, Any]) -> None:
    """SGLang's timing keys, when a server sends strings, booleans, negatives or 1e300: the request succeeds, every
    stage duration stays within the request's real time (a 1e300 queue time was a 1e300 s ``schedule`` observation,
    a dispatch span of 1e300 s one too), and the ledger holds no negative backend queue time (it held -4). A queue
    time that is no duration means the gateway clock times the request."""
    outputs = sglang_chunks()
    for out in outputs:
        out["meta_info"].update(fields)
    async with RawBackend(sglang_answer(outputs)) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat(stream=True)
        assert resp.status_code == 200 and sse_events(resp.text)[-1] == "[DONE]"
        assert 0 <= await stage_seconds(gw) < 10
        [record] = gw.records()
        assert record.status_code == 200 and record.error is None
        queue = record.extra.get("backend_queue_s")
        if "queue_time" in fields:
            assert queue is None  # the gateway clock: no backend queue
            assert {s.source for s in record_stages(record, "prefill")} == {"gateway"}
        else:
            assert queue == 0.001
        assert "backend_dispatch_s" not in record.extra


def record_stages(record: Any, name: str) -> list[Any]:
    return [s for s in record.stages if s.name == name]


async def test_a_completion_count_going_down_is_not_counted_twice() -> None:
    """``completion_tokens`` 1, 3, 2, 4, then the stream breaks: the tokens streamed are 4, the highest count the
    backend reported (they were 5: the 2 → 4 step was counted again after the count went down)."""
    outputs = [
        {"text": text, "output_ids": list(range(n)), "meta_info": meta(completion=n)}
        for text, n in (("a", 1), ("abc", 3), ("ab", 2), ("abcd", 4))
    ]
    async with RawBackend(sglang_answer(outputs, done=False)) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat(stream=True)
        assert resp.status_code == 200 and sse_events(resp.text)[-2]["error"]["code"] == "backend_error"
        assert await tokens(gw) == {"input": 5, "cached": 0, "output": 4}
        [record] = gw.records()
        assert record.extra["usage_partial"] is True


# ---- HTTP-level quirks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirecting_backend_is_a_502_and_the_redirect_is_not_followed(status: int) -> None:
    """A backend URL that redirects is misconfigured: 502 ``backend_error``, counted toward ejection, and the
    request (body and headers) is not sent where the redirect points. (A 307/308 was followed — the client got the
    other server's answer as a 200 — and a 301/302 re-sent the request as a ``GET``.)"""
    async with RawBackend(sglang_answer(sglang_chunks())) as elsewhere:

        async def redirect(writer: asyncio.StreamWriter, request: RawRequest) -> None:
            location = f"{elsewhere.url}{request.path}"
            writer.write(f"HTTP/1.1 {status} X\r\nlocation: {location}\r\ncontent-length: 0\r\n\r\n".encode())

        async with RawBackend(redirect) as backend, serving_gateway(backend.url) as gw:
            resp = await gw.chat(stream=True)
            assert resp.status_code == 502, resp.text
            assert resp.json()["error"]["code"] == "backend_error"
            assert elsewhere.posts == 0
            assert gw.app.gateway.pool.states["b0"].consecutive_failures == 1
            await assert_released(gw)


async def test_answers_that_break_the_protocol_eject_the_backend() -> None:
    """A backend whose every answer is malformed (a wrong ``kind``, a broken build) failed every request it was
    sent and was never ejected; consecutive protocol errors now count toward ejection as 5xx answers do."""
    async with (
        RawBackend(plain(200, b"<html>not an LLM server</html>", "text/html")) as backend,
        serving_gateway(backend.url, health={"interval_s": 60, "eject_after_failures": 2}) as gw,
    ):
        for _ in range(2):
            resp = await gw.chat(stream=True)
            assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error", resp.text
        assert gw.app.gateway.pool.states["b0"].consecutive_failures == 2
        resp = await gw.chat(stream=True)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
        assert backend.posts == 2
        await assert_released(gw)


def broken_midway(kind: str) -> Answer:
    """A stream whose first output is fine and which then breaks as ``kind`` says."""
    first = sse(sglang_chunks()[0])
    if kind == "protocol":  # the next output's text is a number
        bad = sglang_chunks()
        bad[1]["text"] = 12
        return sglang_answer(bad)
    if kind == "5xx":  # an error event of an internal error
        return sse_answer([first, sse({"error": {"message": "boom", "code": 500}}), b"data: [DONE]\n\n"])

    async def cut(writer: asyncio.StreamWriter, request: RawRequest) -> None:  # the process died mid-answer
        writer.write(head(chunked=True) + chunk(first))
        await writer.drain()
        writer.transport.abort()

    return cut


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", ["protocol", "5xx", "connection"])
async def test_answers_that_break_midway_eject_the_backend(kind: str, stream: bool) -> None:
    """Every answer starts well and breaks after its first output (malformed, an internal error event, the
    connection lost): each counts as a failure once the first event came too, so the backend is ejected after
    ``eject_after_failures`` of them (it was never: the good first event counted as a success and reset the count
    every time); a whole answer in between resets the count."""
    answer = in_turn(broken_midway(kind), sglang_answer(sglang_chunks()), broken_midway(kind), broken_midway(kind))
    async with (
        RawBackend(answer) as backend,
        serving_gateway(backend.url, health={"interval_s": 60, "eject_after_failures": 2}) as gw,
    ):
        state = gw.app.gateway.pool.states["b0"]
        failures = []
        for good in (False, True, False, False):
            resp = await gw.chat(stream=stream)
            if stream:  # the 200 was sent with the first output: a broken answer ends with an error event
                assert resp.status_code == 200 and ('"error"' not in resp.text) is good, resp.text
            else:
                assert resp.status_code == (200 if good else 502), resp.text
            await assert_released(gw)
            failures.append(state.consecutive_failures)
        assert failures == [1, 0, 1, 2]
        resp = await gw.chat(stream=stream)
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
        assert backend.posts == 4


async def test_a_complete_answer_whose_connection_is_lost_midway_is_retried_elsewhere() -> None:
    """Nothing reached the client of a non-streamed request: the gateway answers it from the other backend. The
    lost connection still counts against its backend; the trace shows it as a retry before the first event does —
    a failed model-call span, then a second ``route`` stage and model-call span, all children of the request."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    answers = in_turn(broken_midway("connection"), sglang_answer(sglang_chunks(("Hi", " there"))))  # shared
    async with (
        RawBackend(answers) as one,
        RawBackend(answers) as other,
        serving_gateway(
            one.url, other.url, tracer_provider=provider, routing={"max_retries": 1}, health={"interval_s": 60}
        ) as gw,
    ):
        resp = await gw.chat()
        assert resp.status_code == 200, resp.text
        assert resp.json()["choices"][0]["message"]["content"] == "Hi there"
        assert resp.json()["usage"]["completion_tokens"] == 2  # the answer's, not the lost attempt's too
        assert (one.posts, other.posts) == (1, 1)
        (record,) = gw.records()
        lost = "b0" if record.extra["backend"] == "b1" else "b1"
        assert record.extra["retries"] == 1
        assert gw.app.gateway.pool.states[lost].consecutive_failures == 1
        await assert_released(gw)
    spans = exporter.get_finished_spans()
    (server,) = [s for s in spans if s.kind is SpanKind.SERVER]
    calls = [s for s in spans if s.name == "chat m"]
    routes = [s for s in spans if s.name == "llmpath.route"]
    assert [c.status.is_ok for c in sorted(calls, key=lambda c: c.start_time or 0)] == [False, True]
    request = server.context.span_id
    parents: dict[str, set[int | None]] = {}
    for s in (*routes, *calls):
        parents.setdefault(s.name, set()).add(s.parent.span_id if s.parent is not None else None)
    assert len(routes) == 2 and parents == {"llmpath.route": {request}, "chat m": {request}}


async def test_an_answer_that_ends_after_its_backend_was_ejected_does_not_reinstate_it() -> None:
    """A long answer (a reasoning model thinking) still streaming when its backend is ejected by others' failures:
    its end resets nothing — the backend stays out, with the reason, until a probe passes (it came back at once,
    without a probe, and /readyz lost the reason)."""
    started, release = asyncio.Event(), asyncio.Event()

    async def slow_good(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        outputs = sglang_chunks()
        writer.write(head(chunked=True) + chunk(sse(outputs[0])))
        await writer.drain()
        started.set()
        await release.wait()
        writer.write(chunk(sse(outputs[1])) + chunk(b"data: [DONE]\n\n") + chunk(b""))

    async with (
        RawBackend(in_turn(slow_good, broken_midway("protocol"), broken_midway("protocol"))) as backend,
        serving_gateway(backend.url, health={"interval_s": 60, "eject_after_failures": 2}) as gw,
    ):
        state = gw.app.gateway.pool.states["b0"]
        slow = asyncio.ensure_future(gw.chat(stream=True))
        await started.wait()
        for _ in range(2):
            assert (await gw.chat()).status_code == 502
        assert not state.healthy and state.consecutive_failures == 2
        release.set()
        assert (await slow).status_code == 200
        assert not state.healthy and state.consecutive_failures == 2
        assert state.last_error == "answered outside its protocol"


async def test_an_error_answer_whose_body_never_ends_is_a_502_at_once() -> None:
    """A 500 whose body announces a megabyte and stalls after a few bytes (a proxy that died mid-answer): the
    status is the answer, so the client gets 502 ``backend_error`` within the error body's 2 s, not a 504 after the
    whole read timeout (it took ``read_s`` and blamed a timeout)."""

    async def stalled_500(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(b"HTTP/1.1 500 X\r\ncontent-type: text/html\r\ncontent-length: 1000000\r\n\r\n<html>Internal")
        await writer.drain()
        await asyncio.sleep(60)

    async with (
        RawBackend(stalled_500) as backend,
        serving_gateway(backend.url, limits={"timeouts": {"read_s": 30}}) as gw,
    ):
        started = asyncio.get_running_loop().time()
        resp = await gw.chat()
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error"
        assert asyncio.get_running_loop().time() - started < 10
        await assert_released(gw)


@pytest.mark.parametrize(
    ("code", "status"),
    [("429", 503), ("400", 400), (200, 502), ("n/a", 502), ("9" * 5000, 502), ("\u0664\u0662\u0669", 502)],
)
async def test_an_in_stream_error_code_given_as_a_string_is_its_status(code: Any, status: int) -> None:
    """LiteLLM-style error events carry ``"code": "429"``: a busy backend (retried elsewhere, then 503
    ``no_backend``), not a failed one (it was 502). A code that is no error status (``200``, ``"n/a"``) is the
    server's default, a 502 (``200`` was taken as the status; 5,000 digits raised Python's int-conversion limit,
    and Arabic-Indic digits passed as a status)."""
    answer = sse_answer([sse({"error": {"message": "busy", "type": None, "code": code}}), b"data: [DONE]\n\n"])
    async with RawBackend(answer) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat(stream=True)
        assert resp.status_code == status, resp.text
        await assert_released(gw)


def plain(status: int, body: bytes, ctype: str = "application/json") -> Any:
    async def answer(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\ncontent-length: {len(body)}\r\n\r\n".encode())
        writer.write(body)

    return answer


@pytest.mark.parametrize(
    ("status", "body", "ctype"),
    [
        (404, b"<html><body><h1>404 Not Found</h1><hr>nginx</body></html>", "text/html"),
        (404, b'{"detail":"Not Found"}', "application/json"),  # FastAPI: e.g. vLLM, which has no /generate
        (404, b"404: Not Found", "text/plain"),  # aiohttp
        (404, b"404 page not found\n", "text/plain"),  # Go
        (404, b"", "text/plain"),
        (405, b'{"detail":"Method Not Allowed"}', "application/json"),
    ],
)
async def test_a_backend_without_the_route_is_a_502_not_the_clients_404(status: int, body: bytes, ctype: str) -> None:
    """A backend that has no ``/generate`` (a wrong URL, or an OpenAI-only server configured as ``sglang``) is the
    gateway's misconfiguration: 502 ``backend_error``, a 5xx in ``llmpath_requests_total`` and the ledger, counted
    toward ejection. (The client got the 404/405 as ``backend_rejected``, with the HTML page as its message, and the
    SLO saw a client error.)"""
    async with RawBackend(plain(status, body, ctype)) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat()
        assert resp.status_code == 502, resp.text
        assert resp.json()["error"]["code"] == "backend_error" and "html" not in resp.text
        [record] = gw.records()
        assert (record.status_code, record.error) == (502, "backend_error")
        assert gw.app.gateway.pool.states["b0"].consecutive_failures == 1


async def test_a_404_in_the_backends_own_words_is_still_the_clients() -> None:
    """vLLM's answer to an unknown model (in passthrough mode, the client's model name) stays a 404
    ``backend_rejected`` with its message: the client's request, not the gateway's configuration."""
    body = json.dumps({"object": "error", "message": "The model `nope` does not exist.", "code": 404}).encode()
    async with RawBackend(plain(404, body)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat()
        assert resp.status_code == 404 and resp.json()["error"]["code"] == "backend_rejected"
        assert "does not exist" in resp.json()["error"]["message"]
        assert gw.app.gateway.pool.states["b0"].consecutive_failures == 0


@pytest.mark.parametrize("kind", ["sglang", "openai"])
async def test_one_json_body_for_a_streamed_request_is_read_as_the_answer(kind: str) -> None:
    """A server (or proxy) that ignores ``stream: true`` and answers one ``application/json`` body: the gateway
    reads it as the answer and streams it to its client (it was a 502: "stream ended without data: [DONE]")."""
    if kind == "sglang":
        body = {"text": "Hello", "output_ids": [1, 2], "meta_info": meta(completion=2, finish_reason={"type": "stop"})}
    else:
        message = {"role": "assistant", "content": "Hello"}
        body = {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
        body["usage"] = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
    async with (
        RawBackend(plain(200, json.dumps(body).encode())) as backend,
        serving_gateway(backend.url, kind=kind) as gw,
    ):
        resp = await gw.chat(stream=True)
        assert resp.status_code == 200
        chunks = sse_events(resp.text)
        assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks[:-1]) == "Hello"
        assert await tokens(gw) == {"input": 5, "cached": 0, "output": 2}


async def test_one_json_body_without_usage_counts_its_text_not_one_token() -> None:
    """A server that ignores ``stream`` and reports no usage: one body is one chunk, and it counted as one output
    token, however long; its output is estimated from its text as the prompt is (UTF-8 bytes / chars_per_token)."""
    text = "word " * 80  # 400 bytes: 100 tokens at the default 4 bytes a token
    message = {"role": "assistant", "content": text}
    body = {"object": "chat.completion", "choices": [{"index": 0, "message": message, "finish_reason": "stop"}]}
    async with (
        RawBackend(plain(200, json.dumps(body).encode())) as backend,
        serving_gateway(backend.url, kind="openai") as gw,
    ):
        resp = await gw.chat(stream=True, stream_options={"include_usage": True})
        assert resp.status_code == 200
        chunks = sse_events(resp.text)
        assert chunks[-2]["usage"]["completion_tokens"] == 100
        assert (await tokens(gw))["output"] == 100
        [record] = gw.records()
        assert record.output_tokens == 100 and record.extra["output_tokens_estimated"] is True


@pytest.mark.parametrize(("kind", "status"), [("sglang", 503), ("openai", 503), ("openai", 502)])
async def test_a_json_error_answered_with_a_200_is_that_error(kind: str, status: int) -> None:
    """A proxy answering an error as ``200`` + JSON: the error it states, before any byte was streamed (it was
    "stream ended without data: [DONE]", always a 502): here a busy backend (503 ``no_backend``) or a failed one."""
    error = {"message": "upstream overloaded", "code": 503} if status == 503 else {"message": "boom", "type": "x"}
    async with (
        RawBackend(plain(200, json.dumps({"error": error}).encode())) as backend,
        serving_gateway(backend.url, kind=kind) as gw,
    ):
        resp = await gw.chat(stream=True)
        assert resp.status_code == status, resp.text
        await assert_released(gw)


@pytest.mark.parametrize("split", [False, True])
async def test_a_byte_order_mark_before_the_stream_is_not_part_of_it(split: bool) -> None:
    """A UTF-8 BOM before the first ``data:`` (the SSE spec drops it), in the first chunk or split over the first
    two: the first event is read (it was skipped as a field with another name, and its text lost)."""
    first = b"\xef\xbb\xbf" + openai_chunk("He")
    events = [first[:2], first[2:]] if split else [first]
    events += [openai_chunk("llo", finish="stop", usage=USAGE), b"data: [DONE]\n\n"]
    async with RawBackend(sse_answer(events)) as backend, serving_gateway(backend.url, kind="openai") as gw:
        resp = await gw.chat()
        assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"] == "Hello"


async def assert_timed_out(gw: Served, resp: Any, after_first: bool) -> None:
    """The read timeout ended the request: a 504 ``backend_timeout`` before the first byte, the SSE error event and
    ``[DONE]`` after it; the ledger and ``llmpath_requests_total`` say 504 and the slots are released."""
    if after_first:
        assert resp.status_code == 200
        events = sse_events(resp.text)
        assert events[-2]["error"]["code"] == "backend_timeout" and events[-1] == "[DONE]"
    else:
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "backend_timeout"
    [record] = gw.records()
    assert record.status_code == 504
    assert (await requests_by_code(gw)).get("504") == 1
    await assert_released(gw)


@pytest.mark.parametrize("after_first", [False, True])
async def test_a_backend_that_hangs_after_its_headers_is_ended_by_the_read_timeout(after_first: bool) -> None:
    """200 and its headers, then silence (before or after the first event): ``timeouts.read_s`` ends it — a 504
    ``backend_timeout`` before the first byte, the SSE error event and ``[DONE]`` after it — and the ledger,
    ``llmpath_requests_total`` and the slots say so."""

    async def hang(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head(200, chunked=True) + (chunk(sse(sglang_chunks()[0])) if after_first else b""))
        await writer.drain()
        await asyncio.sleep(60)

    async with RawBackend(hang) as backend, serving_gateway(backend.url, limits={"timeouts": {"read_s": 0.5}}) as gw:
        resp = await gw.chat(stream=True)
        await assert_timed_out(gw, resp, after_first)


@pytest.mark.parametrize("after_first", [False, True])
async def test_a_backend_sending_only_keepalive_comments_is_ended_by_the_read_timeout(after_first: bool) -> None:
    """Comments (``: ping``) keep a connection alive through proxies; they are no progress. A backend that sends
    nothing else for longer than ``timeouts.read_s`` is timed out as a silent one is (it held its slot forever)."""

    async def keepalive(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head(200, chunked=True) + (chunk(sse(sglang_chunks()[0])) if after_first else b""))
        for _ in range(600):
            writer.write(chunk(b": ping\n\n"))
            await writer.drain()
            await asyncio.sleep(0.1)

    async with (
        RawBackend(keepalive) as backend,
        serving_gateway(backend.url, limits={"timeouts": {"read_s": 0.5}}) as gw,
    ):
        resp = await asyncio.wait_for(gw.chat(stream=True), 10)
        await assert_timed_out(gw, resp, after_first)


async def test_a_json_answer_past_the_limit_is_a_502_not_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-body answer (read whole since the backend may ignore ``stream``) larger than ``MAX_BODY_BYTES`` (here
    lowered to 1 MiB) is a protocol error, not read into memory to its end (it was read whole, however large)."""
    from llmpath.backends import _http

    monkeypatch.setattr(_http, "MAX_BODY_BYTES", 1 << 20, raising=False)

    async def huge(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        final = json.dumps(meta(completion=2, finish_reason={"type": "stop"})).encode()
        start = b'{"meta_info": ' + final + b', "text": "'
        writer.write(head(200, {"content-type": "application/json"}, chunked=True) + chunk(start))
        for _ in range(64):  # 4 MiB
            writer.write(chunk(b"x" * (64 << 10)))
            await writer.drain()
        writer.write(chunk(b'"}') + chunk(b""))

    async with RawBackend(huge) as backend, serving_gateway(backend.url) as gw:
        resp = await gw.chat(stream=True)
        assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error"
        await assert_released(gw)
