"""The embedded engine's HTTP API against SGLang 0.5.x's documented shapes, over real loopback HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import httpx
import pytest

from tests.backends.engine_loads import wait_loads

pytestmark = pytest.mark.slow

PROMPT = "In a hole in the ground there lived a hobbit. " * 4
TIMING_KEYS = {"queue_time", "forward_entry_time", "prefill_finished_time"}
FINAL_TIMING_KEYS = {"request_received_ts", "api_server_dispatch_finish_ts", "first_token_latency",
                     "request_finished_ts"}  # fmt: skip


def sse_events(body: str) -> list[str]:
    assert body.endswith("data: [DONE]\n\n")
    events = [part for part in body.split("\n\n") if part]
    assert all(e.startswith("data: ") for e in events)
    return [e.removeprefix("data: ") for e in events]


def metric(text: str, name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)$", line)
        if not m or m.group(1) != name:
            continue
        got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
        if all(got.get(k) == v for k, v in labels.items()):
            total += float(m.group(3))
    return total


@pytest.fixture(scope="module")
def url(engine) -> str:
    return engine.url


def gen(url: str, **body) -> httpx.Response:
    body.setdefault("sampling_params", {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
    return httpx.post(f"{url}/generate", json=body, timeout=30)


def test_info_endpoints_have_sglang_shapes(url: str) -> None:
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/health_generate").status_code == 200
    for path in ("/model_info", "/get_model_info"):
        info = httpx.get(url + path).json()
        assert info["is_generation"] is True and info["served_model_name"] == "llmpath-tiny"
        assert json.loads((Path(info["model_path"]) / "tokenizer_config.json").read_text())["chat_template"]
        assert info["max_context_length"] == 4096
    for path in ("/server_info", "/get_server_info"):
        info = httpx.get(url + path).json()
        assert info["max_total_num_tokens"] == 65536 and info["internal_states"][0]["num_running_reqs"] == 0
    models = httpx.get(f"{url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "llmpath-tiny"
    loads = httpx.get(f"{url}/v1/loads").json()["loads"][0]
    assert {"num_running_reqs", "num_waiting_reqs", "num_used_tokens", "num_total_tokens", "token_usage"} <= set(loads)


def test_generate_non_streaming_meta_info(url: str) -> None:
    out = gen(url, text=PROMPT, rid="meta-1").json()
    meta = out["meta_info"]
    assert meta["id"] == "meta-1" and meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == len(PROMPT) + 1 and meta["completion_tokens"] == 6 == len(out["output_ids"])
    assert set(meta) >= TIMING_KEYS | FINAL_TIMING_KEYS | {"e2e_latency", "response_sent_to_client_ts"}
    assert meta["request_received_ts"] <= meta["forward_entry_time"] <= meta["prefill_finished_time"]
    assert meta["prefill_finished_time"] <= meta["request_finished_ts"] <= meta["response_sent_to_client_ts"]
    assert meta["queue_time"] <= meta["first_token_latency"] <= meta["e2e_latency"]
    assert isinstance(out["text"], str) and len(out["text"]) > 0


def test_generate_stream_is_cumulative_sse(url: str) -> None:
    params = {"max_new_tokens": 5, "temperature": 0, "ignore_eos": True}
    body = {"text": PROMPT, "stream": True, "sampling_params": params}
    with httpx.stream("POST", f"{url}/generate", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        chunks = [json.loads(e) for e in sse_events(resp.read().decode())[:-1]]
    assert len(chunks) == 5
    for i, c in enumerate(chunks, start=1):
        assert c["meta_info"]["completion_tokens"] == i == len(c["output_ids"])
        assert set(c["meta_info"]) >= TIMING_KEYS
        assert (c["meta_info"]["finish_reason"] is None) == (i < 5)
        assert ("e2e_latency" in c["meta_info"]) == (i == 5)
        if i > 1:
            assert c["text"].startswith(chunks[i - 2]["text"])
    whole = gen(url, text=PROMPT, sampling_params=params)
    assert chunks[-1]["text"] == whole.json()["text"]


def test_input_ids_batch_and_router_extras(url: str) -> None:
    ids = list(range(60, 90))
    single = gen(url, input_ids=ids, model=None, log_metrics=True, return_hidden_states=False, lora_path=None)
    assert single.status_code == 200 and single.json()["meta_info"]["prompt_tokens"] == 30
    batch = gen(url, text=["first prompt", "second prompt"], sampling_params={"max_new_tokens": 2, "ignore_eos": True})
    assert [len(o["output_ids"]) for o in batch.json()] == [2, 2]


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"text": "hi", "input_ids": [1, 2]}, "Either text or input_ids"),
        ({"sampling_params": {"max_new_tokens": 4}}, "Either text or input_ids"),
        ({"text": "x" * 5000}, "longer than the model's context length (4096 tokens)"),
        ({"text": "hi", "sampling_params": {"max_new_tokens": 4095}}, "exceeds the model's maximum context length"),
        ({"text": "hi", "sampling_params": {"temperature": -0.5}}, "temperature must be non-negative"),
        ({"text": "hi", "sampling_params": {"top_k": 0}}, "top_k must be -1"),
        ({"input_ids": [1, 99999]}, "outside the vocabulary"),
        ({"text": 42}, "text"),
    ],
)
def test_generate_bad_input_is_400(url: str, body: dict, needle: str) -> None:
    resp = httpx.post(f"{url}/generate", json=body)
    assert resp.status_code == 400
    assert needle in resp.json()["error"]["message"]


def test_invalid_json_is_400(url: str) -> None:
    resp = httpx.post(f"{url}/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert resp.status_code == 400 and "not valid JSON" in resp.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
def test_an_unpaired_surrogate_escape_is_400_and_a_pair_is_text(url: str, path: str) -> None:
    """A JSON escape of half a UTF-16 pair decodes to text no tokenizer or response can encode: a 400 naming it
    (it was a 500 with a traceback on /generate), while a whole pair (what ``ensure_ascii`` clients send) is text."""

    def body(text: str) -> bytes:
        if path == "/v1/chat/completions":
            return b'{"model": "m", "max_tokens": 2, "messages": [{"role": "user", "content": "%s"}]}' % text.encode()
        if path == "/v1/completions":
            return b'{"model": "m", "max_tokens": 2, "prompt": "%s"}' % text.encode()
        return b'{"text": "%s", "sampling_params": {"max_new_tokens": 2}}' % text.encode()

    headers = {"content-type": "application/json"}
    for lone in ("hi \\ud800 there", "hi \\uDFFF", "\\ud83d alone"):
        resp = httpx.post(f"{url}{path}", content=body(lone), headers=headers)
        assert resp.status_code == 400, resp.text
        message = resp.json()["message"] if path != "/generate" else resp.json()["error"]["message"]
        assert "unpaired UTF-16 surrogate escape" in message
    assert httpx.post(f"{url}{path}", content=body("hi \\ud83d\\ude00"), headers=headers).status_code == 200


@pytest.mark.parametrize("path", ["/generate", "/v1/chat/completions", "/v1/completions"])
@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),  # RecursionError: was a 500 with a traceback
        (b'{"text": "hi", "prompt": "hi", "max_tokens": %s}' % (b"9" * 5000), "4300 digits"),  # was a 500
        (b'{"text": "hi", "received_time": NaN, "messages": []}', "NaN is not a JSON value"),  # a 500 (/generate)
        (b'{"text": "hi", "temperature": 1e400}', "number 1e400 is out of range"),
    ],
    ids=["deep", "long-integer", "nan", "overflow"],
)
def test_bodies_python_cannot_parse_or_answer_are_400(url: str, path: str, body: bytes, says: str) -> None:
    """JSON nested deeper than Python's recursion limit, an integer longer than Python converts, or a number that is
    no JSON (NaN, one out of a float's range): a 400 naming it, on every route, and the engine still serves."""
    resp = httpx.post(f"{url}{path}", content=body, headers={"content-type": "application/json"}, timeout=30)
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"] if path != "/generate" else resp.json()["error"]["message"]
    assert message.startswith("request body is not valid JSON") and says in message
    assert httpx.get(f"{url}/health", timeout=10).status_code == 200


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 2, "sampling_seed": 2**64}}),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "seed": -(2**63) - 1},
        ),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "seed": 10**30}),
    ],
)
def test_a_seed_beyond_64_bits_is_400(url: str, path: str, body: dict[str, object]) -> None:
    """torch's generator takes a 64-bit seed: a larger one was a 500 with a traceback (``Overflow when unpacking
    long long``); both ends of the range still sample."""
    resp = httpx.post(f"{url}{path}", json=body, timeout=30)
    assert resp.status_code == 400, resp.text
    message = resp.json()["message"] if path != "/generate" else resp.json()["error"]["message"]
    assert message.startswith("sampling_seed must be in [-2**63, 2**64)")
    for seed in (-(2**63), 2**64 - 1):
        ok = {"text": "hi", "sampling_params": {"max_new_tokens": 2, "sampling_seed": seed}}
        assert httpx.post(f"{url}/generate", json=ok, timeout=30).status_code == 200


