"""Engine modes: fault injection, queue bounds, metrics off (gateway clock), incremental streaming, tracing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.trace.v1.trace_pb2 import Span

from llmpath.backends import (
    BackendRequest,
    BackendServerError,
    Done,
    FirstToken,
    SamplingParams,
    Scheduled,
    SGLangBackend,
    TimingSource,
    TokenDelta,
)
from tests.backends.engine_loads import wait_loads
from tests.loopback import Answer, Loopback

pytestmark = pytest.mark.slow

PROMPT = "Fault lines run deep under the mountain. " * 20
TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


@pytest.fixture(scope="module")
def otlp() -> Iterator[Loopback]:
    """A loopback OTLP/HTTP trace receiver (the requests it received)."""
    with Loopback(lambda _: Answer(200, headers={"Content-Type": "application/x-protobuf"}), methods=("POST",)) as rec:
        yield rec


def received_spans(receiver: Loopback) -> list[Span]:
    """The spans of every export ``receiver`` received so far."""
    spans: list[Span] = []
    for request in receiver.requests():
        msg = ExportTraceServiceRequest()
        msg.ParseFromString(request.body)
        spans.extend(span for rs in msg.resource_spans for ss in rs.scope_spans for span in ss.spans)
    return spans


@pytest.fixture(scope="module")
def faulty(engine_factory):
    """Faults allowed, one running request and a queue of two."""
    return engine_factory("--enable-fault-injection", "--max-running", "1", "--max-queued-requests", "2",
                          name="faulty")  # fmt: skip


@pytest.fixture(scope="module")
def plain(engine_factory, otlp: Loopback):
    """Like a stock SGLang: no --enable-metrics, incremental streaming, no cache report; exports traces."""
    env = {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": f"{otlp.url}/v1/traces", "OTEL_BSP_SCHEDULE_DELAY": "50"}
    return engine_factory("--disable-metrics", "--incremental-streaming-output", "--disable-cache-report",
                          name="plain", env=env)  # fmt: skip


def prefill_seconds(url: str, **params) -> float:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 1, **params}}
    meta = httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"]
    return meta["prefill_finished_time"] - meta["forward_entry_time"]


def test_fault_control_validates_and_updates_partially(faulty) -> None:
    url = f"{faulty.url}/debug/fault"
    cleared = {
        "prefill_slowdown": 1.0,
        "decode_slowdown": 1.0,
        "queue_delay_s": 0.0,
        "error_rate": 0.0,
        "step_error_rate": 0.0,
    }
    assert httpx.get(url).json() == cleared
    assert httpx.post(url, json={"error_rate": 0.25}).json()["error_rate"] == 0.25
    state = httpx.post(url, json={"queue_delay_s": 0.5}).json()
    assert state == {**cleared, "queue_delay_s": 0.5, "error_rate": 0.25}
    bad_updates = ({"prefill_slowdown": 0.5}, {"decode_slowdown": 0}, {"error_rate": 2}, {"step_error_rate": -1})
    for bad in (*bad_updates, {"bogus": 1}, [1]):
        resp = httpx.post(url, json=bad)
        assert resp.status_code == 400 and resp.json()["error"]["message"]
    assert httpx.get(url).json()["queue_delay_s"] == 0.5  # a bad update changes nothing
    assert httpx.delete(url).json() == cleared


def test_prefill_slowdown_makes_prefill_really_slower(faulty) -> None:
    httpx.post(f"{faulty.url}/flush_cache")
    base = min(prefill_seconds(faulty.url, temperature=0.1 * i) for i in range(1, 4))
    httpx.post(f"{faulty.url}/debug/fault", json={"prefill_slowdown": 20})
    try:
        httpx.post(f"{faulty.url}/flush_cache")
        slow = prefill_seconds(faulty.url)
    finally:
        httpx.delete(f"{faulty.url}/debug/fault")
    assert slow >= 5 * base and slow > 0.01  # 20x the work; a loaded machine blurs one-off timings


def decode_seconds(url: str) -> float:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 6, "ignore_eos": True}}
    meta = httpx.post(f"{url}/generate", json=body, timeout=60).json()["meta_info"]
    assert meta["completion_tokens"] == 6
    return meta["request_finished_ts"] - meta["prefill_finished_time"]  # five decode steps


def test_decode_slowdown_makes_every_output_token_slower(faulty) -> None:
    base = min(decode_seconds(faulty.url) for _ in range(3))
    httpx.post(f"{faulty.url}/debug/fault", json={"decode_slowdown": 20})
    try:
        slow = decode_seconds(faulty.url)
    finally:
        httpx.delete(f"{faulty.url}/debug/fault")
    assert slow >= 5 * base and slow > 0.01  # 20x the work; a loaded machine blurs one-off timings


def test_queue_delay_shows_up_as_queue_time(faulty) -> None:
    httpx.post(f"{faulty.url}/debug/fault", json={"queue_delay_s": 0.3})
    try:
        out = httpx.post(f"{faulty.url}/generate", json={"text": "q", "sampling_params": {"max_new_tokens": 1}})
    finally:
        httpx.delete(f"{faulty.url}/debug/fault")
    assert 0.3 <= out.json()["meta_info"]["queue_time"] < 2.0


async def test_error_rate_answers_500_and_the_backend_types_it(faulty) -> None:
    backend = SGLangBackend(faulty.url)
    async with httpx.AsyncClient(base_url=faulty.url) as client:
        await client.post("/debug/fault", json={"error_rate": 1.0})
        try:
            resp = await client.post("/generate", json={"text": "x"})
            assert resp.status_code == 500 and "Injected fault" in resp.json()["error"]["message"]
            chat = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
            assert chat.status_code == 500 and chat.json()["object"] == "error"
            with pytest.raises(BackendServerError) as info:
                [ev async for ev in backend.generate(BackendRequest("err-1", "m", prompt="x"))]
            assert info.value.upstream_status == 500 and info.value.status_code == 502
        finally:
            await client.delete("/debug/fault")
            await backend.aclose()


async def test_full_queue_answers_503_with_retry_after(faulty) -> None:
    body = {"text": "wait", "sampling_params": {"max_new_tokens": 1}}
    async with httpx.AsyncClient(base_url=faulty.url, timeout=60) as client:
        await client.post("/debug/fault", json={"queue_delay_s": 30})
        waiting = [asyncio.create_task(client.post("/generate", json=body)) for _ in range(2)]
        await wait_loads(client, num_waiting_reqs=2)
        full = await client.post("/generate", json=body)
        assert full.status_code == 503 and full.headers["retry-after"] == "1"
        assert "queue is full" in full.json()["error"]["message"]
        oa = await client.post("/v1/completions", json={"prompt": "x"})
        assert oa.status_code == 503 and oa.json()["code"] == 503
        await client.delete("/debug/fault")  # the queued requests now run
        assert [r.status_code for r in await asyncio.gather(*waiting)] == [200, 200]


def test_fault_control_is_refused_without_the_flag(plain) -> None:
    assert httpx.post(f"{plain.url}/debug/fault", json={"error_rate": 1}).status_code == 403
    assert httpx.get(f"{plain.url}/debug/fault").status_code == 403


def test_without_metrics_there_are_no_timing_keys_and_no_metrics(plain) -> None:
    meta = httpx.post(f"{plain.url}/generate", json={"text": "hello"}).json()["meta_info"]
    assert {"id", "prompt_tokens", "completion_tokens", "cached_tokens", "e2e_latency"} <= set(meta)
    assert not {"queue_time", "forward_entry_time", "prefill_finished_time", "first_token_latency"} & set(meta)
    assert httpx.get(f"{plain.url}/metrics").status_code == 404
    chat = {"messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
    usage = httpx.post(f"{plain.url}/v1/chat/completions", json=chat).json()["usage"]
    assert usage["prompt_tokens_details"] is None  # no --enable-cache-report


async def test_backend_uses_the_gateway_clock_and_incremental_text(plain, faulty) -> None:
    sampling = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    request = BackendRequest("inc-1", "m", prompt=PROMPT, sampling=sampling)
    results = {}
    for eng in (plain, faulty):  # same seed and weights: same greedy text in both streaming modes
        backend = SGLangBackend(eng.url)
        try:
            results[eng.url] = [ev async for ev in backend.generate(request)]
        finally:
            await backend.aclose()
    plain_events, faulty_events = results[plain.url], results[faulty.url]
    scheduled, first_token = plain_events[:2]
    assert isinstance(scheduled, Scheduled) and isinstance(first_token, FirstToken)
    assert {scheduled.source, first_token.source} == {TimingSource.GATEWAY}
    assert scheduled.queue_seconds == 0.0 and first_token.prefill_seconds > 0
    done = plain_events[-1]
    assert isinstance(done, Done) and done.timings.source is TimingSource.GATEWAY
    assert done.timings.e2e_seconds is not None and done.timings.e2e_seconds > 0

    def text(events: list) -> str:
        return "".join(ev.text for ev in events if isinstance(ev, TokenDelta))

    assert text(plain_events) == text(faulty_events) and len(text(plain_events)) > 0
    assert sum(ev.num_tokens for ev in plain_events if isinstance(ev, TokenDelta)) == 12


async def test_engine_spans_join_the_callers_trace(plain, otlp: Loopback) -> None:
    backend = SGLangBackend(plain.url)
    request = BackendRequest("traced-request-1", "m", prompt="trace me", trace_headers={"traceparent": TRACEPARENT})
    try:
        [ev async for ev in backend.generate(request)]
    finally:
        await backend.aclose()
    mine: list = []
    for _ in range(100):
        mine = [s for s in received_spans(otlp) if s.trace_id.hex() == TRACE_ID]
        if len(mine) >= 4:
            break
        await asyncio.sleep(0.05)
    names = {s.name: s for s in mine}
    assert set(names) == {"Req traced-r", "prefill_waiting", "prefill_forward", "decode_loop"}
    root = names["Req traced-r"]
    assert root.parent_span_id.hex() == "00f067aa0ba902b7"
    assert all(names[n].parent_span_id == root.span_id for n in ("prefill_waiting", "prefill_forward", "decode_loop"))
    attrs = {a.key: a.value for a in root.attributes}
    assert attrs["gen_ai.request.id"].string_value == "traced-request-1"
    assert attrs["gen_ai.usage.prompt_tokens"].int_value == len("trace me") + 1
    assert names["prefill_forward"].start_time_unix_nano <= names["decode_loop"].start_time_unix_nano
