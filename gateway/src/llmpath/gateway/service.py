"""The request path: the seven stages, in the order the data needs, each under its ``stage(...)``.

``auth → validate → assemble → cache_lookup → route → schedule`` run in the endpoint; the backend call
(``prefill`` and ``decode`` from the backend's events, plus the backend's share of ``schedule``) runs in
:class:`~llmpath.gateway.backend_call.BackendCallResponse`, in the same task, so the model-call span and the
trace context stay intact from the first byte to the last. Errors before the first byte get their proper HTTP
status (a connection failure is retried on another backend); errors after it are sent as an SSE error event.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from time import perf_counter
from typing import Any

from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from llmpath.backends.base import (
    BackendRequest,
    ChatMessage,
    SamplingParams,
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
from llmpath.gateway.auth import BASIC_AUTH_METHODS, KeyStore, Principal
from llmpath.gateway.backend_call import BackendCallResponse, wait_for_disconnect
from llmpath.gateway.config import GatewayConfig, RouteConfig
from llmpath.gateway.errors import APIError
from llmpath.gateway.metrics import GatewayMetrics
from llmpath.gateway.openai_format import ResponseFormat
from llmpath.gateway.pool import BackendPool
from llmpath.gateway.prompt_cache import CacheKey, CacheLookup, PromptCache
from llmpath.gateway.routing import Candidate, RouteDecision, Router, RouteReason
from llmpath.gateway.schemas import MIN_TOP_P, ChatCompletionRequest, CompletionRequest
from llmpath.instrumentation import (
    StageScope,
    annotate_request,
    inject_trace_headers,
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
        """The caller's principal (401, or 403 for a non-admin key where ``admin``); ``Basic`` only on reads."""
        basic = request.method in BASIC_AUTH_METHODS  # a cross-site form or fetch must not reuse a browser's login
        principal = self.keys.authenticate(request.headers.get("authorization"), basic=basic)
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
            raw = await self.read_body(request)
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

    async def read_body(self, request: Request) -> bytes:
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
        gone = asyncio.ensure_future(wait_for_disconnect(receive))
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
