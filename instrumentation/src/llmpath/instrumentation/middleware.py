"""Pure ASGI middleware: one SERVER span, stage timeline, metrics and one usage record per request."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from time import perf_counter
from typing import Any

from llmpath.instrumentation.catalog import REQUEST_ID_HEADER
from llmpath.instrumentation.exposition import serve_metrics
from llmpath.instrumentation.request import CLIENT_CLOSED_REQUEST, CURRENT
from llmpath.instrumentation.telemetry import Instrumentation

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_REQUEST_ID_KEY = REQUEST_ID_HEADER.encode()
#: Where the middleware leaves a failed request's id in the ASGI scope for the 500 page written outside it
#: (:mod:`llmpath.instrumentation.error_pages`).
FAILED_REQUEST_ID_KEY = "llmpath.failed_request_id"


class LLMPathMiddleware:
    """llmpath for any ASGI app: ``LLMPathMiddleware(app, **options)`` with :func:`instrument_app`'s options.

    Serves ``metrics_path`` itself; passes websocket traffic and excluded paths through untouched; on lifespan
    shutdown closes the usage sinks (and marks the worker dead in prometheus-client multiprocess mode).
    """

    def __init__(self, app: ASGIApp, *, instrumentation: Instrumentation | None = None, **options: Any) -> None:
        if instrumentation is not None and options:
            raise TypeError("pass either instrumentation= or options, not both")
        self.app = app
        self.instrumentation = instrumentation if instrumentation is not None else Instrumentation(**options)
        if self.instrumentation.route_templates.app is None:  # instrument_app names the app itself
            self.instrumentation.route_templates.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind != "http":
            if kind == "lifespan":
                await self._lifespan(scope, receive, send)
            else:
                await self.app(scope, receive, send)
            return
        instr = self.instrumentation
        path = scope["path"]
        root = scope.get("root_path")
        if root and path.startswith(root):  # uvicorn's path includes the root path; hypercorn's and granian's not
            path = _app_path(path, root)
        if path == instr.metrics_path:
            await serve_metrics(instr.registry, scope, send)
            return
        if instr.is_excluded(path) or CURRENT.get() is not None:
            await self.app(scope, receive, send)
            return

        req, ctx_token = instr.start_request(scope)  # type: ignore[arg-type]
        var_token = CURRENT.set(req)
        request_id = req.request_id.encode("latin-1")
        #: The client is gone: a send failed, or the app (or its framework) received ``http.disconnect``.
        disconnected: list[bool] = []

        async def receive_watching() -> Message:
            message = await receive()
            if message["type"] == "http.disconnect" and not req.finished:
                disconnected.append(True)
            return message

        async def send_with_telemetry(message: Message) -> None:
            kind = message["type"]
            if kind == "http.response.body":
                # An error body (401, 429, ...) is not a token: only a 2xx body counts as the first token
                # (mark_first_token() counts whatever the status); nor is the body of a HEAD response, which the
                # server does not send.
                first = req.first_token is None and message.get("body") and 200 <= req.status_code < 300
                if first and req.method != "HEAD":
                    req.first_token = perf_counter()
                if not message.get("more_body", False):
                    if disconnected:  # a framework that saw the client leave may still end the response normally
                        req.status_code, req.error = CLIENT_CLOSED_REQUEST, "client_disconnect"
                    instr.finish(req)  # before the last byte leaves: a completed response is always recorded
            elif kind == "http.response.start":
                status = req.status_code = req.response_status = message["status"]
                req.response_started = True
                if status == CLIENT_CLOSED_REQUEST and req.error is None:  # an app recording a client that left
                    req.error = "client_disconnect"
                # An error page sent while an exception is being handled (a handler inside this middleware that
                # turns exceptions into responses): its class is the request's error type, unless the exception
                # is the HTTP error itself (HTTPException(503), a gateway's own API error).
                # Frameworks that send their error page after the except block (Django, Quart, Falcon) leave no
                # exception to see: then an exception that escaped a stage names the error.
                if status >= 500 and req.error is None:
                    handled = sys.exc_info()[1]
                    if handled is not None:
                        if getattr(handled, "status_code", None) != status:
                            req.error = type(handled).__qualname__
                    elif req.stage_error is not None and req.stage_error[1] != status:
                        req.error = req.stage_error[0]
                headers = message.get("headers") or []
                for key, _ in headers:  # ASGI header names are lowercase
                    if key == _REQUEST_ID_KEY:
                        break
                else:
                    message = {**message, "headers": [*headers, (_REQUEST_ID_KEY, request_id)]}
            elif kind == "http.response.pathsend":
                instr.finish(req)
            try:
                await send(message)
            except OSError:  # the server could not deliver it: the client is gone
                disconnected.append(True)
                raise

        try:
            await self.app(scope, receive_watching, send_with_telemetry)
        except BaseException as exc:
            scope[FAILED_REQUEST_ID_KEY] = req.request_id
            if not req.finished:
                _classify_failure(req, exc, bool(disconnected))
                instr.finish(req)
            elif isinstance(exc, Exception):  # work after the complete response failed (a background task)
                instr.note_failure_after_response(req, exc)
            raise
        else:
            if not req.finished:
                # The app returned without completing the response: the client went away mid-stream (or the
                # app never answered, which the server turns into a 500).
                if req.response_started:
                    req.status_code, req.error = CLIENT_CLOSED_REQUEST, "client_disconnect"
                else:
                    req.status_code, req.error = 500, "no_response"
                instr.finish(req)
        finally:
            CURRENT.reset(var_token)
            instr.close(req, ctx_token)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def send_and_watch(message: Message) -> None:
            if message["type"] in ("lifespan.shutdown.complete", "lifespan.shutdown.failed"):
                self.instrumentation.shutdown()
            await send(message)

        await self.app(scope, receive, send_and_watch)


def _app_path(path: str, root: str) -> str:
    """``path`` without the server's ``root_path`` prefix (``/gw/metrics`` → ``/metrics``; ``/gwx`` stays)."""
    rest = path[len(root) :]
    if not rest:
        return "/"
    return rest if rest[0] == "/" else path


