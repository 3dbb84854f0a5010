"""The gateway over real HTTP in front of three real tiny engines: every stage, errors, the prompt cache,
routing, cancellation, token accounting against the engines' own metrics, trace propagation and the waterfall
page in headless Chromium."""

from __future__ import annotations

import concurrent.futures
import json
import re
import socket
import threading
import time
from collections import Counter
from typing import Any

import httpx
import pytest
from httpx_sse import connect_sse

from llmpath.instrumentation import STAGES

pytestmark = pytest.mark.slow

SYSTEM_A = "You are a careful assistant for the ACME support desk. " * 8  # 440 bytes
SYSTEM_B = "Answer in the voice of a lighthouse keeper, briefly and kindly. " * 7
SYSTEM_C = "You translate everything into formal legal English with citations. " * 7
SYSTEM_D = "Reply only with haiku about distributed systems and their failures. " * 7
SYSTEM_E = "You summarise meeting notes as terse bullet points for executives. " * 4


@pytest.fixture(scope="module")
def gw(otlp_collector, stack, keys, tmp_path_factory: pytest.TempPathFactory):
    docs = tmp_path_factory.mktemp("docs")
    (docs / "refunds.md").write_text("Refunds are issued within 14 days of purchase to the original card.")
    (docs / "shipping.txt").write_text("Shipping takes 3 to 5 business days; we ship worldwide.")
    otel = {"OTEL_EXPORTER_OTLP_ENDPOINT": otlp_collector.url, "OTEL_BSP_SCHEDULE_DELAY": "100"}
    engines = stack.start_engines(3, env=otel)
    config = {
        "backends": [{"url": e.url, "name": e.name} for e in engines],
        "routing": {"policy": "prefix", "balance_abs_threshold": 2, "balance_rel_threshold": 1.5},
        "health": {"interval_s": 1, "timeout_s": 1},
        "tokenizer": {"chars_per_token": 1},
        "prompt_cache": {"block_tokens": 16, "min_prefix_tokens": 32},
        "routes": [
            {"name": "tiny"},
            {
                "name": "support",
                "model": "tiny",
                "system_prompt": "You are the support bot of {{ tenant }}.",
                "retriever": {"path": str(docs), "top_k": 1},
            },
            {"name": "private", "model": "tiny", "cache": "off"},
        ],
        "api_keys": keys.config(),
        "limits": {
            "max_body_bytes": 65536,
            "max_tokens": 400,
            "default_max_tokens": 8,
            "max_messages": 16,
            "max_prompt_tokens": 3000,
        },
        "usage": {"ledger": str(stack.tmp / "usage.jsonl")},
    }
    # The gateway also exports its OTel metrics (GenAI, HTTP) to the collector.
    metrics_export = {"OTEL_METRICS_EXPORTER": "otlp", "OTEL_METRIC_EXPORT_INTERVAL": "300"}
    return stack.start_gateway("gateway", config, env={**otel, **metrics_export})


@pytest.fixture
def client(gw):
    with gw.client() as c:
        yield c


def chat(client: httpx.Client, keys, messages: list[dict[str, str]], *, key: str | None = None, **extra: Any):
    body = {"model": "tiny", "messages": messages, "max_tokens": 4, **extra}
    return client.post("/v1/chat/completions", json=body, headers=keys.auth(key or keys.user))


