"""A backend for any OpenAI-compatible server (OpenAI, vLLM, SGLang's ``/v1`` routes, the embedded engine).

The URL is the server's base, with or without one trailing ``/v1`` (``http://h:8000`` and ``http://h:8000/v1`` are
the same backend). Chat messages go to ``/v1/chat/completions``, a prompt or token ids to ``/v1/completions``;
streams ask for ``stream_options.include_usage`` so the final usage (with ``prompt_tokens_details.cached_tokens``)
arrives.
OpenAI's protocol carries no server timings, so every timing is the gateway's clock (``TimingSource.GATEWAY``):
queue is reported as 0 and the time to the first content chunk as prefill. Prompt and cached token counts are
known only at the end: ``FirstToken`` carries them when the server sends usage on every chunk
(``continuous_usage=True``, a vLLM/SGLang extension), else 0; ``Done.usage`` is authoritative, unless the server
sent none (it ignored ``stream_options.include_usage``: ``Done.usage_reported`` is false, see there).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from llmpath.backends._http import (
    TRANSPORT_ERRORS,
    HttpClient,
    json_object,
    raise_for_status,
    raise_stream_error,
    read_body,
    sse_json,
    streams,
    transport_error,
)
from llmpath.backends._values import token_count
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

_FINISH = {"stop": "stop", "length": "length", "content_filter": "stop", "tool_calls": "stop"}


def openai_body(request: BackendRequest, model: str | None, continuous_usage: bool) -> tuple[str, dict[str, Any]]:
    """The route and JSON body of a normalized request."""
    s = request.sampling
    body: dict[str, Any] = {"model": model or request.model, "max_tokens": s.max_tokens, "temperature": s.temperature,
                            "top_p": s.top_p, "stream": request.stream}  # fmt: skip
    if s.top_k > 0:
        body["top_k"] = s.top_k
    if s.stop:
        body["stop"] = list(s.stop)
    if s.seed is not None:
        body["seed"] = s.seed
    if s.ignore_eos:
        body["ignore_eos"] = True
    if request.stream:
        body["stream_options"] = {
            "include_usage": True,
            **({"continuous_usage_stats": True} if continuous_usage else {}),
        }
    if request.cache_salt:
        body["cache_salt"] = request.cache_salt
    if request.messages is not None:
        body["messages"] = [{"role": m.role, "content": m.content} for m in request.messages]
        return "/v1/chat/completions", body
    body["prompt"] = request.prompt if request.prompt is not None else list(request.input_ids or [])
    return "/v1/completions", body


def openai_base_url(url: str) -> str:
    """The server's base URL without one trailing ``/v1``: ``http://h:8000/v1/`` and ``http://h:8000`` both give
    ``http://h:8000`` (most OpenAI clients take the ``/v1`` form; the backend adds ``/v1/...`` itself)."""
    return url.rstrip("/").removesuffix("/v1")


def _usage(obj: Any) -> Usage | None:
    """A chunk's ``usage``, or ``None`` when it has none that counts: ``usage: null``, or ``prompt_tokens`` (or a
    given ``completion_tokens``) that is not a token count (some servers put a usage of nulls on every chunk).
    Cached tokens missing or not a count are 0, and never more than the prompt."""
    if not isinstance(obj, dict):
        return None
    prompt = token_count(obj.get("prompt_tokens"))
    completion = token_count(obj.get("completion_tokens")) if obj.get("completion_tokens") is not None else 0
    if prompt is None or completion is None:
        return None
    details = obj.get("prompt_tokens_details")
    cached = token_count(details.get("cached_tokens")) if isinstance(details, dict) else None
    details = obj.get("completion_tokens_details")
    reasoning = token_count(details.get("reasoning_tokens")) if isinstance(details, dict) else None
    return Usage(prompt, completion, min(cached or 0, prompt), min(reasoning or 0, completion))


