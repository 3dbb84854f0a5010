"""A byte-forwarding TCP proxy (asyncio protocols on uvloop): the cheapest process a request can cross.

``bench/gateway_overhead.py`` puts it in front of the engine as a reference hop: what crossing one more process
costs on the same shared cores, with no HTTP parsing, stages or instrumentation at all.

    .venv/bin/python bench/tcp_proxy.py --port 9000 --upstream 127.0.0.1:30000
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import uvloop


class _Pipe(asyncio.Protocol):
    """One direction's sink: bytes received on this side are written to ``peer``."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: asyncio.Transport | None = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.pending.append(data)
        else:
            self.peer.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()


class _Client(_Pipe):
    """The client's side: opens the upstream connection when the client connects."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        super().__init__()
        self.upstream = upstream

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        asyncio.get_running_loop().create_task(self._connect())

    async def _connect(self) -> None:
        loop = asyncio.get_running_loop()
        assert self.transport is not None
        try:
            upstream, side = await loop.create_connection(_Pipe, *self.upstream)
        except OSError:
            self.transport.close()
            return
        if self.transport.is_closing():  # the client left while we connected
            upstream.close()
            return
        side.peer = self.transport
        self.peer = upstream
        for data in self.pending:
            upstream.write(data)
        self.pending.clear()


async def serve(port: int, upstream: tuple[str, int]) -> None:
    """Forward every connection on ``127.0.0.1:port`` to ``upstream`` until cancelled."""
    server = await asyncio.get_running_loop().create_server(lambda: _Client(upstream), "127.0.0.1", port)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.upstream.rpartition(":")
    uvloop.run(serve(args.port, (host, int(port))))


if __name__ == "__main__":
    main()
