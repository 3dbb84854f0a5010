"""OpenAI-style errors: ``{"error": {"message", "type", "param", "code"}}`` with the right HTTP status.

Messages never contain prompt text or keys: they name the field (``param``) and the rule that failed.
"""

from __future__ import annotations

import json
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.responses import JSONResponse

from llmpath.gateway.schemas import REFUSED
from llmpath.instrumentation import fail_request


class APIError(Exception):
    """An error answered to the client; ``headers`` are added to the response (e.g. ``Retry-After``)."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        """The OpenAI-style error response (see :meth:`record`)."""
        self.record()
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)

    def record(self) -> None:
        """A server error (5xx) names its code as the request's error in the usage record and the metrics, so that
        the ledger tells ``no_backend`` from ``backend_timeout`` or ``shutting_down``; a client's error (4xx) is not
        the service's failure and keeps none."""
        if self.status_code >= 500:
            fail_request(self.status_code, self.code or self.type)

    def sse_event(self) -> bytes:
        """The error as one SSE event (for failures after a stream has started)."""
        return b"data: " + json.dumps(self.body()).encode() + b"\n\n"


def unauthorized() -> APIError:
    # No detail on purpose: the same answer for a missing, malformed or unknown key.
    return APIError(401, "Invalid or missing API key.", type="authentication_error", code="invalid_api_key")


def forbidden() -> APIError:
    return APIError(403, "This API key may not use this endpoint.", type="permission_error", code="forbidden")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"Request body exceeds the limit of {limit} bytes.", code="request_too_large")


def body_timeout(seconds: float) -> APIError:
    # Connection: close — the rest of a stalled body must not be read as the next request.
    return APIError(
        408,
        f"The request body did not arrive within {seconds:g} s.",
        code="request_timeout",
        headers={"Connection": "close"},
    )


def invalid_json(reason: str) -> APIError:
    return APIError(400, f"The request body is not valid JSON: {reason}.", code="invalid_json")


def parse_json(raw: bytes) -> Any:
    """A request body's JSON (400 ``invalid_json`` when it is empty or not JSON)."""
    if not raw.strip():
        raise invalid_json("the body is empty")
    try:
        return orjson.loads(raw)  # also refuses invalid UTF-8 and nesting deeper than 1024
    except orjson.JSONDecodeError as exc:
        raise invalid_json(exc.msg) from None


def parse_json_object(raw: bytes) -> dict[str, Any]:
    """A request body that must be a JSON object (400 ``invalid_json``, or ``invalid_type`` for another value)."""
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
    return body


def limit_exceeded(param: str, message: str) -> APIError:
    return APIError(422, message, param=param, code="limit_exceeded")


def context_length_exceeded(kind: str, message: str) -> APIError:
    """A 400 as OpenAI answers a prompt too long for the model (``param`` ``messages``, or ``prompt`` for
    ``kind="text"``), whether the gateway's ``max_prompt_tokens`` or the backend refused it."""
    return APIError(400, message, param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model {model!r} does not exist or you do not have access to it.",
        param="model",
        code="model_not_found",
    )


def rate_limited(message: str, retry_after_s: float, code: str) -> APIError:
    seconds = max(1, int(retry_after_s + 0.999))
    return APIError(429, message, type="rate_limit_error", code=code, headers={"Retry-After": str(seconds)})


def no_backend(message: str = "No healthy backend is available.") -> APIError:
    return APIError(503, message, type="service_unavailable", code="no_backend", headers={"Retry-After": "1"})


def shutting_down() -> APIError:
    return APIError(
        503,
        "The gateway is shutting down; retry the request.",
        type="service_unavailable",
        code="shutting_down",
        headers={"Retry-After": "1"},
    )


def from_validation_error(exc: ValidationError) -> APIError:
    """A 400 naming the first invalid field as OpenAI does (``messages[0].role``)."""
    err = exc.errors(include_url=False, include_input=False)[0]
    param = _param_path(err["loc"])
    if err["type"] == REFUSED:  # carries its own param (under the error's location) and code
        ctx = err["ctx"]
        rel = ctx["param"]
        param = f"{param}{rel}" if rel.startswith("[") or not param else f"{param}.{rel}"
        return APIError(400, ctx["message"], param=param, code=ctx["code"])
    msg = err["msg"]
    if err["type"] == "missing":
        msg = "Missing required parameter"
    elif err["type"] == "extra_forbidden":
        msg = "Unrecognized request argument supplied"
    detail = f"{msg}: '{param}'." if param else f"{msg}."
    return APIError(400, detail, param=param or None, code="invalid_value" if err["type"] != "missing" else "missing")


def _param_path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif isinstance(part, str) and (part.startswith("function-") or part in {"str", "list[...]"}):
            continue  # pydantic's union/validator branch names are not fields
        else:
            out += f".{part}" if out else str(part)
    return out