def convo(system: str, question: str = "hello?") -> list[dict[str, str]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": question}]


def test_chat_runs_every_stage(gw, client, keys) -> None:
    resp = chat(client, keys, convo(SYSTEM_D, "first question"), max_tokens=6, temperature=0)
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["object"] == "chat.completion" and body["model"] == "tiny"
    assert body["choices"][0]["message"]["role"] == "assistant" and body["choices"][0]["finish_reason"] == "length"
    usage = body["usage"]
    assert usage["completion_tokens"] == 6 and usage["prompt_tokens"] > 400
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    rec = gw.record(resp.headers["x-request-id"])
    assert rec["status_code"] == 200 and rec["tenant"] == "acme" and rec["route"] == "tiny"
    assert (rec["input_tokens"], rec["output_tokens"]) == (usage["prompt_tokens"], 6)
    names = [s["name"] for s in sorted(rec["stages"], key=lambda s: s["start_s"])]
    assert set(names) == set(STAGES.names)
    # the order the data needs: the prompt is assembled before the cache index and the router look at it
    order = ["auth", "validate", "assemble", "cache_lookup", "route", "schedule", "prefill", "decode"]
    assert [n for i, n in enumerate(names) if n not in names[:i]] == order
    sources = {(s["name"], s["source"]) for s in rec["stages"]}
    assert {("schedule", "gateway"), ("schedule", "backend"), ("prefill", "backend")} <= sources
    assert rec["extra"]["backend"] in {"e0", "e1", "e2"} and rec["extra"]["routing_reason"] in {"no_prefix", "prefix"}
    assert rec["ttft_s"] > 0 and rec["duration_s"] >= rec["ttft_s"]
    # the engine's own time before its queue (tokenize + dispatch) is the backend's schedule time, not unattributed:
    # placed right before the backend's queue interval, which ends where prefill starts
    dispatch, queue = sorted(
        (s for s in rec["stages"] if (s["name"], s["source"]) == ("schedule", "backend")), key=lambda s: s["start_s"]
    )
    prefill = next(s for s in rec["stages"] if s["name"] == "prefill")
    assert dispatch["duration_s"] == pytest.approx(rec["extra"]["backend_dispatch_s"], abs=2e-6)
    assert queue["duration_s"] == pytest.approx(rec["extra"]["backend_queue_s"], abs=2e-6)
    assert dispatch["start_s"] + dispatch["duration_s"] == pytest.approx(queue["start_s"], abs=2e-6)
    assert queue["start_s"] + queue["duration_s"] == pytest.approx(prefill["start_s"], abs=2e-6)


def test_stream_with_usage_chunk(gw, client, keys) -> None:
    warm = {"model": "tiny", "messages": convo(SYSTEM_D, "warm up"), "max_tokens": 1}  # the system prompt, cached
    assert client.post("/v1/chat/completions", json=warm, headers=keys.auth()).status_code == 200
    body = {
        "model": "tiny",
        "messages": convo(SYSTEM_D, "stream please"),
        "max_tokens": 12,
        "ignore_eos": True,  # sampled: twelve tokens even if EOS is drawn
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with connect_sse(client, "POST", "/v1/chat/completions", json=body, headers=keys.auth()) as source:
        assert source.response.status_code == 200
        assert source.response.headers["content-type"].startswith("text/event-stream")
        request_id = source.response.headers["x-request-id"]
        data = [e.data for e in source.iter_sse()]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == [] and usage["completion_tokens"] == 12
    # the same system prompt as the warm-up: the engine served most of it from its radix cache
    assert usage["prompt_tokens_details"]["cached_tokens"] > 400
    rec = gw.record(request_id)
    assert rec["cached_tokens"] == usage["prompt_tokens_details"]["cached_tokens"]
    assert rec["extra"]["routing_reason"] == "prefix" and rec["extra"]["cache_result"] in {"hit", "partial"}
    assert len(text.encode()) <= 12 * 4


def test_text_completions(gw, client, keys) -> None:
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 5, "ignore_eos": True}
    resp = client.post("/v1/completions", json=body, headers=keys.auth())
    assert resp.status_code == 200, resp.text
    out = resp.json()
    assert out["object"] == "text_completion" and out["usage"]["completion_tokens"] == 5
    assert out["usage"]["prompt_tokens"] == len("Once upon a time") + 1  # bytes + BOS
    with connect_sse(client, "POST", "/v1/completions", json={**body, "stream": True}, headers=keys.auth()) as src:
        events = [e.data for e in src.iter_sse()]
    chunks = [json.loads(d) for d in events[:-1]]
    assert events[-1] == "[DONE]" and all(c["object"] == "text_completion" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    too_big = client.post("/v1/completions", json={**body, "prompt": "", "top_k": 2**115}, headers=keys.auth())
    assert too_big.status_code == 400 and too_big.json()["error"]["param"] == "top_k"


def test_models_and_probes(gw, client, keys) -> None:
    resp = client.get("/v1/models", headers=keys.auth())
    assert resp.status_code == 200
    assert [m["id"] for m in resp.json()["data"]] == ["tiny", "support", "private"]
    assert client.get("/v1/models").status_code == 401
    one = client.get("/v1/models/support", headers=keys.auth())
    assert one.status_code == 200 and one.json() == {
        "id": "support",
        "object": "model",
        "created": 0,
        "owned_by": "llmpath",
    }
    assert client.get("/v1/models/", headers=keys.auth()).status_code == 404
    missing = client.get("/v1/models/nope", headers=keys.auth())
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
    assert client.get("/v1/models/support").status_code == 401
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert {b["name"]: b["available"] for b in ready.json()["backends"]} == {"e0": True, "e1": True, "e2": True}


@pytest.mark.parametrize(
    "header",
    [None, "Bearer sk-wrong", "Bearer", "Basic Zm9vOmJhcg==", "sk-acme-0f4c2a9d7e1b", "Bearer sk-acme-0f4c2a9d7e1"],
)
def test_bad_keys_get_401_without_detail(client, keys, header: str | None) -> None:
    headers = {"Authorization": header} if header is not None else {}
    resp = client.post("/v1/chat/completions", json={"model": "tiny", "messages": convo("x")}, headers=headers)
    assert resp.status_code == 401
    assert resp.json() == {
        "error": {
            "message": "Invalid or missing API key.",
            "type": "authentication_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }


def test_admin_endpoints_need_the_admin_key(client, keys) -> None:
    assert client.get("/debug/requests.json", headers=keys.auth()).status_code == 403
    anonymous = client.get("/debug/requests")
    assert anonymous.status_code == 401 and anonymous.headers["www-authenticate"].startswith("Basic")
    assert client.post("/admin/prompt-cache/flush", headers=keys.auth()).status_code == 403
    basic = httpx.BasicAuth("anyone", keys.admin)
    assert client.get("/debug/requests", auth=basic).status_code == 200


def test_the_waterfall_finds_one_request_by_request_id_or_trace_id(gw, client, keys) -> None:
    """On-call has an id from a log line, an exemplar or a client's x-request-id: ``?id=`` shows that request."""
    system = "You answer questions about waterfalls only. " * 3  # a prefix no other test uses
    sent = [chat(client, keys, convo(system, f"find me {i}")) for i in range(3)]
    request_id = sent[1].headers["x-request-id"]
    trace_id = gw.record(request_id)["trace_id"]
    admin = keys.auth(keys.admin)
    for wanted in (request_id, trace_id):
        found = client.get("/debug/requests.json", params={"id": wanted}, headers=admin).json()["requests"]
        assert [r["request_id"] for r in found] == [request_id]
    every_page = client.get("/debug/requests", headers=admin).text
    assert f'<a href="?axis=request&id={request_id}">{request_id[:12]}</a>' in every_page  # a row links to itself
    page = client.get("/debug/requests", params={"id": request_id, "limit": 7}, headers=admin).text
    assert request_id[:12] in page and sent[0].headers["x-request-id"][:12] not in page
    assert f'href="?axis=ttft&limit=7&amp;id={request_id}"' in page  # zooming keeps to that request
    every = client.get("/debug/requests.json", params={"id": ""}, headers=admin).json()["requests"]
    assert {r.headers["x-request-id"] for r in sent} <= {r["request_id"] for r in every}  # empty: no filter
    nothing = client.get("/debug/requests.json", params={"id": "no-such-request"}, headers=admin)
    assert nothing.status_code == 200 and nothing.json()["requests"] == []
    too_long = client.get("/debug/requests.json", params={"id": "x" * 129}, headers=admin)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "id"


@pytest.mark.parametrize(
    ("body", "status", "param", "code"),
    [
        (b"{not json", 400, None, "invalid_json"),
        (b"[1, 2]", 400, None, "invalid_type"),
        (b"", 400, None, "invalid_json"),
        ({"messages": [{"role": "user", "content": "hi"}]}, 400, "model", "missing"),
        ({"model": "tiny", "messages": []}, 400, "messages", "invalid_value"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role", None),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "temperature": 5},
            400,
            "temperature",
            None,
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n", None),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "tools": []},
            400,
            "tools",
            "unsupported_parameter",
        ),
        (
            {
                "model": "tiny",
                "messages": [{"role": "user", "content": "hi"}],
                "response_format": {"type": "json_object"},
            },
            400,
            "response_format",
            "unsupported_value",
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            400,
            "messages[0].content[0].type",
            "unsupported_value",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, 400, "stream", None),
        ({"model": "nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "model", "model_not_found"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 401},
            422,
            "max_tokens",
            None,
        ),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 1000},
            422,
            "max_completion_tokens",
            None,
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}] * 17}, 422, "messages", "limit_exceeded"),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x" * 3500}]},
            400,
            "messages",
            "context_length_exceeded",
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, 422, "stop", None),
        # Integers the backend cannot take (schemathesis found top_k = 4.7e34 reaching the backend client as a 500).
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "top_k": 2**115}, 400, "top_k", None),
        (
            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2**64},
            400,
            "max_tokens",
            None,
        ),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "seed": 2**63}, 400, "seed", None),
    ],
)
def test_bad_bodies_name_the_param(gw, client, keys, body: Any, status: int, param: str | None, code: str | None):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {**keys.auth(), "content-type": "application/json"}
    resp = client.post("/v1/chat/completions", content=content, headers=headers)
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if code is not None:
        assert err["code"] == code
    assert "x" * 50 not in resp.text  # nothing of the prompt is echoed back


