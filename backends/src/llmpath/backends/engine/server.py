"""The engine's HTTP server: SGLang's native API (``/generate`` …) and its OpenAI-compatible routes.

Errors follow SGLang: native routes answer ``{"error": {"message", "type", "code"}}``, OpenAI routes
``{"object": "error", "message", "type", "param", "code"}``; a full queue is 503 with ``Retry-After``.
Prompt text is never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import ValidationError

from llmpath.backends.engine.loads import LoadsRequestError, loads_json, loads_prometheus, parse_include
from llmpath.backends.engine.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GenerateRequest,
    validation_message,
)
from llmpath.backends.engine.runtime import VERSION, Engine, RequestError, RequestStream
from llmpath.backends.engine.sampling import InvalidSamplingParams, SamplingParams, parse_sampling_params
from llmpath.backends.engine.scheduler import DuplicateRequestId, Output, QueueFull
from llmpath.backends.engine.tracing import extract_context

log = logging.getLogger("llmpath.engine")

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_FINISH = {"stop": "stop", "length": "length", "abort": "abort"}
Handler = Callable[[Request], Awaitable[Response]]


class ApiError(Exception):
    """An HTTP error answered in the route family's error shape."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers or {}


def _error_type(status: int) -> str:
    named = {400: "BadRequestError", 403: "PermissionDeniedError", 404: "NotFoundError",
             503: "ServiceUnavailableError"}  # fmt: skip
    return named.get(status, "InternalServerError" if status >= 500 else "BadRequestError")


def native_error(err: ApiError) -> JSONResponse:
    body = {"error": {"message": err.message, "type": _error_type(err.status), "code": err.status}}
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def openai_error(err: ApiError) -> JSONResponse:
    body = {"object": "error", "message": err.message, "type": _error_type(err.status), "param": err.param,
            "code": err.status}  # fmt: skip
    return JSONResponse(body, status_code=err.status, headers=err.headers)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def _finite(text: str) -> float:
    """A JSON number as a float; one out of a float's range (``1e400``) is no number the engine can use."""
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text[:32]} is out of range")
    return value


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")  # Python's json module would take NaN and Infinity


async def _json_body(request: Request) -> Any:
    """The request's JSON body; a 400 for one that is no JSON or holds what the engine cannot use (``NaN``, ``1e400``,
    nesting past the recursion limit, an unpaired surrogate escape)."""
    raw = await request.body()
    try:
        body = json.loads(raw or b"null", parse_float=_finite, parse_constant=_no_constant)
    except RecursionError:
        raise ApiError(400, "request body is not valid JSON: nested too deeply") from None
    except ValueError as exc:  # invalid JSON or UTF-8, NaN, 1e400, an integer of more than 4300 digits
        raise ApiError(400, f"request body is not valid JSON: {exc}") from None
    # A surrogate escape (JSON's \\u is lower case; two scans, no lower-cased copy of a long body): unpaired, no
    # text can hold it (tokenizer, responses, logs).
    if b"\\ud" in raw or b"\\uD" in raw:
        try:
            json.dumps(body, ensure_ascii=False).encode("utf-8")
        except UnicodeEncodeError as exc:
            bad = exc.object[exc.start].encode("unicode_escape").decode()
            raise ApiError(400, f"request body holds an unpaired UTF-16 surrogate escape ({bad})") from None
    return body


def _guard(render: Callable[[ApiError], JSONResponse]) -> Callable[[Handler], Handler]:
    """Turn :class:`ApiError` raised by a route into its error response."""

    def wrap(fn: Handler) -> Handler:
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as err:
                return render(err)

        handler.__name__ = fn.__name__
        return handler

    return wrap


def _namespace(extra_key: str | None, cache_salt: str | None) -> str:
    """Both ``extra_key`` and ``cache_salt`` are part of SGLang's radix key."""
    return f"{extra_key or ''}\x00{cache_salt or ''}" if (extra_key or cache_salt) else ""


