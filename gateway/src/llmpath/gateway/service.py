"""The request path: the seven stages, in the order the data needs, each under its ``stage(...)``.

``auth → validate → assemble → cache_lookup → route → schedule`` run in the endpoint; the backend call
(``prefill`` and ``decode`` from the backend's events, plus the backend's share of ``schedule``) runs in
:class:`BackendCallResponse`, in the same task, so the model-call span and the trace context stay intact
from the first byte to the last. Errors before the first byte get their proper HTTP status (a connection
failure is retried on another backend); errors after it are sent as an SSE error event.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Callable, MutableMapping
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

import orjson
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from llmpath.backends.base import (
    CONTEXT_LENGTH_EXCEEDED,
    BackendBadRequest,
    BackendError,
    BackendEvent,
    BackendRequest,
    BackendServerError,
    BackendTimeout,
    BackendUnavailable,
    BackendUnreachable,
    ChatMessage,
    Done,
    FirstToken,
    SamplingParams,
    Scheduled,
    TimingSource,
    TokenDelta,
)
from llmpath.backends.chat_template import render_chatml
from llmpath.gateway import errors
from llmpath.gateway.admission import (
    Admission,
    AdmissionRejected,
    TenantRateLimiter,
    TenantTokenLimiter,
    TokenReservation,
)
from llmpath.gateway.assembly import Assembled, AssemblyError, MessagesRejected, RouteAssembler
from llmpath.gateway.auth import KeyStore, Principal
from llmpath.gateway.config import GatewayConfig, RouteConfig
from llmpath.gateway.errors import APIError
from llmpath.gateway.metrics import GatewayMetrics
from llmpath.gateway.openai_format import SSE_DONE, ResponseFormat, openai_finish_reason
from llmpath.gateway.pool import BackendPool
from llmpath.gateway.prompt_cache import CacheKey, CacheLookup, PromptCache
from llmpath.gateway.routing import Candidate, RouteDecision, Router, RouteReason
from llmpath.gateway.schemas import MIN_TOP_P, ChatCompletionRequest, CompletionRequest
from llmpath.instrumentation import (
    ModelCallSpan,
    StageScope,
    annotate_request,
    fail_request,
    inject_trace_headers,
    mark_first_token,
    model_call_span,
    record_stage,
    record_usage,
    set_request_labels,
    stage,
)

log = logging.getLogger("llmpath.gateway")

#: The route used when the configuration defines none: any model name, the client's messages as they are.
DEFAULT_ROUTE = "default"

#: A request whose body took at least this long to arrive after its headers gets ``body_receive_s`` in its usage
#: record, so a slow ``auth`` stage can be told apart: waiting for the client's upload (or a busy event loop) versus
#: the key check. Bodies that come with their headers, nearly every request, add nothing to the ledger.
BODY_WAIT_RECORDED_S = 0.001


@dataclass(slots=True)
class RouteRuntime:
    config: RouteConfig
    assembler: RouteAssembler
    #: When no routes are configured, the client's ``model`` is sent to the backend as it is.
    passthrough: bool = False


def build_routes(routes: tuple[RouteConfig, ...], render_chat: Callable[[Any], str]) -> dict[str, RouteRuntime]:
    """Route name → runtime (template, system prompt, retriever); without routes, one passthrough route.
    Raises :class:`~llmpath.gateway.assembly.AssemblyError` for a template that does not compile."""
    if routes:
        return {r.name: RouteRuntime(r, RouteAssembler(r, render_chat=render_chat)) for r in routes}
    default = RouteConfig(name=DEFAULT_ROUTE)
    return {DEFAULT_ROUTE: RouteRuntime(default, RouteAssembler(default, render_chat=render_chat), passthrough=True)}


@dataclass(slots=True)
class Prepared:
    """A request that passed every stage up to admission: what the backend call needs."""

    kind: str  # "chat" | "text"
    principal: Principal
    route: RouteRuntime
    backend_model: str
    stream: bool
    include_usage: bool
    sampling: SamplingParams
    assembled: Assembled
    key: CacheKey
    lookup: CacheLookup
    decision: RouteDecision
    fmt: ResponseFormat
    #: Backends already tried (connection failures), for the retry.
    tried: list[str] = field(default_factory=list)
    admitted: bool = False
    holds_backend: bool = False
    #: Cached tokens predicted for the chosen backend, in the gateway's token estimate (``chars_per_token``).
    predicted_tokens: int = 0
    #: The tokens reserved from the tenant's budget (``limits.tenant_tokens``), settled on release with ...
    tokens: TokenReservation | None = None
    #: ... the prompt and output tokens the backend reported (0 when it never answered).
    tokens_used: int = 0
    #: ``x-ratelimit-*`` response headers of the tenant's limits, as OpenAI sends them (none when unlimited).
    ratelimit_headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class Gateway:
    """The gateway's components and its request path (framework glue lives in :mod:`llmpath.gateway.app`)."""

    def __init__(
        self,
        config: GatewayConfig,
        *,
        pool: BackendPool,
        prompt_cache: PromptCache,
        router: Router,
        routes: dict[str, RouteRuntime],
        render_chat: Callable[[Any], str] = render_chatml,
    ) -> None:
        self.config = config
        #: The chat template the routes were built with (a reload builds new routes with it: the template is
        #: read once, at startup, like the backends').
        self.render_chat = render_chat
        self.keys = KeyStore(config.api_keys, insecure_no_auth=config.insecure_no_auth)
        self.pool = pool
        self.prompt_cache = prompt_cache
        self.router = router
        self.routes = routes
        self.admission = Admission(
            config.limits.max_concurrency, config.limits.max_queue, config.limits.timeouts.queue_s
        )
        self.rates = TenantRateLimiter(config.limits.tenant_rate)
        self.tokens = TenantTokenLimiter(config.limits.tenant_tokens)
        self.metrics: GatewayMetrics | None = None
        #: Set when shutdown begins: requests the server cancels after ``listen.drain_s`` were cut by the
        #: shutdown, not abandoned by their clients.
        self.draining = False

    # ---- helpers for the app ------------------------------------------------------------------

    def route_for(self, model: str) -> RouteRuntime | None:
        """The route serving ``model``: its own, or the passthrough route when none is configured."""
        route = self.routes.get(model)
        if route is None:
            default = self.routes.get(DEFAULT_ROUTE)
            return default if default is not None and default.passthrough else None
        return route

    def authenticate(self, request: Request, *, admin: bool = False) -> Principal:
        principal = self.keys.authenticate(request.headers.get("authorization"))
        if principal is None:
            raise errors.unauthorized()
        if admin and not principal.admin:
            raise errors.forbidden()
        return principal

    def bind_metrics(self, metrics: GatewayMetrics) -> None:
        """Start publishing backend and admission state to ``metrics``."""
        self.metrics = metrics
        clock = self.pool.clock
        self.pool.on_change = lambda s: metrics.backend_state(s.name, up=s.available(clock()), inflight=s.inflight)
        self.pool.on_inflight = lambda s: metrics.backend_inflight(s.name, s.inflight)
        self.admission.on_change = metrics.admission
        for state in self.pool.states.values():
            metrics.backend_state(state.name, up=state.available(clock()), inflight=state.inflight)
        metrics.admission(0, 0)
        self.publish_index_blocks()

    def publish_index_blocks(self, backend: str | None = None) -> None:
        """Set ``llmpath_prompt_cache_index_blocks`` of ``backend`` (``None``: of every backend)."""
        if self.metrics is None:
            return
        index = self.prompt_cache.index
        for name in (backend,) if backend is not None else self.pool.states:
            self.metrics.index_blocks(name, index.size(name))

    # ---- the request path ---------------------------------------------------------------------

    async def handle(self, request: Request, kind: str) -> Response:
        """Serve ``POST /v1/chat/completions`` (``kind="chat"``) or ``/v1/completions`` (``"text"``)."""
        with stage("auth") as st:  # ingress: the key, then the body (a slow upload or a busy event loop shows here)
            principal = self.authenticate(request)
            set_request_labels(tenant=principal.tenant)  # also on the requests refused from here on
            started = perf_counter()
            raw = await self._read_body(request)
            waited = perf_counter() - started
            st.set_attribute("http.request.body.size", len(raw))
            st.set_attribute("llmpath.request.body_receive_seconds", waited)
        if waited >= BODY_WAIT_RECORDED_S:
            annotate_request(body_receive_s=round(waited, 6))
        with stage("validate") as st:
            parsed, route = self._validate(errors.parse_json(raw), kind)
            st.set_attribute("llmpath.stream", parsed.wants_stream)
        backend_model = parsed.model if route.passthrough else route.config.backend_model
        set_request_labels(route=route.config.name, model=backend_model)
        with stage("assemble") as st:
            assembled = self._assemble(parsed, route, principal.tenant)
            st.set_attribute("llmpath.assemble.documents", len(assembled.documents))
            st.set_attribute("llmpath.assemble.system_prompt", assembled.system_prompt)
        if assembled.documents:
            annotate_request(documents=len(assembled.documents))
        with stage("cache_lookup") as st:
            key = self.prompt_cache.key(
                assembled.cache_text,
                tenant=principal.tenant,
                route=route.config.name,
                model=backend_model,
                mode=route.config.cache,
            )
            self._check_prompt_tokens(key.prompt_tokens, kind)
            candidates = self.pool.candidates(route.config.backends)
            lookup = self.prompt_cache.lookup(key, [c.name for c in candidates])
            st.set_attribute("llmpath.cache.result", lookup.result.value)
            st.set_attribute("llmpath.cache.matched_tokens", lookup.best_blocks * self.prompt_cache.block_tokens)
            st.set_attribute("llmpath.cache.prompt_tokens", key.prompt_tokens)
        if self.metrics is not None:
            self.metrics.cache_lookup(route.config.name, lookup.result.value)
        prepared = Prepared(
            kind=kind,
            principal=principal,
            route=route,
            backend_model=backend_model,
            stream=parsed.wants_stream,
            include_usage=parsed.include_usage,
            sampling=self._sampling(parsed, route.config),
            assembled=assembled,
            key=key,
            lookup=lookup,
            decision=RouteDecision("", RouteReason.NO_PREFIX, 0, 0),
            fmt=ResponseFormat(
                kind,
                f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                int(time.time()),
                parsed.model,
            ),
        )
        try:
            with stage("route") as st:
                self.route_request(prepared, st, candidates)
            with stage("schedule") as st:
                await self._admit(prepared, st, request.receive)
        except BaseException:
            self.release(prepared)
            raise
        return BackendCallResponse(self, prepared)

    async def _read_body(self, request: Request) -> bytes:
        """The request body, refused (413) as soon as it is larger than ``limits.max_body_bytes``, or (408) when it
        has not all arrived ``limits.timeouts.body_s`` after the headers."""
        limit = self.config.limits.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise errors.body_too_large(limit)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.config.limits.timeouts.body_s):
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > limit:
                        raise errors.body_too_large(limit)
                    chunks.append(chunk)
        except TimeoutError:
            raise errors.body_timeout(self.config.limits.timeouts.body_s) from None
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _validate(self, body: Any, kind: str) -> tuple[ChatCompletionRequest | CompletionRequest, RouteRuntime]:
        if not isinstance(body, dict):
            raise APIError(400, "The request body must be a JSON object.", code="invalid_type")
        model_cls = ChatCompletionRequest if kind == "chat" else CompletionRequest
        try:
            parsed = model_cls.model_validate(body)
        except ValidationError as exc:
            raise errors.from_validation_error(exc) from None
        route = self.route_for(parsed.model)
        if route is None:
            raise errors.model_not_found(parsed.model)
        limits = self.config.limits
        if isinstance(parsed, ChatCompletionRequest) and len(parsed.messages) > limits.max_messages:
            raise errors.limit_exceeded(
                "messages", f"Too many messages: {len(parsed.messages)} > the limit of {limits.max_messages}."
            )
        cap = route.config.max_tokens or limits.max_tokens
        requested = parsed.requested_max_tokens
        if requested is not None and requested > cap:
            param = "max_tokens"
            if isinstance(parsed, ChatCompletionRequest) and parsed.max_completion_tokens is not None:
                param = "max_completion_tokens"
            raise errors.limit_exceeded(param, f"{param} is {requested}, above the limit of {cap}.")
        if len(parsed.stop_list()) > limits.max_stop_sequences:
            raise errors.limit_exceeded("stop", f"At most {limits.max_stop_sequences} stop sequences are allowed.")
        return parsed, route

    def _check_prompt_tokens(self, tokens: int, kind: str) -> None:
        limit = self.config.limits.max_prompt_tokens
        if tokens > limit:
            raise errors.context_length_exceeded(
                kind, f"The prompt is about {tokens} tokens, above this gateway's limit of {limit}."
            )

    def _assemble(
        self, parsed: ChatCompletionRequest | CompletionRequest, route: RouteRuntime, tenant: str
    ) -> Assembled:
        try:
            if isinstance(parsed, ChatCompletionRequest):
                messages = [ChatMessage(m.role, m.text()) for m in parsed.messages]
                return route.assembler.assemble_chat(messages, tenant=tenant)
            return route.assembler.assemble_completion(parsed.prompt_text(), tenant=tenant)
        except MessagesRejected as exc:  # the template's own message (e.g. "System role not supported")
            raise APIError(
                400, f"The model's chat template rejected the messages: {exc}", param="messages", code="invalid_value"
            ) from None
        except AssemblyError as exc:  # its message names the route, field and exception, never prompt text
            log.error("prompt assembly failed: %s", exc)
            raise APIError(500, "Prompt assembly failed.", type="server_error", code="assembly_failed") from None

    def _sampling(self, parsed: ChatCompletionRequest | CompletionRequest, route: RouteConfig) -> SamplingParams:
        max_tokens = parsed.requested_max_tokens or min(
            self.config.limits.default_max_tokens, route.max_tokens or self.config.limits.max_tokens
        )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if parsed.temperature is None else parsed.temperature,
            top_p=1.0 if parsed.top_p is None else max(parsed.top_p, MIN_TOP_P),
            top_k=-1 if parsed.top_k is None else parsed.top_k,
            stop=parsed.stop_list(),
            seed=parsed.seed,
            ignore_eos=bool(parsed.ignore_eos),
        )

    def route_request(
        self, p: Prepared, st: StageScope, candidates: list[Candidate] | None = None, *, retry: bool = False
    ) -> None:
        """Choose a backend (excluding those already tried) and hold an in-flight slot on it."""
        if candidates is None:
            candidates = self.pool.candidates(p.route.config.backends, exclude=p.tried)
        if not candidates:
            raise errors.no_backend(
                "No healthy backend is available." if not p.tried else "Every backend failed; retry later."
            )
        decision = self.router.choose(candidates, p.lookup.matches, p.lookup.total_blocks, self.prompt_cache.index.size)
        if retry:
            decision = RouteDecision(
                decision.backend, RouteReason.RETRY, decision.matched_blocks, decision.best_matched_blocks
            )
        p.decision = decision
        self.pool.acquire(decision.backend)
        p.holds_backend = True
        predicted = self.prompt_cache.predicted_tokens(p.lookup, decision.backend)
        # Recorded now, not when the backend answers: a burst of same-prefix requests must see it (as
        # sglang-router and llm-d do). A backend that fails is ejected, and its index entries with it.
        self.prompt_cache.record(p.key, decision.backend)
        self.publish_index_blocks(decision.backend)
        matched_tokens = decision.matched_blocks * self.prompt_cache.block_tokens
        st.set_attribute("llmpath.route.backend", decision.backend)
        st.set_attribute("llmpath.route.reason", decision.reason.value)
        st.set_attribute("llmpath.route.matched_prefix_tokens", matched_tokens)
        st.set_attribute("llmpath.route.predicted_cached_tokens", predicted)
        st.set_attribute("llmpath.route.candidates", len(candidates))
        p.predicted_tokens = predicted  # counted when the backend answers, in its tokens (see _Tracker.done)
        if self.metrics is not None:
            self.metrics.route_decision(decision.backend, decision.reason.value)
        annotate_request(
            backend=decision.backend,
            routing_reason=decision.reason.value,
            matched_prefix_tokens=matched_tokens,
            cache_result=p.lookup.result.value,
            retries=len(p.tried),
        )

    def record_prediction(self, p: Prepared, prompt_tokens: int) -> None:
        """Count the request's predicted cached tokens once the backend has reported ``prompt_tokens``.

        The prediction is made in the gateway's estimate (UTF-8 bytes / ``chars_per_token``), which counts a chat
        template's special tokens by their text (``<|im_start|>``: 12 bytes, one token); it is converted to the
        backend's tokens with this request's own ratio, so that it compares with the backend's cached tokens.
        """
        predicted = p.predicted_tokens
        estimate = p.key.prompt_tokens
        if predicted and prompt_tokens > 0 and estimate > 0:
            predicted = min(round(predicted * prompt_tokens / estimate), prompt_tokens)
        if self.metrics is not None:
            self.metrics.predicted_tokens(p.route.config.name, predicted)
        annotate_request(predicted_cached_tokens=predicted)

    async def _admit(self, p: Prepared, st: StageScope, receive: Callable[[], Any]) -> None:
        try:
            requests = self.rates.check(p.principal.tenant, p.principal.rate)
            estimate = p.key.prompt_tokens + p.sampling.max_tokens
            p.tokens = self.tokens.reserve(p.principal.tenant, estimate, p.principal.tokens)
            limits = requests.headers("requests") if requests is not None else {}
            if p.tokens is not None:
                limits |= p.tokens.bucket.headers("tokens")
            p.ratelimit_headers = [(k.encode(), v.encode()) for k, v in limits.items()]
            if self.admission.must_wait:
                waited = await self._queue_unless_gone(receive)
            else:
                waited = await self.admission.acquire()
        except AdmissionRejected as exc:
            if self.metrics is not None:
                self.metrics.rejection(exc.reason)
            error = errors.rate_limited(str(exc), exc.retry_after_s, exc.reason)
            error.headers |= exc.headers
            raise error from None
        p.admitted = True
        st.set_attribute("llmpath.schedule.gateway_queue_s", waited)
        annotate_request(gateway_queue_s=round(waited, 6))
        if p.tokens is not None:
            annotate_request(tokens_reserved=p.tokens.estimate)

    async def _queue_unless_gone(self, receive: Callable[[], Any]) -> float:
        """Wait in the admission queue while watching the client: one that disconnects leaves the queue at once
        (``ClientDisconnect``) instead of holding its place until the queue timeout."""
        acquire = asyncio.ensure_future(self.admission.acquire())
        gone = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait((acquire, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not gone.cancel() and not gone.cancelled():
                gone.exception()  # retrieved: a receive that failed means the client is gone too
            if not acquire.done():
                acquire.cancel()  # leaves the queue (or passes on a slot granted meanwhile)
                await asyncio.wait((acquire,))
        if acquire.cancelled():
            raise ClientDisconnect()
        return acquire.result()  # the waited seconds, or AdmissionRejected

    def release(self, p: Prepared) -> None:
        """Give back what the request holds (idempotent); settle its token reservation with what it used."""
        if p.tokens is not None:
            p.tokens.settle(p.tokens_used)
        if p.admitted:
            p.admitted = False
            self.admission.release()
        self.release_backend(p)

    def release_backend(self, p: Prepared) -> None:
        if p.holds_backend:
            p.holds_backend = False
            self.pool.release(p.decision.backend)

    def backend_request(self, p: Prepared) -> BackendRequest:
        assembled = p.assembled
        return BackendRequest(
            request_id=p.fmt.id,
            model=p.backend_model,
            messages=assembled.messages,
            prompt=assembled.prompt,
            sampling=p.sampling,
            stream=True,
            cache_salt=p.key.cache_salt,
            trace_headers=dict(inject_trace_headers({})),
        )

    def record_output(self, p: Prepared, output: str) -> None:
        """After a chat reply: remember that the backend now also holds prompt + reply (the next turn's prefix;
        the backend's radix cache keeps generated tokens too)."""
        if p.kind != "chat" or not output or not p.key.indexed:
            return
        messages = [*(p.assembled.messages or []), ChatMessage("assistant", output)]
        try:
            text = p.route.assembler.chat_text(messages)
        except (AssemblyError, MessagesRejected):  # a template that refuses a reply: the next turn will tell
            return
        key = self.prompt_cache.extend(p.key, text)
        self.prompt_cache.record(key, p.decision.backend)
        self.publish_index_blocks(p.decision.backend)


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

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        main = asyncio.current_task()
        assert main is not None

        async def watch_disconnect() -> None:
            await _disconnected(receive)
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
        try:
            scope, call, events = await self._connect()
        except APIError as exc:
            await self._send_error(send, exc)
            return
        tracker = _Tracker(self.gateway, self.p, call)
        with scope:  # the model-call span, current from connect to the last event
            try:
                if self.p.stream:
                    await self._stream(send, tracker, events)
                else:
                    await self._complete(send, tracker, events)
            finally:
                tracker.settle()  # cut short (client gone, shutdown, backend error): account for what was generated
                await events.aclose()

    async def _connect(self) -> tuple[contextlib.ExitStack, ModelCallSpan, _Prefetched]:
        """Open the backend stream and wait for its first event; retry elsewhere on connection failure."""
        gw, p = self.gateway, self.p
        retries = gw.config.routing.max_retries
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
                p.tried.append(state.name)
                # Unreachable (no answer at all) counts toward ejection and is worth a WARNING; a busy backend's
                # 503 is frequent under overload, and in its own metrics.
                unreachable = isinstance(exc, BackendUnreachable)
                reason = f"connection failed: {type(exc.__cause__).__name__}" if unreachable else "busy"
                level = logging.WARNING if unreachable else logging.DEBUG
                if unreachable:
                    gw.pool.report_failure(state.name, reason)
                gw.release_backend(p)
                if exc.retry_after is not None:  # a busy backend's own Retry-After (429/503): the longest one
                    retry_after = max(retry_after, exc.retry_after)
                if len(p.tried) > retries:
                    log.log(level, "backend %s: %s; no retries left (routing.max_retries)", state.name, reason)
                    error = errors.no_backend("Every backend tried failed; retry later.")
                    error.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))
                    raise error from None
                try:
                    with stage("route") as st:
                        gw.route_request(p, st, retry=True)
                except APIError as error:
                    log.log(level, "backend %s: %s; no other backend to try", state.name, reason)
                    error.headers["Retry-After"] = str(max(1, math.ceil(retry_after)))  # a busy one's own wait
                    raise
                log.log(level, "backend %s: %s; retrying on %s", state.name, reason, p.decision.backend)
                continue
            except BackendError as exc:
                await events.aclose()
                call.set_error(type(exc).__name__)
                scope.close()
                if isinstance(exc, BackendServerError):  # consecutive 5xx answers eject, like outlier detection
                    gw.pool.report_failure(state.name, f"answered {exc.upstream_status}")
                raise _api_error(exc, p.kind) from None
            except BaseException as exc:
                await events.aclose()
                scope.__exit__(type(exc), exc, exc.__traceback__)
                raise
            gw.pool.report_success(state.name)
            return scope, call, events

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
                    if event.text or first:
                        chunk = fmt.chunk(event.text, first=first)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        first = False
                elif isinstance(event, Done):
                    tracker.done(event)
                    tail = fmt.chunk("", first=first, finish_reason=openai_finish_reason(event.finish_reason))
                    if p.include_usage:
                        tail += fmt.usage_chunk(event.usage)
                    self._finished = True
                    await send({"type": "http.response.body", "body": tail + SSE_DONE, "more_body": False})
                    await _drain(events)
                    return
                else:
                    tracker.event(event)
            raise BackendError("the backend stream ended without a final event")
        except BackendError as exc:
            error = _api_error(exc, p.kind, mid_response=True)
            call.set_error(type(exc).__name__)
            annotate_request(stream_error=error.code or type(exc).__name__)
            fail_request(error.status_code, type(exc).__name__)  # a failed request, though its 200 was sent
            tracker.settle()  # the tokens streamed so far, before the last message closes the usage record
            self._finished = True
            await send({"type": "http.response.body", "body": error.sse_event() + SSE_DONE, "more_body": False})

    async def _complete(self, send: Any, tracker: _Tracker, events: AsyncIterator[BackendEvent]) -> None:
        call = tracker.call
        try:
            async for event in events:
                if isinstance(event, TokenDelta):
                    tracker.delta(event)
                elif isinstance(event, Done):
                    tracker.done(event)
                    body = self.p.fmt.full(tracker.text(), openai_finish_reason(event.finish_reason), event.usage)
                    self._finished = True
                    await self._send_json(send, 200, body)
                    await _drain(events)
                    return
                else:
                    tracker.event(event)
            raise BackendError("the backend stream ended without a final event")
        except BackendError as exc:
            call.set_error(type(exc).__name__)
            tracker.settle()  # the tokens generated so far, before the answer closes the usage record
            await self._send_error(send, _api_error(exc, self.p.kind, mid_response=True))

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


