"""docs/gateway.md, claim by claim, where an operator relies on it and no other test checked it: the configuration
table's defaults, what a reload applies and what it leaves for a restart (a file without keys, ``insecure_no_auth``),
limits and rate buckets after a reload, the 429's ``Retry-After``, ejection (which failures count, how long a backend
stays out, what reinstates it), a backend refusing the gateway's key, a connection that cannot be made in time, the
codes of the refused OpenAI fields and the SQLite ledger's extensions.

In-process over ASGI (``httpx.ASGITransport``: no lifespan, so no health-check loop runs unless a test probes) with
real backend clients over loopback; one test routes to a real tiny engine."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import HotPath, create_app
from llmpath.gateway.config import (
    BackendConfig,
    GatewayConfig,
    HealthConfig,
    RetrieverConfig,
    RouteConfig,
    hash_key,
    load_config,
)
from llmpath.gateway.pool import BackendPool, BackendState
from llmpath.ledger.reading import read_ledger
from tests.gateway.stack import FakeClock
from tests.loopback import Answer, Loopback
from tests.loopback import black_hole as unreachable

DOC = Path(__file__).parents[2] / "docs" / "gateway.md"
KEY, ADMIN, LIMITED = "sk-doc-user-4e1a", "sk-doc-admin-9b2c", "sk-doc-limited-7d3f"
MESSAGES = [{"role": "user", "content": "hi"}]
CHAT = {"model": "m", "messages": MESSAGES, "max_tokens": 2}


def doc_text() -> str:
    """docs/gateway.md with its line breaks as spaces."""
    return " ".join(DOC.read_text(encoding="utf-8").split())


def api_keys(limited_rate: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    keys: list[dict[str, Any]] = [
        {"sha256": hash_key(KEY), "tenant": "acme"},
        {"sha256": hash_key(ADMIN), "tenant": "ops", "admin": True},
    ]
    if limited_rate is not None:
        keys.append({"sha256": hash_key(LIMITED), "tenant": "slow", "rate": limited_rate})
    return keys


def make_app(**sections: Any) -> HotPath:
    config = load_config(
        None, {"backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}], "api_keys": api_keys(), **sections}
    )
    return create_app(config, registry=CollectorRegistry())


def client(app: HotPath) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw")


def auth(key: str = KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def backends(c: httpx.AsyncClient) -> dict[str, dict[str, Any]]:
    """``/readyz``'s backends by name."""
    return {b["name"]: b for b in (await c.get("/readyz")).json()["backends"]}


# ---- Configuration: the table's defaults -------------------------------------------------------------------------


