"""Running the gateway under uvicorn, with a drain when it is told to stop."""

from __future__ import annotations

import asyncio
import logging
import socket
from types import FrameType

import uvicorn

from llmpath.gateway.service import Gateway

log = logging.getLogger("llmpath.gateway")

#: On a forced stop, how long the requests in flight get to send their 503 ``shutting_down`` once cancelled.
FORCED_CUT_S = 1.0
#: On a forced stop, how long the application's own shutdown (backend clients, exporters) may take.
FORCED_SHUTDOWN_S = 5.0


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the gateway as draining when SIGTERM or SIGINT arrives.

    uvicorn then closes the listening sockets, waits ``timeout_graceful_shutdown`` (``listen.drain_s``) for the
    requests in flight and cancels the rest; the gateway answers those with a 503 ``shutting_down`` (an SSE error
    event in a stream that has begun) instead of recording them as abandoned by their clients.

    A second SIGINT stops at once (uvicorn's ``force_exit``). uvicorn then neither cancels the requests in flight
    nor runs the application's shutdown, and Python's exit cancels the application's lifespan task with a
    traceback; here the requests are cut as at the end of the drain and the application shuts down as usual,
    with one log line.
    """

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.gateway.draining = True
        super().handle_exit(sig, frame)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if not self.force_exit:
            return
        tasks = [t for t in self.server_state.tasks if not t.done()]
        log.warning("SIGINT during the drain: stopping now, %d request(s) in flight cut (503)", len(tasks))
        for task in tasks:
            task.cancel(msg="forced stop (second SIGINT)")
        if tasks:
            await asyncio.wait(tasks, timeout=FORCED_CUT_S)
        lifespan_done = getattr(self.lifespan, "shutdown_event", None)
        if lifespan_done is not None and not lifespan_done.is_set():  # uvicorn skipped it for the forced exit
            try:  # bounded: uvicorn ignores a further SIGINT, so a stuck shutdown must not hang the stop
                await asyncio.wait_for(self.lifespan.shutdown(), FORCED_SHUTDOWN_S)
            except TimeoutError:
                log.warning("application shutdown took over %g s after the forced stop: exiting without it",
                            FORCED_SHUTDOWN_S)  # fmt: skip