def _classify_failure(req: Any, exc: BaseException, send_failed: bool) -> None:
    """Status and error type of a request the app failed (content-free: the exception's class name only)."""
    if isinstance(exc, asyncio.CancelledError):
        req.status_code, req.error = CLIENT_CLOSED_REQUEST, "cancelled"
        return
    if send_failed or type(exc).__name__ == "ClientDisconnect":  # starlette.requests.ClientDisconnect
        req.status_code, req.error = CLIENT_CLOSED_REQUEST, "client_disconnect"
        return
    # Before the response started the server sends a 500; after it (a streamed body that raised), the client gets a
    # cut-off response: it counts as a 500 too (the spans keep the status that was sent), as with fail_request.
    req.status_code = 500
    req.error = type(exc).__qualname__


def instrument_app(app: Any, **options: Any) -> Any:
    """Instrument a FastAPI or Starlette app in place (returns it), or wrap any other ASGI app (returns the
    wrapper). Options: ``registry``, ``tracer_provider``, ``meter_provider``, ``usage_sink``, ``metrics_path``,
    ``catalog``, ``excluded_paths``, ``max_label_values``, ``latency_buckets``, ``tpot_buckets``, ``exemplars``,
    ``trust_request_id``, ``fast_spans`` (see :class:`~llmpath.instrumentation.telemetry.Instrumentation`).

    The :class:`Instrumentation` is ``app.state.llmpath`` (and :func:`get_instrumentation` finds it).
    """
    instrumentation = Instrumentation(**options)
    instrumentation.route_templates.app = app  # its mounts' templates name mounted apps' routes
    if hasattr(app, "add_middleware") and hasattr(app, "state"):
        # Inside Starlette's ServerErrorMiddleware, as user middleware: opentelemetry-instrumentation-fastapi
        # rebuilds the stack around what is inside it, whichever of the two instruments the app first.
        app.add_middleware(LLMPathMiddleware, instrumentation=instrumentation)
        app.state.llmpath = instrumentation
        if hasattr(app, "build_middleware_stack"):  # Starlette's
            _adapt_when_built(app, instrumentation)
        return app
    return LLMPathMiddleware(app, instrumentation=instrumentation)


def _adapt_when_built(app: Any, instrumentation: Instrumentation) -> None:
    """Each time the app's stack is built: put the request id on the 500 page of an uncaught exception, and note
    whether opentelemetry-instrumentation-fastapi (applied before or after llmpath) records the HTTP metrics."""
    from llmpath.instrumentation.error_pages import tag_error_pages  # needs Starlette

    build = app.build_middleware_stack

    def build_middleware_stack() -> Any:
        stack = build()
        tag_error_pages(stack)
        instrumentation.outer_http_instrumentation = bool(getattr(app, "_is_instrumented_by_opentelemetry", False))
        return stack

    app.build_middleware_stack = build_middleware_stack


def get_instrumentation(app: Any) -> Instrumentation:
    """The :class:`Instrumentation` of an app instrumented by :func:`instrument_app` (or the middleware)."""
    if isinstance(app, LLMPathMiddleware):
        return app.instrumentation
    found = getattr(getattr(app, "state", None), "llmpath", None)
    if not isinstance(found, Instrumentation):
        raise LookupError(f"{app!r} is not instrumented by llmpath (call instrument_app first)")
    return found
