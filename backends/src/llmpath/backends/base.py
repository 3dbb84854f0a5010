"""The Backend interface: one async, streaming protocol every model server adapter implements.

A backend takes a normalized :class:`BackendRequest` and yields typed events in this order::

    Scheduled → FirstToken → TokenDelta* → Done

``Scheduled`` and ``FirstToken`` may arrive together (SGLang reports queue time with its first chunk).
Failures raise one of the :class:`BackendError` subclasses; ``BackendUnavailable`` raised before any
event was yielded means the request can safely be retried on another backend.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, runtime_checkable


class TimingSource(StrEnum):
    """Where a stage timing came from: the backend's own clock, or the gateway's clock around the call."""

    BACKEND = "backend"
    GATEWAY = "gateway"


@dataclass(slots=True)
class ChatMessage:
    role: str
    content: str


@dataclass(slots=True)
class SamplingParams:
    max_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False


@dataclass(slots=True)
class BackendRequest:
    """A normalized generation request. Exactly one of ``messages``, ``prompt`` or ``input_ids`` is set."""

    request_id: str
    model: str
    messages: list[ChatMessage] | None = None
    prompt: str | None = None
    input_ids: list[int] | None = None
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stream: bool = True
    #: Isolates cached prefixes per tenant (SGLang ``cache_salt``).
    cache_salt: str | None = None
    #: W3C trace context headers (``traceparent``, ``tracestate``) to propagate.
    trace_headers: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        given = sum(x is not None for x in (self.messages, self.prompt, self.input_ids))
        if given != 1:
            raise ValueError("exactly one of messages, prompt or input_ids must be set")


@dataclass(slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    #: Of ``completion_tokens``, those a reasoning model spent thinking (``completion_tokens_details``).
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(slots=True)
class Scheduled:
    """The backend took the request off its queue and started prefill."""

    queue_seconds: float
    source: TimingSource


@dataclass(slots=True)
class FirstToken:
    """The first output token is ready."""

    prefill_seconds: float
    prompt_tokens: int
    cached_tokens: int
    source: TimingSource


@dataclass(slots=True)
class TokenDelta:
    """New output text (a delta, never cumulative) and the number of tokens it covers. ``reasoning`` is new text of
    a reasoning model's thinking, which servers with a reasoning parser stream apart from the answer (OpenAI-
    compatible ``reasoning_content`` or ``reasoning``); a delta may carry either or both."""

    text: str
    num_tokens: int = 1
    reasoning: str = ""


@dataclass(slots=True)
class BackendTimings:
    """Per-request timings as the backend reported them (seconds); ``None`` where not reported."""

    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    first_token_seconds: float | None = None
    e2e_seconds: float | None = None
    source: TimingSource = TimingSource.GATEWAY
    #: From receiving the request to handing it to the scheduler's queue (SGLang: tokenize + dispatch,
    #: ``api_server_dispatch_finish_ts − request_received_ts``; reported with the final output only).
    dispatch_seconds: float | None = None


@dataclass(slots=True)
class Done:
    usage: Usage
    finish_reason: str  # "stop" | "length" ("abort": an answer cut short, which the gateway fails)
    timings: BackendTimings
    #: The model that generated the response, when the backend says (OpenAI-compatible servers; SGLang's
    #: ``/generate`` does not).
    response_model: str | None = None
    #: False when the server reported no usage (an OpenAI-compatible server that ignores
    #: ``stream_options.include_usage``): ``usage`` then has 0 prompt tokens and the streamed chunks as completion
    #: tokens, and a caller should estimate the prompt.
    usage_reported: bool = True


BackendEvent = Scheduled | FirstToken | TokenDelta | Done


class BackendError(Exception):
    """Base class of backend failures."""

    #: HTTP status the gateway should answer with.
    status_code: int = 502


class BackendUnavailable(BackendError):
    """Connection refused/reset or the backend answered 503/429: retry elsewhere if nothing was streamed yet."""

    status_code = 503

    def __init__(self, message: str = "backend unavailable", retry_after: float | None = None) -> None:
        super().__init__(message)
        #: Seconds from the backend's ``Retry-After`` header, when it sent one.
        self.retry_after = retry_after


class BackendUnreachable(BackendUnavailable):
    """No HTTP answer at all: the connection was refused, not made within the connect timeout, or reset or closed
    before (or while) the response came.

    Unlike a busy backend's 503/429, this counts as a failure of the backend (health, ejection).
    """


class BackendAborted(BackendUnavailable):
    """The backend aborted the request itself, with no error status (SGLang's ``finish_reason`` ``abort``: an
    operator's ``/abort_request``, ``abort_all`` around a weight update): the output was cut short, so it is no
    answer. Retried elsewhere when nothing was sent to the client yet, like a busy backend (it does not count toward
    ejection)."""

    def __init__(self, message: str = "the backend aborted the request") -> None:
        super().__init__(message)


class BackendTimeout(BackendError):
    """Read timeout (the backend silent too long), or the backend's own 408/504; a connect timeout is
    :class:`BackendUnreachable`."""

    status_code = 504


class BackendProtocolError(BackendError):
    """The backend answered something that does not follow its protocol."""

    status_code = 502


class BackendServerError(BackendError):
    """The backend answered a 5xx other than 503 (an internal error), or refused the caller's own credentials
    (401, 403, 407): the request failed there, not through the client's fault."""

    status_code = 502

    def __init__(self, message: str, upstream_status: int = 500) -> None:
        super().__init__(message)
        #: The status the backend answered with.
        self.upstream_status = upstream_status


#: OpenAI's error code for a prompt (plus ``max_tokens``) that does not fit the model's context.
CONTEXT_LENGTH_EXCEEDED = "context_length_exceeded"
#: How servers word that rejection without the code: SGLang ("longer than the model's context length", "exceeds the
#: model's maximum context length"), vLLM ("This model's maximum context length is ..."), llama.cpp ("exceeds the
#: available context size").
_CONTEXT_LENGTH_WORDING = re.compile(r"context (length|size|window)", re.IGNORECASE)


class BackendBadRequest(BackendError):
    """The backend rejected the request (4xx); the client's fault, never retried.

    ``code`` is the backend's OpenAI error code; a rejection worded as a context-length one gets
    :data:`CONTEXT_LENGTH_EXCEEDED` when the backend gave no code (SGLang never does).
    """

    def __init__(self, message: str, status_code: int = 400, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.param = param
        if code is None and _CONTEXT_LENGTH_WORDING.search(message):
            code = CONTEXT_LENGTH_EXCEEDED
        self.code = code


@runtime_checkable
class Backend(Protocol):
    """A model server adapter."""

    #: Stable short name used in metrics and spans (e.g. ``"engine-0"`` or the URL).
    name: str
    url: str
    #: Where this backend's stage timings come from.
    timing_source: TimingSource

    def generate(self, request: BackendRequest) -> AsyncIterator[BackendEvent]:
        """Run one request, yielding events; cancelling the iteration aborts the request at the backend."""
        ...

    async def health(self) -> bool:
        """True when the backend answers its health check."""
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...
