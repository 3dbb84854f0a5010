"""Security: what a hostile web page, client or backend can make the gateway do, in-process over ASGI (the same app
``llmpath gateway serve`` runs)."""

from __future__ import annotations

import httpx
import pytest

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
