"""Admission (429s, queue waits), backend errors, failover when an engine process is killed, ejection and
reinstatement by health checks — real engines with fault injection behind a real gateway."""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.slow

PREFIX = "Failover drill: keep answering even when an engine dies. " * 6


@pytest.fixture(scope="module")
def gw(stack, keys):
    engines = stack.start_engines(2, "--enable-fault-injection")
    config = {
        "backends": [{"url": e.url, "name": e.name} for e in engines],
        "routing": {"policy": "prefix", "max_retries": 2},
        # 3: the stream cut by the kill (1) and the probe that may run before the next request (2) leave the dead
        # engine in service for that request, whose failed connection (3) is retried elsewhere and ejects it.
        "health": {"interval_s": 1, "timeout_s": 0.5, "eject_after_failures": 3, "eject_for_s": 1.5},
        "tokenizer": {"chars_per_token": 1},
        "api_keys": keys.config(),
        "limits": {"max_concurrency": 2, "max_queue": 1, "timeouts": {"queue_s": 1.0, "connect_s": 1}},
    }
    return stack.start_gateway("gateway", config)


def post(gw, keys, content: str, *, key: str | None = None, **extra: Any) -> httpx.Response:
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=keys.auth(key or keys.user), timeout=30)


def faults(stack, **state: float) -> None:
    for engine in stack.engines:
        if engine.proc.poll() is None:
            if state:
                httpx.post(f"{engine.url}/debug/fault", json=state).raise_for_status()
            else:
                httpx.delete(f"{engine.url}/debug/fault").raise_for_status()


def rejections(gw) -> dict[str, float]:
    metrics = gw.metrics()
    reasons = ("queue_full", "queue_timeout", "rate_limited", "token_rate_limited")
    return {r: metrics[f'llmpath_admission_rejections_total{{reason="{r}"}}'] for r in reasons}


def test_tenant_rate_limit(gw, keys) -> None:
    before = rejections(gw)  # every reason is exported before its first rejection
    first = post(gw, keys, "first", key=keys.limited, stream=True)  # the SSE response carries them too
    assert first.status_code == 200
    assert first.headers["x-ratelimit-limit-requests"] == "1" and first.headers["x-ratelimit-remaining-requests"] == "0"
    assert "x-ratelimit-limit-tokens" not in first.headers  # no token budget for this tenant
    limited = post(gw, keys, "second", key=keys.limited)
    assert limited.status_code == 429
    assert limited.headers["x-ratelimit-remaining-requests"] == "0"
    assert limited.headers["x-ratelimit-reset-requests"].endswith("s")
    assert limited.json()["error"]["code"] == "rate_limited" and limited.json()["error"]["type"] == "rate_limit_error"
    assert 1 <= int(limited.headers["retry-after"]) <= 5  # 0.2 requests/s: the next token in at most 5 s
    assert post(gw, keys, "another tenant").status_code == 200  # tenants have their own buckets
    after = rejections(gw)
    assert {r: after[r] - before[r] for r in after} == {r: 1 if r == "rate_limited" else 0 for r in after}


def test_admission_queue_full_and_queue_timeout(gw, stack, keys) -> None:
    faults(stack, queue_delay_s=2.0)  # every request holds its admission slot for > 2 s
    try:
        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            running = [pool.submit(post, gw, keys, f"slow {i}") for i in range(2)]
            time.sleep(0.5)
            queued = pool.submit(post, gw, keys, "queued")
            time.sleep(0.15)
            gauges = gw.metrics()
            full = post(gw, keys, "no room")
            results = [f.result() for f in running]
            timed_out = queued.result()
    finally:
        faults(stack)
    assert gauges["llmpath_admission_inflight_requests"] == 2 and gauges["llmpath_admission_queue_depth"] == 1
    assert [r.status_code for r in results] == [200, 200]
    assert full.status_code == 429 and full.json()["error"]["code"] == "queue_full" and "retry-after" in full.headers
    assert timed_out.status_code == 429 and timed_out.json()["error"]["code"] == "queue_timeout"
    metrics = gw.metrics()
    assert metrics['llmpath_admission_rejections_total{reason="queue_full"}'] >= 1
    assert metrics['llmpath_admission_rejections_total{reason="queue_timeout"}'] >= 1
    assert metrics["llmpath_admission_inflight_requests"] == metrics["llmpath_admission_queue_depth"] == 0


