"""Fixtures of the backends tests: real engine processes started with the ``llmpath`` CLI."""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from llmpath.demo.supervisor import ManagedProcess, Supervisor, free_port
from tests.backends.canned_server import LoopbackServer

LLMPATH = str(Path(sys.executable).parent / "llmpath")


@dataclass(frozen=True)
class EngineProcess:
    """One ``llmpath engine serve`` child process (tiny preset, one torch thread) owned by a :class:`Supervisor`."""

    url: str
    process: ManagedProcess


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EngineProcess]]:
    """``engine_factory(*flags, name=…, env=…)`` starts an engine for the module (raises :class:`ProcessFailed`,
    with the log's tail, if it exits or never gets ready); all are stopped by PID at the end."""
    with Supervisor(tmp_path_factory.mktemp("engines")) as supervisor:

        def start(*extra: str, name: str = "engine", env: dict[str, str] | None = None) -> EngineProcess:
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            cmd = [LLMPATH, "engine", "serve", "--port", str(port), "--preset", "tiny", "--threads", "1", *extra]
            return EngineProcess(url, supervisor.spawn(f"{name}-{port}", cmd, ready_url=f"{url}/health", env=env))

        yield start


@pytest.fixture(scope="module")
def engine(engine_factory: Callable[..., EngineProcess]) -> EngineProcess:
    """A tiny engine with fault injection allowed (tests that set faults clear them)."""
    return engine_factory("--enable-fault-injection")


@pytest.fixture
async def loopback() -> AsyncIterator[LoopbackServer]:
    """A started :class:`LoopbackServer` (stopped at teardown)."""
    server = LoopbackServer()
    await server.start()
    yield server
    await server.stop()
