"""A raw asyncio HTTP/1.1 server on loopback that replays canned answers: the stand-in for an SGLang or
OpenAI-compatible server where a test needs control of the bytes on the wire (chunked SSE, dropped connections,
hangs) and of keep-alive."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from tests.raw_http import RawRequest, read_request


@dataclass
class Reply:
    """How the loopback server answers one path: an SSE ``body`` in HTTP/1.1 chunks (one per event, the terminal
    chunk a moment after ``data: [DONE]``, as a real server sends it), others with ``content-length``; ``close`` drops
    the connection before any byte of the answer; ``hang`` never answers; ``cut`` drops it after the first event."""

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    chunked: bool = True
    close: bool = False
    hang: bool = False
    #: Drop the connection after the first SSE event (a server that dies mid-stream).
    cut: bool = False


class LoopbackServer:
    """A real HTTP/1.1 server on loopback with keep-alive that replays canned answers, counting the TCP
    connections it accepts (to show that clients reuse them) and recording the requests."""

    def __init__(self) -> None:
        self.replies: dict[str, Reply] = {}
        self.connections = 0
        self.requests: list[RawRequest] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def reply(self, path: str, body: bytes = b"", **options: Any) -> None:
        """Answer ``path`` with ``body`` (options: :class:`Reply`'s fields)."""
        self.replies[path] = Reply(body, **options)

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):  # Server.close_clients() needs Python 3.13
                writer.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                request = await read_request(reader)
                self.requests.append(request)
                reply = self.replies.get(request.path, Reply(b"not found", status=404, chunked=False))
                if reply.close:
                    return
                if reply.hang:
                    await asyncio.sleep(3600)
                await self._answer(writer, reply)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _answer(self, writer: asyncio.StreamWriter, reply: Reply) -> None:
        ctype = "text/event-stream" if reply.body.startswith(b"data:") else "application/json"
        headers = {"content-type": ctype, **reply.headers}
        chunked = reply.chunked and reply.body.startswith(b"data:")
        if chunked:
            headers["transfer-encoding"] = "chunked"
        else:
            headers["content-length"] = str(len(reply.body))
        lines = [f"HTTP/1.1 {reply.status} X", *(f"{k}: {v}" for k, v in headers.items())]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if not chunked:
            writer.write(reply.body)
            await writer.drain()
            return
        for event in reply.body.split(b"\n\n"):
            if event:
                writer.write(b"%x\r\n%s\n\n\r\n" % (len(event) + 2, event))
                await writer.drain()
                if reply.cut:
                    raise ConnectionResetError("cut")
        await asyncio.sleep(0.005)  # the end of the body comes after [DONE], in its own write
        writer.write(b"0\r\n\r\n")
        await writer.drain()
