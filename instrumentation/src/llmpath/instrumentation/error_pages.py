"""The request id on the 500 page Starlette writes for an exception that no handler caught.

Starlette's ``ServerErrorMiddleware`` sits outside all user middleware (opentelemetry-instrumentation-fastapi
relies on that), so llmpath's middleware never sees the page it sends. :func:`instrument_app` therefore wraps the
500 handler of every ``ServerErrorMiddleware`` outside llmpath's middleware: the page (Starlette's default or the
app's own ``500``/``Exception`` handler) gets the ``x-request-id`` of the request's usage record unless the handler
set one. Debug mode's traceback page is left as it is. Imported only for Starlette apps (it needs Starlette).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.middleware.errors import ServerErrorMiddleware
from starlette.requests import Request
from starlette.responses import Response

from llmpath.instrumentation.catalog import REQUEST_ID_HEADER
from llmpath.instrumentation.middleware import FAILED_REQUEST_ID_KEY, LLMPathMiddleware

Handler = Callable[..., Any]  # Starlette's exception handler (its own type is a union)


def tag_error_pages(stack: Any) -> None:
    """Give the 500 pages of the ``ServerErrorMiddleware`` layers above llmpath's middleware in ``stack`` (an
    app's built middleware stack) the failed request's id."""
    node = stack
    while node is not None and not isinstance(node, LLMPathMiddleware):
        if isinstance(node, ServerErrorMiddleware) and not getattr(node.handler, "_llmpath_request_id", False):
            node.handler = _with_request_id(node.handler, node.error_response)
        node = getattr(node, "app", None)


def _with_request_id(
    handler: Handler | None, default: Callable[[Request, Exception], Response]
) -> Callable[[Request, Exception], Awaitable[Response]]:
    async def handle(request: Request, exc: Exception) -> Response:
        if handler is None:
            response = default(request, exc)
        elif _is_async(handler):
            response = await handler(request, exc)
        else:
            response = await run_in_threadpool(handler, request, exc)
        request_id = request.scope.get(FAILED_REQUEST_ID_KEY)
        if request_id is not None and REQUEST_ID_HEADER not in response.headers:
            response.headers[REQUEST_ID_HEADER] = request_id
        return response

    handle._llmpath_request_id = True  # type: ignore[attr-defined]
    return handle


def _is_async(handler: Any) -> bool:
    """Whether ``ServerErrorMiddleware`` would await ``handler`` (Starlette's own test: partials unwrapped)."""
    while isinstance(handler, functools.partial):
        handler = handler.func
    return inspect.iscoroutinefunction(handler) or (callable(handler) and inspect.iscoroutinefunction(handler.__call__))
