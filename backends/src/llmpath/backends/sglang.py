"""The SGLang backend: SGLang's native ``/generate`` over HTTP, with its per-request timings mapped to stages.

* schedule = ``meta_info.queue_time``; prefill = ``prefill_finished_time − forward_entry_time`` (or
  ``first_token_latency − queue_time``); cached tokens = ``meta_info.cached_tokens``. These keys exist only when
  the server runs with ``--enable-metrics``; without them the gateway's own clock is used (time to the first
  chunk counts as prefill, queue as 0) and every event says ``TimingSource.GATEWAY``.
* Streams in cumulative (SGLang's default) and incremental (``--incremental-streaming-output``) text modes;
  the mode is detected from ``output_ids`` unless fixed with ``incremental_output=``.
* Chat messages are rendered client-side with a chat template (default ChatML, see
  :mod:`llmpath.backends.chat_template`), because ``/generate`` takes text and is the route that reports timings.
* ``traceparent``/``tracestate`` from ``BackendRequest.trace_headers`` are sent along; closing the event iterator
  closes the HTTP stream, and SGLang aborts a request whose client went away.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp

from llmpath.backends._http import (
    TRANSPORT_ERRORS,
    HttpClient,
    error_for_status,
    json_object,
    raise_for_status,
    raise_stream_error,
    read_body,
    sse_json,
    streams,
    transport_error,
)
from llmpath.backends._values import between, seconds, token_count
from llmpath.backends.base import (
    BackendAborted,
    BackendEvent,
    BackendProtocolError,
    BackendRequest,
    BackendTimings,
    Done,
    FirstToken,
    Scheduled,
    TimingSource,
    TokenDelta,
    Usage,
)
from llmpath.backends.chat_template import Messages, load_chat_template


def generate_body(request: BackendRequest, render_chat: Callable[[Messages], str]) -> dict[str, Any]:
    """The ``/generate`` JSON body of a normalized request."""
    s = request.sampling
    params: dict[str, Any] = {"max_new_tokens": s.max_tokens, "temperature": s.temperature, "top_p": s.top_p,
                              "top_k": s.top_k, "ignore_eos": s.ignore_eos}  # fmt: skip
    if s.stop:
        params["stop"] = list(s.stop)
    if s.seed is not None:
        params["sampling_seed"] = s.seed
    body: dict[str, Any] = {"sampling_params": params, "stream": request.stream, "rid": request.request_id}
    if request.messages is not None:
        body["text"] = render_chat([{"role": m.role, "content": m.content} for m in request.messages])
    elif request.prompt is not None:
        body["text"] = request.prompt
    else:
        body["input_ids"] = list(request.input_ids or [])
    if request.cache_salt:
        body["cache_salt"] = request.cache_salt
    return body


class GenerateStreamParser:
    """Turns ``/generate`` outputs (SSE chunks or one JSON body) into backend events."""

    def __init__(self, started: float, incremental_output: bool | None = None) -> None:
        self.started = started
        self.incremental = incremental_output
        self.text = ""
        self.completion_tokens = 0
        self.first_token_at: float | None = None
        self.source = TimingSource.GATEWAY
        self.queue_seconds: float | None = None
        self.prefill_seconds: float | None = None
        self.done = False

    def feed(self, chunk: dict[str, Any]) -> list[BackendEvent]:
        """Events for one output object (raises typed errors for in-stream errors and malformed chunks)."""
        # An error with a message only is SGLang's streamed form of a ValueError from checking the request (a
        # prompt longer than the context, bad sampling parameters): its non-streaming path answers those 400.
        raise_stream_error(chunk, default_status=400)
        meta = chunk.get("meta_info")
        if not isinstance(meta, dict):
            raise BackendProtocolError(f"/generate output without meta_info: {json.dumps(chunk)[:200]}")
        if self.done:
            raise BackendProtocolError("/generate output after the final one")
        prompt, completion = _required_count(meta, "prompt_tokens"), _required_count(meta, "completion_tokens")
        text = chunk.get("text")
        if text is not None and not isinstance(text, str):
            raise BackendProtocolError(f"/generate output whose text is a {type(text).__name__}, not a string")
        events: list[BackendEvent] = []
        if self.first_token_at is None:
            events.extend(self._first(meta, prompt))
        delta, n = self._delta(text or "", chunk.get("output_ids"), completion)
        if delta or n:
            events.append(TokenDelta(delta, n))
        if meta.get("finish_reason"):
            events.append(self._done(meta))
        return events

    def _first(self, meta: dict[str, Any], prompt: int) -> list[BackendEvent]:
        now = time.monotonic()
        self.first_token_at = now
        gateway_ttft = now - self.started
        # The server's durations, when they are durations: finite, not negative, at most a day (a string, a boolean
        # or 1e300 would end up in the stage histograms, spans and ledger); the gateway clock otherwise.
        queue = seconds(meta.get("queue_time"))
        if queue is not None:
            self.source = TimingSource.BACKEND
            self.queue_seconds = queue
            prefill = between(meta.get("forward_entry_time"), meta.get("prefill_finished_time"))
            if prefill is None:
                first_token = seconds(meta.get("first_token_latency"))
                prefill = first_token - queue if first_token is not None else gateway_ttft - queue
            self.prefill_seconds = max(prefill, 0.0)
        else:
            self.queue_seconds, self.prefill_seconds = 0.0, gateway_ttft
        return [
            Scheduled(self.queue_seconds, self.source),
            FirstToken(self.prefill_seconds, prompt, _cached(meta, prompt), self.source),
        ]

    def _delta(self, text: str, output_ids: Any, completion: int) -> tuple[str, int]:
        new_tokens = completion - self.completion_tokens
        if self.incremental is None and isinstance(output_ids, list) and self.completion_tokens > 0:
            self.incremental = len(output_ids) != completion
        cumulative = (not self.incremental) if self.incremental is not None else text.startswith(self.text)
        if cumulative:
            if text.startswith(self.text):
                delta = text[len(self.text) :]
                self.text = text
            else:  # SGLang trims a matched stop string at the end; never emit negative deltas
                delta = ""
                if self.text.startswith(text):
                    self.text = text
        else:
            delta = text
            self.text += text
        self.completion_tokens = max(self.completion_tokens, completion)  # a count that went down: no recount
        return delta, max(new_tokens, 0)

    def _done(self, meta: dict[str, Any]) -> Done:
        self.done = True
        reason = meta["finish_reason"]
        kind = reason.get("type") if isinstance(reason, dict) else str(reason)
        if kind == "abort":
            status = reason.get("status_code") if isinstance(reason, dict) else None
            message = (reason.get("message") if isinstance(reason, dict) else None) or "request aborted by the backend"
            if isinstance(status, int) and status >= 400 and status != 499:
                raise error_for_status(status, json.dumps({"error": {"message": message}}).encode())
            raise BackendAborted()
        now = time.monotonic()
        if self.source is TimingSource.BACKEND:
            timings = BackendTimings(
                queue_seconds=self.queue_seconds,
                prefill_seconds=self.prefill_seconds,
                first_token_seconds=seconds(meta.get("first_token_latency")),
                e2e_seconds=seconds(meta.get("e2e_latency")),
                source=TimingSource.BACKEND,
                dispatch_seconds=between(meta.get("request_received_ts"), meta.get("api_server_dispatch_finish_ts")),
            )
        else:
            timings = BackendTimings(
                queue_seconds=None,
                prefill_seconds=self.prefill_seconds,
                first_token_seconds=(self.first_token_at or now) - self.started,
                e2e_seconds=now - self.started,
                source=TimingSource.GATEWAY,
            )
        prompt, completion = _required_count(meta, "prompt_tokens"), _required_count(meta, "completion_tokens")
        reasoning = min(token_count(meta.get("reasoning_tokens")) or 0, completion)  # 0 without a reasoning parser
        usage = Usage(prompt, completion, _cached(meta, prompt), reasoning)
        return Done(usage, kind if kind in ("stop", "length") else "stop", timings)


def _required_count(meta: dict[str, Any], key: str) -> int:
    """``meta_info[key]``, a token count every output has (a protocol error when missing or not a count)."""
    count = token_count(meta.get(key))
    if count is None:
        raise BackendProtocolError(f"/generate meta_info.{key} is not a token count: {meta.get(key)!r:.50}")
    return count


def _cached(meta: dict[str, Any], prompt: int) -> int:
    """``meta_info.cached_tokens``: 0 when missing or not a count, at most the prompt."""
    return min(token_count(meta.get("cached_tokens")) or 0, prompt)


class SGLangBackend:
    """A :class:`~llmpath.backends.base.Backend` for an SGLang server (or the embedded engine)."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        chat_template: str | Callable[[Messages], str] | None = None,
        incremental_output: bool | None = None,
        headers: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        #: The server's clock when it reports timings (--enable-metrics); events say which was used.
        self.timing_source = TimingSource.BACKEND
        self._render_chat = load_chat_template(chat_template)
        self._incremental = incremental_output
        self._http = HttpClient(self.url, connect_timeout, read_timeout, headers, session)
        #: Why the last health check failed (``None`` when it passed, or before the first).
        self.health_error: str | None = None
        self._generate_url = self._http.url("/generate")

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendEvent]:
        """Run ``request`` on ``/generate``; see the module docstring for the mapping."""
        body = generate_body(request, self._render_chat)
        parser = GenerateStreamParser(time.monotonic(), self._incremental)
        try:
            async with self._http.post_json(self._generate_url, body, request.trace_headers) as resp:
                await raise_for_status(resp)
                if streams(resp, request.stream):
                    async for chunk in sse_json(resp, self._http.read_timeout):
                        for event in parser.feed(chunk):
                            yield event
                else:
                    payload = json_object(await read_body(resp))
                    if isinstance(payload, list) and len(payload) == 1:
                        payload = payload[0]
                    if not isinstance(payload, dict):
                        raise BackendProtocolError("/generate answered something other than an object")
                    for event in parser.feed(payload):
                        yield event
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.url) from exc
        if not parser.done:
            raise BackendProtocolError("/generate finished without a final output (finish_reason)")

    async def health(self) -> bool:
        """True when ``GET /health`` answers 200; otherwise ``health_error`` says why (``connection refused``,
        ``timed out``, ``answered HTTP 503``)."""
        self.health_error = await self._http.probe("/health")
        return self.health_error is None

    async def server_info(self) -> dict[str, Any]:
        """``GET /server_info`` (SGLang's server arguments and load)."""
        try:
            status, body = await self._http.get(self._http.url("/server_info"))
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.url) from exc
        if status >= 400:
            raise error_for_status(status, body)
        return json_object(body)

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"SGLangBackend({self.name!r}, url={self.url!r})"
