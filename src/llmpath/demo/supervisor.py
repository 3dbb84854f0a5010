"""Start real child processes, wait until they answer over HTTP, and always stop them by PID.

Used by ``llmpath demo`` and by the end-to-end tests: every process runs in its own session (so its children
die with it), logs to a file, and is stopped with SIGTERM then SIGKILL.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx

#: The lowest port :func:`free_port` picks when it can pick below the kernel's ephemeral range.
LOWEST_PICKED_PORT = 10_000


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that was free a moment ago, for a child to bind.

    Picked at random below the kernel's ephemeral port range where that is known (Linux): a port from ``bind(0)`` is
    one the kernel may hand to the next ``bind(0)`` or outgoing connection of any process before the child binds it
    — and then another server answers the child's readiness check while the child fails to start."""
    low = _ephemeral_low()
    if low is not None and low - LOWEST_PICKED_PORT >= 1000:
        for _ in range(100):
            port = random.randrange(LOWEST_PICKED_PORT, low)
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                try:
                    s.bind((host, port))
                except OSError:
                    continue
                return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _ephemeral_low() -> int | None:
    """The first port of the kernel's ephemeral range (``net.ipv4.ip_local_port_range``), if known."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


class ProcessFailed(RuntimeError):
    """A child process exited or never became ready; the message ends with the tail of its log."""


class Stopped(KeyboardInterrupt):
    """Raised in the main thread inside :func:`stop_signals` to unwind everything and stop the children.

    A ``KeyboardInterrupt`` because ``asyncio.run`` and ``subprocess.run`` treat exactly that as "stop now":
    the event loop re-raises it instead of storing it on a task, and ``subprocess.run`` kills its child.
    """


class Interrupted(Stopped):
    """SIGINT, SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class ChildDied(Stopped):
    """A supervised process exited while nobody was stopping it; the message ends with the tail of its log."""


#: Signals that mean "stop": Ctrl-C, ``kill``, and the terminal closing.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
#: Sent by the watchdog thread to the main thread when a child dies.
_CHILD_DIED_SIGNAL = signal.SIGUSR1


@dataclass
class ManagedProcess:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: killed by that signal), or None while it runs."""
        return self.popen.poll()

    def alive(self) -> bool:
        return self.returncode is None

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class Supervisor:
    """Owns a set of child processes; use as a context manager so they are stopped on any exit."""

    log_dir: Path
    processes: list[ManagedProcess] = field(default_factory=list)
    #: Set once stopping starts: exits after that are expected.
    stopping: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def spawn(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        ready_url: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout: float = 60.0,
    ) -> ManagedProcess:
        """Start ``cmd``; when ``ready_url`` is given, wait until it answers with a status below 500."""
        log_path = self.log_dir / f"{name}.log"
        with log_path.open("wb") as log:
            popen = subprocess.Popen(
                list(cmd),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**os.environ, **(env or {})},
                cwd=cwd,
                start_new_session=True,
            )
        proc = ManagedProcess(name, popen, log_path)
        self.processes.append(proc)
        if ready_url is not None:
            wait_ready(proc, ready_url, timeout)
        return proc

    def stop(self, proc: ManagedProcess, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Stop one process (and its session) by PID: ``sig`` first, SIGKILL after ``timeout`` seconds."""
        if proc.popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait(timeout=timeout)

    def stop_all(self) -> None:
        """Stop every process, most recently started first."""
        self.stopping.set()
        # A signal during cleanup waits until it is done (then raises as usual) instead of cutting it short.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        try:
            for proc in reversed(self.processes):
                self.stop(proc)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def watch(self, poll_s: float = 0.2) -> None:
        """Start a thread that reports the first child to exit before stopping began: inside
        :func:`stop_signals`, :class:`ChildDied` is then raised in the main thread."""

        def run() -> None:
            while not self.stopping.wait(poll_s):
                if self.report_dead_child():
                    return

        threading.Thread(target=run, name="supervisor-watchdog", daemon=True).start()

    def report_dead_child(self) -> bool:
        """Report a child that has exited before stopping began, as the watchdog does (call it at once when a
        request to a child failed: the watchdog may not have looked yet); whether there was one."""
        died = next((p for p in list(self.processes) if p.popen.poll() is not None), None)
        if died is None or self.stopping.is_set():
            return False
        _report_death(
            f"{died.name} (pid {died.pid}) {describe_exit(died.popen.returncode)}; "
            f"stopping the rest. Its log ({died.log_path}) ends:\n{died.log_tail()}"
        )
        return True

    def logs(self) -> str:
        """The tail of every process's log, for failure reports."""
        return "\n".join(
            f"----- {p.name} (pid {p.pid}, rc {p.popen.returncode}) -----\n{p.log_tail()}" for p in self.processes
        )


