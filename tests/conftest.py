"""Shared fixtures: free loopback ports and real child processes that are always stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
LLMPATH = str(VENV_BIN / "llmpath")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(name="free_port")
def free_port_fixture():
    return free_port


def require_binary(name: str) -> str:
    """Path of a system binary, or skip the test saying which Debian package provides it."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (make test installs it via apt-get)")
    return path


@pytest.fixture(name="require_binary")
def require_binary_fixture():
    """``require_binary("promtool")`` → path, or skips the test."""
    return require_binary


@pytest.fixture
def llmpath_bin() -> str:
    """Path of the ``llmpath`` CLI in the test's virtual environment."""
    return LLMPATH


class ProcessManager:
    """Starts real child processes, waits until they answer, and stops them all (SIGTERM, then SIGKILL) by PID."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes], Path]] = []

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        ready_url: str | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60.0,
    ) -> subprocess.Popen[bytes]:
        log = self.log_dir / f"{name}.log"
        full_env = {**os.environ, **(env or {})}
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                list(cmd), stdout=fh, stderr=subprocess.STDOUT, env=full_env, cwd=cwd, start_new_session=True
            )
        self.procs.append((name, proc, log))
        if ready_url is not None:
            self.wait_ready(name, proc, ready_url, timeout, log)
        return proc

    @staticmethod
    def wait_ready(name: str, proc: subprocess.Popen[bytes], url: str, timeout: float, log: Path) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
            try:
                if httpx.get(url, timeout=1.0).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready at {url} after {timeout}s:\n{log.read_text(errors='replace')[-4000:]}")

    def stop(self, proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=timeout)

    def stop_all(self) -> None:
        for _, proc, _ in reversed(self.procs):
            self.stop(proc)

    def logs(self) -> str:
        return "\n".join(
            f"----- {name} (pid {proc.pid}, rc {proc.returncode}) -----\n{log.read_text(errors='replace')[-3000:]}"
            for name, proc, log in self.procs
        )


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[ProcessManager]:
    """Real child processes for one test; all are stopped at teardown, and their logs printed on failure."""
    mgr = ProcessManager(tmp_path)
    try:
        yield mgr
    finally:
        mgr.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(mgr.logs())


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
