"""A backend that aborts a request itself (SGLang's ``finish_reason`` ``abort``: an operator's ``/abort_request``,
``abort_all`` around a weight update) cut its output short: that is no answer. Before anything reached the client
(a complete answer, or a stream before its first event) the request is retried on another backend; after that the
client gets an error (an error event in a stream that has begun), not a ``finish_reason`` that says the answer is
complete. Real engines behind a real gateway."""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

PROMPT = "Abort drill: an operator aborts everything on one engine. "


@pytest.fixture(scope="module")
def gw(stack, keys):
    engines = stack.start_engines(2, "--enable-fault-injection")
    config = {
        "backends": [{"url": e.url, "name": e.name} for e in engines],
        "routing": {"policy": "least_load", "max_retries": 1},
        "health": {"interval_s": 60},
        "api_keys": keys.config(),
        "usage": {"ledger": str(stack.tmp / "abort-usage.jsonl")},
    }
    return stack.start_gateway("gateway", config)


def set_fault(url: str, **state: float) -> None:
    httpx.post(f"{url}/debug/fault", json=state, timeout=5).raise_for_status()


def clear_fault(url: str) -> None:
    httpx.delete(f"{url}/debug/fault", timeout=5).raise_for_status()


def abort_all(url: str) -> None:
    httpx.post(f"{url}/abort_request", json={"abort_all": True}, timeout=5).raise_for_status()


def loads(url: str) -> dict[str, Any]:
    return httpx.get(f"{url}/v1/loads", timeout=5).json()["loads"][0]


def engine_holding(stack, what: str, timeout: float = 10.0) -> tuple[str, str]:
    """(URL of the engine with one request ``what`` (waiting or running), URL of the other one)."""
    urls = [e.url for e in stack.engines]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for i, url in enumerate(urls):
            if loads(url)[f"num_{what}_reqs"] == 1:
                return url, urls[1 - i]
        time.sleep(0.02)
    raise AssertionError(f"no engine has a {what} request")


def served(url: str) -> float:
    """Requests the engine finished (``sglang:num_requests_total``)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("sglang:num_requests_total")
    )


def chat(gw, keys, *, stream: bool, max_tokens: int) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": max_tokens,
            "stream": stream}  # fmt: skip
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=keys.auth(), timeout=60)


def codes(gw) -> dict[str, float]:
    metrics = gw.metrics()
    return {c: sum(v for k, v in metrics.items() if k.startswith("llmpath_requests_total") and f'code="{c}"' in k)
            for c in ("200", "502", "503")}  # fmt: skip


@pytest.fixture(autouse=True)
def no_faults(stack):
    yield
    for engine in stack.engines:
        clear_fault(engine.url)


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "streamed"])
def test_a_request_aborted_before_its_first_token_is_retried_on_the_other_backend(gw, stack, keys, stream) -> None:
    for engine in stack.engines:
        set_fault(engine.url, queue_delay_s=30)  # the request waits in the queue of whichever engine it goes to
    before = codes(gw)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(chat, gw, keys, stream=stream, max_tokens=4)
        aborting, other = engine_holding(stack, "waiting")
        other_served = served(other)
        clear_fault(other)
        abort_all(aborting)  # "Abort before prefill"
        resp = call.result(timeout=30)
    assert resp.status_code == 200, resp.text
    if stream:
        events = [line.removeprefix("data: ") for line in resp.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert not any("error" in c for c in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    else:
        assert resp.json()["choices"][0]["finish_reason"] in ("stop", "length")
    assert served(other) == other_served + 1  # the answer came from the other engine
    after = codes(gw)
    assert {c: after[c] - before[c] for c in after} == {"200": 1, "502": 0, "503": 0}
    assert "aborted the request; retrying on" in gw.log.read_text()


def records(gw) -> list[dict[str, Any]]:
    return [json.loads(line) for line in gw.ledger.read_text().splitlines()]


def test_a_complete_answer_aborted_mid_generation_is_retried_on_the_other_backend(gw, stack, keys) -> None:
    # Nothing reached the client (it waits for one JSON body): the gateway can still answer it from elsewhere.
    for engine in stack.engines:
        set_fault(engine.url, decode_slowdown=300)  # a few hundred milliseconds a token
    before, seen = codes(gw), len(records(gw))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(chat, gw, keys, stream=False, max_tokens=4)
        aborting, other = engine_holding(stack, "running")
        other_served = served(other)
        time.sleep(0.5)  # a token or two generated: the engine ends the request with them and finish_reason abort
        abort_all(aborting)
        resp = call.result(timeout=30)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 4
    assert served(other) == other_served + 1  # the answer came from the other engine
    after = codes(gw)
    assert {c: after[c] - before[c] for c in after} == {"200": 1, "502": 0, "503": 0}
    assert "aborted the request; retrying on" in gw.log.read_text()
    (record,) = records(gw)[seen:]
    # The answer's tokens only (not the aborted attempt's), and its first token: after the abort, not before it.
    assert (record["output_tokens"], record["status_code"]) == (4, 200)
    assert record["ttft_s"] > 0.5
    other_name = next(e.name for e in stack.engines if e.url == other)
    assert (record["extra"]["backend"], record["extra"]["retries"]) == (other_name, 1)


def test_a_complete_answer_aborted_on_every_backend_is_a_502_not_a_cut_answer(gw, stack, keys) -> None:
    for engine in stack.engines:
        set_fault(engine.url, decode_slowdown=300)
    before = codes(gw)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        call = pool.submit(chat, gw, keys, stream=False, max_tokens=8)
        first, second = engine_holding(stack, "running")
        time.sleep(0.5)
        abort_all(first)
        deadline = time.monotonic() + 10
        while loads(second)["num_running_reqs"] != 1:  # retried on the other one (routing.max_retries: 1) ...
            assert time.monotonic() < deadline, "the request was not retried on the other engine"
            time.sleep(0.02)
        time.sleep(0.8)  # its first tokens came (an abort before them would be a retry before the first event)
        abort_all(second)  # ... which aborts it too: no retry is left
        resp = call.result(timeout=30)
    assert resp.status_code == 502 and resp.json()["error"]["code"] == "backend_error", resp.text
    after = codes(gw)
    assert {c: after[c] - before[c] for c in after} == {"200": 0, "502": 1, "503": 0}
    assert "aborted the request; no retries left" in gw.log.read_text()


def test_a_stream_aborted_after_its_first_token_ends_with_an_error_not_a_stop(gw, stack, keys) -> None:
    for engine in stack.engines:
        set_fault(engine.url, decode_slowdown=300)
    before = codes(gw)
    body = {"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 40, "stream": True}
    lines: list[str] = []
    aborted = False
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=keys.auth(), timeout=60) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(line)
            if (
                not aborted
                and line.startswith("data: {")
                and json.loads(line[6:])["choices"][0]["delta"].get("content")
            ):
                aborted = True  # a first token reached the client
                for engine in stack.engines:
                    abort_all(engine.url)
    events = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    last = json.loads(events[-2])
    assert last["error"]["code"] == "backend_error", last
    assert not any(json.loads(e).get("choices", [{}])[0].get("finish_reason") for e in events[:-2])
    after = codes(gw)
    assert {c: after[c] - before[c] for c in after} == {"200": 0, "502": 1, "503": 0}