def test_oversize_bodies_get_413(gw, keys) -> None:
    big = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "y" * 70_000}]}).encode()
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=big, headers=keys.auth())
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit is enforced while reading
        for i in range(0, len(big), 8192):
            yield big[i : i + 8192]

    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=chunks(), headers=keys.auth())
    assert resp.status_code == 413


def test_a_slow_upload_is_ingress_time_not_validation(gw, keys) -> None:
    """The body arriving late (slow client, busy event loop) is charged to ``auth`` (ingress, the gateway team's),
    not to ``validate`` (the API team's)."""
    body = json.dumps({"model": "tiny", "messages": convo(SYSTEM_E, "slow upload"), "max_tokens": 2}).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {keys.user}\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    host, port = gw.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        time.sleep(0.4)  # the headers are in; the body follows 400 ms later
        sock.sendall(body)
        response = b""
        while chunk := sock.recv(65536):
            response += chunk
    status_line, _, rest = response.partition(b"\r\n")
    assert status_line.split()[1] == b"200", response[:300]
    request_id = next(
        line.split(b":", 1)[1].strip().decode()
        for line in rest.split(b"\r\n\r\n", 1)[0].split(b"\r\n")
        if line.lower().startswith(b"x-request-id:")
    )
    record = gw.record(request_id)
    stages = {s["name"]: s["duration_s"] for s in record["stages"] if s["source"] == "gateway"}
    assert stages["auth"] >= 0.35
    assert stages["validate"] < 0.1
    # The ledger says how much of auth was the wait for the body; a body sent with its headers records none.
    assert 0.35 <= record["extra"]["body_receive_s"] <= stages["auth"]
    resp = httpx.post(f"{gw.url}/v1/chat/completions", content=body, headers=keys.auth())
    assert "body_receive_s" not in (gw.record(resp.headers["x-request-id"]).get("extra") or {})


