"""Waiting for an engine's scheduler to reach given figures (its ``/v1/loads``)."""

from __future__ import annotations

import asyncio
import time
from typing import Any


async def wait_loads(client: Any, timeout_s: float = 5.0, **want: int) -> dict[str, Any]:
    """Poll the engine's ``/v1/loads`` (``client``: an ``httpx.AsyncClient`` on its URL) until its figures equal
    ``want`` or ``timeout_s`` passes; returns the last figures either way."""
    deadline = time.monotonic() + timeout_s
    while True:
        loads: dict[str, Any] = (await client.get("/v1/loads")).json()["loads"][0]
        if all(loads[k] == v for k, v in want.items()) or time.monotonic() >= deadline:
            return loads
        await asyncio.sleep(0.02)