def test_the_configuration_table_states_the_defaults() -> None:
    """Each row of the table (as written in the doc) against the configuration's own default."""
    doc = doc_text()
    config = GatewayConfig()
    backend = BackendConfig.model_validate({"url": "http://10.0.0.7:30000"})
    route = RouteConfig(name="r")
    retriever = RetrieverConfig(path=Path("docs"))
    lim, t = config.limits, config.limits.timeouts
    rows: dict[str, tuple[str, list[tuple[Any, Any]]]] = {
        "`listen.host`, `listen.port`": ("`127.0.0.1`, `8000`", [(config.listen.host, "127.0.0.1"),
                                                                (config.listen.port, 8000)]),
        "`listen.trust_request_id`": ("`true`", [(config.listen.trust_request_id, True)]),
        "`listen.drain_s`": ("`30`", [(config.listen.drain_s, 30)]),
        "`backends[].kind`": ("`sglang`", [(backend.kind, "sglang")]),
        "`backends[].weight`": ("`1`", [(backend.weight, 1)]),
        "`backends[].name`": ("`host:port`", [(backend.display_name, "10.0.0.7:30000")]),
        "`routing.policy`": ("`prefix`", [(config.routing.policy, "prefix")]),
        "`routing.min_match_ratio`": ("`0.1`", [(config.routing.min_match_ratio, 0.1)]),
        "`routing.balance_abs_threshold`": ("`4`", [(config.routing.balance_abs_threshold, 4)]),
        "`routing.balance_rel_threshold`": ("`1.5`", [(config.routing.balance_rel_threshold, 1.5)]),
        "`routing.max_retries`": ("`2`", [(config.routing.max_retries, 2)]),
        "`health.interval_s`, `health.timeout_s`": ("`5`, `5`", [(config.health.interval_s, 5),
                                                                (config.health.timeout_s, 5)]),
        "`health.eject_after_failures`": ("`3`", [(config.health.eject_after_failures, 3)]),
        "`health.eject_for_s`": ("`30`", [(config.health.eject_for_s, 30)]),
        "`routes[].model`": ("the name", [(route.backend_model, "r")]),
        "`routes[].context_template`": ('a "Use the following context" block',
                                        [(route.context_template.startswith("Use the following context"), True)]),
        "`routes[].retriever`": (
            '— | `{kind: folder, path, patterns: ["**/*.txt", "**/*.md"], top_k: 3, chunk_chars: 1200, min_score: 0}`',
            [(retriever.kind, "folder"), (retriever.patterns, ("**/*.txt", "**/*.md")), (retriever.top_k, 3),
             (retriever.chunk_chars, 1200), (retriever.min_score, 0)],
        ),
        "`routes[].cache`": ("`tenant`", [(route.cache, "tenant")]),
        "`routes[].backends`": ("all", [(route.backends, ())]),
        "`insecure_no_auth`": ("`false`", [(config.insecure_no_auth, False)]),
        "`limits.max_body_bytes`": ("`1048576`", [(lim.max_body_bytes, 1048576)]),
        "`limits.max_messages`": ("`512`", [(lim.max_messages, 512)]),
        "`limits.max_prompt_tokens`": ("`128000`", [(lim.max_prompt_tokens, 128000)]),
        "`limits.max_tokens`, `limits.default_max_tokens`": ("`4096`, `256`", [(lim.max_tokens, 4096),
                                                                              (lim.default_max_tokens, 256)]),
        "`limits.max_stop_sequences`": ("`4`", [(lim.max_stop_sequences, 4)]),
        "`limits.max_concurrency`, `limits.max_queue`": ("`64`, `256`", [(lim.max_concurrency, 64),
                                                                        (lim.max_queue, 256)]),
        "`limits.tenant_rate`": ("`{requests_per_second: 0}`", [(lim.tenant_rate.requests_per_second, 0)]),
        "`limits.tenant_tokens`": ("`{tokens_per_minute: 0}`", [(lim.tenant_tokens.tokens_per_minute, 0)]),
        "`limits.timeouts`": ("`{connect_s: 5, read_s: 120, queue_s: 30, body_s: 30}`",
                              [(t.connect_s, 5), (t.read_s, 120), (t.queue_s, 30), (t.body_s, 30)]),
        "`tokenizer.chars_per_token`": ("`4.0`", [(config.tokenizer.chars_per_token, 4.0)]),
        "`tokenizer.chat_template`": ("`chatml`", [(config.tokenizer.chat_template, "chatml")]),
        "`debug.waterfall_requests`": ("`200`", [(config.debug.waterfall_requests, 200)]),
    }  # fmt: skip
    for field, (documented, values) in rows.items():
        assert f"| {field} | {documented} |" in doc, f"docs/gateway.md's row of {field} changed"
        for actual, expected in values:
            assert actual == expected, field
    # the token budget's burst: one minute's worth by default
    assert "`burst` defaults to one minute's worth" in doc
    tokens = GatewayConfig.model_validate({"limits": {"tenant_tokens": {"tokens_per_minute": 600}}})
    assert tokens.limits.tenant_tokens.capacity == 600


# ---- Command line ------------------------------------------------------------------------------------------------