T = TypeVar("T")
_deaths: list[str] = []
_guarding = threading.Event()
#: Held while the watchdog signals the main thread and while the handlers are restored: a SIGUSR1 that arrived
#: after ``stop_signals`` had put back the default action would kill the demo.
_guard_lock = threading.Lock()


def _report_death(message: str) -> None:
    with _guard_lock:
        if _guarding.is_set():
            _deaths.append(message)
            signal.pthread_kill(threading.main_thread().ident or 0, _CHILD_DIED_SIGNAL)  # interrupts a blocking call


@contextlib.contextmanager
def stop_signals() -> Iterator[None]:
    """Within this block (main thread only), SIGINT/SIGTERM/SIGHUP raise :class:`Interrupted` and a watched child's
    exit raises :class:`ChildDied`, so every ``with`` block unwinds and stops its children. Only the first is
    raised: a second Ctrl-C does not cut the cleanup short."""
    fired = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if fired.is_set():
            return
        fired.set()
        if signum == _CHILD_DIED_SIGNAL:
            raise ChildDied(_deaths[0] if _deaths else "a child process exited")
        raise Interrupted(signum)

    previous = {sig: signal.signal(sig, on_signal) for sig in (*STOP_SIGNALS, _CHILD_DIED_SIGNAL)}
    _deaths.clear()
    _guarding.set()
    try:
        yield
    finally:
        with _guard_lock:
            _guarding.clear()
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(coro)`` for code inside :func:`stop_signals`. A stop signal (or a watched child's death) that
    arrives while the loop runs cancels the coroutine, whose tasks end cleanly, and is raised again once the loop
    has closed, as :func:`stop_signals` raises it. (Raised by a handler amid the loop's work, it left tasks half
    run: asyncio printed "Task was destroyed but it is pending!" with a traceback.)"""
    caught: list[int] = []

    async def main() -> T | None:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        signals = (*STOP_SIGNALS, _CHILD_DIED_SIGNAL)
        previous = {sig: signal.getsignal(sig) for sig in signals}

        def on_signal(signum: int) -> None:
            if not caught:
                caught.append(signum)
                task.cancel()

        for sig in signals:
            loop.add_signal_handler(sig, on_signal, sig)
        try:
            return await coro
        except asyncio.CancelledError:
            if caught:
                return None
            raise
        finally:
            for sig in signals:  # asyncio puts back the default action: put back stop_signals' handlers instead
                loop.remove_signal_handler(sig)
                signal.signal(sig, previous[sig])

    result = asyncio.run(main())
    if caught:
        signal.raise_signal(caught[0])  # stop_signals' handler raises Interrupted (or ChildDied) right here
    return result  # type: ignore[return-value]  # None only when a signal was caught


def describe_exit(returncode: int | None) -> str:
    """``exited with code 1`` or ``was killed by SIGKILL``."""
    if returncode is not None and returncode < 0:
        return f"was killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def wait_ready(proc: ManagedProcess, url: str, timeout: float) -> None:
    """Poll ``url`` until it answers below 500; raise :class:`ProcessFailed` if the process dies or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(timeout=1.0) as client:
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ProcessFailed(f"{proc.name} exited with code {proc.popen.returncode}:\n{proc.log_tail()}")
            try:
                if client.get(url).status_code < 500:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise ProcessFailed(f"{proc.name} did not answer at {url} within {timeout:.0f}s:\n{proc.log_tail()}")
