"""Busy backends (429/503 with their own ``Retry-After``) over loopback: the gateway retries elsewhere, and when
every backend it tried was busy its 503 asks the client to wait as long as the busiest one asked."""

from __future__ import annotations

import logging
from collections.abc import Callable

import httpx
import pytest
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import create_app
from llmpath.gateway.config import load_config


@pytest.fixture
def busy_backend(answering: Callable[..., str]) -> Callable[[int, str], str]:
    """Start servers answering every POST with ``status`` and ``Retry-After: retry_after``; returns their URLs."""

    def start(status: int, retry_after: str) -> str:
        return answering(status, b'{"error": {"message": "busy"}}', {"retry-after": retry_after})

    return start


async def test_every_backend_busy_is_a_503_with_the_longest_retry_after(busy_backend, caplog) -> None:
    config = load_config(
        None,
        {
            "backends": [
                {"url": busy_backend(429, "7"), "name": "throttled"},
                {"url": busy_backend(503, "3"), "name": "overloaded"},
            ],
            "routing": {"max_retries": 1},
            "insecure_no_auth": True,
        },
    )
    app = create_app(config, registry=CollectorRegistry())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    caplog.set_level(logging.DEBUG, logger="llmpath.gateway")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        resp = await c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
    assert resp.headers["retry-after"] == "7"  # both were tried; the throttled one asked for the longest wait
    [record] = app.state.waterfall.recent()
    assert record.extra["retries"] == 1
    assert (record.status_code, record.error) == (503, "no_backend")  # the ledger says why, not just 503
    second = record.extra["backend"]  # the last one tried
    (first,) = {"throttled", "overloaded"} - {second}
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llmpath.gateway"]
    assert lines == [
        (logging.DEBUG, f"backend {first}: busy; retrying on {second}"),
        (logging.DEBUG, f"backend {second}: busy; no retries left (routing.max_retries)"),
    ]
    await app.gateway.pool.stop()


async def test_an_unreachable_backend_with_no_other_to_try_says_so(free_port, caplog) -> None:
    config = load_config(
        None, {"backends": [{"url": f"http://127.0.0.1:{free_port()}", "name": "gone"}], "insecure_no_auth": True}
    )
    app = create_app(config, registry=CollectorRegistry())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        resp = await c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
    lines = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "llmpath.gateway"]
    said = "backend gone: connection failed: ClientConnectorError; no other backend to try"
    assert lines == [(logging.WARNING, said)]
    await app.gateway.pool.stop()


async def test_a_lone_busy_backend_passes_its_retry_after_on(busy_backend) -> None:
    backends = [{"url": busy_backend(429, "7"), "name": "only"}]
    config = load_config(None, {"backends": backends, "insecure_no_auth": True})
    app = create_app(config, registry=CollectorRegistry())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        resp = await c.post("/v1/chat/completions", json=body)
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
    assert resp.headers["retry-after"] == "7"  # no other backend to try: the backend's own wait, not 1 s
    await app.gateway.pool.stop()


async def test_server_errors_name_their_code_in_the_ledger_client_errors_none(answering) -> None:
    backends = [{"url": answering(500, b'{"error": {"message": "boom"}}'), "name": "broken"}]
    config = load_config(None, {"backends": backends, "insecure_no_auth": True})
    app = create_app(config, registry=CollectorRegistry())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        failed = await c.post("/v1/chat/completions", json=body)
        refused = await c.post("/v1/chat/completions", json={**body, "max_tokens": -1})
    assert failed.status_code == 502 and failed.json()["error"]["code"] == "backend_error"
    assert refused.status_code == 400
    by_status = {r.status_code: r for r in app.state.waterfall.recent()}
    assert by_status[502].error == "backend_error"
    assert by_status[400].error is None  # the client's mistake, not the service's failure
    await app.gateway.pool.stop()
