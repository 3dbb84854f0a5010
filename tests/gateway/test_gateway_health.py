"""Active health checks say why a backend is down (``/readyz``'s ``last_error``): real backend clients against a
closed port, a server answering 503 and one that never answers, over loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import create_app
from llmpath.gateway.config import load_config
from tests.loopback import Answer, Loopback


@pytest.fixture
def unhealthy_url() -> Iterator[str]:
    """A server whose health endpoints answer 503."""
    with Loopback(lambda _: Answer(503)) as server:
        yield server.url


@pytest.fixture
def silent_url() -> Iterator[str]:
    """A socket that accepts connections (in its backlog) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("kind", ["sglang", "openai"])
async def test_readyz_says_why_each_backend_is_down(kind: str, free_port, unhealthy_url: str, silent_url: str) -> None:
    config = load_config(
        None,
        {
            "backends": [
                {"url": f"http://127.0.0.1:{free_port()}", "name": "refused", "kind": kind},
                {"url": unhealthy_url, "name": "unhealthy", "kind": kind},
                {"url": silent_url, "name": "silent", "kind": kind},
            ],
            "health": {"timeout_s": 0.3, "eject_after_failures": 1},
            "insecure_no_auth": True,
        },
    )
    app = create_app(config, registry=CollectorRegistry())
    await app.gateway.pool.check_all()
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        ready = await c.get("/readyz")
    assert ready.status_code == 503
    errors = {b["name"]: b["last_error"] for b in ready.json()["backends"]}
    assert errors == {
        "refused": "health check failed: connection refused",
        "unhealthy": "health check failed: answered HTTP 503",
        "silent": "health check timed out after 0.3 s",
    }
    await app.gateway.pool.stop()


async def test_a_backend_failing_its_first_probe_is_not_used_until_one_passes(caplog) -> None:
    """Starting against an engine still loading: not ready, 503 at once; one passing probe brings it in. Once seen
    healthy, a failed probe alone does not take it out (``eject_after_failures`` consecutive failures do)."""
    status = [503]  # what its health endpoints answer (set by the test)
    server = Loopback(lambda _: Answer(status[0]))
    config = load_config(
        None,
        {"backends": [{"url": server.url, "name": "loading"}],
         "health": {"eject_after_failures": 3}, "insecure_no_auth": True},
    )  # fmt: skip
    app = create_app(config, registry=CollectorRegistry())
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
            await app.gateway.pool.check_all()  # the lifespan's first round
            ready = await c.get("/readyz")
            assert ready.status_code == 503, ready.text
            [backend] = ready.json()["backends"]
            assert (backend["healthy"], backend["consecutive_failures"]) == (False, 1)
            assert backend["last_error"] == "health check failed: answered HTTP 503"
            refused = await c.post("/v1/chat/completions", json=body)
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "no_backend", refused.text
            assert "backend loading failed its first health check" in caplog.text

            status[0] = 200
            await app.gateway.pool.check_all()
            assert (await c.get("/readyz")).status_code == 200
            status[0] = 503
            await app.gateway.pool.check_all()
            ready = await c.get("/readyz")
            assert ready.status_code == 200, ready.text  # one failure of three
            assert ready.json()["backends"][0]["consecutive_failures"] == 1
    finally:
        await app.gateway.pool.stop()
        server.close()
