"""The same small LLM gateway in Litestar, Quart, Django and Falcon, for the framework and server tests.

Each app has ``POST /v1/chat`` (JSON; stages ``auth`` and ``route``, ``mark_first_token``, ``record_usage``),
``GET /v1/stream?tokens=&delay=`` (server-sent events; a ``schedule`` stage, then one event per token; the first
body chunk is the first token), ``GET /items/{id}``, ``GET /boom`` (raises :class:`BackendDown` inside a stage),
``GET /crash`` (Quart, Django, Falcon: raises ``LookupError`` outside every stage; :func:`install_error_hook`),
``/ws`` (a websocket echoing text reversed; not Django, whose ASGI handler has none) and lifespan hooks recording
``startup``/``shutdown`` in :data:`EVENTS` (not Django, which has no lifespan). ``labelled=True`` adds the
framework's one-line hook that names the ``route`` label (docs/instrumentation.md, "Frameworks and servers").

Served by a real server: ``instr_framework_apps:app``, the framework named by ``LLMPATH_TEST_FRAMEWORK``, wrapped
in ``LLMPathMiddleware`` with a JSON-lines ledger at ``LLMPATH_TEST_JSONL``.
"""

# No `from __future__ import annotations`: Litestar reads the handlers' annotations as objects.
import asyncio
import os
import sys
from collections.abc import AsyncIterator, Callable
from typing import Any

from llmpath.instrumentation import (
    JsonlUsageSink,
    LLMPathMiddleware,
    current_request,
    fail_request,
    mark_first_token,
    record_usage,
    set_request_labels,
    stage,
)

#: Lifespan hooks that ran in this process, in order.
EVENTS: list[str] = []
FRAMEWORKS = ("litestar", "quart", "django", "falcon")


class BackendDown(RuntimeError):
    """The exception ``/boom`` raises (its class is the request's error type)."""


async def chat_body(payload: dict[str, Any]) -> dict[str, Any]:
    """The JSON endpoint's work, shared by every framework."""
    with stage("auth"):
        await asyncio.sleep(0.002)
    with stage("route"):
        pass
    mark_first_token()
    record_usage(input_tokens=12, cached_tokens=4, output_tokens=3, model="tiny", tenant="acme")
    req = current_request()
    return {"echo": payload.get("q"), "request_id": req.request_id if req else None}


async def events(tokens: int, delay: float) -> AsyncIterator[bytes]:
    """The streamed body: a ``schedule`` stage, then one SSE event per token."""
    with stage("schedule"):
        await asyncio.sleep(delay)
    for i in range(tokens):
        yield f"data: {i}\n\n".encode()
        await asyncio.sleep(delay)
    record_usage(input_tokens=10, cached_tokens=0, output_tokens=tokens, model="tiny")


async def boom() -> None:
    with stage("route"):
        raise BackendDown("prompt text that must never be recorded")


async def crash() -> None:
    raise LookupError("outside every stage")


def stream_args(get: Callable[[str, str], str]) -> tuple[int, float]:
    return int(get("tokens", "3")), float(get("delay", "0.01"))


# ---- Litestar ------------------------------------------------------------------------------------------------


def litestar_app(labelled: bool = False) -> Any:
    """Litestar exposes the matched template itself (``scope["path_template"]``): ``labelled`` changes nothing."""
    from litestar import Litestar, Request, get, post, websocket
    from litestar.connection import WebSocket
    from litestar.params import FromPath, JSONBody
    from litestar.response import Stream

    @post("/v1/chat", status_code=200)
    async def chat(data: JSONBody[dict[str, Any]]) -> dict[str, Any]:
        return await chat_body(data)

    @get("/v1/stream")
    async def stream(request: Request[Any, Any, Any]) -> Stream:
        return Stream(events(*stream_args(request.query_params.get)), media_type="text/event-stream")

    @get("/items/{item_id:int}")
    async def item(item_id: FromPath[int]) -> dict[str, int]:
        return {"item": item_id}

    @get("/boom")
    async def fail() -> None:
        await boom()

    @websocket("/ws")
    async def ws(socket: WebSocket[Any, Any, Any]) -> None:
        await socket.accept()
        text = await socket.receive_text()
        await socket.send_text(text[::-1])
        await socket.close()

    return Litestar(
        route_handlers=[chat, stream, item, fail, ws],
        on_startup=[lambda: EVENTS.append("startup")],
        on_shutdown=[lambda: EVENTS.append("shutdown")],
    )