def test_openai_chat_completion_and_cache_report(url: str) -> None:
    messages = [{"role": "system", "content": "Answer in French. " * 5}, {"role": "user", "content": "Bonjour"}]
    body = {"model": "llmpath-tiny", "messages": messages, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    first = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    second = httpx.post(f"{url}/v1/chat/completions", json=body).json()
    assert first["object"] == "chat.completion" and first["choices"][0]["message"]["role"] == "assistant"
    assert first["choices"][0]["finish_reason"] == "length"
    usage = second["usage"]
    assert usage["completion_tokens"] == 4 and usage["total_tokens"] == usage["prompt_tokens"] + 4
    assert usage["prompt_tokens_details"]["cached_tokens"] == usage["prompt_tokens"] - 1
    assert first["choices"][0]["message"]["content"] == second["choices"][0]["message"]["content"]


def test_openai_chat_stream_with_usage(url: str) -> None:
    content = [{"type": "text", "text": "Stream please"}]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": 5, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
        chunks = [json.loads(e) for e in sse_events(resp.read().decode())[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    plain = httpx.post(f"{url}/v1/chat/completions", json={**body, "stream": False}).json()
    assert text == plain["choices"][0]["message"]["content"]


def test_openai_completions(url: str) -> None:
    body = {"prompt": "Once upon", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
    out = httpx.post(f"{url}/v1/completions", json=body).json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 3
    ids = httpx.post(f"{url}/v1/completions", json={"prompt": [256, 79, 110], "max_tokens": 2}).json()
    assert ids["usage"]["prompt_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"messages": []}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, "messages.role"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x" * 5000}]}, None),
        ("/v1/completions", {"prompt": "x", "max_tokens": 5000}, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ],
)
def test_openai_errors_have_openai_shape(url: str, path: str, body: dict, param: str | None) -> None:
    resp = httpx.post(url + path, json=body)
    assert resp.status_code == 400
    err = resp.json()
    assert err["object"] == "error" and err["code"] == 400 and err["type"] == "BadRequestError"
    assert err["param"] == param and err["message"]