def create_app(engine: Engine, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The FastAPI app serving ``engine`` (whose scheduler must be started); ``on_shutdown`` runs when the server
    stops (uvicorn re-raises SIGTERM after its graceful shutdown, so a ``finally`` around it would not run)."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="llmpath engine", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    args = engine.args

    def inject_fault() -> None:
        if args.enable_fault_injection and engine.faults.should_fail():
            raise ApiError(500, "Injected fault: internal server error (llmpath fault injection).")

    def start(
        input_ids: list[int], params: SamplingParams, *, rid: str | None, namespace: str, stream: bool,
        request: Request, received: tuple[float, float], log_metrics: bool = True,
    ) -> RequestStream:  # fmt: skip
        """Submit a request; refusals become HTTP errors before any byte is sent."""
        try:
            return engine.submit(
                input_ids, params, rid=rid, namespace=namespace, stream=stream,
                trace_parent=extract_context(request.headers), received_ts=received[0], received_mono=received[1],
                log_metrics=log_metrics,
            )  # fmt: skip
        except (RequestError, InvalidSamplingParams, DuplicateRequestId) as exc:
            raise ApiError(400, str(exc), getattr(exc, "param", None)) from None
        except QueueFull as exc:
            raise ApiError(503, str(exc), headers={"Retry-After": "1"}) from None

    # ------------------------------------------------------------------ native

    @app.get("/health")
    @app.get("/health_generate")
    @_guard(native_error)  # a full queue refuses the probe's generation: 503 with Retry-After, as a request
    async def health(request: Request) -> Response:
        if not engine.scheduler.alive:
            return Response(status_code=503)
        if request.url.path == "/health_generate":
            params = SamplingParams(max_new_tokens=1, temperature=0.0)
            gen = start(engine.encode("health"), params, rid=None, namespace="__health__", stream=False,
                        request=request, received=(time.time(), time.monotonic()), log_metrics=False)  # fmt: skip
            await _collect(gen)
        return Response(status_code=200)

    @app.get("/model_info")
    @app.get("/get_model_info")
    async def model_info() -> JSONResponse:
        return JSONResponse(engine.model_info())

    @app.get("/server_info")
    @app.get("/get_server_info")
    async def server_info() -> JSONResponse:
        return JSONResponse(engine.server_info())

    @app.get("/v1/loads")
    async def loads(dp_rank: int | None = None, include: str | None = None, format: str | None = None) -> Response:
        # SGLang's query: ?dp_rank=N&include=core,memory,...&format=json|prometheus (one DP rank here: 0)
        try:
            sections = parse_include(include)
            if dp_rank not in (None, 0):
                raise LoadsRequestError(f"dp_rank {dp_rank} out of range: this server has one DP rank (0)")
        except LoadsRequestError as exc:
            return JSONResponse({"detail": str(exc)}, status_code=400)
        if format == "prometheus":
            return PlainTextResponse(
                loads_prometheus(engine, sections), media_type="text/plain; version=0.0.4; charset=utf-8"
            )
        return JSONResponse(loads_json(engine, sections, VERSION, engine.accelerator()))

    @app.get("/get_load")
    async def get_load() -> JSONResponse:
        ld = engine.scheduler.loads()
        return JSONResponse(
            [{"dp_rank": 0, "num_reqs": ld["num_running_reqs"] + ld["num_waiting_reqs"],
              "num_waiting_reqs": ld["num_waiting_reqs"], "num_tokens": ld["num_used_tokens"]}]
        )  # fmt: skip

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache() -> Response:
        if await asyncio.wrap_future(engine.scheduler.flush_cache()):
            return PlainTextResponse(
                "Cache flushed.\nPlease check backend logs for more details. (When there are running or waiting "
                "requests, the operation will not be performed.)\n"
            )
        return PlainTextResponse("Cache not flushed: requests are running or waiting.\n", status_code=400)

    @app.post("/abort_request")
    @_guard(native_error)
    async def abort_request(request: Request) -> Response:
        # SGLang's AbortReqInput: {"rid": "", "abort_all": false}. A known rid aborts every request whose rid
        # starts with it; an empty rid without abort_all is ignored (it would match every request).
        body = await _json_body(request)
        if not isinstance(body, dict):
            raise ApiError(400, "abort_request needs a JSON object with 'rid' or 'abort_all'")
        rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
        if not isinstance(rid, str):
            raise ApiError(400, "abort_request needs a string 'rid'")
        if not isinstance(abort_all, bool):
            raise ApiError(400, "abort_request needs a boolean 'abort_all'")
        if abort_all or rid:  # the clients get their output so far, finish_reason abort
            engine.scheduler.abort(None if abort_all else rid, requested=True)
        else:
            log.warning("abort_request with an empty rid and abort_all false: ignored")
        return Response(status_code=200)

    @app.get("/metrics")
    async def metrics() -> Response:
        if engine.metrics is None:
            return Response("metrics are disabled (the engine runs with --disable-metrics)\n", status_code=404)
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(engine.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.api_route("/generate", methods=["POST", "PUT"])
    @_guard(native_error)
    async def generate(request: Request) -> Response:
        received = (time.time(), time.monotonic())
        try:
            req = GenerateRequest.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise ApiError(400, validation_message(exc)[0]) from None
        inject_fault()
        if req.input_embeds is not None:
            raise ApiError(400, "input_embeds is not supported by this engine")
        if req.return_logprob:
            raise ApiError(400, "return_logprob is not supported by this engine")
        if (req.text is None) == (req.input_ids is None):
            raise ApiError(400, "Either text or input_ids should be provided (exactly one).")
        ids = req.input_ids
        batch = isinstance(req.text, list) or (bool(ids) and isinstance(ids[0], list))  # type: ignore[index]
        prompts: list[list[int]]
        if req.text is not None:
            prompts = [engine.encode(t) for t in (req.text if isinstance(req.text, list) else [req.text])]
        else:
            prompts = ids if batch else [ids]  # type: ignore[assignment, list-item]  # one of the two shapes
        raw_params = req.sampling_params
        param_list = raw_params if isinstance(raw_params, list) else [raw_params] * len(prompts)
        rids = req.rid if isinstance(req.rid, list) else [req.rid] * len(prompts)
        if len(param_list) != len(prompts) or len(rids) != len(prompts):
            raise ApiError(400, "sampling_params and rid lists must match the batch size")
        if batch and req.stream:
            raise ApiError(400, "streaming a batch is not supported; send one request per prompt")
        named = [r for r in rids if r]
        if batch and len(set(named)) != len(named):
            raise ApiError(400, "Duplicate request ID detected in the batch")
        try:
            params = [parse_sampling_params(p) for p in param_list]
        except InvalidSamplingParams as exc:
            raise ApiError(400, str(exc)) from None
        if req.received_time is not None:
            received = (req.received_time, received[1] - (time.time() - req.received_time))
        namespace = _namespace(req.extra_key, req.cache_salt)
        gens: list[RequestStream] = []
        try:
            for ids, p, rid in zip(prompts, params, rids, strict=True):
                gens.append(start(ids, p, rid=rid, namespace=namespace, stream=bool(req.stream), request=request,
                                  received=received, log_metrics=req.log_metrics is not False))  # fmt: skip
        except ApiError:
            for g in gens:
                await g.aclose()
            raise
        if req.stream:
            stream = _native_stream(gens[0], args.incremental_streaming_output)
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        bodies = []
        for out in await _collect_while_connected(request, gens):
            if out.error:
                raise ApiError(*out.error)
            meta = {**out.meta, "response_sent_to_client_ts": time.time()}
            bodies.append({"text": out.text, "output_ids": out.output_ids, "meta_info": meta})
        return JSONResponse(bodies if batch else bodies[0])

    # ------------------------------------------------------------------ OpenAI-compatible

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = {"id": engine.model_name, "object": "model", "created": int(engine.started_at), "owned_by": "sglang",
                "root": engine.model_name, "max_model_len": engine.context_length}  # fmt: skip
        return JSONResponse({"object": "list", "data": [card]})

    @app.post("/v1/chat/completions")
    @_guard(openai_error)
    async def chat_completions(request: Request) -> Response:
        received = (time.time(), time.monotonic())
        try:
            req = ChatCompletionRequest.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise ApiError(400, *validation_message(exc)) from None
        inject_fault()
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        try:
            ids = engine.encode(engine.render_chat(messages))
            max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
            params = req.sampling(max_tokens)
        except ValueError as exc:  # InvalidSamplingParams or a chat template error
            raise ApiError(400, str(exc)) from None
        return await openai_response(request, req, ids, params, received, chat=True)

    @app.post("/v1/completions")
    @_guard(openai_error)
    async def completions(request: Request) -> Response:
        received = (time.time(), time.monotonic())
        try:
            req = CompletionRequest.model_validate(await _json_body(request))
        except ValidationError as exc:
            raise ApiError(400, *validation_message(exc)) from None
        inject_fault()
        if req.suffix:
            raise ApiError(400, "suffix is not supported by this engine", "suffix")
        prompt: Any = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list):
            if len(prompt) != 1:
                raise ApiError(400, "batched prompts are not supported; send one request per prompt", "prompt")
            prompt = prompt[0]
        ids = engine.encode(prompt) if isinstance(prompt, str) else list(prompt)
        try:
            params = req.sampling(req.max_tokens if req.max_tokens is not None else 16)  # OpenAI's default
        except InvalidSamplingParams as exc:
            raise ApiError(400, str(exc)) from None
        return await openai_response(request, req, ids, params, received, chat=False)

    async def openai_response(
        request: Request, req: Any, ids: list[int], params: SamplingParams, received: tuple[float, float], *,
        chat: bool,
    ) -> Response:  # fmt: skip
        rid = req.rid or (f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}")
        gen = start(ids, params, rid=rid, namespace=_namespace(req.extra_key, req.cache_salt), stream=bool(req.stream),
                    request=request, received=received)  # fmt: skip
        model = req.model or engine.model_name
        created = int(received[0])
        echo = req.prompt if getattr(req, "echo", False) and isinstance(getattr(req, "prompt", None), str) else ""
        if req.stream:
            opts = req.stream_options
            include_usage = bool(opts.include_usage) if opts else args.stream_response_default_include_usage
            continuous = bool(opts and opts.continuous_usage_stats)
            stream = _openai_stream(gen, _ChunkShape(rid, model, created, chat), include_usage, continuous,
                                    args.enable_cache_report, echo)  # fmt: skip
            return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
        (out,) = await _collect_while_connected(request, [gen])
        if out.error:
            raise ApiError(*out.error)
        reason = out.meta["finish_reason"] or {}
        finish = {"finish_reason": _FINISH.get(reason.get("type", ""), "stop"), "matched_stop": reason.get("matched")}
        if chat:
            message = {"role": "assistant", "content": out.text, "reasoning_content": None, "tool_calls": None}
            choice = {"index": 0, "message": message, "logprobs": None, **finish}
        else:
            choice = {"index": 0, "text": echo + out.text, "logprobs": None, **finish}
        body = {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": model, "choices": [choice], "usage": _usage(out.meta, args.enable_cache_report),
                "metadata": {"weight_version": "default"}}  # fmt: skip
        return JSONResponse(body)

    # ------------------------------------------------------------------ fault injection

    @app.api_route("/debug/fault", methods=["GET", "POST", "DELETE"])
    @_guard(native_error)
    async def debug_fault(request: Request) -> Response:
        if not args.enable_fault_injection:
            raise ApiError(403, "fault injection is disabled; start the engine with --enable-fault-injection")
        if request.method == "GET":
            return JSONResponse(engine.faults.state.to_dict())
        if request.method == "DELETE":
            state = engine.faults.clear()
            log.warning("fault injection cleared")
            return JSONResponse(state.to_dict())
        try:
            state = engine.faults.update(await _json_body(request))
        except ValueError as exc:
            raise ApiError(400, str(exc)) from None
        log.warning("fault injection set: %s", state.to_dict())
        return JSONResponse(state.to_dict())

    return app


class _Final:
    """The last output of a request, with all its output ids."""

    __slots__ = ("error", "meta", "output_ids", "text")

    def __init__(self, out: Output, ids: list[int]) -> None:
        self.text, self.meta, self.error, self.output_ids = out.text, out.meta, out.error, ids


async def _collect(gen: RequestStream) -> _Final:
    ids: list[int] = []
    last: Output | None = None
    try:
        async for out in gen:
            ids.extend(out.new_ids)
            last = out
    finally:
        await gen.aclose()
    assert last is not None
    return _Final(last, ids)


async def _collect_while_connected(request: Request, gens: list[RequestStream]) -> list[_Final]:
    """Collect non-streamed requests; if the client goes away first, abort them (as SGLang does)."""
    task = asyncio.ensure_future(asyncio.gather(*(_collect(g) for g in gens)))
    while True:
        done, _ = await asyncio.wait([task], timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()  # each _collect closes its stream: the engine aborts the request and frees its KV
            with contextlib.suppress(asyncio.CancelledError):
                await task
            raise ApiError(499, "client disconnected")


async def _native_stream(gen: RequestStream, incremental: bool) -> AsyncIterator[str]:
    """SGLang's /generate SSE: cumulative ``text``/``output_ids`` unless ``--incremental-streaming-output``."""
    ids: list[int] = []
    sent_first = False
    try:
        async for out in gen:
            if out.error:
                kind = "invalid_request_error" if out.error[0] < 500 else "internal_error"
                yield _sse({"error": {"message": out.error[1], "type": kind, "code": out.error[0], "retryable": False}})
                break
            ids.extend(out.new_ids)
            meta = dict(out.meta)
            if not sent_first or out.finished:
                meta["response_sent_to_client_ts"] = time.time()
            sent_first = True
            if incremental:
                yield _sse({"text": out.new_text, "output_ids": out.new_ids, "meta_info": meta})
            else:
                yield _sse({"text": out.text, "output_ids": list(ids), "meta_info": meta})
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()  # a client disconnect cancels this generator: the request is aborted


def _usage(meta: dict[str, Any], cache_report: bool) -> dict[str, Any]:
    prompt, completion = meta["prompt_tokens"], meta["completion_tokens"]
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": meta["cached_tokens"]} if cache_report else None,
        "reasoning_tokens": 0,
    }


class _ChunkShape:
    """Builds OpenAI stream chunks of one response."""

    def __init__(self, rid: str, model: str, created: int, chat: bool) -> None:
        self.rid, self.model, self.created, self.chat = rid, model, created, chat

    def chunk(self, choice: dict[str, Any] | None, usage: dict[str, Any] | None = None) -> str:
        return _sse({"id": self.rid, "object": "chat.completion.chunk" if self.chat else "text_completion",
                     "created": self.created, "model": self.model, "choices": [choice] if choice else [],
                     "usage": usage})  # fmt: skip

    def content(self, text: str, usage: dict[str, Any] | None = None) -> str:
        body = {"delta": {"content": text}} if self.chat else {"text": text}
        return self.chunk({"index": 0, **body, "logprobs": None, "finish_reason": None}, usage)

    def finish(self, reason: dict[str, Any], usage: dict[str, Any] | None) -> str:
        body: dict[str, Any] = {"delta": {}} if self.chat else {"text": ""}
        fin = {"finish_reason": _FINISH.get(reason.get("type", ""), "stop"), "matched_stop": reason.get("matched")}
        return self.chunk({"index": 0, **body, "logprobs": None, **fin}, usage)


async def _openai_stream(
    gen: RequestStream, shape: _ChunkShape, include_usage: bool, continuous: bool, cache_report: bool, echo: str
) -> AsyncIterator[str]:
    try:
        if shape.chat:
            yield shape.chunk({"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None})  # fmt: skip
        elif echo:
            yield shape.content(echo)
        async for out in gen:
            if out.error:
                yield _sse({"object": "error", "message": out.error[1], "type": _error_type(out.error[0]),
                            "param": None, "code": out.error[0]})  # fmt: skip
                break
            usage = _usage(out.meta, cache_report) if continuous else None
            if out.new_text or (continuous and not out.finished):
                yield shape.content(out.new_text, usage)
            if out.finished:
                yield shape.finish(out.meta["finish_reason"] or {}, usage)
                if include_usage:
                    yield shape.chunk(None, _usage(out.meta, cache_report))
        yield "data: [DONE]\n\n"
    finally:
        await gen.aclose()