# ---- Quart ---------------------------------------------------------------------------------------------------


def quart_app(labelled: bool = False) -> Any:
    from quart import Quart, Response, request, websocket

    app = Quart(__name__)

    @app.post("/v1/chat")
    async def chat() -> dict[str, Any]:
        return await chat_body(await request.get_json())

    @app.get("/v1/stream")
    async def stream() -> Response:
        return Response(events(*stream_args(request.args.get)), mimetype="text/event-stream")

    @app.get("/items/<int:item_id>")
    async def item(item_id: int) -> dict[str, int]:
        return {"item": item_id}

    @app.get("/boom")
    async def fail() -> dict[str, Any]:
        await boom()
        return {}

    @app.get("/crash")
    async def crashed() -> dict[str, Any]:
        await crash()
        return {}

    @app.websocket("/ws")
    async def ws() -> None:
        text = await websocket.receive()
        await websocket.send(text[::-1])

    @app.before_serving
    async def startup() -> None:
        EVENTS.append("startup")

    @app.after_serving
    async def shutdown() -> None:
        EVENTS.append("shutdown")

    if labelled:

        @app.before_request
        async def route_label() -> None:
            if request.url_rule is not None:
                set_request_labels(route=request.url_rule.rule)

    return app


# ---- Django --------------------------------------------------------------------------------------------------


class DjangoRouteLabel:
    """Django middleware naming the ``route`` label after the matched URL pattern."""

    def __init__(self, get_response: Any) -> None:
        self.get_response = get_response

    def __call__(self, request: Any) -> Any:
        return self.get_response(request)

    def process_view(self, request: Any, view: Any, args: Any, kwargs: Any) -> None:
        set_request_labels(route="/" + request.resolver_match.route)


def django_app(labelled: bool = False) -> Any:
    """Django's settings are process-wide: the first call decides ``labelled`` for the process."""
    import django
    from django.conf import settings
    from django.core.asgi import get_asgi_application

    if not settings.configured:
        settings.configure(
            DEBUG=False,
            ALLOWED_HOSTS=["*"],
            ROOT_URLCONF=__name__,
            MIDDLEWARE=[f"{__name__}.DjangoRouteLabel"] if labelled else [],  # decided once per process
            INSTALLED_APPS=[],
            LOGGING_CONFIG=None,
        )
        django.setup()
    return get_asgi_application()


def _django_urls() -> list[Any]:
    import json

    from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
    from django.urls import path

    async def chat(request: Any) -> Any:
        return JsonResponse(await chat_body(json.loads(request.body)))

    async def stream(request: Any) -> Any:
        return StreamingHttpResponse(events(*stream_args(request.GET.get)), content_type="text/event-stream")

    async def item(request: Any, item_id: int) -> Any:
        return JsonResponse({"item": item_id})

    async def fail(request: Any) -> Any:
        await boom()
        return HttpResponse()

    async def crashed(request: Any) -> Any:
        await crash()
        return HttpResponse()

    return [
        path("v1/chat", chat),
        path("v1/stream", stream),
        path("items/<int:item_id>", item),
        path("boom", fail),
        path("crash", crashed),
    ]


def __getattr__(name: str) -> Any:
    if name == "urlpatterns":  # Django's ROOT_URLCONF, made when Django first resolves a URL
        return _django_urls()
    raise AttributeError(name)


