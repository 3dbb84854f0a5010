"""Errors the gateway answers itself, in-process over ASGI (no backend is reached): route templates that fail at run
time, a chat template that refuses the client's messages, the admin endpoints' bad bodies, a reload without a
configuration file, and the documented ``max_tokens`` maxima."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from typing import Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import HotPath, create_app
from llmpath.gateway.config import hash_key, load_config

KEY, ADMIN = "sk-errors-user", "sk-errors-admin"
STRICT = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


def make_app(registry: CollectorRegistry | None = None, **sections: Any) -> HotPath:
    config = load_config(
        None,
        {
            "backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
            "api_keys": [
                {"sha256": hash_key(KEY), "tenant": "acme"},
                {"sha256": hash_key(ADMIN), "tenant": "ops", "admin": True},
            ],
            **sections,
        },
    )
    return create_app(config, registry=registry or CollectorRegistry())


def client(app: HotPath) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_a_route_template_failing_at_run_time_is_a_clean_500(caplog: pytest.LogCaptureFixture) -> None:
    """The system prompt divides by zero for 4-letter tenants (``acme``): 500 ``assembly_failed``, one log line
    naming the route, field and exception, no traceback and no prompt text."""
    app = make_app(routes=[{"name": "sp", "model": "m", "system_prompt": "{{ 10 // (tenant|length - 4) }}"}])
    caplog.set_level(logging.INFO, logger="llmpath")
    async with client(app) as c:
        chat = {"model": "sp", "messages": [{"role": "user", "content": "SECRET-PROMPT-1"}]}
        responses = [
            await c.post("/v1/chat/completions", json=chat, headers=auth()),
            await c.post("/v1/completions", json={"model": "sp", "prompt": "SECRET-PROMPT-2"}, headers=auth()),
        ]
    for r in responses:
        assert r.status_code == 500
        assert r.json() == {
            "error": {
                "message": "Prompt assembly failed.",
                "type": "server_error",
                "param": None,
                "code": "assembly_failed",
            }
        }
    errors = [rec for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert [rec.getMessage() for rec in errors] == 2 * [
        "prompt assembly failed: route 'sp': system_prompt: template failed to render: ZeroDivisionError at line 1 "
        "of the template: integer division or modulo by zero"
    ]
    assert all(rec.exc_info is None for rec in errors)
    assert "SECRET" not in caplog.text
    assert [rec.status_code for rec in app.state.waterfall.recent()] == [500, 500]


async def test_a_template_over_its_render_budget_is_a_clean_500(caplog: pytest.LogCaptureFixture) -> None:
    """A system prompt that loops 10**10 times for 4-letter tenants, a chat template that repeats a message a billion
    times when it holds BOOM: each request stops at the render budget, a 500 ``assembly_failed`` logged with the
    route, the field and the limit, never the prompt."""
    runaway = "{% if tenant|length == 4 %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}" \
        "{% endfor %}{% endif %}"  # fmt: skip
    chat = "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ m['content'] * 10**9 }}{% endif %}" \
        "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"  # fmt: skip
    app = make_app(
        routes=[{"name": "sp", "model": "m", "system_prompt": runaway}, {"name": "plain", "model": "p"}],
        tokenizer={"chat_template": chat},
    )
    caplog.set_level(logging.INFO, logger="llmpath")
    async with client(app) as c:
        responses = [
            await c.post("/v1/completions", json={"model": "sp", "prompt": "SECRET-PROMPT-1"}, headers=auth()),
            await c.post(
                "/v1/chat/completions",
                json={"model": "plain", "messages": [{"role": "user", "content": "SECRET-BOOM"}]},
                headers=auth(),
            ),
        ]
    for r in responses:
        assert r.status_code == 500 and r.json()["error"]["code"] == "assembly_failed"
    errors = [rec.getMessage() for rec in caplog.records if rec.levelno >= logging.ERROR]
    assert errors == [
        "prompt assembly failed: route 'sp': system_prompt: template exceeded its render budget (1,000,000 steps: "
        "loop iterations, range() items, lookups, operators, filters and calls) at line 1 of the template",
        "prompt assembly failed: route 'plain': tokenizer.chat_template: the chat template failed to render: template "
        "exceeded its render budget (32,000,120 characters of output and of the strings and lists it builds) at line "
        "1 of the template",  # 32,000,000 and 8 for each character of the messages (user, SECRET-BOOM)
    ]
    assert "SECRET" not in caplog.text


async def test_a_chat_template_refusing_the_messages_is_a_400_naming_messages(caplog) -> None:
    app = make_app(routes=[{"name": "plain", "model": "m"}], tokenizer={"chat_template": STRICT})
    caplog.set_level(logging.INFO, logger="llmpath")
    system = [{"role": "system", "content": "SECRET-PROMPT"}, {"role": "user", "content": "hi"}]
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={"model": "plain", "messages": system}, headers=auth())
    assert r.status_code == 400
    assert r.json()["error"] == {
        "message": "The model's chat template rejected the messages: System role not supported",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "invalid_value",
    }
    assert not [rec for rec in caplog.records if rec.levelno >= logging.ERROR]  # the client's error, not ours


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b'{"tenant": "acme"', 400, "invalid_json", None),
        (b"\xff\xfe", 400, "invalid_json", None),
        (b"[1]", 400, "invalid_type", None),
        (b'{"tenant": 5}', 400, "invalid_value", "tenant"),
        (b'{"tenants": "acme"}', 400, "invalid_value", "tenants"),
        (b" ", 400, "invalid_json", None),  # found by schemathesis: not JSON, so it must not flush everyone
        (b"", 200, None, None),
        (b'{"tenant": "acme"}', 200, None, None),
    ],
)
async def test_prompt_cache_flush_bodies(body: bytes, status: int, code: str | None, param: str | None) -> None:
    app = make_app()
    async with client(app) as c:
        r = await c.post("/admin/prompt-cache/flush", content=body, headers=auth(ADMIN))
    assert r.status_code == status, r.text
    if status == 200:
        assert r.json()["flushed"] is True
    else:
        assert (r.json()["error"]["code"], r.json()["error"]["param"]) == (code, param)


async def test_a_prompt_cache_flush_body_is_bounded_like_every_other() -> None:
    """The admin endpoint reads its body under limits.max_body_bytes and limits.timeouts.body_s too, and a refused
    body flushes nothing."""
    app = make_app(limits={"max_body_bytes": 1024, "timeouts": {"body_s": 0.2}})
    cache = app.state.gateway.prompt_cache
    key = cache.key("x" * 4096, tenant="acme", route="default", model="m", mode="tenant")
    padded = b'{"tenant": "acme", "pad": "' + b"x" * 2048 + b'"}'

    async def undeclared() -> Any:  # no Content-Length: refused while reading
        yield padded

    async def stalled() -> Any:
        yield b'{"tenant": '
        await asyncio.sleep(2)
        yield b'"acme"}'

    async with client(app) as c:
        declared = await c.post("/admin/prompt-cache/flush", content=padded, headers=auth(ADMIN))
        chunked = await c.post("/admin/prompt-cache/flush", content=undeclared(), headers=auth(ADMIN))
        slow = await c.post("/admin/prompt-cache/flush", content=stalled(), headers=auth(ADMIN))
    assert (declared.status_code, declared.json()["error"]["code"]) == (413, "request_too_large")
    assert (chunked.status_code, chunked.json()["error"]["code"]) == (413, "request_too_large")
    assert (slow.status_code, slow.json()["error"]["code"]) == (408, "request_timeout")
    assert cache.key("x" * 4096, tenant="acme", route="default", model="m", mode="tenant") == key  # same epoch


async def test_a_reload_without_a_configuration_file_is_refused_and_not_counted(caplog) -> None:
    registry = CollectorRegistry()
    app = make_app(registry)
    caplog.set_level(logging.INFO, logger="llmpath")
    async with client(app) as c:
        r = await c.post("/admin/reload", headers=auth(ADMIN))
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "reload_failed"
    assert "started without --config" in r.json()["error"]["message"]
    assert not registry.get_sample_value("llmpath_gateway_config_reloads_total", {"result": "failure"})
    assert registry.get_sample_value("llmpath_gateway_config_last_reload_successful") != 0
    assert (
        "configuration reload (POST /admin/reload) refused: the gateway was started without "
        "--config: there is no file to reload" in caplog.text
    )


async def test_a_route_only_lowers_the_documented_max_tokens() -> None:
    app = make_app(
        limits={"max_tokens": 64, "default_max_tokens": 16},
        routes=[{"name": "short", "model": "m", "max_tokens": 8}, {"name": "long", "model": "m"}],
    )
    schema = app.app.openapi()["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    maxima = [b["maximum"] for b in schema["max_tokens"]["anyOf"] if b.get("type") == "integer"]
    assert maxima == [64]  # the global cap, which no route exceeds
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 9}
    async with client(app) as c:
        r = await c.post("/v1/chat/completions", json={**body, "model": "short"}, headers=auth())
        over = await c.post("/v1/chat/completions", json={**body, "model": "long", "max_tokens": 65}, headers=auth())
    assert r.status_code == 422 and r.json()["error"]["message"] == "max_tokens is 9, above the limit of 8."
    assert over.status_code == 422 and over.json()["error"]["message"] == "max_tokens is 65, above the limit of 64."


async def test_requests_refused_after_auth_keep_their_tenant_in_the_ledger(tmp_path) -> None:
    """A 400/404 after the key was accepted is the tenant's request: the ledger and token counts must say whose."""
    from llmpath.instrumentation import read_jsonl

    ledger = tmp_path / "usage.jsonl"
    app = make_app(usage={"ledger": str(ledger)}, routes=[{"name": "chat", "model": "m"}])
    async with client(app) as c:
        bad_tokens = {"model": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": -5}
        unknown = {"model": "nosuch", "messages": [{"role": "user", "content": "x"}]}
        statuses = [
            (await c.post("/v1/chat/completions", json=bad_tokens, headers=auth())).status_code,
            (await c.post("/v1/chat/completions", json=unknown, headers=auth())).status_code,
            (await c.post("/v1/chat/completions", json=unknown, headers=auth("sk-wrong"))).status_code,
        ]
    assert statuses == [400, 404, 401]
    assert [(r.status_code, r.tenant) for r in read_jsonl(ledger)] == [(400, "acme"), (404, "acme"), (401, None)]


async def test_an_assistant_message_sent_back_by_the_openai_sdk_validates() -> None:
    """``message.model_dump()`` of an SDK answer carries ``refusal: null``: it passes validation (the backend here
    is unreachable, so the request ends at the backend); a refusal text is refused naming its field."""
    app = make_app()
    turn = [{"role": "user", "content": "hi"}]
    answer = {"role": "assistant", "content": "hello", "refusal": None}
    async with client(app) as c:
        sent_back = await c.post(
            "/v1/chat/completions", headers=auth(),
            json={"model": "m", "messages": [*turn, answer, {"role": "user", "content": "more"}]},
        )  # fmt: skip
        refusal = await c.post(
            "/v1/chat/completions", headers=auth(),
            json={"model": "m", "messages": [*turn, {**answer, "refusal": "I can't"}]},
        )  # fmt: skip
    assert sent_back.status_code == 503, sent_back.text  # validated, then no backend answered
    assert refusal.status_code == 400 and refusal.json()["error"]["param"] == "messages[1].refusal"


def test_the_gateway_starts_outside_the_main_thread() -> None:
    """uvicorn run in a thread (as embedding servers and test harnesses do), on uvloop, whose signal handlers
    raise ValueError outside the main thread: the gateway starts without its reload-on-SIGHUP handler."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(), port=port, loop="uvloop", log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert server.started, "the gateway failed to start in a thread"
        assert httpx.get(f"http://127.0.0.1:{port}/healthz").json() == {"status": "ok"}
    finally:
        server.should_exit = True
        thread.join(10)


async def test_readyz_shows_no_credentials_from_backend_urls() -> None:
    """/readyz needs no key: a backend URL's user, password and query (``?api-key=``) are left out of it."""
    app = make_app(backends=[{"url": "http://svc:S3CRETPASS@127.0.0.1:9/v1?api-key=QUERYKEY", "name": "b"}])
    async with client(app) as c:
        ready = await c.get("/readyz")
    assert [b["url"] for b in ready.json()["backends"]] == ["http://127.0.0.1:9/v1"]
    assert "S3CRETPASS" not in ready.text and "QUERYKEY" not in ready.text


async def test_a_stalled_body_is_answered_408() -> None:
    """A body that stops arriving (a slow-loris upload) holds the connection no longer than limits.timeouts.body_s."""
    app = make_app(limits={"timeouts": {"body_s": 0.2}})

    async def stalled() -> Any:
        yield b'{"model": "m", '
        await asyncio.sleep(2)
        yield b'"messages": []}'

    async with client(app) as c:
        resp = await c.post("/v1/chat/completions", headers=auth(), content=stalled())
    assert resp.status_code == 408 and resp.json()["error"]["code"] == "request_timeout"
    assert resp.headers["connection"] == "close"


async def test_no_redirect_echoes_the_host_header() -> None:
    """A trailing slash is a 404, not a redirect to the client's own Host (an open redirect behind a cache)."""
    app = make_app()
    async with client(app) as c:
        resp = await c.get("/debug/requests/", headers={**auth(ADMIN), "host": "evil.example"})
    assert resp.status_code == 404 and "location" not in resp.headers


async def test_models_retrieve_in_passthrough_mode() -> None:
    """Without routes every name is served, so every name is found, but the empty one."""
    async with client(make_app()) as c:
        found = await c.get("/v1/models/org/any-model", headers=auth())
        empty = await c.get("/v1/models/", headers=auth())
    assert found.status_code == 200 and found.json()["id"] == "org/any-model"
    assert empty.status_code == 404 and empty.json()["error"]["code"] == "model_not_found"