def test_prompt_cache_prediction_and_tenant_isolation(gw, client, keys) -> None:
    before = gw.metrics()
    first = chat(client, keys, convo(SYSTEM_C, "q1"))
    again = chat(client, keys, convo(SYSTEM_C, "q2"))
    footprint = _index_blocks(gw.metrics())
    other = chat(client, keys, convo(SYSTEM_C, "q2"), key=keys.other)
    assert first.status_code == again.status_code == other.status_code == 200
    r1, r2, r3 = (gw.record(r.headers["x-request-id"]) for r in (first, again, other))
    # The index grew by the prompt's blocks (16 tokens each) at the backend that took it ...
    chosen = r1["extra"]["backend"]
    assert footprint[chosen] - _index_blocks(before).get(chosen, 0) >= 400 // 16
    # ... and the other tenant's prompt, a new prefix for it, went to a backend whose index held the fewest.
    assert footprint[r3["extra"]["backend"]] == min(footprint.values()) < footprint[chosen]
    assert r1["extra"]["cache_result"] == "miss" and r1["extra"]["predicted_cached_tokens"] == 0
    assert r2["extra"]["cache_result"] == "partial" and r2["extra"]["backend"] == r1["extra"]["backend"]
    actual = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    predicted = r2["extra"]["predicted_cached_tokens"]
    assert actual > 400 and predicted > 400  # the engine confirms the prediction ...
    assert 0 <= actual - predicted <= 32  # ... to within the gateway's block granularity (16 tokens here)
    # another tenant: its own index entries and its own cache_salt at the engine
    assert r3["extra"]["cache_result"] == "miss"
    assert other.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    after = gw.metrics()
    lookups = 'llmpath_prompt_cache_lookups_total{result="%s",route="tiny"}'
    assert after[lookups % "miss"] - before.get(lookups % "miss", 0) == 2
    assert after[lookups % "partial"] - before.get(lookups % "partial", 0) == 1
    predicted_metric = 'llmpath_prompt_cache_predicted_tokens_total{route="tiny"}'
    assert after[predicted_metric] - before.get(predicted_metric, 0) == predicted