class OpenAIBackend:
    """A :class:`~llmpath.backends.base.Backend` for an OpenAI-compatible HTTP server."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 300.0,
        continuous_usage: bool = False,
        headers: dict[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.url = openai_base_url(url)
        self.name = name or self.url
        self.timing_source = TimingSource.GATEWAY
        #: Overrides ``BackendRequest.model`` (the upstream's model id), when set.
        self.model = model
        self._continuous_usage = continuous_usage
        hdrs = dict(headers or {})
        if api_key:
            hdrs["Authorization"] = f"Bearer {api_key}"
        self._http = HttpClient(self.url, connect_timeout, read_timeout, hdrs, session)
        #: Why the last health check failed (``None`` when it passed, or before the first).
        self.health_error: str | None = None
        self._urls = {path: self._http.url(path) for path in ("/v1/chat/completions", "/v1/completions")}

    async def generate(self, request: BackendRequest) -> AsyncIterator[BackendEvent]:
        path, body = openai_body(request, self.model, self._continuous_usage)
        chat = path.endswith("chat/completions")
        started = time.monotonic()
        first_at: float | None = None
        usage: Usage | None = None
        finish: str | None = None
        model: str | None = None
        streamed = 0
        try:
            async with self._http.post_json(self._urls[path], body, request.trace_headers) as resp:
                await raise_for_status(resp)
                streamed_answer = streams(resp, request.stream)
                chunks = sse_json(resp, self._http.read_timeout) if streamed_answer else _single(resp)
                async for chunk in chunks:
                    raise_stream_error(chunk)
                    usage = _usage(chunk.get("usage")) or usage
                    if isinstance(chunk.get("model"), str):
                        model = chunk["model"]
                    for choice in _choices(chunk):
                        if choice.get("finish_reason") == "abort":  # SGLang's OpenAI routes: output cut short
                            raise BackendAborted()
                        text, reasoning = _choice_text(choice, chat)
                        if first_at is None and (text or reasoning or choice.get("finish_reason")):
                            first_at = time.monotonic()
                            yield Scheduled(0.0, TimingSource.GATEWAY)
                            yield FirstToken(first_at - started, usage.prompt_tokens if usage else 0,
                                             usage.cached_tokens if usage else 0, TimingSource.GATEWAY)  # fmt: skip
                        if text or reasoning:
                            # A non-streamed answer covers all tokens; a stream chunk is one token in practice.
                            n = usage.completion_tokens if usage and not streamed_answer else 1
                            streamed += n
                            yield TokenDelta(text, n, reasoning)
                        if choice.get("finish_reason"):  # unknown reasons (TGI's "eos_token", ...) are a stop
                            reason = choice["finish_reason"]
                            finish = _FINISH.get(reason, "stop") if isinstance(reason, str) else "stop"
        except TRANSPORT_ERRORS as exc:
            raise transport_error(exc, self.url) from exc
        if finish is None:
            raise BackendProtocolError(f"{path} finished without a finish_reason")
        reported = usage is not None
        if usage is None:  # the server ignored stream_options.include_usage: what was streamed, no prompt
            usage = Usage(0, streamed, 0)
        end = time.monotonic()
        timings = BackendTimings(
            queue_seconds=None,
            prefill_seconds=(first_at or end) - started,
            first_token_seconds=(first_at or end) - started,
            e2e_seconds=end - started,
            source=TimingSource.GATEWAY,
        )
        yield Done(usage, finish, timings, model, usage_reported=reported)

    async def health(self) -> bool:
        """True when ``GET /v1/models`` answers 200; otherwise ``health_error`` says why (``connection refused``,
        ``timed out``, ``answered HTTP 503``)."""
        self.health_error = await self._http.probe("/v1/models")
        return self.health_error is None

    async def aclose(self) -> None:
        await self._http.aclose()

    def __repr__(self) -> str:
        return f"OpenAIBackend({self.name!r}, url={self.url!r})"


def _choices(chunk: dict[str, Any]) -> list[dict[str, Any]]:
    """A chunk's ``choices`` (none when missing or ``null``); a protocol error when they are not a list of objects."""
    choices = chunk.get("choices")
    if choices is None:
        return []
    if not isinstance(choices, list) or not all(isinstance(c, dict) for c in choices):
        raise BackendProtocolError(f"choices is not a list of objects: {str(choices)[:100]!r}")
    return choices


#: Where servers with a reasoning parser put a reasoning model's thinking: ``reasoning_content`` (DeepSeek, SGLang,
#: vLLM before its rename) or ``reasoning`` (vLLM since, OpenAI's gpt-oss guidance).
REASONING_FIELDS = ("reasoning_content", "reasoning")


def _choice_text(choice: dict[str, Any], chat: bool) -> tuple[str, str]:
    """A choice's new answer text and new reasoning text (``""`` for none)."""
    reasoning = None
    if chat:
        part = choice.get("delta") or choice.get("message") or {}
        if not isinstance(part, dict):
            return "", ""
        text = part.get("content")
        for field in REASONING_FIELDS:
            reasoning = part.get(field)
            if reasoning:
                break
    else:
        text = choice.get("text")
    if text is not None and not isinstance(text, str):
        raise BackendProtocolError(f"a choice's text is a {type(text).__name__}, not a string")
    if reasoning is not None and not isinstance(reasoning, str):
        raise BackendProtocolError(f"a choice's reasoning is a {type(reasoning).__name__}, not a string")
    return text or "", reasoning or ""


async def _single(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    obj = json_object(await read_body(resp))
    if not isinstance(obj, dict):
        raise BackendProtocolError("response is not a JSON object")
    yield obj
