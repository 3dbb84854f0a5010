"""Security: what a hostile web page, client or backend can make the gateway do, in-process over ASGI (the same app
``llmpath gateway serve`` runs)."""

from __future__ import annotations

import httpx
import pytest
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import create_app
from llmpath.gateway.config import load_config
from llmpath.instrumentation.usage import StageTiming, UsageRecord
from tests.gateway.test_gateway_request_errors import ADMIN, KEY, auth, client, make_app


@pytest.mark.parametrize(
    ("path", "key", "body"),
    [
        ("/admin/prompt-cache/flush", ADMIN, b""),  # a cross-site <form method=post> with no fields
        ("/admin/reload", ADMIN, b""),
        # a <form enctype="text/plain"> whose one field, name '{"model":...,"content":"hi' and value 'x"}]}', is
        # this JSON once the browser joins them with "="
        ("/v1/chat/completions", KEY, b'{"model":"any","messages":[{"role":"user","content":"hi=x"}]}\r\n'),
        ("/v1/completions", KEY, b'{"model":"any","prompt":"hi=x"}\r\n'),
    ],
)
async def test_a_browsers_basic_login_does_not_authorise_a_cross_site_post(path: str, key: str, body: bytes) -> None:
    """A browser that logged in to the waterfall (Basic, the key as password) sends those credentials with any
    page's cross-site form or fetch: a POST with them is 401, without the challenge that would make the browser
    retry with them; the same POST with ``Bearer`` (which browsers never add by themselves) passes auth."""
    app = make_app()
    basic = httpx.BasicAuth("anyone", key)
    cross_site = {"Origin": "https://attacker.example", "Content-Type": "text/plain"}
    async with client(app) as c:
        refused = await c.post(path, content=body, headers=cross_site, auth=basic)
        bearer = await c.post(path, content=body, headers={**cross_site, **auth(key)})
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "invalid_api_key"
    assert "www-authenticate" not in refused.headers
    assert bearer.status_code not in (401, 403)  # past auth (400 reload_failed, 503 no_backend, 200 flushed)


async def test_basic_auth_still_reads_the_debug_pages() -> None:
    """The waterfall in a browser: a 401 with the Basic challenge, then the page and its JSON with the key as
    password; a user's key is still 403."""
    app = make_app()
    async with client(app) as c:
        challenge = await c.get("/debug/requests")
        page = await c.get("/debug/requests", auth=httpx.BasicAuth("anyone", ADMIN))
        data = await c.get("/debug/requests.json", auth=httpx.BasicAuth("", ADMIN))
        user = await c.get("/debug/requests", auth=httpx.BasicAuth("anyone", KEY))
    assert challenge.status_code == 401
    assert challenge.headers["www-authenticate"].startswith("Basic ")
    assert page.status_code == 200 and "Recent requests" in page.text
    assert data.status_code == 200 and data.json()["requests"] == []
    assert user.status_code == 403


MARKUP = '"><script>alert(1)</script><img src=x onerror=alert(2)>'


async def test_the_waterfall_escapes_what_it_shows_and_forbids_scripts() -> None:
    """Markup in every text a waterfall row shows (request id, trace id, tenant, route, error, backend, routing
    reason, stage name) and in the reflected ``?id=`` is escaped; the page's CSP allows no script even if some
    text ever were not, and no framing."""
    app = make_app()
    stages = [StageTiming(MARKUP, 0.0, 0.001, MARKUP)]
    extra = {"backend": MARKUP, "routing_reason": MARKUP, "matched_prefix_tokens": MARKUP, "retries": MARKUP}
    hostile = UsageRecord(
        MARKUP, MARKUP, 0.0, MARKUP, MARKUP, MARKUP, 1, 0, 1, stages, 0.001, 0.002, 500, error=MARKUP, extra=extra
    )
    app.state.waterfall.add(hostile)
    async with client(app) as c:
        every = await c.get("/debug/requests", headers=auth(ADMIN))
        one = await c.get("/debug/requests", params={"id": MARKUP, "axis": "ttft"}, headers=auth(ADMIN))
    for page in (every, one):
        assert page.status_code == 200
        assert MARKUP not in page.text and "<script" not in page.text and "<img" not in page.text
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page.text  # shown, as text
        csp = dict(part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";"))
        assert csp["default-src"] == "'none'" and "script-src" not in csp  # no script of any kind
        assert csp["frame-ancestors"] == "'none'" and page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["cache-control"] == "no-store"
    assert one.text.count("&lt;script&gt;") >= 2  # the heading and the row


@pytest.mark.parametrize(
    ("retry_after", "expected"),
    [("inf", "1"), ("nan", "1"), ("-5", "1"), ("Wed, 21 Oct 2015 07:28:00 GMT", "1"), ("1e300", "3600"), ("7", "7")],
)
async def test_a_backends_retry_after_cannot_break_or_inflate_the_gateways(
    answering, retry_after: str, expected: str
) -> None:
    """A busy backend's ``Retry-After`` that is no delay (``inf`` was a 500 with a traceback) leaves the 503
    ``no_backend`` the gateway's own 1 s; a huge one (``1e300`` was a 301-digit header) is capped at an hour; a
    plausible one is passed on."""
    busy = answering(503, b'{"error": {"message": "busy"}}', {"retry-after": retry_after})
    config = load_config(None, {"backends": [{"url": busy, "name": "busy"}], "insecure_no_auth": True})
    app = create_app(config, registry=CollectorRegistry())
    async with client(app) as c:
        resp = await c.post(
            "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        )
    await app.gateway.pool.stop()
    assert resp.status_code == 503 and resp.json()["error"]["code"] == "no_backend"
    assert resp.headers["retry-after"] == expected