def test_backend_and_key_flags_replace_the_files_lists(tmp_path: Path) -> None:
    """``--backend`` and the key flags (or their environment variables, space-separated) replace the file's lists:
    an ``--admin-key`` alone leaves no user key of the file."""
    from typer.testing import CliRunner

    from llmpath.cli.gateway import app as cli

    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump({"backends": [{"url": "http://127.0.0.1:9"}], "api_keys": api_keys()}))
    no_env: dict[str, str | None] = {"LLMPATH_GATEWAY_API_KEYS": None, "LLMPATH_GATEWAY_ADMIN_KEYS": None}
    runner = CliRunner()

    def summary(*args: str, env: dict[str, str | None] = no_env) -> dict[str, str]:
        result = runner.invoke(cli, ["check-config", str(path), *args], env=env)
        assert result.exit_code == 0, result.output
        return {line[2:14].strip(): line[14:] for line in result.output.splitlines()[1:]}  # "  label       value"

    assert summary()["api keys"] == "2 (1 admin)"
    assert summary("--admin-key", "sk-new-admin")["api keys"] == "1 (1 admin)"
    from_env: dict[str, str | None] = {"LLMPATH_GATEWAY_API_KEYS": "sk-one sk-two", "LLMPATH_GATEWAY_ADMIN_KEYS": None}
    assert summary(env=from_env)["api keys"] == "2 (0 admin)"
    flags = summary("--backend", "http://127.0.0.1:1", "--backend", "http://127.0.0.1:2", "--backend-kind", "openai")
    assert flags["backends"] == "127.0.0.1:1 (openai), 127.0.0.1:2 (openai)"


# ---- Reloading ---------------------------------------------------------------------------------------------------


@pytest.fixture
def reloadable(tmp_path: Path) -> Callable[..., tuple[HotPath, Path, CollectorRegistry]]:
    """``start(**sections)``: a gateway built from a file it reloads (as ``serve --config`` does), that file and
    the registry."""

    def start(**sections: Any) -> tuple[HotPath, Path, CollectorRegistry]:
        path = tmp_path / "gateway.yaml"
        base = {"backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}], "api_keys": api_keys()}
        path.write_text(yaml.safe_dump({**base, **sections}))
        registry = CollectorRegistry()
        app = create_app(load_config(path), registry=registry, reload_config=lambda: load_config(path))
        return app, path, registry

    return start


def rewrite(path: Path, **changes: Any) -> None:
    path.write_text(yaml.safe_dump({**yaml.safe_load(path.read_text()), **changes}))


async def test_a_reload_without_any_key_is_refused_and_changes_nothing(reloadable) -> None:
    app, path, registry = reloadable()
    rewrite(path, api_keys=[])
    async with client(app) as c:
        resp = await c.post("/admin/reload", headers=auth(ADMIN))
        assert resp.status_code == 400
        error = resp.json()["error"]
        assert error["code"] == "reload_failed"
        assert "api_keys: the new configuration has no API keys" in error["message"]
        assert (await c.get("/v1/models", headers=auth())).status_code == 200  # the running keys still work
    assert registry.get_sample_value("llmpath_gateway_config_reloads_total", {"result": "failure"}) == 1
    assert registry.get_sample_value("llmpath_gateway_config_last_reload_successful") == 0


async def test_sections_that_need_a_restart_are_reported_and_left_as_they_are(reloadable, tmp_path: Path) -> None:
    """Every section the doc lists as needing a restart, changed at once: reported in order, none applied — not
    even ``insecure_no_auth: true``, which would open the gateway to callers without a key."""
    app, path, _ = reloadable()
    (tmp_path / "stages.toml").write_text('[owners]\nauth = "identity"\n')
    rewrite(
        path,
        listen={"port": 8123, "drain_s": 5},
        backends=[{"url": "http://127.0.0.1:9", "name": "nowhere"}, {"url": "http://127.0.0.1:10", "name": "new"}],
        routing={"policy": "round_robin"},
        health={"interval_s": 1},
        tokenizer={"chars_per_token": 1},
        prompt_cache={"block_tokens": 32},
        usage={"ledger": str(tmp_path / "usage.jsonl")},
        debug={"waterfall_requests": 5},
        insecure_no_auth=True,
        stage_catalog=str(tmp_path / "stages.toml"),
        limits={"timeouts": {"connect_s": 1, "read_s": 30}},
    )
    before = app.gateway.config
    async with client(app) as c:
        resp = await c.post("/admin/reload", headers=auth(ADMIN))
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "applied": [],
            "restart_required": [
                "listen", "backends", "routing", "health", "insecure_no_auth", "tokenizer", "prompt_cache", "usage",
                "debug", "stage_catalog", "limits.timeouts.connect_s", "limits.timeouts.read_s",
            ],
        }  # fmt: skip
        assert (await c.get("/v1/models")).status_code == 401  # still no way in without a key
    gateway = app.gateway
    assert gateway.config == before
    assert list(gateway.pool.states) == ["nowhere"] and gateway.router.policy == "prefix"
    assert gateway.prompt_cache.block_tokens == 16


