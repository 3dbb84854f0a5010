"""Reading one HTTP/1.1 request off an asyncio stream, for the tests' raw servers (``tests/gateway/hostile.py``,
``tests/backends/canned_server.py``), which control every byte of their answers."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any


@dataclass
class RawRequest:
    """One request as it came: method, target, lowercase header names, body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


async def read_request(reader: asyncio.StreamReader) -> RawRequest:
    """The next request on a connection (its body by ``content-length``); raises ``asyncio.IncompleteReadError`` when
    the client closes it."""
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
    method, path, _ = head[0].split(" ", 2)
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in head[1:] if h)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawRequest(method, path, headers, body)
