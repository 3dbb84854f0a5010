"""The backend call of an admitted request, as an ASGI response: connect (retrying elsewhere when the connection
fails before the first event, and, for a complete answer, when the backend goes away or aborts it before anything
reached the client), then relay the backend's events to the client as SSE chunks or one JSON body, turning
them into the ``prefill``, ``decode`` and backend ``schedule`` stages, the model-call span and the usage record.
It runs in the endpoint's task, so the model-call span and the trace context stay intact to the last byte.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import traceback
from collections.abc import AsyncIterator, Callable, MutableMapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import orjson
from opentelemetry import context as otel_context
from starlette.responses import Response

from llmpath.backends.base import (
    CONTEXT_LENGTH_EXCEEDED,
    BackendAborted,
    BackendBadRequest,
    BackendError,
    BackendEvent,
    BackendProtocolError,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
    Done,
    FirstToken,
    Scheduled,
    TimingSource,
    TokenDelta,
    Usage,
)
from llmpath.gateway import errors
from llmpath.gateway.errors import APIError
from llmpath.gateway.openai_format import SSE_DONE, openai_finish_reason
from llmpath.instrumentation import (
    ModelCallSpan,
    annotate_request,
    fail_request,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    stage,
)

if TYPE_CHECKING:
    from llmpath.gateway.service import Gateway, Prepared

log = logging.getLogger("llmpath.gateway")


Scope = MutableMapping[str, Any]


class BackendCallResponse(Response):
    """The backend call as an ASGI response: connects (retrying on connection failure), then streams SSE or
    sends one JSON body. A client disconnect cancels the backend request."""

    def __init__(self, gateway: Gateway, prepared: Prepared) -> None:
        self.gateway = gateway
        self.p = prepared
        self.status_code = 200
        self.background = None
        self._finished = False
        self._disconnected = False
        self._started = False
        #: The backend answering, once its first event came.
        self._backend: str | None = None
        #: The OTel context of the request, outside the model-call spans (set when the call starts).
        self._request_context: otel_context.Context = otel_context.Context()

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        main = asyncio.current_task()
        assert main is not None

        async def watch_disconnect() -> None:
            await wait_for_disconnect(receive)
            if not self._finished:
                self._disconnected = True
                main.cancel()

        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            await self._run(send)
        except asyncio.CancelledError:
            if self._disconnected:
                main.uncancel()
                annotate_request(client_disconnect=True)
                if not self._started:  # nobody will read it; it records the request as closed by the client (499)
                    with contextlib.suppress(OSError):
                        await send({"type": "http.response.start", "status": 499, "headers": []})
                        await send({"type": "http.response.body", "body": b""})
            elif self.gateway.draining:  # the drain time is over: tell the client to retry elsewhere
                main.uncancel()
                annotate_request(shutdown=True)
                with contextlib.suppress(OSError):
                    await self._end_early(send, errors.shutting_down())
            else:
                raise
        finally:
            watcher.cancel()
            self.gateway.release(self.p)

    async def _run(self, send: Any) -> None:
        self._request_context = otel_context.get_current()  # the request's, outside every model-call span
        while True:
            try:
                scope, call, events = await self._connect()
            except APIError as exc:
                await self._send_error(send, exc)
                return
            tracker = _Tracker(self.gateway, self.p, call)
            retried = False
            with scope:  # the model-call span, current from connect to the last event
                try:
                    if self.p.stream:
                        await self._stream(send, tracker, events)
                    else:
                        retried = await self._complete(send, tracker, events)
                finally:
                    if not retried:  # cut short (client gone, shutdown, backend error): account for what was made
                        tracker.settle()
                    await events.aclose()
            if not retried:
                return

    async def _connect(self) -> tuple[contextlib.ExitStack, ModelCallSpan, _Prefetched]:
        """Open the backend stream and wait for its first event; retry elsewhere on connection failure."""
        gw, p = self.gateway, self.p
        retry_after = 0.0
        while True:
            state = gw.pool[p.decision.backend]
            scope = contextlib.ExitStack()
            call = scope.enter_context(
                model_call_span(
                    p.backend_model,
                    provider=state.config.kind,
                    server_address=state.config.url.host,
                    server_port=state.config.url.port,
                    stream=p.stream,
                    operation="chat" if p.kind == "chat" else "text_completion",
                    max_tokens=p.sampling.max_tokens,
                    temperature=p.sampling.temperature,
                    top_p=p.sampling.top_p,
                )
            )
            events = _Prefetched(state.backend.generate(gw.backend_request(p)))
            try:
                await events.prefetch()
            except BackendUnavailable as exc:
                await events.aclose()
                call.set_error("unavailable")
                scope.close()
                if isinstance(exc, BackendUnreachable):  # no answer at all: counts toward ejection
                    gw.pool.report_failure(state.name, f"connection failed: {type(exc.__cause__).__name__}")
                if exc.retry_after is not None:  # a busy backend's own Retry-After (429/503): the longest one
                    retry_after = max(retry_after, exc.retry_after)
                error = self._route_elsewhere(state.name, exc)
                if error is not None:  # no retries left, or no other backend: a busy one's own wait, if longer
                    error.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
                    raise error from None
                continue
            except BackendError as exc:
                await events.aclose()
                call.set_error(type(exc).__name__)
                scope.close()
                self._report_failure(state.name, exc, mid_answer=False)
                raise _api_error(exc, p.kind) from None
            except BaseException as exc:
                await events.aclose()
                scope.__exit__(type(exc), exc, exc.__traceback__)
                raise
            self._backend = state.name  # its success is reported with the whole answer (_report_answer)
            return scope, call, events

    def _route_elsewhere(self, backend: str, exc: BackendUnavailable, *, mid_answer: bool = False) -> APIError | None:
        """After ``backend`` failed ``exc`` (nothing reached the client): route the request to another backend
        within ``routing.max_retries``; the client's error when no retry is left or no other backend can take it."""
        gw, p = self.gateway, self.p
        p.tried.append(backend)
        # A connection that failed is worth a WARNING, an operator's abort (a weight update) a line; a busy
        # backend's 503 is frequent under overload, and in its own metrics.
        if isinstance(exc, BackendUnreachable):
            cause = type(exc.__cause__).__name__
            reason = f"connection lost mid-answer: {cause}" if mid_answer else f"connection failed: {cause}"
            level = logging.WARNING
        elif isinstance(exc, BackendAborted):
            reason, level = "aborted the request", logging.INFO
        else:
            reason, level = "busy", logging.DEBUG
        gw.release_backend(p)
        if len(p.tried) > gw.config.routing.max_retries:
            log.log(level, "backend %s: %s; no retries left (routing.max_retries)", backend, reason)
            return errors.no_backend("Every backend tried failed; retry later.")
        # Mid-answer the failed model-call span is still current: the retry's route stage is the request's, as
        # before the first event (sibling of the model-call spans, not a child of the failed one).
        token = otel_context.attach(self._request_context) if mid_answer else None
        try:
            with stage("route") as st:
                gw.route_request(p, st, retry=True)
        except APIError as error:
            log.log(level, "backend %s: %s; no other backend to try", backend, reason)
            return error
        finally:
            if token is not None:
                otel_context.detach(token)
        log.log(level, "backend %s: %s; retrying on %s", backend, reason, p.decision.backend)
        return None

    def _report_failure(self, backend: str, exc: BackendError, *, mid_answer: bool) -> None:
        """Consecutive 5xx answers and answers that break the protocol eject, like outlier detection — before the
        first event or in the middle of the answer alike; so does a connection lost mid-answer (the process died;
        before the first event it is retried elsewhere and counted by :meth:`_connect`)."""
        if isinstance(exc, BackendServerError):
            self.gateway.pool.report_failure(backend, f"answered {exc.upstream_status}")
        elif isinstance(exc, BackendProtocolError):
            self.gateway.pool.report_failure(backend, "answered outside its protocol")
        elif isinstance(exc, BackendUnreachable) and mid_answer:
            self.gateway.pool.report_failure(backend, "connection lost mid-answer")

    def _report_answer(self) -> None:
        """A whole answer resets the backend's failure count (its first event would hide failures that come later
        in every answer)."""
        assert self._backend is not None  # set when the first event came
        self.gateway.pool.report_answer(self._backend)

    async def _stream(self, send: Any, tracker: _Tracker, events: AsyncIterator[BackendEvent]) -> None:
        p, fmt, call = self.p, self.p.fmt, tracker.call
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [
                    (b"content-type", b"text/event-stream; charset=utf-8"),
                    (b"cache-control", b"no-cache"),
                    (b"x-accel-buffering", b"no"),
                    *p.ratelimit_headers,
                ],
            }
        )
        self._started = True
        first = True
        try:
            async for event in events:
                if isinstance(event, TokenDelta):
                    tracker.delta(event)
                    if first:
                        mark_first_token()
                    call.mark_chunk()  # every chunk the backend streamed, sent on or not
                    if event.text or event.reasoning or first:
                        chunk = fmt.chunk(event.text, first=first, reasoning=event.reasoning)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        first = False
                elif isinstance(event, Done):
                    _check_complete(event)
                    self._report_answer()
                    usage = tracker.done(event)
                    tail = fmt.chunk("", first=first, finish_reason=openai_finish_reason(event.finish_reason))
                    if p.include_usage:
                        tail += fmt.usage_chunk(usage)
                    self._finished = True
                    await send({"type": "http.response.body", "body": tail + SSE_DONE, "more_body": False})
                    await _drain(events)
                    return
                else:
                    tracker.event(event)
            raise BackendProtocolError("the backend stream ended without a final event")
        except BackendError as exc:
            assert self._backend is not None  # set when the first event came
            self._report_failure(self._backend, exc, mid_answer=True)
            error = _api_error(exc, p.kind, mid_response=True)
            call.set_error(type(exc).__name__)
            annotate_request(stream_error=error.code or type(exc).__name__)
            fail_request(error.status_code, type(exc).__name__)  # a failed request, though its 200 was sent
            tracker.settle()  # the tokens streamed so far, before the last message closes the usage record
            self._finished = True
            await send({"type": "http.response.body", "body": error.sse_event() + SSE_DONE, "more_body": False})

    async def _complete(self, send: Any, tracker: _Tracker, events: AsyncIterator[BackendEvent]) -> bool:
        """Collect the answer and send it as one JSON body; ``True`` when the backend went away or aborted the
        request and it was routed to another backend instead (nothing was sent: the caller tries again)."""
        call = tracker.call
        try:
            async for event in events:
                if isinstance(event, TokenDelta):
                    tracker.delta(event)
                elif isinstance(event, Done):
                    _check_complete(event)
                    self._report_answer()
                    usage = tracker.done(event)
                    finish = openai_finish_reason(event.finish_reason)
                    body = self.p.fmt.full(tracker.text(), finish, usage, tracker.reasoning())
                    self._finished = True
                    await self._send_json(send, 200, body)
                    await _drain(events)
                    return False
                else:
                    tracker.event(event)
            raise BackendProtocolError("the backend stream ended without a final event")
        except BackendError as exc:
            assert self._backend is not None  # set when the first event came
            self._report_failure(self._backend, exc, mid_answer=True)
            call.set_error(type(exc).__name__)
            # Nothing reached the client yet: a backend that went away or aborted the request (an operator's abort,
            # a weight update) is retried elsewhere, as before its first event. The failed attempt's tokens are
            # not the client's (its time stays in the stages it ran: schedule, prefill).
            if (
                isinstance(exc, BackendUnavailable)
                and self._route_elsewhere(self._backend, exc, mid_answer=True) is None
            ):
                return True
            tracker.settle()  # the tokens generated so far, before the answer closes the usage record
            await self._send_error(send, _api_error(exc, self.p.kind, mid_response=True))
            return False

    async def _end_early(self, send: Any, exc: APIError) -> None:
        """End a response cut short: the error as JSON if nothing was sent yet, as an SSE error event in a stream
        that has begun, else just the end of the body."""
        if not self._started:
            await self._send_error(send, exc)
            return
        self._finished = True
        if self.p.stream:
            annotate_request(stream_error=exc.code)
            await send({"type": "http.response.body", "body": exc.sse_event() + SSE_DONE, "more_body": False})
        else:
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _send_error(self, send: Any, exc: APIError) -> None:
        self._finished = True
        exc.record()
        headers = {k.lower(): v for k, v in exc.headers.items()}
        await self._send_json(send, exc.status_code, exc.body(), headers)

    async def _send_json(self, send: Any, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = orjson.dumps(obj)
        raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        raw_headers += [(k.encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
        raw_headers += self.p.ratelimit_headers
        self._started = True
        await send({"type": "http.response.start", "status": status, "headers": raw_headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})


async def wait_for_disconnect(receive: Callable[[], Any]) -> None:
    """Returns when the client disconnects (the request body has been read: ``receive`` has nothing else)."""
    while (await receive())["type"] != "http.disconnect":
        pass


#: How long the end of a backend's answer may take after its final event before the connection is closed instead.
DRAIN_TIMEOUT_S = 1.0


async def _drain(events: AsyncIterator[BackendEvent]) -> None:
    """Read the backend's stream to its end (``data: [DONE]``) so that its connection goes back to the pool;
    closing it half-read would cost a new TCP connection per request. A backend that keeps the body open after its
    final event gets :data:`DRAIN_TIMEOUT_S` (the request holds its admission slot meanwhile), then the connection
    is closed."""
    with contextlib.suppress(BackendError, TimeoutError):
        async with asyncio.timeout(DRAIN_TIMEOUT_S):
            async for _ in events:
                pass


class _Prefetched:
    """An async iterator over backend events whose first event can be awaited ahead (to detect failures
    before anything is sent to the client)."""

    __slots__ = ("_agen", "_first")

    def __init__(self, agen: AsyncIterator[BackendEvent]) -> None:
        self._agen = agen
        self._first: list[BackendEvent] = []

    async def prefetch(self) -> None:
        try:
            self._first.append(await self._next())
        except StopAsyncIteration:
            raise BackendError("the backend answered no events") from None

    def __aiter__(self) -> _Prefetched:
        return self

    async def __anext__(self) -> BackendEvent:
        if self._first:
            return self._first.pop()
        return await self._next()

    async def _next(self) -> BackendEvent:
        """The backend's next event; any exception of its adapter other than a :class:`BackendError` (a value it
        did not expect in the backend's answer) is that answer's fault: a protocol error, logged with where it was
        raised, not a 500 or a stream cut without its error event."""
        try:
            return await anext(self._agen)
        except (BackendError, StopAsyncIteration):
            raise
        except Exception as exc:
            # The frames, not the exception's message: that may quote the backend's answer (generated text).
            where = "".join(traceback.format_tb(exc.__traceback__))
            log.error("the backend adapter failed on the backend's answer (%s):\n%s", type(exc).__name__, where)
            raise BackendProtocolError(f"the backend adapter failed: {type(exc).__name__}") from exc

    async def aclose(self) -> None:
        aclose = getattr(self._agen, "aclose", None)
        if aclose is not None:
            await aclose()


class _Tracker:
    """Turns backend events into stage timings, usage and the model-call span's attributes."""

    __slots__ = (
        "_backend_queued_at",
        "_chunks",
        "_reasoning",
        "_first",
        "_first_token_at",
        "_gateway",
        "_output_tokens",
        "_p",
        "_scheduled",
        "_settled",
        "call",
    )

    def __init__(self, gateway: Gateway, p: Prepared, call: ModelCallSpan) -> None:
        self._gateway = gateway
        self._p = p
        self.call = call
        self._scheduled: Scheduled | None = None
        self._first: FirstToken | None = None
        self._output_tokens = 0
        self._settled = False
        self._first_token_at: float | None = None
        #: When the backend's queue took the request, on the gateway clock (backend-timed requests only).
        self._backend_queued_at: float | None = None
        self._chunks: list[str] = []
        self._reasoning: list[str] = []

    def event(self, event: BackendEvent) -> None:
        if isinstance(event, Scheduled):
            self._scheduled = event
        elif isinstance(event, FirstToken):
            self._first_token(event)

    def delta(self, event: TokenDelta) -> None:
        if self._first_token_at is None:  # a backend that reports no FirstToken: the gateway clock
            self._first_token_at = perf_counter()
        self._output_tokens += event.num_tokens
        self._chunks.append(event.text)
        if event.reasoning:
            self._reasoning.append(event.reasoning)

    def text(self) -> str:
        """The answer so far."""
        return "".join(self._chunks)

    def reasoning(self) -> str:
        """A reasoning model's thinking so far, as the backend streamed it apart from the answer."""
        return "".join(self._reasoning)

    def _first_token(self, event: FirstToken) -> None:
        self._first = event
        now = self._first_token_at = perf_counter()
        prefill = max(0.0, event.prefill_seconds)
        record_stage("prefill", prefill, end=now, source=event.source.value)
        queued = self._scheduled
        if queued is not None and queued.source is TimingSource.BACKEND:
            record_stage(
                "schedule",
                queued.queue_seconds,
                end=now - prefill,
                source="backend",
                attributes={"llmpath.schedule.backend_queue_s": queued.queue_seconds},
            )
            annotate_request(backend_queue_s=round(queued.queue_seconds, 6))
            self._backend_queued_at = now - prefill - max(0.0, queued.queue_seconds)

    def done(self, event: Done) -> Usage:
        """Account for the backend's final event; returns the usage to answer with (the backend's, or, when it
        reported none, the gateway's estimates of the prompt and of the output: ``input_tokens_estimated``,
        ``output_tokens_estimated``)."""
        p, usage = self._p, event.usage
        if not event.usage_reported:
            # The output as the prompt is estimated (UTF-8 bytes / chars_per_token), at least a token per chunk
            # streamed: one body (a server that ignored ``stream``) counts as one chunk, however long.
            generated = len(self.text().encode()) + len(self.reasoning().encode())
            text_tokens = -(-generated // self._gateway.config.tokenizer.chars_per_token)
            output = int(max(usage.completion_tokens, self._output_tokens, text_tokens))
            usage = Usage(p.key.prompt_tokens, output, 0)
            annotate_request(input_tokens_estimated=True, output_tokens_estimated=True)
        self._account(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens, usage.reasoning_tokens)
        dispatch = event.timings.dispatch_seconds
        if dispatch is not None and self._backend_queued_at is not None:
            # Only known at the end (SGLang reports it with the final output), placed just before the backend queue.
            record_stage(
                "schedule",
                dispatch,
                end=self._backend_queued_at,
                source="backend",
                attributes={"llmpath.schedule.backend_dispatch_s": dispatch},
            )
            annotate_request(backend_dispatch_s=round(dispatch, 6))
        self.call.set_finish_reasons([event.finish_reason])
        self.call.set_response(response_id=p.fmt.id, response_model=event.response_model)  # None: not known
        annotate_request(finish_reason=event.finish_reason)
        if event.usage_reported:  # with the backend's own prompt count only, as in settle()
            self._gateway.record_prediction(p, usage.prompt_tokens)
        self._gateway.record_output(p, self.text())
        return usage

    def settle(self) -> None:
        """Account for a request that ended without the backend's final event — the client went away (a "stop"
        button), the gateway shut down, the stream broke: the prompt as the backend reported it with the first
        token, and the tokens generated until then (``usage_partial`` in the ledger). Nothing when no token came."""
        first = self._first
        if self._settled or first is None or self._first_token_at is None:
            self._settled = True
            return
        prompt = first.prompt_tokens
        if not prompt:  # OpenAI-compatible servers count the prompt only in their final chunk: the gateway's estimate
            prompt = self._p.key.prompt_tokens
            annotate_request(input_tokens_estimated=True)
        self._account(prompt, first.cached_tokens, self._output_tokens)
        if first.prompt_tokens:  # the backend's own figures (SGLang's first chunk): count the prediction with them
            self._gateway.record_prediction(self._p, first.prompt_tokens)
        annotate_request(usage_partial=True)

    def _account(self, prompt: int, cached: int, output: int, reasoning: int = 0) -> None:
        """The end of the request: its decode stage up to now, and its tokens in the usage record, the model-call
        span and the tenant's token budget (once, whichever of :meth:`done` and :meth:`settle` comes first)."""
        self._settled = True
        p = self._p
        if self._first is not None and not p.stream:
            # A complete answer's first token (marked now, not when it came: a retried attempt's does not count).
            mark_first_token(self._first_token_at)
        if self._first_token_at is not None:
            now = perf_counter()
            record_stage("decode", now - self._first_token_at, end=now, source="gateway")
        cached = min(cached, prompt)
        p.tokens_used = prompt + output
        record_usage(
            input_tokens=prompt,
            cached_tokens=cached,
            output_tokens=output,
            model=p.backend_model,
            tenant=p.principal.tenant,
        )
        self.call.set_usage(
            input_tokens=prompt, output_tokens=output, cached_tokens=cached, reasoning_tokens=reasoning or None
        )
        if reasoning:
            annotate_request(reasoning_tokens=reasoning)  # of output_tokens


def _check_complete(done: Done) -> None:
    """A ``Done`` that says the backend aborted the request (a backend of its own; the built-in ones raise
    :class:`BackendAborted` themselves) ended an answer cut short: a failure, not a complete answer."""
    if done.finish_reason == "abort":
        raise BackendAborted()


def _api_error(exc: BackendError, kind: str, mid_response: bool = False) -> APIError:
    """The client's error for a backend failure; ``mid_response``: after the backend's first event (a connection
    lost then is the backend failing, not a busy backend to retry later)."""
    if isinstance(exc, BackendBadRequest):
        if exc.code == CONTEXT_LENGTH_EXCEEDED:
            return errors.context_length_exceeded(kind, f"The backend rejected the prompt: {exc}")
        return APIError(
            exc.status_code, f"The backend rejected the request: {exc}", param=exc.param, code="backend_rejected"
        )
    if isinstance(exc, BackendTimeout):
        return APIError(504, "The backend timed out.", type="server_error", code="backend_timeout")
    if isinstance(exc, BackendUnavailable) and not mid_response:
        return errors.no_backend("The backend is unavailable; retry later.")
    return APIError(502, "The backend failed.", type="server_error", code="backend_error")
