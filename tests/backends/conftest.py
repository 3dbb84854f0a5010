"""Fixtures of the backends tests: real engine processes started with the ``llmpath`` CLI."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

LLMPATH = str(Path(sys.executable).parent / "llmpath")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EngineProcess:
    """One ``llmpath engine serve`` child process (tiny preset, one torch thread), stopped by PID."""

    def __init__(self, log_dir: Path, *extra: str, name: str = "engine", env: dict[str, str] | None = None) -> None:
        self.port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log_dir / f"{name}-{self.port}.log"
        cmd = [LLMPATH, "engine", "serve", "--port", str(self.port), "--preset", "tiny", "--threads", "1", *extra]
        with self.log.open("wb") as fh:
            self.proc = subprocess.Popen(
                cmd, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **(env or {})}
            )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"engine exited with {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"engine not ready:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def engine_factory(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., EngineProcess]]:
    """``engine_factory(*flags, name=…, env=…)`` starts an engine for the module; all are stopped at the end."""
    started: list[EngineProcess] = []
    log_dir = tmp_path_factory.mktemp("engines")

    def start(*extra: str, name: str = "engine", env: dict[str, str] | None = None) -> EngineProcess:
        eng = EngineProcess(log_dir, *extra, name=name, env=env)
        started.append(eng)
        return eng

    yield start
    for eng in reversed(started):
        eng.stop()


@pytest.fixture(scope="module")
def engine(engine_factory: Callable[..., EngineProcess]) -> EngineProcess:
    """A tiny engine with fault injection allowed (tests that set faults clear them)."""
    return engine_factory("--enable-fault-injection")