def _index_blocks(metrics: dict[str, float]) -> dict[str, float]:
    """backend → ``llmpath_prompt_cache_index_blocks`` from a scrape."""
    found = (re.fullmatch(r'llmpath_prompt_cache_index_blocks\{backend="([^"]+)"\}', k) for k in metrics)
    return {m[1]: metrics[m[0]] for m in found if m}


def test_predicted_cached_tokens_are_counted_in_the_backends_tokens(gw, client, keys) -> None:
    """A long conversation carries many chat-template special tokens (``<|im_start|>``: 12 bytes of text, one
    token). The prediction, made on bytes, is converted with the request's own token ratio: it neither counts the
    markup's text as tokens (≈ 22 tokens too many per message) nor exceeds what the engine serves."""
    turns = [{"role": "system", "content": SYSTEM_E}]
    for i in range(5):
        turns += [{"role": "user", "content": f"Notes {i}: ship it."}, {"role": "assistant", "content": f"- ok {i}"}]
    first = chat(client, keys, [*turns, {"role": "user", "content": "And the budget?"}])
    again = chat(client, keys, [*turns, {"role": "user", "content": "And the timeline?"}])
    assert first.status_code == again.status_code == 200
    record = gw.record(again.headers["x-request-id"])
    actual = again.json()["usage"]["prompt_tokens_details"]["cached_tokens"]
    predicted = record["extra"]["predicted_cached_tokens"]
    assert actual > 300 and record["cached_tokens"] == actual
    assert 0 <= actual - predicted <= 32, (predicted, actual)


def test_admin_flush_invalidates_a_tenant(gw, client, keys) -> None:
    warm = convo(SYSTEM_B, "flush me")
    assert chat(client, keys, warm).status_code == 200
    hit = chat(client, keys, warm)
    assert hit.json()["usage"]["prompt_tokens_details"]["cached_tokens"] > 300
    resp = client.post("/admin/prompt-cache/flush", json={"tenant": "acme"}, headers=keys.auth(keys.admin))
    assert resp.status_code == 200 and resp.json() == {"flushed": True, "tenant": "acme"}
    after = chat(client, keys, warm)
    rec = gw.record(after.headers["x-request-id"])
    assert rec["extra"]["cache_result"] == "miss"
    # a new epoch means a new cache_salt: the engine does not reuse the tenant's old KV either
    assert after.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    bad = client.post("/admin/prompt-cache/flush", json={"tenant": 5}, headers=keys.auth(keys.admin))
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tenant"


def test_cache_off_route_bypasses(gw, client, keys) -> None:
    for _ in range(2):
        resp = chat(client, keys, convo(SYSTEM_A, "private"), model="private")
        assert resp.status_code == 200
        rec = gw.record(resp.headers["x-request-id"])
        assert rec["extra"]["cache_result"] == "bypass"
        assert resp.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_retrieval_and_system_prompt_are_assembled(gw, client, keys) -> None:
    plain = chat(client, keys, [{"role": "user", "content": "How long do refunds take?"}])
    support = chat(client, keys, [{"role": "user", "content": "How long do refunds take?"}], model="support")
    assert plain.status_code == support.status_code == 200
    extra_tokens = support.json()["usage"]["prompt_tokens"] - plain.json()["usage"]["prompt_tokens"]
    system = len("You are the support bot of acme.")
    document = len("Refunds are issued within 14 days of purchase to the original card.")
    assert extra_tokens > system + document  # both the system prompt and the retrieved document reached the engine
    rec = gw.record(support.headers["x-request-id"])
    assert rec["route"] == "support" and rec["extra"]["documents"] == 1


def test_same_prefix_requests_land_together(gw, client, keys) -> None:
    systems = [SYSTEM_A, SYSTEM_B.replace("kindly", "warmly"), SYSTEM_C.replace("formal", "plain")]
    placed: dict[int, list[str]] = {i: [] for i in range(len(systems))}
    for turn in range(4):
        for i, system in enumerate(systems):
            resp = chat(client, keys, convo(system, f"question {turn}"), key=keys.other)
            assert resp.status_code == 200
            placed[i].append(gw.record(resp.headers["x-request-id"])["extra"]["backend"])
    for group in placed.values():
        assert len(set(group)) == 1, placed  # each shared prefix stays on one engine
    assert len({group[0] for group in placed.values()}) >= 2, placed  # new prefixes spread over the engines