# ---- Falcon --------------------------------------------------------------------------------------------------


class FalconRouteLabel:
    """Falcon middleware naming the ``route`` label after the matched URI template."""

    async def process_resource(self, req: Any, resp: Any, resource: Any, params: Any) -> None:
        set_request_labels(route=req.uri_template)


def falcon_app(labelled: bool = False) -> Any:
    import falcon.asgi

    class Chat:
        async def on_post(self, req: Any, resp: Any) -> None:
            resp.media = await chat_body(await req.get_media())

    class Stream:
        """Falcon's SSE (``resp.sse``): it watches for the client leaving, which ``resp.stream`` does not."""

        async def on_get(self, req: Any, resp: Any) -> None:
            async def sse() -> AsyncIterator[Any]:
                async for chunk in events(*stream_args(req.get_param)):
                    yield falcon.asgi.SSEvent(data=chunk[len(b"data: ") : -2])

            resp.sse = sse()

    class Item:
        async def on_get(self, req: Any, resp: Any, item_id: int) -> None:
            resp.media = {"item": item_id}

    class Boom:
        async def on_get(self, req: Any, resp: Any) -> None:
            await boom()

    class Crash:
        async def on_get(self, req: Any, resp: Any) -> None:
            await crash()

    class Echo:
        async def on_websocket(self, req: Any, ws: Any) -> None:
            await ws.accept()
            text = await ws.receive_text()
            await ws.send_text(text[::-1])
            await ws.close()

    class Lifespan:
        async def process_startup(self, scope: Any, event: Any) -> None:
            EVENTS.append("startup")

        async def process_shutdown(self, scope: Any, event: Any) -> None:
            EVENTS.append("shutdown")

    middleware: list[Any] = [Lifespan(), *([FalconRouteLabel()] if labelled else [])]
    app = falcon.asgi.App(middleware=middleware)
    app.add_route("/v1/chat", Chat())
    app.add_route("/v1/stream", Stream())
    app.add_route("/items/{item_id:int}", Item())
    app.add_route("/boom", Boom())
    app.add_route("/crash", Crash())
    app.add_route("/ws", Echo())
    return app


# ---- The exception hooks of docs/instrumentation.md ("Errors") --------------------------------------------------


async def quart_error_type(sender: Any, exception: BaseException, **extra: Any) -> None:
    fail_request(500, type(exception).__name__)


def django_error_type(sender: Any, **kwargs: Any) -> None:
    fail_request(500, type(sys.exc_info()[1]).__name__)  # sent while Django handles the exception


async def falcon_error_type(req: Any, resp: Any, exception: BaseException, params: Any) -> None:
    import falcon

    fail_request(500, type(exception).__name__)
    raise falcon.HTTPInternalServerError()


def install_error_hook(framework: str, app: Any) -> Callable[[], None]:
    """Connect the framework's exception hook that names the error; returns what disconnects it (Django's signal
    is process-wide)."""
    if framework == "quart":
        from quart.signals import got_request_exception

        got_request_exception.connect(quart_error_type, app)
        return lambda: got_request_exception.disconnect(quart_error_type, app)
    if framework == "django":
        from django.core.signals import got_request_exception as django_signal

        django_signal.connect(django_error_type)
        return lambda: django_signal.disconnect(django_error_type)
    app.add_error_handler(Exception, falcon_error_type)
    return lambda: None


BUILDERS: dict[str, Callable[..., Any]] = {
    "litestar": litestar_app,
    "quart": quart_app,
    "django": django_app,
    "falcon": falcon_app,
}

if os.environ.get("LLMPATH_TEST_FRAMEWORK"):
    app = LLMPathMiddleware(
        BUILDERS[os.environ["LLMPATH_TEST_FRAMEWORK"]](labelled=os.environ.get("LLMPATH_TEST_LABELLED") == "1"),
        usage_sink=JsonlUsageSink(os.environ["LLMPATH_TEST_JSONL"]),
    )