async def _disconnected(receive: Callable[[], Any]) -> None:
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
            self._first.append(await anext(self._agen))
        except StopAsyncIteration:
            raise BackendError("the backend answered no events") from None

    def __aiter__(self) -> _Prefetched:
        return self

    async def __anext__(self) -> BackendEvent:
        if self._first:
            return self._first.pop()
        return await anext(self._agen)

    async def aclose(self) -> None:
        aclose = getattr(self._agen, "aclose", None)
        if aclose is not None:
            await aclose()


class _Tracker:
    """Turns backend events into stage timings, usage and the model-call span's attributes."""

    __slots__ = (
        "_backend_queued_at",
        "_chunks",
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

    def text(self) -> str:
        return "".join(self._chunks)

    def _first_token(self, event: FirstToken) -> None:
        self._first = event
        now = self._first_token_at = perf_counter()
        if not self._p.stream:
            mark_first_token(now)
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

    def done(self, event: Done) -> None:
        p, usage = self._p, event.usage
        self._account(usage.prompt_tokens, usage.cached_tokens, usage.completion_tokens)
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
        self._gateway.record_prediction(p, usage.prompt_tokens)
        self._gateway.record_output(p, self.text())

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
        annotate_request(usage_partial=True)

    def _account(self, prompt: int, cached: int, output: int) -> None:
        """The end of the request: its decode stage up to now, and its tokens in the usage record, the model-call
        span and the tenant's token budget (once, whichever of :meth:`done` and :meth:`settle` comes first)."""
        self._settled = True
        p = self._p
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
        self.call.set_usage(input_tokens=prompt, output_tokens=output, cached_tokens=cached)


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
