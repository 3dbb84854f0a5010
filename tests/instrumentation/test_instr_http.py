"""Real uvicorn over loopback: streaming TTFT, request ids, client disconnects and traceparent propagation."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmpath.instrumentation import read_jsonl

APP_DIR = Path(__file__).parent / "apps"
APP = "instr_server_app:app"


def serve(processes, free_port, name: str, env: dict[str, str]) -> str:
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(APP_DIR),
        APP,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    processes.spawn(name, cmd, ready_url=f"http://127.0.0.1:{port}/health", env=env, timeout=60)
    return f"http://127.0.0.1:{port}"


def wait_for_records(path: Path, n: int, timeout: float = 10.0) -> list:
    deadline = time.monotonic() + timeout
    records: list = []
    while time.monotonic() < deadline:
        records = list(read_jsonl(path)) if path.exists() else []
        if len(records) >= n:
            return records
        time.sleep(0.05)
    raise AssertionError(f"expected {n} records in {path}, got {len(records)}")


def test_streaming_ttft_over_real_http(processes, free_port, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    base = serve(processes, free_port, "stream", {"LLMPATH_TEST_JSONL": str(ledger)})
    delay, tokens = 0.1, 5
    with httpx.Client(timeout=10) as client:
        t0 = time.perf_counter()
        with client.stream("GET", f"{base}/v1/stream", params={"tokens": tokens, "delay": delay}) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            request_id = r.headers["x-request-id"]
            chunks = []
            for chunk in r.iter_raw():
                if chunk:
                    chunks.append(time.perf_counter() - t0)
        total = time.perf_counter() - t0
    # The middleware does not buffer the stream: the first event arrives long before the end.
    assert chunks[0] < total - 3 * delay
    [rec] = wait_for_records(ledger, 1)
    assert rec.request_id == request_id
    assert rec.status_code == 200 and rec.error is None
    assert rec.output_tokens == tokens
    # The first token is the first body chunk: after the 100 ms schedule stage, well before the end.
    assert delay <= rec.ttft_s < rec.duration_s - 3 * delay
    assert rec.ttft_s <= chunks[0] + 0.05  # the server saw it no later than the client did (loopback)
    assert rec.tpot_s == pytest.approx((rec.duration_s - rec.ttft_s) / (tokens - 1), rel=1e-3)
    assert [s.name for s in rec.stages] == ["schedule"]
    assert rec.unattributed_s == pytest.approx(rec.ttft_s - rec.stages[0].duration_s, abs=2e-6)


def test_request_id_is_honoured_assigned_and_returned(processes, free_port, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    base = serve(processes, free_port, "ids", {"LLMPATH_TEST_JSONL": str(ledger)})
    with httpx.Client(timeout=10) as client:
        given = client.post(f"{base}/v1/chat/completions", json={}, headers={"x-request-id": "req-abc.123"})
        assigned = client.post(f"{base}/v1/chat/completions", json={})
        unsafe = client.post(f"{base}/v1/chat/completions", json={}, headers={"x-request-id": 'bad id"}'})
        failed = client.get(f"{base}/fail", headers={"x-request-id": "req-fail.1"})  # Starlette's 500 page
    assert failed.status_code == 500 and failed.headers["x-request-id"] == "req-fail.1"
    assert given.headers["x-request-id"] == "req-abc.123" == given.json()["request_id"]
    assert len(assigned.headers["x-request-id"]) == 32
    assert unsafe.headers["x-request-id"] != 'bad id"}' and len(unsafe.headers["x-request-id"]) == 32
    records = wait_for_records(ledger, 4)
    assert [r.request_id for r in records] == [
        "req-abc.123",
        assigned.headers["x-request-id"],
        unsafe.headers["x-request-id"],
        "req-fail.1",
    ]
    assert records[3].status_code == 500 and records[3].error == "RuntimeError"


def test_client_disconnect_mid_stream_is_recorded_once(processes, free_port, tmp_path):
    ledger = tmp_path / "usage.jsonl"
    base = serve(processes, free_port, "disconnect", {"LLMPATH_TEST_JSONL": str(ledger)})
    with (
        httpx.Client(timeout=10) as client,
        client.stream("GET", f"{base}/v1/stream", params={"tokens": 40, "delay": 0.05}) as r,
    ):
        for chunk in r.iter_raw():
            if chunk:
                break  # leave after the first event: the connection closes
    [rec] = wait_for_records(ledger, 1)
    time.sleep(0.5)
    assert len(list(read_jsonl(ledger))) == 1  # exactly one record
    assert rec.status_code == 499
    assert rec.error in ("client_disconnect", "cancelled")
    assert rec.ttft_s is not None and rec.duration_s < 40 * 0.05


def test_traceparent_propagates_over_real_http_into_the_model_call(processes, free_port, tmp_path):
    spans_file = tmp_path / "spans.jsonl"
    backend = serve(processes, free_port, "backend", {})
    gateway = serve(
        processes,
        free_port,
        "gateway",
        {"LLMPATH_TEST_BACKEND": backend, "LLMPATH_TEST_SPANS": str(spans_file)},
    )
    client_trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    client_span = "00f067aa0ba902b7"
    with httpx.Client(timeout=10) as client:
        r = client.get(f"{gateway}/call-backend", headers={"traceparent": f"00-{client_trace}-{client_span}-01"})
    body = r.json()
    assert body["trace_id"] == client_trace
    version, trace_id, parent_id, flags = body["seen"]["traceparent"].split("-")
    assert (version, trace_id) == ("00", client_trace)
    assert int(flags, 16) & 1  # sampled
    assert body["seen"]["x-request-id"] == body["request_id"] == r.headers["x-request-id"]
    deadline = time.monotonic() + 5
    spans: list[dict] = []
    while time.monotonic() < deadline and len(spans) < 2:
        spans = [json.loads(line) for line in spans_file.read_text().splitlines()] if spans_file.exists() else []
        time.sleep(0.05)
    by_name = {s["name"]: s for s in spans}
    call = by_name["chat tiny"]
    server = by_name["GET /call-backend"]
    # The backend's parent is the model-call span, itself a child of the request's server span.
    assert parent_id == call["span_id"]
    assert call["parent_id"] == server["span_id"] and call["kind"] == "CLIENT"
    assert server["parent_id"] == client_span and server["trace_id"] == client_trace
