"""The backends against SGLang 0.5.23 response fixtures (documented shapes), and the engine against the fixtures."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from llmpath.backends import (
    BackendBadRequest,
    BackendProtocolError,
    BackendRequest,
    BackendServerError,
    BackendUnavailable,
    ChatMessage,
    Done,
    FirstToken,
    OpenAIBackend,
    SamplingParams,
    Scheduled,
    SGLangBackend,
    TimingSource,
    TokenDelta,
)

FIXTURES = Path(__file__).parent / "fixtures"
#: sglang.md §1.1: keys present regardless of flags (cached_tokens_details only on a prefix hit).
ALWAYS = {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "reasoning_tokens",
          "weight_version", "num_retractions"}  # fmt: skip
#: sglang.md §1.2 / §2: timing keys on every chunk with --enable-metrics, and those sent only at the finish.
EVERY_CHUNK_TIMING = {"queue_time", "forward_entry_time", "prefill_finished_time", "storage_prefetch_wait",
                      "storage_staging_wait"}  # fmt: skip
FINAL_TIMING = {"request_received_ts", "api_server_dispatch_finish_ts", "first_token_latency", "request_finished_ts",
                "decode_throughput"}  # fmt: skip


def sse_objects(text: str) -> list[dict]:
    assert text.endswith("data: [DONE]\n\n")
    return [json.loads(e.removeprefix("data: ")) for e in text.split("\n\n") if e and e != "data: [DONE]"]


def fixture_objects(name: str) -> list[dict]:
    return sse_objects((FIXTURES / name).read_text())


@pytest.mark.parametrize(
    ("name", "metrics"),
    [("generate_stream_metrics.sse", True), ("generate_stream_no_metrics.sse", False),
     ("generate_stream_incremental.sse", True)],
)  # fmt: skip
def test_generate_fixtures_follow_the_documented_shapes(name: str, metrics: bool) -> None:
    chunks = fixture_objects(name)
    for i, chunk in enumerate(chunks):
        meta, final = chunk["meta_info"], i == len(chunks) - 1
        assert set(chunk) == {"text", "output_ids", "meta_info"}
        assert set(meta) >= ALWAYS
        assert (meta["finish_reason"] is None) != final
        assert ("e2e_latency" in meta) == final
        assert (set(meta) >= EVERY_CHUNK_TIMING) == metrics
        assert (set(meta) >= FINAL_TIMING) == (metrics and final)
        assert ("cached_tokens_details" in meta) == (meta["cached_tokens"] > 0)


def replay(server, path: str, body: bytes, *, status: int = 200, headers: dict[str, str] | None = None) -> str:
    """Make the loopback server answer ``path`` with the fixture bytes; returns its URL."""
    server.reply(path, body, status=status, headers=headers or {})
    return server.url


async def events_of(backend, request: BackendRequest) -> list:
    try:
        return [ev async for ev in backend.generate(request)]
    finally:
        await backend.aclose()


def request(stream: bool = True, **kw) -> BackendRequest:
    kw.setdefault("prompt", "The capital of France is")
    return BackendRequest("9f1c2e7a4b5d4c3e8a7f6b5c4d3e2f1a", "m", stream=stream, **kw)


async def test_metrics_stream_maps_meta_info_to_stage_timings(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes())
    backend = SGLangBackend(url)
    traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    req = request(messages=[ChatMessage("user", "Capital of France?")], prompt=None, cache_salt="tenant-7",
                  sampling=SamplingParams(max_tokens=3, temperature=0.0, stop=["\n\n"], seed=11),
                  trace_headers={"traceparent": traceparent})  # fmt: skip
    sched, first, *deltas, done = await events_of(backend, req)
    assert sched == Scheduled(0.0123, TimingSource.BACKEND)
    assert isinstance(first, FirstToken) and first.source is TimingSource.BACKEND
    assert first.prefill_seconds == pytest.approx(0.05) and (first.prompt_tokens, first.cached_tokens) == (9, 4)
    assert [(d.text, d.num_tokens) for d in deltas] == [(" Paris", 1), (" is", 1), (" the", 1)]
    assert isinstance(done, Done) and done.finish_reason == "length"
    assert done.response_model is None  # /generate does not say
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.cached_tokens) == (9, 3, 4)
    t = done.timings
    assert t.source is TimingSource.BACKEND and t.queue_seconds == 0.0123 and t.prefill_seconds == pytest.approx(0.05)
    assert (t.first_token_seconds, t.e2e_seconds) == (0.0735, 0.1205)
    assert t.dispatch_seconds == pytest.approx(0.003, abs=1e-6)  # api_server_dispatch_finish_ts − request_received_ts
    seen = loopback.requests
    sent = json.loads(seen[0].body)
    assert sent["text"] == "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert sent["rid"] == req.request_id and sent["stream"] is True and sent["cache_salt"] == "tenant-7"
    assert sent["sampling_params"] == {"max_new_tokens": 3, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                       "ignore_eos": False, "stop": ["\n\n"], "sampling_seed": 11}  # fmt: skip
    assert seen[0].headers["traceparent"] == traceparent


async def test_stream_without_metrics_uses_the_gateway_clock(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_stream_no_metrics.sse").read_bytes())
    events = await events_of(SGLangBackend(url), request())
    assert {ev.source for ev in events[:2]} == {TimingSource.GATEWAY}
    assert events[0].queue_seconds == 0.0 and events[1].cached_tokens == 0
    assert events[-1].timings.source is TimingSource.GATEWAY and events[-1].timings.queue_seconds is None
    assert events[-1].timings.dispatch_seconds is None
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == " Paris is the"


async def test_incremental_stream_is_detected(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_stream_incremental.sse").read_bytes())
    events = await events_of(SGLangBackend(url), request())
    assert [e.text for e in events if isinstance(e, TokenDelta)] == [" Paris", " is", " the"]
    assert events[-1].usage.completion_tokens == 3


async def test_non_streaming_body(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_nonstream_metrics.json").read_bytes())
    events = await events_of(SGLangBackend(url), request(stream=False))
    assert [type(e) for e in events] == [Scheduled, FirstToken, TokenDelta, Done]
    assert events[2] == TokenDelta(" Paris is the", 3)
    assert events[-1].finish_reason == "stop" and events[-1].timings.e2e_seconds == 0.1205


async def test_in_stream_error_and_abort_are_typed(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_stream_error.sse").read_bytes())
    with pytest.raises(BackendBadRequest, match="longer than the model's context length"):
        await events_of(SGLangBackend(url), request())
    url = replay(loopback, "/generate", (FIXTURES / "generate_stream_abort.sse").read_bytes())
    with pytest.raises(BackendUnavailable, match="overloaded"):
        await events_of(SGLangBackend(url), request())


@pytest.mark.parametrize(
    ("error", "kind", "status"),
    [
        # SGLang versions that stream a ValueError from checking the request as a message only (their
        # non-streaming path answers it 400): the client's error, not the backend's.
        ({"message": "The input (201 tokens) is longer than the model's context length (64 tokens)."},
         BackendBadRequest, 400),
        ({"message": "bad top_p", "type": "invalid_request_error"}, BackendBadRequest, 400),
        ({"message": "scheduler crashed", "type": "internal_error"}, BackendServerError, 500),
        ({"message": "no such adapter", "type": "invalid_request_error", "code": 404}, BackendBadRequest, 404),
    ],
)  # fmt: skip
async def test_in_stream_errors_without_a_code_take_their_status_from_the_type(loopback, error, kind, status) -> None:
    body = b"data: " + json.dumps({"error": error}).encode() + b"\n\ndata: [DONE]\n\n"
    url = replay(loopback, "/generate", body)
    with pytest.raises(kind) as info:
        await events_of(SGLangBackend(url), request())
    raised = info.value
    assert (raised.status_code if isinstance(raised, BackendBadRequest) else raised.upstream_status) == status


async def test_openai_in_stream_error_without_a_code_is_a_server_error(loopback) -> None:
    body = b'data: {"error": {"message": "The server had an error.", "type": null}}\n\ndata: [DONE]\n\n'
    url = replay(loopback, "/v1/chat/completions", body)
    with pytest.raises(BackendServerError) as info:
        await events_of(OpenAIBackend(url), request(messages=[ChatMessage("user", "hi")], prompt=None))
    assert info.value.upstream_status == 500


async def test_http_errors_are_typed(loopback) -> None:
    url = replay(loopback, "/generate", (FIXTURES / "generate_400.json").read_bytes(), status=400)
    with pytest.raises(BackendBadRequest) as info:
        await events_of(SGLangBackend(url), request())
    assert str(info.value) == "top_p must be in (0, 1], got 0.0." and info.value.status_code == 400
    url = replay(
        loopback, "/generate", b'{"error": {"message": "queue full"}}', status=503, headers={"Retry-After": "2"}
    )
    with pytest.raises(BackendUnavailable) as unavailable:
        await events_of(SGLangBackend(url), request())
    assert unavailable.value.retry_after == 2.0
    url = replay(loopback, "/generate", b"data: {not json}\n\n")
    with pytest.raises(BackendProtocolError, match="not JSON"):
        await events_of(SGLangBackend(url), request())
    url = replay(
        loopback, "/generate", (FIXTURES / "generate_stream_metrics.sse").read_bytes().replace(b"data: [DONE]", b"")
    )
    with pytest.raises(BackendProtocolError, match=r"\[DONE\]"):
        await events_of(SGLangBackend(url), request())


@pytest.mark.parametrize(
    ("path", "status", "body", "code"),
    [
        # SGLang's two context refusals (a 400 body, and the streamed message-only form), without a code.
        ("/generate", 400, {"error": {"message": "The input (201 tokens) is longer than the model's context length "
                                                 "(64 tokens)."}}, "context_length_exceeded"),
        ("/generate", 200, {"error": {"message": "Requested token count exceeds the model's maximum context length "
                                                 "of 64 tokens. You requested a total of 90 tokens."}},
         "context_length_exceeded"),
        # vLLM's wording, and OpenAI's own code, on the OpenAI-compatible path.
        ("/v1/chat/completions", 400, {"object": "error", "message": "This model's maximum context length is 4096 "
                                       "tokens. However, you requested 5000 tokens.", "type": "BadRequestError"},
         "context_length_exceeded"),
        ("/v1/chat/completions", 400, {"error": {"code": 400, "message": "the request exceeds the available context "
                                                 "size, try increasing it", "type": "exceed_context_size_error"}},
         "context_length_exceeded"),  # llama.cpp's server
        ("/v1/chat/completions", 400, {"error": {"message": "Too long.", "code": "context_length_exceeded",
                                                 "param": "messages", "type": "invalid_request_error"}},
         "context_length_exceeded"),
        ("/v1/chat/completions", 400, {"error": {"message": "Bad top_p.", "code": "invalid_value", "param": "top_p"}},
         "invalid_value"),
        ("/generate", 400, {"error": {"message": "top_p must be in (0, 1], got 0.0."}}, None),
    ],
)  # fmt: skip
async def test_context_length_refusals_carry_openais_code(loopback, path, status, body, code) -> None:
    raw = json.dumps(body).encode()
    if status == 200:  # an in-stream error
        raw = b"data: " + raw + b"\n\ndata: [DONE]\n\n"
    url = replay(loopback, path, raw, status=status)
    backend = SGLangBackend(url) if path == "/generate" else OpenAIBackend(url)
    req = request() if path == "/generate" else request(messages=[ChatMessage("user", "hi")], prompt=None)
    with pytest.raises(BackendBadRequest) as info:
        await events_of(backend, req)
    assert info.value.code == code and info.value.status_code == 400


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_backend_key_is_the_backends_failure_and_its_body_is_dropped(loopback, status) -> None:
    """OpenAI's 401 echoes a masked piece of the key: it is a server error (the gateway's 502, counted against the
    backend), and the body is not kept where a client could see it."""
    body = b'{"error": {"message": "Incorrect API key provided: sk-proj-****wxyz.", "code": "invalid_api_key"}}'
    url = replay(loopback, "/v1/chat/completions", body, status=status)
    with pytest.raises(BackendServerError) as info:
        await events_of(OpenAIBackend(url, api_key="sk-x"), request(messages=[ChatMessage("user", "hi")], prompt=None))
    assert info.value.upstream_status == status and "wxyz" not in str(info.value)


async def test_openai_chat_stream_fixture(loopback) -> None:
    url = replay(loopback, "/v1/chat/completions", (FIXTURES / "chat_stream_usage.sse").read_bytes())
    backend = OpenAIBackend(url, api_key="sk-test")
    events = await events_of(backend, request(messages=[ChatMessage("user", "Capital?")], prompt=None))
    assert {e.source for e in events[:2]} == {TimingSource.GATEWAY}
    assert "".join(e.text for e in events if isinstance(e, TokenDelta)) == "Paris is lovely"
    done = events[-1]
    assert (done.usage.prompt_tokens, done.usage.completion_tokens, done.usage.cached_tokens) == (42, 3, 32)
    assert done.finish_reason == "stop" and done.timings.source is TimingSource.GATEWAY
    assert done.response_model == "meta-llama/Llama-3.1-8B-Instruct"  # what the server says generated it
    seen = loopback.requests
    assert seen[0].headers["authorization"] == "Bearer sk-test"
    body = json.loads(seen[0].body)
    assert body["stream_options"] == {"include_usage": True} and body["messages"][0]["content"] == "Capital?"


async def test_openai_chat_non_streaming_fixture(loopback) -> None:
    url = replay(loopback, "/v1/chat/completions", (FIXTURES / "chat_nonstream.json").read_bytes())
    req = request(stream=False, messages=[ChatMessage("user", "Capital?")], prompt=None)
    events = await events_of(OpenAIBackend(url), req)
    assert events[2] == TokenDelta("Paris is lovely", 3)
    assert events[-1].usage.cached_tokens == 32


@pytest.mark.slow
def test_engine_outputs_have_the_fixture_key_sets(engine) -> None:
    body = {"text": "Key sets please", "stream": True, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    httpx.post(f"{engine.url}/generate", json=body)  # warm the prefix so cached_tokens_details appears
    ours = sse_objects(httpx.post(f"{engine.url}/generate", json=body).text)
    theirs = fixture_objects("generate_stream_metrics.sse")
    assert [set(c["meta_info"]) for c in ours] == [set(c["meta_info"]) for c in theirs]
    chat = {"messages": [{"role": "user", "content": "Key sets please"}], "stream": True,
            "stream_options": {"include_usage": True}, "max_tokens": 3, "ignore_eos": True}  # fmt: skip
    ours = sse_objects(httpx.post(f"{engine.url}/v1/chat/completions", json=chat).text)
    theirs = fixture_objects("chat_stream_usage.sse")
    assert set(ours[-1]) == set(theirs[-1]) and set(ours[-1]["usage"]) == set(theirs[-1]["usage"])
    assert set(ours[-2]["choices"][0]) == set(theirs[-2]["choices"][0])
