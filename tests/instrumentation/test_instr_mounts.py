"""Apps mounted under a prefix (Starlette ``Mount``, FastAPI ``app.mount``): the ``route`` label, ``http.route`` and
the SERVER span's name carry the mounts' templates before the mounted app's own route template."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

from llmpath.instrumentation import LLMPathMiddleware, UsageRecord

from .conftest import Harness


def items_app() -> FastAPI:
    sub = FastAPI()

    @sub.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    return sub


async def plain_asgi(scope: Any, receive: Any, send: Any) -> None:
    await PlainTextResponse("raw")(scope, receive, send)


def routes_seen(h: Harness) -> dict[str, float]:
    """route label → requests counted."""
    out: dict[str, float] = {}
    for metric in h.registry.collect():
        for sample in metric.samples:
            if sample.name == "llmpath_requests_total":
                out[sample.labels["route"]] = out.get(sample.labels["route"], 0) + sample.value
    return out


async def get_all(h: Harness, *paths: str, root_path: str = "") -> None:
    transport = httpx.ASGITransport(app=h.app, root_path=root_path)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        for path in paths:
            assert (await c.get(path)).status_code == 200, path


async def test_a_mounted_apps_routes_carry_the_mount_prefix(make_harness: Callable[..., Harness]) -> None:
    top = FastAPI()
    top.mount("/v1", items_app())
    top.mount("/v2", items_app())
    h = make_harness(app=top)
    await get_all(h, "/v1/items/1", "/v1/items/2", "/v2/items/3")
    assert routes_seen(h) == {"/v1/items/{item_id}": 2, "/v2/items/{item_id}": 1}
    server = [s for s in h.spans() if s.name.startswith("GET ")]
    assert sorted(s.name for s in server) == ["GET /v1/items/{item_id}"] * 2 + ["GET /v2/items/{item_id}"]
    assert {(s.attributes or {})["http.route"] for s in server} == {"/v1/items/{item_id}", "/v2/items/{item_id}"}
    assert [r.route for r in h.records] == ["/v1/items/{item_id}"] * 2 + ["/v2/items/{item_id}"]


async def test_mount_parameters_stay_templates_and_nested_mounts_add_up(make_harness: Callable[..., Harness]) -> None:
    api = FastAPI()
    api.mount("/tenants/{tenant}", items_app())
    top = FastAPI()
    top.mount("/api", api)
    h = make_harness(app=top)
    await get_all(h, "/api/tenants/acme/items/1", "/api/tenants/globex/items/2", "/api/tenants/acme/items/3")
    assert routes_seen(h) == {"/api/tenants/{tenant}/items/{item_id}": 3}


async def test_requests_a_mounted_app_answers_without_a_route_are_the_mounts(
    make_harness: Callable[..., Harness],
) -> None:
    top = FastAPI()
    top.mount("/raw/{kind}", plain_asgi)  # FastAPI's router leaves no route for a mount
    top.mount("/api", items_app())
    starlette_top = Starlette(routes=[Mount("/static", app=plain_asgi)])  # Starlette's leaves the Mount
    h, s = make_harness(app=top), make_harness(app=starlette_top)
    await get_all(h, "/raw/a/x", "/raw/b/y/z")
    await get_all(s, "/static/app.js")
    transport = httpx.ASGITransport(app=top)
    async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
        assert (await c.get("/api/nothing-here")).status_code == 404
    assert routes_seen(h) == {"/raw/{kind}": 2, "/api": 1}
    assert routes_seen(s) == {"/static": 1}


async def test_a_proxys_root_path_is_not_a_mount(make_harness: Callable[..., Harness]) -> None:
    h = make_harness()
    await get_all(h, "/items/5", root_path="/behind-proxy")
    assert routes_seen(h) == {"/items/{item_id}": 1}


async def test_mounts_inside_a_middleware_wrapped_app_are_found_through_it(
    make_harness: Callable[..., Harness],
) -> None:
    inner = FastAPI()
    inner.mount("/shard/{n}", items_app())
    top = FastAPI()
    top.mount("/wrapped", GZipMiddleware(inner))  # the mount inside is reached through the middleware's .app
    h = make_harness(app=top)
    await get_all(h, "/wrapped/shard/7/items/1", "/wrapped/shard/8/items/2")
    assert routes_seen(h) == {"/wrapped/shard/{n}/items/{item_id}": 2}


async def test_mounts_that_cannot_be_found_are_one_placeholder_segment(make_harness: Callable[..., Harness]) -> None:
    inner = FastAPI()
    inner.mount("/shard/{n}", items_app())

    async def opaque(scope: Any, receive: Any, send: Any) -> None:  # hides the app it calls
        await inner(scope, receive, send)

    top = FastAPI()
    top.mount("/hidden", opaque)
    h = make_harness(app=top)
    await get_all(h, "/hidden/shard/7/items/1", "/hidden/shard/8/items/2")
    assert routes_seen(h) == {"/hidden/{mount}/items/{item_id}": 2}  # one series, not one per shard


async def test_the_middleware_on_a_starlette_app_resolves_its_mounts() -> None:
    async def hello(request: Any) -> PlainTextResponse:
        return PlainTextResponse("hi")

    inner = Starlette(routes=[Route("/hello/{name}", hello)])
    records: list[UsageRecord] = []
    app = LLMPathMiddleware(
        Starlette(routes=[Mount("/org/{org}", app=inner)]), registry=CollectorRegistry(), usage_sink=records.append
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as c:
        assert (await c.get("/org/acme/hello/bob")).status_code == 200
    assert [r.route for r in records] == ["/org/{org}/hello/{name}"]