async def test_a_reload_applies_limits_to_the_next_request_and_refills_rate_buckets(reloadable) -> None:
    """New maxima for the next requests; request-rate buckets start again, full, at their new rates (a key's own
    ``rate`` included). The 429 says when the next request may come (``Retry-After``)."""
    app, path, _ = reloadable(
        api_keys=api_keys(limited_rate={"requests_per_second": 0.5, "burst": 1}),
        health={"eject_after_failures": 100},  # the refused backend stays a candidate: requests reach admission
    )
    async with client(app) as c:

        async def limited() -> httpx.Response:
            return await c.post("/v1/chat/completions", json=CHAT, headers=auth(LIMITED))

        assert (await limited()).status_code == 503  # admitted (the backend refuses the connection)
        refused = await limited()
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "rate_limited"
        assert refused.headers["retry-after"] == "2"  # 0.5 requests/s: the next one in 2 s

        rewrite(
            path,
            api_keys=api_keys(limited_rate={"requests_per_second": 0.5, "burst": 3}),
            limits={"max_messages": 1, "max_body_bytes": 400},
        )
        assert (await c.post("/admin/reload", headers=auth(ADMIN))).json()["applied"] == ["api_keys", "limits"]
        assert [(await limited()).status_code for _ in range(4)] == [503, 503, 503, 429]  # full again, burst 3
        two = {**CHAT, "messages": 2 * MESSAGES}
        too_many = await c.post("/v1/chat/completions", json=two, headers=auth())
        assert (too_many.status_code, too_many.json()["error"]["param"]) == (422, "messages")
        big = {**CHAT, "messages": [{"role": "user", "content": "x" * 500}]}
        assert (await c.post("/v1/chat/completions", json=big, headers=auth())).status_code == 413


# ---- Health and ejection -----------------------------------------------------------------------------------------


async def test_ejection_after_consecutive_failures_of_any_kind_until_one_passing_probe() -> None:
    """Probes and request failures count together; a passing probe ends the run; an ejected backend is not probed
    for ``eject_for_s``; then one passing probe reinstates it."""
    from llmpath.backends import create_backend

    status = [200]  # what its health endpoint answers
    health = Loopback(lambda _: Answer(status[0]))
    url = health.url
    config = BackendConfig.model_validate({"url": url, "name": "e0"})
    state = BackendState(create_backend("sglang", url, name="e0"), config, "e0", 1.0)
    clock = FakeClock()
    pool = BackendPool([state], HealthConfig(eject_after_failures=3, eject_for_s=30), clock=clock)
    try:
        assert await pool.check(state) and state.available(clock())
        pool.report_failure("e0", "answered 500")
        pool.report_failure("e0", "connection failed: ClientConnectorError")
        assert await pool.check(state)  # a passing probe: the run of failures is over
        assert state.consecutive_failures == 0
        pool.report_failure("e0", "answered 500")
        pool.report_failure("e0", "answered 401")
        status[0] = 503
        assert not await pool.check(state)  # the third in a row: ejected
        ejected_at = clock.now
        assert not state.available(clock()) and pool.status()[0]["ejected_for_s"] == 30
        assert pool.candidates() == [] and not pool.ready()

        status[0] = 200
        hits = len(health.requests())
        clock.now = ejected_at + 29.9
        assert not await pool.check(state) and len(health.requests()) == hits  # still out: not even probed
        clock.now = ejected_at + 30
        assert await pool.check(state) and len(health.requests()) == hits + 1  # one passing probe reinstates it
        assert state.available(clock()) and state.consecutive_failures == 0 and state.last_error is None
    finally:
        await pool.stop()
        health.close()


