"""Running the gateway under uvicorn, with a drain when it is told to stop."""

from __future__ import annotations

from types import FrameType

import uvicorn

from llmpath.gateway.service import Gateway


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the gateway as draining when SIGTERM or SIGINT arrives.

    uvicorn then closes the listening sockets, waits ``timeout_graceful_shutdown`` (``listen.drain_s``) for the
    requests in flight and cancels the rest; the gateway answers those with a 503 ``shutting_down`` (an SSE error
    event in a stream that has begun) instead of recording them as abandoned by their clients.
    """

    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.gateway.draining = True
        super().handle_exit(sig, frame)