def test_schedule_stage_is_gateway_wait_plus_backend_queue(gw, stack, keys) -> None:
    faults(stack, queue_delay_s=0.3)
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            first = [pool.submit(post, gw, keys, f"hold {i}") for i in range(2)]
            time.sleep(0.1)
            waited = post(gw, keys, "waits for a slot")
            assert all(f.result().status_code == 200 for f in first)
    finally:
        faults(stack)
    assert waited.status_code == 200
    rec = gw.record(waited.headers["x-request-id"])
    schedule = {s["source"]: s["duration_s"] for s in rec["stages"] if s["name"] == "schedule"}
    assert 0.1 < schedule["gateway"] < 1.0  # waited for a slot in the gateway ...
    assert 0.25 < schedule["backend"] < 1.0  # ... and then in the engine's queue
    assert rec["extra"]["gateway_queue_s"] == pytest.approx(schedule["gateway"], abs=0.01)
    assert rec["extra"]["backend_queue_s"] == pytest.approx(schedule["backend"], abs=0.01)


def test_backend_errors_are_openai_errors(gw, stack, keys) -> None:
    faults(stack, error_rate=1.0)
    try:
        resp = post(gw, keys, "boom")
        streamed = post(gw, keys, "boom", stream=True)
    finally:
        faults(stack)
    assert resp.status_code == streamed.status_code == 502
    assert resp.json()["error"] == {
        "message": "The backend failed.",
        "type": "server_error",
        "param": None,
        "code": "backend_error",
    }
    assert post(gw, keys, "healthy again").status_code == 200


def test_tenant_token_budget_reserves_and_refunds(gw, stack, keys) -> None:
    """300 tokens, refilled at 1 token/s; a request reserves its prompt estimate + max_tokens up front and is
    settled at the end with what it used — nothing when the backend failed."""
    _wait_until(_all_backends_clean(gw))  # the previous test's injected 5xx
    faults(stack, error_rate=1.0)
    try:
        failed = post(gw, keys, "metered", key=keys.budgeted, max_tokens=200)
    finally:
        faults(stack)
    assert failed.status_code == 502
    served = post(gw, keys, "metered", key=keys.budgeted, max_tokens=200)  # fits only because of the refund
    assert served.status_code == 200, served.text
    reserved = gw.record(served.headers["x-request-id"])["extra"]["tokens_reserved"]
    assert 200 < reserved <= 300
    # what is left after the reservation, as OpenAI's headers say it (it refills at 1 token/s meanwhile)
    assert served.headers["x-ratelimit-limit-tokens"] == "300"
    assert 300 - reserved <= int(served.headers["x-ratelimit-remaining-tokens"]) <= 300 - reserved + 5
    over = post(gw, keys, "metered", key=keys.budgeted, max_tokens=200)
    assert over.status_code == 429 and over.json()["error"]["code"] == "token_rate_limited"
    assert over.headers["x-ratelimit-limit-tokens"] == "300" and "x-ratelimit-reset-tokens" in over.headers
    assert over.json()["error"]["type"] == "rate_limit_error" and int(over.headers["retry-after"]) >= 1
    assert gw.metrics()['llmpath_admission_rejections_total{reason="token_rate_limited"}'] >= 1
    unlimited = post(gw, keys, "metered", key=keys.user, max_tokens=200)  # other tenants: no budget, no headers
    assert unlimited.status_code == 200 and not any(h.startswith("x-ratelimit-") for h in unlimited.headers)
    _wait_until(_all_backends_clean(gw))  # the injected 5xx counts towards ejection until a health check passes


def _all_backends_clean(gw) -> Callable[[], bool]:
    def check() -> bool:
        backends = httpx.get(f"{gw.url}/readyz").json()["backends"]
        return all(b["available"] and b["consecutive_failures"] == 0 for b in backends)

    return check