def test_imbalance_falls_back_to_least_loaded(gw, keys) -> None:
    """Concurrent long requests with one prefix: beyond the thresholds (2 in flight, 1.5×) load wins."""
    body = {"model": "tiny", "messages": convo(SYSTEM_A, "imbalance"), "max_tokens": 120, "ignore_eos": True}
    start = threading.Barrier(8)  # all at once, so that they overlap even when the machine is busy

    def one(_: int) -> str:
        start.wait(timeout=30)
        r = httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers=keys.auth(), timeout=60)
        assert r.status_code == 200
        return r.headers["x-request-id"]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = list(pool.map(one, range(8)))
    reasons = Counter(gw.record(i)["extra"]["routing_reason"] for i in ids)
    backends = Counter(gw.record(i)["extra"]["backend"] for i in ids)
    assert reasons["imbalanced"] >= 1, reasons
    assert len(backends) >= 2, backends


def test_stream_cancellation_aborts_the_backend_request(gw, stack, keys) -> None:
    engines_before = {e.name: e.metrics() for e in stack.engines}
    body = {
        "model": "tiny",
        "messages": convo(SYSTEM_D.upper(), "long story"),
        "max_tokens": 400,  # far longer than it takes to hang up
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(base_url=gw.url, timeout=30) as c,
        c.stream("POST", "/v1/chat/completions", json=body, headers=keys.auth()) as resp,
    ):
        request_id = resp.headers["x-request-id"]
        for line in resp.iter_lines():
            if line.startswith("data: "):
                break  # one chunk, then hang up
    rec = gw.record(request_id, timeout=10)
    assert rec["status_code"] == 499 and rec["extra"]["client_disconnect"] is True
    # what was generated before the hang-up is accounted for: the prompt and the tokens so far
    assert rec["extra"]["usage_partial"] is True
    assert rec["input_tokens"] > len(SYSTEM_D) and 1 <= rec["output_tokens"] < 400
    backend = rec["extra"]["backend"]
    engine = next(e for e in stack.engines if e.name == backend)
    aborted_before = engines_before[backend].get("sglang:num_aborted_requests_total", 0)
    deadline = time.monotonic() + 10
    while True:
        aborted = engine.metrics().get("sglang:num_aborted_requests_total", 0) - aborted_before
        if aborted == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert aborted == 1  # the engine stopped generating for the client that left
    assert gw.metrics()[f'llmpath_backend_inflight_requests{{backend="{backend}"}}'] == 0
    assert gw.metrics()["llmpath_admission_inflight_requests"] == 0


def _sum_engines(stack) -> Counter[str]:
    total: Counter[str] = Counter()
    for engine in stack.engines:
        total.update({k: v for k, v in engine.metrics().items() if "{" not in k})
    return total


def test_token_accounting_matches_the_engines(gw, stack, client, keys) -> None:
    """The gateway's token counters equal the engines' own sglang:*_tokens_total over the same requests."""
    names = ("sglang:prompt_tokens_total", "sglang:generation_tokens_total", "sglang:cached_tokens_total")
    kinds = ("input", "output", "cached")

    def gateway_tokens() -> dict[str, float]:
        metrics = gw.metrics()
        key = 'llmpath_tokens_total{{model="tiny",route="tiny",tenant="acme",type="{}"}}'
        return {kind: metrics.get(key.format(kind), 0.0) for kind in kinds}

    def settled() -> tuple[dict[str, float], Counter[str]]:
        """Both sides' counters once they stop moving (engines count at finish, in their scheduler thread)."""
        previous = None
        for _ in range(50):
            current = (gateway_tokens(), _sum_engines(stack))
            if current == previous:
                return current
            previous = current
            time.sleep(0.1)
        raise AssertionError("counters kept moving")

    before_gw, before_engines = settled()
    for i in range(6):
        resp = chat(client, keys, convo(SYSTEM_B, f"count {i % 2}"), max_tokens=3 + i, ignore_eos=True)
        assert resp.status_code == 200
    after_gw, after_engines = settled()
    gateway = {kind: after_gw[kind] - before_gw[kind] for kind in kinds}
    engines = {kind: after_engines[name] - before_engines[name] for kind, name in zip(kinds, names, strict=True)}
    assert gateway == engines
    assert gateway["output"] == sum(3 + i for i in range(6)) and gateway["input"] > 0 and gateway["cached"] > 0


