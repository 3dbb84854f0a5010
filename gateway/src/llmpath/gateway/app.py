"""The FastAPI app: OpenAI-compatible endpoints, probes, metrics, the waterfall page and admin endpoints."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from llmpath.backends.base import Backend
from llmpath.gateway import errors
from llmpath.gateway.auth import BASIC_AUTH_METHODS
from llmpath.gateway.chat_template import load_renderer
from llmpath.gateway.config import LEDGER_FORMATS, BackendConfig, GatewayConfig
from llmpath.gateway.errors import APIError
from llmpath.gateway.metrics import GatewayMetrics
from llmpath.gateway.otel import setup_from_env
from llmpath.gateway.pool import BackendPool, BackendState
from llmpath.gateway.prompt_cache import PromptCache
from llmpath.gateway.reload import ConfigReloader, ReloadError
from llmpath.gateway.routing import PrefixIndex, Router, Tokenization
from llmpath.gateway.schemas import (
    SSE_EVENT_SCHEMA,
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
    error_responses,
)
from llmpath.gateway.service import Gateway, build_routes
from llmpath.gateway.waterfall import PAGE_HEADERS, WaterfallStore, render_html, to_json
from llmpath.instrumentation import (
    DEFAULT_EXCLUDED_PATHS,
    STAGES,
    JsonlUsageSink,
    LLMPathMiddleware,
    SqliteUsageSink,
    annotate_request,
    get_instrumentation,
    instrument_app,
    load_catalog,
)
from llmpath.instrumentation.middleware import Receive, Scope, Send

log = logging.getLogger("llmpath.gateway")

try:
    __version__ = version("llmpath-gateway")
except PackageNotFoundError:  # pragma: no cover
    __version__ = "0"

BackendFactory = Callable[[BackendConfig, GatewayConfig], Backend]
#: Paths that are not LLM traffic: no spans, stage metrics or usage records.
EXCLUDED_PATHS = (*DEFAULT_EXCLUDED_PATHS, "/v1/models", "/openapi.json", "/debug/*", "/admin/*")

#: The ``id`` parameter of the debug endpoints: from a log line, an alert's exemplar or a client's ``x-request-id``.
_ID_HELP = "Only the request with this request id or trace id (from a log line, an exemplar or x-request-id)."


def default_backend_factory(backend: BackendConfig, config: GatewayConfig) -> Backend:
    """A backend client for ``backend`` (``llmpath.backends.create_backend``) with the configured timeouts."""
    from llmpath.backends import create_backend

    timeouts = config.limits.timeouts
    options: dict[str, Any] = {"connect_timeout": timeouts.connect_s, "read_timeout": timeouts.read_s}
    if backend.kind == "openai":
        options["api_key"] = os.environ.get(backend.api_key_env) if backend.api_key_env else None
    else:
        options["chat_template"] = load_renderer(config.tokenizer.chat_template)  # the gateway's renderer
    return create_backend(backend.kind, backend.base_url, name=backend.display_name, **options)


def build_gateway(config: GatewayConfig, backend_factory: BackendFactory = default_backend_factory) -> Gateway:
    """The gateway's components from a configuration."""
    states = [
        BackendState(backend=backend_factory(b, config), config=b, name=b.display_name, weight=b.weight)
        for b in config.backends
    ]
    pc = config.prompt_cache
    tokenization = Tokenization(block_tokens=pc.block_tokens, chars_per_token=config.tokenizer.chars_per_token)
    index = PrefixIndex(max_blocks_per_backend=pc.max_blocks_per_backend, ttl_s=pc.ttl_s)
    prompt_cache = PromptCache(index, tokenization, min_prefix_tokens=pc.min_prefix_tokens, enabled=pc.enabled)
    routing = config.routing
    router = Router(
        routing.policy,
        min_match_ratio=routing.min_match_ratio,
        min_blocks=max(1, -(-pc.min_prefix_tokens // pc.block_tokens)),
        balance_abs=routing.balance_abs_threshold,
        balance_rel=routing.balance_rel_threshold,
    )
    render_chat = load_renderer(config.tokenizer.chat_template)
    routes = build_routes(config.routes, render_chat)
    pool = BackendPool(states, config.health, on_eject=lambda s: prompt_cache.forget_backend(s.name))
    return Gateway(config, pool=pool, prompt_cache=prompt_cache, router=router, routes=routes, render_chat=render_chat)


def _open_ledger(config: GatewayConfig) -> Any:
    path = config.usage.ledger
    if path is None:
        return None
    if LEDGER_FORMATS.get(path.suffix.lower()) == "SQLite":  # as the configuration checked it: `usage.DB` too
        return SqliteUsageSink(path)
    return JsonlUsageSink(path)


class FlushRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    #: Flush one tenant's cached prefixes; everyone's when omitted.
    tenant: str | None = Field(default=None, max_length=128)


def _request_body(model: type[BaseModel], defs: dict[str, Any], *, required: bool = True) -> dict[str, Any]:
    """An ``openapi_extra`` request body for ``model`` (the handlers parse bodies themselves, after auth);
    nested models are collected into ``defs`` for ``components.schemas``."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
    defs.update(schema.pop("$defs", {}))
    defs[model.__name__] = schema
    ref = {"$ref": f"#/components/schemas/{model.__name__}"}
    return {"requestBody": {"required": required, "content": {"application/json": {"schema": ref}}}}


def _with_components(
    app: FastAPI, defs: dict[str, Any], config: Callable[[], GatewayConfig]
) -> Callable[[], dict[str, Any]]:
    """``app.openapi`` with the request-body schemas in ``components.schemas``, the configured limits
    (``max_tokens``, messages, stop sequences) as their maxima and the routes as the ``model`` values (of the
    running ``config()``; a reload clears the cached schema)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            schemas = schema.setdefault("components", {}).setdefault("schemas", {})
            schemas.update(copy.deepcopy(defs))
            error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(error_schema.pop("$defs", {}))
            schemas["ErrorResponse"] = error_schema
            _document_config(schemas, config())
            app.openapi_schema = schema
        return app.openapi_schema

    return openapi


def _document_config(schemas: dict[str, Any], config: GatewayConfig) -> None:
    limits = config.limits
    for name in ("ChatCompletionRequest", "CompletionRequest"):
        props = schemas[name]["properties"]
        if config.routes:  # only the configured routes are models; without routes any name passes through
            props["model"]["enum"] = [r.name for r in config.routes]
        for field in ("max_tokens", "max_completion_tokens"):
            for branch in props.get(field, {}).get("anyOf", ()):
                if branch.get("type") == "integer":
                    branch["maximum"] = limits.max_tokens
        for branch in props["stop"]["anyOf"]:
            if branch.get("type") == "array":
                branch["maxItems"] = limits.max_stop_sequences
    schemas["ChatCompletionRequest"]["properties"]["messages"]["maxItems"] = limits.max_messages


def create_app(
    config: GatewayConfig,
    *,
    backend_factory: BackendFactory = default_backend_factory,
    registry: Any = None,
    tracer_provider: Any = None,
    reload_config: Callable[[], GatewayConfig] | None = None,
) -> HotPath:
    """The gateway as an ASGI app (instrumented; OTel export from the environment unless a provider is given):
    the completion endpoints' fast path in front of the FastAPI app (``.app``; its ``.state`` has the
    ``gateway``, the ``waterfall`` and the ``llmpath`` instrumentation).

    ``reload_config`` loads the configuration again (the file and the command line's overrides): with it,
    ``SIGHUP`` and ``POST /admin/reload`` apply a changed file (see :mod:`llmpath.gateway.reload`)."""
    gateway = build_gateway(config, backend_factory)
    reloader = ConfigReloader(gateway, reload_config)
    waterfall = WaterfallStore(config.debug.waterfall_requests)
    ledger = _open_ledger(config)
    otel = setup_from_env() if tracer_provider is None else None
    if otel is not None and otel.tracer_provider is not None:
        tracer_provider = otel.tracer_provider

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.pool.check_all()
        gateway.pool.start()
        loop = asyncio.get_running_loop()
        expirer = loop.create_task(_expire_loop(gateway), name="llmpath-cache-expiry")
        on_hangup = _install_sighup(loop, lambda: _hang_up(ledger, reloader))
        try:
            yield
        finally:
            if on_hangup:
                loop.remove_signal_handler(signal.SIGHUP)
            expirer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await expirer
            await gateway.pool.stop()
            if otel is not None:
                otel.shutdown()

    app = FastAPI(
        title="llmpath gateway",
        version=__version__,
        description="OpenAI-compatible LLM gateway whose seven request stages are instrumented (llmpath).",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # a redirect would echo the client's Host header back as the Location
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    app.state.gateway = gateway
    app.state.waterfall = waterfall
    _install_error_handlers(app)

    defs: dict[str, Any] = {}
    chat_schema = _request_body(ChatCompletionRequest, defs)
    completion_schema = _request_body(CompletionRequest, defs)
    flush_schema = _request_body(FlushRequest, defs, required=False)
    admin = [Depends(_admin_dependency(gateway))]  # runs before query parameters are validated
    stream_doc = {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}}
    completion_errors = error_responses(400, 401, 404, 408, 413, 422, 429, 502, 503, 504)

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        responses={200: {"content": stream_doc}, **completion_errors},
        openapi_extra=chat_schema,
        summary="Create a chat completion (stream or not)",
    )
    async def chat_completions(request: Request) -> Response:
        return await gateway.handle(request, "chat")

    @app.post(
        "/v1/completions",
        response_model=Completion,
        responses={200: {"content": stream_doc}, **completion_errors},
        openapi_extra=completion_schema,
        summary="Create a text completion (stream or not)",
    )
    async def completions(request: Request) -> Response:
        return await gateway.handle(request, "text")

    @app.get("/v1/models", response_model=ModelList, responses=error_responses(401), summary="List the routes")
    async def models(request: Request) -> dict[str, Any]:
        gateway.authenticate(request)
        return {
            "object": "list",
            "data": [{"id": name, "object": "model", "created": 0, "owned_by": "llmpath"} for name in gateway.routes],
        }

    @app.get(
        "/v1/models/{model:path}",
        response_model=ModelCard,
        responses=error_responses(401, 404),
        summary="One route (any name when no routes are configured: the model goes to the backend as it is)",
    )
    async def model(request: Request, model: str) -> dict[str, Any]:
        gateway.authenticate(request)
        if not model or gateway.route_for(model) is None:
            raise errors.model_not_found(model)
        return {"id": model, "object": "model", "created": 0, "owned_by": "llmpath"}

    @app.get("/healthz", summary="Liveness")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: at least one backend is available")
    async def readyz() -> JSONResponse:
        ready = gateway.pool.ready()
        body = {"status": "ready" if ready else "unavailable", "backends": gateway.pool.status()}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get(
        "/debug/requests",
        response_class=HTMLResponse,
        responses=error_responses(400, 401, 403),
        dependencies=admin,
        summary="Waterfall of recent requests (admin; browsers may use Basic auth with the key as password)",
    )
    async def debug_requests(
        limit: Annotated[int, Query(ge=1, le=100_000, description="Rows (newest first).")] = 50,
        axis: Annotated[
            Literal["request", "ttft"], Query(description="Time axis: whole requests or TTFT.")
        ] = "request",
        wanted: Annotated[str | None, Query(alias="id", max_length=128, description=_ID_HELP)] = None,
    ) -> HTMLResponse:
        limit, wanted = min(limit, config.debug.waterfall_requests), wanted or None  # ?id= (empty): every request
        html = render_html(waterfall.recent(limit, wanted=wanted), axis=axis, limit=limit, wanted=wanted)
        return HTMLResponse(html, headers=PAGE_HEADERS)

    @app.get(
        "/debug/requests.json",
        responses=error_responses(400, 401, 403),
        dependencies=admin,
        summary="Recent requests as JSON (admin)",
    )
    async def debug_requests_json(
        limit: Annotated[int, Query(ge=1, le=100_000, description="Records (newest first).")] = 200,
        wanted: Annotated[str | None, Query(alias="id", max_length=128, description=_ID_HELP)] = None,
    ) -> JSONResponse:
        limit, wanted = min(limit, config.debug.waterfall_requests), wanted or None  # ?id= (empty): every request
        return JSONResponse(to_json(waterfall.recent(limit, wanted=wanted)), headers={"cache-control": "no-store"})

    @app.post(
        "/admin/prompt-cache/flush",
        responses=error_responses(400, 401, 403, 408, 413),
        openapi_extra=flush_schema,
        dependencies=admin,
        summary="Invalidate cached prefixes of one tenant or everyone (admin)",
    )
    async def flush_prompt_cache(request: Request) -> dict[str, Any]:
        raw = await gateway.read_body(request)  # bounded by limits.max_body_bytes, as every other body
        body = FlushRequest()
        if raw:  # no body flushes everyone, as `{}` does; whitespace alone is no JSON (400, as the schema says)
            data = errors.parse_json_object(raw)
            try:
                body = FlushRequest.model_validate(data)
            except ValidationError as exc:
                raise errors.from_validation_error(exc) from None
        gateway.prompt_cache.flush(body.tenant)
        gateway.publish_index_blocks()
        log.info("prompt cache flushed (%s)", "one tenant" if body.tenant else "all tenants")
        return {"flushed": True, "tenant": body.tenant}

    @app.post(
        "/admin/reload",
        responses=error_responses(400, 401, 403),
        dependencies=admin,
        summary="Apply the changed configuration file: API keys, limits and routes (admin)",
    )
    async def reload_configuration() -> dict[str, Any]:
        try:
            change = reloader.reload("POST /admin/reload")
        except ReloadError as exc:
            raise APIError(400, f"Configuration not reloaded: {exc}", code="reload_failed") from None
        return change.to_dict()

    sinks: list[Any] = [waterfall]
    if ledger is not None:
        sinks.append(ledger)
    instrument_app(
        app,
        registry=registry,
        tracer_provider=tracer_provider,
        meter_provider=otel.meter_provider if otel is not None else None,
        usage_sink=sinks,
        excluded_paths=EXCLUDED_PATHS,
        trust_request_id=config.listen.trust_request_id,
        catalog=STAGES if config.stage_catalog is None else load_catalog(config.stage_catalog),
    )
    metrics = GatewayMetrics(app.state.llmpath.metric)
    gateway.bind_metrics(metrics)

    def after_reload(success: bool) -> None:
        metrics.config_reload(success)
        if success:
            app.openapi_schema = None  # it documents the routes and limits

    reloader.on_result = after_reload
    app.openapi = _with_components(app, defs, lambda: gateway.config)  # type: ignore[method-assign]
    return HotPath(app)


class HotPath:
    """The gateway's ASGI app: ``POST /v1/chat/completions`` and ``/v1/completions`` go straight to
    :meth:`Gateway.handle` under the llmpath middleware; everything else (and those paths with any other method)
    to the FastAPI app, which also documents the two endpoints in its OpenAPI schema.

    FastAPI's middleware stack, routing and dependency resolution cost about a fifth of the gateway's CPU per
    streamed request (docs/gateway.md, Performance); the two endpoints need none of it. Errors are answered as
    the FastAPI app's handlers answer them, and the request's route template is the FastAPI route's, so spans,
    metrics and usage records are the same either way.
    """

    def __init__(self, app: FastAPI) -> None:
        self.app = app
        self.gateway: Gateway = app.state.gateway
        self.state = app.state
        routes = {route.path: route for route in app.routes if isinstance(route, APIRoute)}
        self._hot = {path: (kind, routes[path]) for path, kind in HOT_ENDPOINTS.items()}
        self._instrumented = LLMPathMiddleware(self._serve, instrumentation=get_instrumentation(app))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            hot = self._hot.get(scope["path"])
            if hot is not None:
                scope["route"] = hot[1]  # as FastAPI's router sets it (the instrumentation reads the template)
                await self._instrumented(scope, receive, send)
                return
        await self.app(scope, receive, send)

    async def _serve(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = self._hot[scope["path"]][0]
        try:
            response = await self.gateway.handle(Request(scope, receive), kind)
        except APIError as exc:
            response = exc.response()
        except ClientDisconnect:  # gone while its body arrived or while it waited for admission: nobody to answer
            annotate_request(client_disconnect=True)
            with contextlib.suppress(OSError):
                await send({"type": "http.response.start", "status": 499, "headers": []})  # recorded as 499
                await send({"type": "http.response.body", "body": b""})
            return
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if not self.gateway.draining or task is None:
                raise
            task.uncancel()  # still queued (or assembling) when the drain time ended: retry elsewhere
            annotate_request(shutdown=True)
            response = errors.shutting_down().response()
        except Exception:
            log.exception("unexpected error serving POST %s", scope["path"])
            response = internal_error().response()
        await response(scope, receive, send)


#: The endpoints :class:`HotPath` serves itself, and the request kind of each.
HOT_ENDPOINTS = {"/v1/chat/completions": "chat", "/v1/completions": "text"}


def _hang_up(ledger: Any, reloader: ConfigReloader) -> None:
    """``SIGHUP``: reopen the usage ledger (after logrotate moved it, the next record starts a new file), then
    reload the configuration file if there is one (failures are logged and counted by the reloader)."""
    if ledger is not None:
        ledger.close()  # the next record opens the path again
        log.info("usage ledger reopened (SIGHUP)")
    if reloader.load is None:
        log.info("SIGHUP: no configuration file to reload (started without --config)")
        return
    with contextlib.suppress(ReloadError):
        reloader.reload("SIGHUP")


def _install_sighup(loop: asyncio.AbstractEventLoop, handler: Callable[[], None]) -> bool:
    """Run ``handler`` on ``SIGHUP`` (where signals can be handled); returns whether it is installed."""
    try:
        loop.add_signal_handler(signal.SIGHUP, handler)
    except (NotImplementedError, RuntimeError, ValueError, AttributeError):  # no SIGHUP (Windows), not the main thread
        return False
    return True


def _admin_dependency(gateway: Gateway) -> Callable[[Request], None]:
    def require_admin(request: Request) -> None:
        try:
            gateway.authenticate(request, admin=True)
        except APIError as exc:
            if exc.status_code == 401 and request.method in BASIC_AUTH_METHODS:  # a browser asks for the key
                exc.headers["WWW-Authenticate"] = 'Basic realm="llmpath gateway admin", charset="UTF-8"'
            raise

    return require_admin


async def _expire_loop(gateway: Gateway, interval_s: float = 30.0) -> None:
    while True:
        await asyncio.sleep(interval_s)
        gateway.prompt_cache.index.expire()
        gateway.publish_index_blocks()  # and after ejections, which forget a backend's blocks


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        loc = [str(p) for p in err.get("loc", ()) if p not in ("query", "body", "path", "header")]
        param = ".".join(loc) or None
        return APIError(400, f"{err.get('msg', 'invalid request')}: '{param}'.", param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
        return err.response()

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return internal_error().response()


def internal_error() -> APIError:
    return APIError(500, "Internal server error.", type="server_error", code="internal_error")