def test_failover_when_an_engine_is_killed(gw, stack, keys) -> None:
    warm = post(gw, keys, PREFIX + "warm")
    victim_name = gw.record(warm.headers["x-request-id"])["extra"]["backend"]
    victim = next(e for e in stack.engines if e.name == victim_name)
    survivor = next(e for e in stack.engines if e.name != victim_name)

    # a stream on the victim when it dies: an SSE error after the tokens streamed, and those tokens in the ledger
    faults(stack, decode_slowdown=30)  # slow tokens: the stream is mid-way when the engine dies
    body = {"model": "tiny", "messages": [{"role": "user", "content": PREFIX + "warm"}], "max_tokens": 200,
            "ignore_eos": True, "stream": True}  # fmt: skip
    with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body, headers=keys.auth(), timeout=30) as resp:
        request_id = resp.headers["x-request-id"]
        lines = resp.iter_lines()
        chunks = 0
        for line in lines:
            chunks += line.startswith("data: ")
            if chunks == 3:  # the role chunk and two tokens
                break
        os.killpg(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait(10)
        rest = [line for line in lines if line.startswith("data: ")]
    faults(stack)
    assert rest[-1] == "data: [DONE]" and json.loads(rest[-2][6:])["error"]["code"] == "backend_error"
    cut = gw.record(request_id)
    assert cut["extra"]["backend"] == victim_name and cut["extra"]["stream_error"] == "backend_error"
    assert (cut["status_code"], cut["error"]) == (502, "BackendUnreachable")  # a failure, though its 200 was sent
    assert cut["extra"]["usage_partial"] is True and cut["output_tokens"] >= 2 and cut["input_tokens"] > 0
    assert "decode" in {s["name"] for s in cut["stages"]}

    # affine to the dead engine: the connection fails before any byte, the request is retried elsewhere
    resp = post(gw, keys, PREFIX + "after the crash")
    assert resp.status_code == 200, resp.text
    rec = gw.record(resp.headers["x-request-id"])
    assert rec["extra"]["backend"] == survivor.name and rec["extra"]["routing_reason"] == "retry"
    assert rec["extra"]["retries"] == 1
    routes = [s for s in rec["stages"] if s["name"] == "route"]
    assert len(routes) == 2  # the first choice and the retry, both in the waterfall
    failed = f"WARNING llmpath.gateway: backend {victim_name}: connection failed: ClientConnectorError"
    retried = f"{failed}; retrying on {survivor.name}"
    assert any(
        retried in line and line.endswith(f"request_id={rec['request_id']}")  # no trace context here
        for line in gw.log.read_text().splitlines()
    ), "the retry is not in the gateway's log with the request's id"

    # streaming requests fail over too (nothing was streamed yet)
    streamed = post(gw, keys, PREFIX + "streamed", stream=True)
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("data: [DONE]")

    _wait_until(lambda: _availability(gw).get(victim_name) is False)
    assert _availability(gw)[survivor.name] is True
    assert httpx.get(f"{gw.url}/readyz").status_code == 200  # one backend is enough to be ready
    assert gw.metrics()[f'llmpath_backend_up{{backend="{victim_name}"}}'] == 0
    for i in range(3):  # ejected: not even tried
        resp = post(gw, keys, PREFIX + f"later {i}")
        assert resp.status_code == 200
        assert gw.record(resp.headers["x-request-id"])["extra"]["retries"] == 0

    # the engine comes back on the same port: a passing health check reinstates it
    port = int(victim.url.rsplit(":", 1)[1])
    restarted = stack.start_engines(1, "--enable-fault-injection", port=port, name=f"{victim_name}-restarted")[0]
    _wait_until(lambda: _availability(gw).get(victim_name) is True, timeout=15)
    assert gw.metrics()[f'llmpath_backend_up{{backend="{victim_name}"}}'] == 1

    # every engine down: 503 with Retry-After, and not ready
    for engine in (restarted, survivor):
        os.killpg(engine.proc.pid, signal.SIGKILL)
        engine.proc.wait(10)
    resp = post(gw, keys, "nobody home")
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend" and "retry-after" in resp.headers
    _wait_until(lambda: httpx.get(f"{gw.url}/readyz").status_code == 503)


def _availability(gw) -> dict[str, bool]:
    return {b["name"]: b["available"] for b in httpx.get(f"{gw.url}/readyz").json()["backends"]}


def _wait_until(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)