def test_usage_ledger_has_every_request(gw, client, keys) -> None:
    resp = chat(client, keys, convo(SYSTEM_B, "ledger"), ignore_eos=True)  # four tokens, even if EOS is sampled
    request_id = resp.headers["x-request-id"]
    deadline = time.monotonic() + 5
    while True:
        lines = [json.loads(line) for line in gw.ledger.read_text().splitlines()]
        found = [r for r in lines if r["request_id"] == request_id]
        if found or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(found) == 1 and found[0]["output_tokens"] == 4 and found[0]["tenant"] == "acme"
    statuses = Counter(r["status_code"] for r in lines)
    assert statuses[200] > 5 and statuses[401] >= 5 and statuses[400] >= 5  # failures are accounted too
    assert gw.metrics()['llmpath_usage_record_failures_total{sink="jsonl"}'] == 0  # exposed before any loss


def test_no_keys_or_prompt_text_in_the_logs(gw, client, keys) -> None:
    secret = "TOP-SECRET-PROMPT-7731"
    assert chat(client, keys, convo(secret, secret)).status_code == 200
    assert (
        client.post("/v1/chat/completions", json={}, headers={"Authorization": f"Bearer {secret}"}).status_code == 401
    )
    time.sleep(0.3)
    logs = gw.log.read_text() + gw.ledger.read_text()
    assert secret not in logs
    for key in keys.tenants:
        assert key not in logs


def test_trace_spans_per_stage_and_propagation_to_the_engine(gw, client, keys, otlp_collector) -> None:
    """Gateway and engines export to one OTLP collector; the engine's spans are children of the model call."""
    resp = chat(client, keys, convo(SYSTEM_A, "trace me"), ignore_eos=True)  # sampled: EOS could end it early
    assert resp.status_code == 200
    trace_id = gw.record(resp.headers["x-request-id"])["trace_id"]
    assert trace_id and len(trace_id) == 32

    def complete(spans: list[dict[str, Any]]) -> bool:
        mine = [s for s in spans if s["trace_id"] == trace_id]
        return {"llmpath-gateway", "llmpath-engine"} <= {s["service"] for s in mine} and len(mine) >= 10

    spans = [s for s in otlp_collector.wait_for(complete) if s["trace_id"] == trace_id]
    gateway = [s for s in spans if s["service"] == "llmpath-gateway"]
    server = next(s for s in gateway if s["kind"] == 2)  # SPAN_KIND_SERVER
    call = next(s for s in gateway if s["kind"] == 3)  # SPAN_KIND_CLIENT: the model call
    assert call["name"] == "chat tiny" and call["parent_id"] == server["span_id"]
    usage = resp.json()["usage"]
    assert call["attributes"]["gen_ai.usage.output_tokens"] == usage["completion_tokens"] == 4
    assert call["attributes"]["gen_ai.usage.input_tokens"] == usage["prompt_tokens"]
    assert "gen_ai.usage.cache_read.input_tokens" in call["attributes"]
    stage_spans = [s for s in gateway if "llmpath.stage.name" in s["attributes"]]
    assert {s["attributes"]["llmpath.stage.name"] for s in stage_spans} == set(STAGES.names)
    for span in stage_spans:
        measured_by = span["attributes"]["llmpath.timing.source"]
        if span["attributes"]["llmpath.stage.name"] in ("prefill", "decode") or measured_by == "backend":
            assert span["parent_id"] in (server["span_id"], call["span_id"])  # during the model call
        else:
            assert span["parent_id"] == server["span_id"], span
    auth = next(s for s in stage_spans if s["attributes"]["llmpath.stage.name"] == "auth")
    assert auth["attributes"]["http.request.body.size"] == len(resp.request.content)
    route = next(s for s in stage_spans if s["attributes"]["llmpath.stage.name"] == "route")
    assert route["attributes"]["llmpath.route.backend"] in {"e0", "e1", "e2"}
    prefill = next(s for s in stage_spans if s["attributes"]["llmpath.stage.name"] == "prefill")
    assert prefill["attributes"]["llmpath.timing.source"] == "backend"
    engine_root = next(s for s in spans if s["service"] == "llmpath-engine" and s["parent_id"] == call["span_id"])
    assert engine_root["name"].startswith("Req ")
    for span in spans:  # no prompt text on any span
        assert SYSTEM_A[:40] not in json.dumps(span["attributes"])