@pytest.mark.parametrize("status", [401, 403, 407])
async def test_a_backend_refusing_the_gateways_key_is_a_502_that_counts_toward_ejection(answering, status) -> None:
    echoed = b'{"error": {"message": "Incorrect API key provided: sk-backend-SECRET-3f9a"}}'
    url = answering(status, echoed)
    app = make_app(
        backends=[{"url": url, "name": "guarded", "kind": "openai"}],
        health={"eject_after_failures": 2, "eject_for_s": 30},
    )
    async with client(app) as c:
        first = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert first.status_code == 502
        assert first.json()["error"] == {
            "message": "The backend failed.", "type": "server_error", "param": None, "code": "backend_error",
        }  # fmt: skip
        assert "SECRET" not in first.text
        assert (await backends(c))["guarded"]["last_error"] == f"answered {status}"
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth())).status_code == 502
        guarded = (await backends(c))["guarded"]
        assert not guarded["available"] and guarded["ejected_for_s"] > 29  # the second failure in a row
        after = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert (after.status_code, after.json()["error"]["code"]) == (503, "no_backend")
    await app.gateway.pool.stop()


async def test_a_busy_backends_503_is_retried_but_does_not_count_toward_ejection(answering) -> None:
    busy = answering(503, b'{"error": {"message": "queue full"}}', {"retry-after": "2"})
    app = make_app(backends=[{"url": busy, "name": "busy"}], health={"eject_after_failures": 1})
    async with client(app) as c:
        for _ in range(3):
            resp = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
            assert (resp.status_code, resp.json()["error"]["code"]) == (503, "no_backend")
            assert resp.headers["retry-after"] == "2"  # its own wait, not 1 s
        state = (await backends(c))["busy"]
        assert state["available"] and state["consecutive_failures"] == 0
    await app.gateway.pool.stop()


# ---- A connection that cannot be made in time --------------------------------------------------------------------


@pytest.fixture
def black_hole() -> Iterator[str]:
    """The URL of a host that drops the SYNs (:func:`tests.loopback.black_hole`)."""
    with unreachable() as url:
        yield url


async def test_a_lone_backend_that_cannot_be_connected_to_in_time_is_a_503_and_a_failure(black_hole, caplog) -> None:
    """``limits.timeouts.connect_s`` passed without a connection: no byte was sent, so it is a connection that
    failed (counted toward ejection, retried elsewhere when there is another backend), not a backend that was
    silent too long (504)."""
    app = make_app(backends=[{"url": black_hole, "name": "hole"}], limits={"timeouts": {"connect_s": 0.3}})
    caplog.set_level(logging.INFO, logger="llmpath.gateway")
    async with client(app) as c:
        resp = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert resp.status_code == 503, resp.text
        assert resp.json()["error"]["code"] == "no_backend"
        hole = (await backends(c))["hole"]
    assert (hole["consecutive_failures"], hole["last_error"]) == (1, "connection failed: ConnectionTimeoutError")
    said = "backend hole: connection failed: ConnectionTimeoutError; no other backend to try"
    assert [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llmpath.gateway"] == [
        (logging.WARNING, said)
    ]
    await app.gateway.pool.stop()


