"""A misbehaving backend and a real gateway in front of it, both on loopback HTTP in the test's event loop.

:class:`RawBackend` is an asyncio TCP server that answers the health probes as a well-behaved server does and hands
every ``POST`` to the test's ``answer(writer, request)``, which writes whatever bytes the quirk under test needs
(broken framing, odd fields, a hang). :func:`serving_gateway` runs the gateway with uvicorn on a free port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn
from prometheus_client import CollectorRegistry

from llmpath.gateway.app import BackendFactory, HotPath, create_app, default_backend_factory
from llmpath.gateway.config import load_config
from tests.raw_http import RawRequest, read_request

Answer = Callable[[asyncio.StreamWriter, RawRequest], Awaitable[None]]


class RawBackend:
    """A loopback HTTP/1.1 server: ``GET`` probes get 200, ``POST``s go to ``answer`` (one request per connection:
    the answer ends by closing it unless it returns normally with a complete response)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.url = ""
        self.posts = 0
        self.open_connections = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> RawBackend:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.open_connections += 1
        try:
            while True:
                request = await read_request(reader)
                if request.method == "GET":
                    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 2\r\n\r\n{}")
                    await writer.drain()
                    continue
                self.posts += 1
                await self.answer(writer, request)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self.open_connections -= 1
            self._tasks.discard(task)
            writer.close()


def head(status: int = 200, headers: dict[str, str] | None = None, *, chunked: bool = False) -> bytes:
    """A response's status line and headers (``transfer-encoding: chunked`` when ``chunked``)."""
    hdrs = {"content-type": "text/event-stream", **(headers or {})}
    if chunked:
        hdrs["transfer-encoding"] = "chunked"
    lines = [f"HTTP/1.1 {status} X", *(f"{k}: {v}" for k, v in hdrs.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunk(data: bytes) -> bytes:
    """One HTTP/1.1 chunk of a chunked body (``b""``: the last one)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def meta(prompt: int = 5, completion: int = 1, cached: int = 0, **extra: Any) -> dict[str, Any]:
    """SGLang 0.5.23's ``meta_info`` of a stream chunk (with ``--enable-metrics``), plus ``extra``."""
    return {
        "id": "rid",
        "finish_reason": None,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "queue_time": 0.001,
        "forward_entry_time": 1000.0,
        "prefill_finished_time": 1000.002,
        **extra,
    }


def sglang_chunks(texts: Iterable[str] = ("Hel", "lo"), **final: Any) -> list[dict[str, Any]]:
    """A cumulative ``/generate`` stream's outputs; the last carries ``finish_reason`` and ``final``'s keys."""
    out, text = [], ""
    texts = list(texts)
    for i, piece in enumerate(texts, 1):
        text += piece
        m = meta(completion=i)
        if i == len(texts):
            m |= {"finish_reason": {"type": "stop", "matched": 2}, "e2e_latency": 0.01, **final}
        out.append({"text": text, "output_ids": list(range(i)), "meta_info": m})
    return out


def sse_answer(events: list[bytes], *, status: int = 200, headers: dict[str, str] | None = None) -> Answer:
    """An answer sending ``events`` (raw SSE bytes) as one chunk each, then the end of the body."""

    async def answer(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        writer.write(head(status, headers, chunked=True))
        for event in events:
            writer.write(chunk(event))
            await writer.drain()
        writer.write(chunk(b""))

    return answer


def in_turn(*answers: Answer) -> Answer:
    """An answer that is each of ``answers`` in turn, one a request."""
    remaining = iter(answers)

    async def answer(writer: asyncio.StreamWriter, request: RawRequest) -> None:
        await next(remaining)(writer, request)

    return answer


def sglang_answer(outputs: list[dict[str, Any]], *, done: bool = True) -> Answer:
    return sse_answer([*(sse(o) for o in outputs), *([b"data: [DONE]\n\n"] if done else [])])


@dataclass
class Served:
    app: HotPath
    client: httpx.AsyncClient

    async def chat(self, *, stream: bool = False, **extra: Any) -> httpx.Response:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": stream}
        return await self.client.post("/v1/chat/completions", json={**body, **extra})

    def records(self) -> list[Any]:
        return self.app.state.waterfall.recent()

    async def metrics(self) -> dict[str, float]:
        text = (await self.client.get("/metrics")).text
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line.startswith("llmpath_"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def held(self) -> tuple[int, int]:
        """(admission slots held, in-flight count of every backend): both 0 once every request is over."""
        gw = self.app.gateway
        return gw.admission.inflight, sum(s.inflight for s in gw.pool.states.values())


@contextlib.asynccontextmanager
async def serving_gateway(
    *urls: str,
    kind: str = "sglang",
    backend_factory: BackendFactory | None = None,
    tracer_provider: Any = None,
    **sections: Any,
) -> AsyncIterator[Served]:
    """The gateway (no auth) in front of ``urls``, served by uvicorn on loopback, with a client for it; its spans go
    to ``tracer_provider`` when given."""
    limits = sections.pop("limits", {})
    config = load_config(
        None,
        {
            "backends": [{"url": u, "name": f"b{i}", "kind": kind} for i, u in enumerate(urls)],
            "insecure_no_auth": True,
            "routing": {"max_retries": 0},
            "limits": {"timeouts": {"read_s": 2, "connect_s": 1}, **limits},
            **sections,
        },
    )
    app = create_app(
        config,
        registry=CollectorRegistry(),
        backend_factory=backend_factory or default_backend_factory,
        tracer_provider=tracer_provider,
    )
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error", lifespan="on"))
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=20) as client:
        try:
            yield Served(app, client)
        finally:
            server.should_exit = True
            await task
