"""A health probe against a server whose answer never ends: the probe says so instead of reading forever (and the
backend's ``/server_info`` read is bounded the same way). A raw loopback HTTP server streams the endless body."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from llmpath.backends import _http
from llmpath.backends.base import BackendProtocolError
from llmpath.backends.sglang import SGLangBackend


async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\n\r\n")
        block = b"x" * (64 << 10)
        while True:
            writer.write(b"%x\r\n%s\r\n" % (len(block), block))
            await writer.drain()


async def test_a_probe_of_an_endless_answer_stops_at_the_body_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_http, "MAX_BODY_BYTES", 1 << 20)
    server = await asyncio.start_server(endless, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    backend = SGLangBackend(url, read_timeout=5)
    try:
        assert not await asyncio.wait_for(backend.health(), 10)
        assert backend.health_error == f"answer larger than {1 << 20} bytes"
        with pytest.raises(BackendProtocolError):
            await asyncio.wait_for(backend.server_info(), 10)
    finally:
        await backend.aclose()
        server.close()