@pytest.mark.slow
async def test_a_connection_not_made_in_time_is_retried_on_another_backend(stack, black_hole) -> None:
    (engine,) = stack.start_engines(1)
    app = make_app(
        # the heavier weight goes first in a smooth weighted round robin
        backends=[{"url": black_hole, "name": "hole", "weight": 10}, {"url": engine.url, "name": "engine"}],
        routing={"policy": "round_robin"},
        limits={"timeouts": {"connect_s": 0.3}},
    )
    async with client(app) as c:
        resp = await c.post("/v1/chat/completions", json=CHAT, headers=auth())
        assert resp.status_code == 200, resp.text
        [record] = app.state.waterfall.recent()
        assert (record.extra["backend"], record.extra["routing_reason"], record.extra["retries"]) == (
            "engine", "retry", 1,
        )  # fmt: skip
        assert app.gateway.pool["hole"].consecutive_failures == 1

        # Streaming, as "Streaming and cancellation" and "Endpoints" describe it: SSE that no proxy buffers, the
        # role with the first token, the usage chunk (empty choices, cached tokens) and [DONE] last.
        body = {**CHAT, "max_tokens": 3, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        streamed = await c.post("/v1/chat/completions", json=body, headers=auth())
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.headers["x-accel-buffering"] == "no"
    data = [line.removeprefix("data: ") for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant" and chunks[0]["choices"][0]["delta"]["content"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert "cached_tokens" in chunks[-1]["usage"]["prompt_tokens_details"]
    await app.gateway.pool.stop()


# ---- Requests and errors -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "extra", "param", "code"),
    [
        ("/v1/chat/completions", {"tools": []}, "tools", "unsupported_parameter"),
        ("/v1/chat/completions", {"logprobs": True}, "logprobs", "unsupported_value"),
        ("/v1/chat/completions", {"service_tier": "flex"}, "service_tier", "unsupported_value"),
        ("/v1/completions", {"logprobs": 1}, "logprobs", "unsupported_parameter"),
        ("/v1/completions", {"best_of": 2}, "best_of", "unsupported_value"),
        # schema bounds, not the unsupported fields' check: invalid_value, as the doc says
        ("/v1/chat/completions", {"n": 2}, "n", "invalid_value"),
        ("/v1/chat/completions", {"presence_penalty": 0.5}, "presence_penalty", "invalid_value"),
        ("/v1/completions", {"frequency_penalty": 1}, "frequency_penalty", "invalid_value"),
        ("/v1/completions", {"echo": True}, "echo", "invalid_value"),
        ("/v1/completions", {"suffix": "!"}, "suffix", "invalid_value"),
    ],
)
async def test_refused_openai_fields_get_the_documented_code(
    path: str, extra: dict[str, Any], param: str, code: str
) -> None:
    doc = doc_text()
    assert (
        "`n`, `presence_penalty` and `frequency_penalty`, and completions' `echo` and `suffix`, are checked as "
        "bounds of the schema instead: any other value is `invalid_value`" in doc
    )
    app = make_app()
    body = {"model": "m", **extra}
    body |= {"messages": MESSAGES} if path == "/v1/chat/completions" else {"prompt": "hi"}
    async with client(app) as c:
        resp = await c.post(path, json=body, headers=auth())
    assert resp.status_code == 400
    assert (resp.json()["error"]["param"], resp.json()["error"]["code"]) == (param, code)


def test_the_errors_table_says_when_a_503_asks_for_longer_than_a_second() -> None:
    """``Retry-After`` of a 503 ``no_backend``: 1, or the longest wait the busy backends tried asked for (see
    ``test_a_busy_backends_503_is_retried_but_does_not_count_toward_ejection``)."""
    row = next(line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| 503 |"))
    assert "`Retry-After: 1`, or the longest `Retry-After` of the busy backends tried" in row


# ---- The usage ledger --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["usage.db", "usage.DB", "usage.Sqlite3"])
async def test_a_ledger_named_as_sqlite_is_sqlite_whatever_the_case(tmp_path: Path, name: str) -> None:
    app = make_app(usage={"ledger": str(tmp_path / name)})
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT)).status_code == 401  # recorded too
    for _ in range(100):
        if (tmp_path / name).exists() and (tmp_path / name).stat().st_size:
            break
        await asyncio.sleep(0.05)
    assert (tmp_path / name).read_bytes().startswith(b"SQLite format 3\x00")
    assert [r.status_code for r in read_ledger(tmp_path / name)] == [401]


# ---- The stages --------------------------------------------------------------------------------------------------


async def test_the_model_call_span_is_named_by_its_operation() -> None:
    """``chat {model}`` for a chat completion, ``text_completion {model}`` for a text completion (one per attempt:
    the backend here refuses the connection)."""
    assert re.search(r"The model call is a CLIENT span `chat \{model\}` \(`text_completion \{model\}` for", doc_text())
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    config = load_config(None, {"backends": [{"url": "http://127.0.0.1:9", "name": "nowhere"}],
                                "api_keys": api_keys(), "routing": {"max_retries": 0}})  # fmt: skip
    app = create_app(config, registry=CollectorRegistry(), tracer_provider=provider)
    async with client(app) as c:
        assert (await c.post("/v1/chat/completions", json=CHAT, headers=auth())).status_code == 503
        text = {"model": "m", "prompt": "hi", "max_tokens": 2}
        assert (await c.post("/v1/completions", json=text, headers=auth())).status_code == 503
    calls = [(s.name, s.attributes["gen_ai.operation.name"]) for s in exporter.get_finished_spans()
             if s.kind is SpanKind.CLIENT and s.attributes is not None]  # fmt: skip
    assert calls == [("chat m", "chat"), ("text_completion m", "text_completion")]
    await app.gateway.pool.stop()