async def test_client_disconnect_aborts_and_frees_kv(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        before = (await client.get(f"{url}/metrics")).text
        body = {"text": PROMPT * 3, "stream": True, "rid": "gone-1",
                "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}  # fmt: skip
        async with client.stream("POST", f"{url}/generate", json=body) as resp:
            lines = resp.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            loads = (await client.get(f"{url}/v1/loads")).json()["loads"][0]
            assert loads["num_running_reqs"] == 1 and loads["num_used_tokens"] > len(PROMPT) * 3
        for _ in range(100):  # the engine notices the disconnect, aborts, then returns the KV slots
            loads = (await client.get(f"{url}/v1/loads")).json()["loads"][0]
            if loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0:
                break
            await asyncio.sleep(0.05)
        assert loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0 and loads["token_usage"] == 0
        after = (await client.get(f"{url}/metrics")).text
    aborted = "sglang:num_aborted_requests_total"
    assert metric(after, aborted) == metric(before, aborted) + 1
    assert metric(after, "sglang:num_used_tokens") == 0


async def test_counters_equal_the_sum_of_meta_info(url: str) -> None:
    async with httpx.AsyncClient(timeout=30) as client:
        before = (await client.get(f"{url}/metrics")).text
        bodies = [{"text": PROMPT[: 50 + 7 * i], "sampling_params": {"max_new_tokens": 3 + i, "ignore_eos": True},
                   "stream": i % 2 == 0} for i in range(6)]  # fmt: skip
        metas = []
        for body in bodies:
            resp = await client.post(f"{url}/generate", json=body)
            metas.append(
                json.loads(sse_events(resp.text)[-2])["meta_info"] if body["stream"] else resp.json()["meta_info"]
            )
        after = (await client.get(f"{url}/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert delta("sglang:prompt_tokens_total") == sum(m["prompt_tokens"] for m in metas)
    assert delta("sglang:generation_tokens_total") == sum(m["completion_tokens"] for m in metas)
    assert delta("sglang:cached_tokens_total", cache_source="device") == sum(m["cached_tokens"] for m in metas)
    assert sum(m["cached_tokens"] for m in metas) > 0
    assert delta("sglang:num_requests_total", is_streaming="true") == 3
    assert delta("sglang:time_to_first_token_seconds_count", is_streaming="false") == 3
    assert delta("sglang:e2e_request_latency_seconds_count") == 6
    assert delta("sglang:queue_time_seconds_count") == 6
    labels = {"model_name": "llmpath-tiny", "engine_type": "unified", "tp_rank": "0"}
    assert metric(after, "sglang:max_total_num_tokens", **labels) == 65536


def test_metrics_families_follow_the_catalog(url: str) -> None:
    from llmpath.instrumentation.catalog import SGLANG_METRICS

    text = httpx.get(f"{url}/metrics").text
    for spec in SGLANG_METRICS:
        assert f"# TYPE {spec.name} {spec.kind}" in text, spec.name
    assert 'sglang:time_to_first_token_seconds_bucket{engine_type="unified",is_streaming="false",le="0.1"' in text


def test_continuous_batching_decodes_requests_together(url: str) -> None:
    def passes() -> int:
        return httpx.get(f"{url}/server_info").json()["internal_states"][0]["num_forward_passes"]

    deadline = time.monotonic() + 30  # earlier tests' aborted streams may still be winding down: their passes
    while (load := httpx.get(f"{url}/v1/loads").json()["loads"][0])["num_running_reqs"] or load["num_waiting_reqs"]:
        assert time.monotonic() < deadline, load
        time.sleep(0.05)
    start = passes()
    body = {"text": [f"request number {i}" for i in range(4)],
            "sampling_params": {"max_new_tokens": 32, "ignore_eos": True}}  # fmt: skip
    out = httpx.post(f"{url}/generate", json=body, timeout=30).json()
    assert [o["meta_info"]["completion_tokens"] for o in out] == [32] * 4
    # One prefill batch and 31 shared decode steps (a few more when a loaded machine spreads the four arrivals over
    # several scheduler steps); one request at a time would take 4 × 32 passes.
    assert passes() - start <= 64


def test_flush_cache_drops_the_prefix_cache(url: str) -> None:
    gen(url, text=PROMPT + "flush")
    assert gen(url, text=PROMPT + "flush").json()["meta_info"]["cached_tokens"] > 0
    resp = httpx.post(f"{url}/flush_cache")
    assert resp.status_code == 200 and resp.text.startswith("Cache flushed.")
    assert gen(url, text=PROMPT + "flush").json()["meta_info"]["cached_tokens"] == 0


def test_duplicate_in_flight_rid_is_refused(url: str) -> None:
    params = {"max_new_tokens": 2000, "ignore_eos": True}
    body = {"text": "dup", "rid": "dup-1", "stream": True, "sampling_params": params}
    with httpx.stream("POST", f"{url}/generate", json=body) as resp:
        lines = resp.iter_lines()  # keep the iterator: dropping it closes the stream (a disconnect)
        next(lines)
        again = httpx.post(f"{url}/generate", json={**body, "stream": False})
    assert again.status_code == 400 and "Duplicate request ID" in again.json()["error"]["message"]


async def test_non_streaming_client_disconnect_aborts_too(url: str) -> None:
    body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 3000, "ignore_eos": True}}
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        before = metric((await client.get("/metrics")).text, "sglang:num_aborted_requests_total")
        call = asyncio.create_task(client.post("/generate", json=body))
        await wait_loads(client, num_running_reqs=1)
        call.cancel()  # the client gives up: its connection closes
        loads = await wait_loads(client, num_running_reqs=0)
        after = metric((await client.get("/metrics")).text, "sglang:num_aborted_requests_total")
    assert loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0
    assert after == before + 1  # aborted, not run to its 3000 tokens