def test_genai_client_and_server_metrics_over_otlp(gw, stack, client, keys, otlp_collector) -> None:
    """A streamed call's GenAI metrics as the gateway exports them: one duration and time to first chunk, one time
    per output chunk for each chunk after the first (the engine streams a token per chunk), the token usage."""
    before = otlp_collector.settled_histograms()  # the earlier tests' requests all exported
    body = {
        "model": "tiny",
        "messages": convo(SYSTEM_E, "metrics please"),
        "max_tokens": 9,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with connect_sse(client, "POST", "/v1/chat/completions", json=body, headers=keys.auth()) as source:
        request_id = source.response.headers["x-request-id"]
        usage = [json.loads(e.data) for e in source.iter_sse() if e.data != "[DONE]"][-1]["usage"]
    assert usage["completion_tokens"] == 9
    backend = gw.record(request_id)["extra"]["backend"]
    host, port = next(e.url for e in stack.engines if e.name == backend).removeprefix("http://").split(":")
    client_attrs = (
        ("gen_ai.operation.name", "chat"),
        ("gen_ai.provider.name", "sglang"),
        ("gen_ai.request.model", "tiny"),
        ("server.address", host),
        ("server.port", int(port)),
    )
    server_attrs = client_attrs[:3]

    def added(snapshot: dict[Any, tuple[int, float]], name: str, attrs: tuple[Any, ...]) -> tuple[int, float]:
        """What this request added to a series: (count, sum)."""
        (count, total), (count0, total0) = snapshot.get((name, attrs), (0, 0.0)), before.get((name, attrs), (0, 0.0))
        return count - count0, total - total0

    after = otlp_collector.wait_for_histograms(
        lambda snapshot: added(snapshot, "gen_ai.client.operation.duration", client_attrs)[0] == 1
    )
    assert added(after, "gen_ai.client.operation.time_to_first_chunk", client_attrs)[0] == 1
    chunks, chunk_time = added(after, "gen_ai.client.operation.time_per_output_chunk", client_attrs)
    assert chunks == 9 - 1
    assert 0 < chunk_time < added(after, "gen_ai.client.operation.duration", client_attrs)[1]  # gaps inside the call
    tokens = {
        dict(attrs)["gen_ai.token.type"]: added(after, name, attrs)[1]
        for name, attrs in after
        if name == "gen_ai.client.token.usage" and set(client_attrs) <= set(attrs)
    }
    assert tokens == {"input": usage["prompt_tokens"], "output": 9}
    assert added(after, "gen_ai.server.request.duration", server_attrs)[0] == 1
    assert added(after, "gen_ai.server.time_to_first_token", server_attrs)[0] == 1


def test_waterfall_page_in_headless_chromium(gw, client, keys, chromium) -> None:
    for i in range(3):
        assert chat(client, keys, convo(SYSTEM_C, f"waterfall {i}")).status_code == 200
    expression = """JSON.stringify([...document.querySelectorAll('tr.request')].map(tr => ({
        id: tr.dataset.requestId,
        cells: tr.querySelectorAll('td').length,
        bars: [...tr.querySelectorAll('.bar')].map(b => {
            const r = b.getBoundingClientRect();
            return {stage: b.dataset.stage, width: r.width, height: r.height,
                    colour: getComputedStyle(b).backgroundColor, visible: r.width > 0 && r.height > 0};
        }),
        ttft: tr.querySelector('.ttft') !== null,
    })))"""
    status, value = chromium.evaluate_page(f"{gw.url}/debug/requests?limit=5", expression, keys.auth(keys.admin))
    assert status == 200
    rows = json.loads(value)
    assert len(rows) == 5
    ok_rows = [r for r in rows if len(r["bars"]) >= len(STAGES.names)]
    assert ok_rows, rows
    for row in ok_rows:
        drawn = {b["stage"] for b in row["bars"] if b["visible"]}
        assert drawn == set(STAGES.names), row  # every stage's bar is drawn
        colours = {b["stage"]: b["colour"] for b in row["bars"]}
        assert len(set(colours.values())) == len(STAGES.names)  # one colour per stage
        assert row["ttft"] and row["cells"] == 10
    denied, _ = chromium.evaluate_page(f"{gw.url}/debug/requests", "document.title", keys.auth(keys.user))
    assert denied == 403
