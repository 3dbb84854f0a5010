"""``llmpath demo`` stopped by a signal or by a child dying: every child gone, a clear exit status, no traceback.

Driven as a user would (the real CLI as a subprocess, real signals); Prometheus is kept off PATH so that each test
only waits for two tiny engines and the gateway.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

QUICK = ["--preset", "tiny", "--conversations", "40", "--concurrency", "2", "--duration", "60"]


def children_of(pid: int) -> set[int]:
    """PIDs whose parent is ``pid`` (the supervisor's children run in their own sessions, still its children)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


def alive(pid: int) -> bool:
    """Running (not gone, not a zombie)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(what: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


class Demo:
    def __init__(self, llmpath_bin: str, cwd: Path, *args: str, keep_path: bool = False) -> None:
        env = dict(os.environ) if keep_path else {**os.environ, "PATH": str(Path(sys.executable).parent)}
        self.workdir = cwd / "build"
        self.out = cwd / "out.txt"
        self.err = cwd / "err.txt"
        with self.out.open("wb") as out, self.err.open("wb") as err:
            self.proc = subprocess.Popen(
                [llmpath_bin, "demo", *QUICK, "--workdir", "build", *args], cwd=cwd, env=env, stdout=out, stderr=err
            )

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def children(self) -> set[int]:
        return children_of(self.proc.pid)

    def engines_up(self) -> bool:
        assert self.proc.poll() is None, self.stdout() + self.stderr()
        return "starting the gateway" in self.stdout()

    def workload_running(self) -> bool:
        assert self.proc.poll() is None, self.stdout() + self.stderr()
        ledger = self.workdir / "usage.jsonl"
        return ledger.exists() and len(ledger.read_text().splitlines()) >= 2

    def serving(self) -> bool:
        assert self.proc.poll() is None, self.stdout() + self.stderr()
        return "serving until Ctrl-C" in self.stdout()

    def finish(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def demo(llmpath_bin: str, tmp_path: Path) -> Iterator[Callable[..., Demo]]:
    started: list[Demo] = []

    def start(*args: str, keep_path: bool = False) -> Demo:
        """Without Prometheus on PATH (faster) unless ``keep_path``."""
        started.append(Demo(llmpath_bin, tmp_path, *args, keep_path=keep_path))
        return started[-1]

    yield start
    for d in started:  # a failing test must not leave a demo (and its engines) behind
        pids = d.children()
        if d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        for pid in pids:
            if alive(pid):
                os.killpg(pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("phase", "sig"),
    [
        ("engines_up", signal.SIGINT),  # Ctrl-C: one handler serves the three signals and every phase
        ("workload_running", signal.SIGTERM),
        ("workload_running", signal.SIGHUP),
    ],
)
def test_a_signal_stops_every_child_and_exits_128_plus_signal(demo, phase: str, sig: signal.Signals) -> None:
    d = demo("--once")
    wait_for(getattr(d, phase))
    pids = d.children()
    assert pids  # the engines (and the gateway) are running
    d.proc.send_signal(sig)
    rc = d.finish()
    err = d.stderr()
    assert rc == 128 + sig, d.stdout() + err
    assert "Traceback" not in err and f"interrupted ({sig.name})" in err
    assert [pid for pid in pids if alive(pid)] == []
    assert (d.workdir / "logs" / "engine-0.log").exists()  # logs stay for a look at what happened


@pytest.mark.slow
def test_ctrl_c_while_serving_after_the_report_stops_everything_and_exits_0(demo) -> None:
    d = demo()
    wait_for(d.serving)
    pids = d.children()
    assert len(pids) == 3  # two engines and the gateway
    d.proc.send_signal(signal.SIGINT)
    assert d.finish() == 0, d.stderr()
    assert "stopping" in d.stdout() and "Traceback" not in d.stderr()
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.slow
@pytest.mark.parametrize("phase", ["workload_running", "serving"])
def test_an_engine_killed_mid_run_ends_the_demo_with_a_clear_error(demo, phase: str) -> None:
    d = demo()
    wait_for(getattr(d, phase))
    pids = d.children()
    victim = next(pid for pid in pids if b"engine" in Path(f"/proc/{pid}/cmdline").read_bytes())
    os.kill(victim, signal.SIGKILL)
    rc = d.finish()
    err = d.stderr()
    assert rc == 1, d.stdout() + err
    assert f"(pid {victim}) was killed by SIGKILL" in err and "Traceback" not in err
    assert [pid for pid in pids if alive(pid)] == []


def quick_demo(llmpath_bin: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """A short ``llmpath demo --once`` in ``cwd/build``, run to its end."""
    return subprocess.run(
        [llmpath_bin, "demo", *QUICK, "--once", "--workdir", "build"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_a_work_folder_it_cannot_write_into_is_a_one_line_error(llmpath_bin: str, tmp_path: Path) -> None:
    (tmp_path / "build").mkdir()
    (tmp_path / "build" / "rules").write_text("a file where the rules folder goes")
    proc = quick_demo(llmpath_bin, tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stderr.startswith("error: llmpath slo compile failed") and "Traceback" not in proc.stderr
    assert "rules" in proc.stderr


@pytest.mark.slow
def test_a_second_demo_in_the_same_work_folder_refuses_to_start(demo, llmpath_bin: str, tmp_path: Path) -> None:
    first = demo("--once")
    wait_for(first.engines_up)
    second = quick_demo(llmpath_bin, tmp_path)
    assert second.returncode == 1, second.stdout + second.stderr
    assert f"another llmpath demo (pid {first.proc.pid}) is using build" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.proc.poll() is None and (first.workdir / "logs" / "engine-0.log").stat().st_size > 0


@pytest.mark.slow
def test_prometheus_killed_mid_run_ends_the_demo_with_a_clear_error(
    demo, require_binary, monkeypatch: pytest.MonkeyPatch
) -> None:
    prometheus = require_binary("prometheus")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{Path(prometheus).parent}")
    d = demo(keep_path=True)
    wait_for(d.workload_running)
    pids = d.children()
    victim = next(pid for pid in pids if Path(f"/proc/{pid}/exe").resolve() == Path(prometheus).resolve())
    os.kill(victim, signal.SIGKILL)
    rc = d.finish()
    err = d.stderr()
    assert rc == 1, d.stdout() + err
    assert f"prometheus (pid {victim}) was killed by SIGKILL" in err and "Traceback" not in err
    assert [pid for pid in pids if alive(pid)] == []


@pytest.mark.slow
def test_a_previous_runs_prometheus_data_does_not_count_in_this_run(
    demo, require_binary, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    prometheus = require_binary("prometheus")
    monkeypatch.setenv("PATH", f"{Path(sys.executable).parent}:{Path(prometheus).parent}")
    stale = tmp_path / "build" / "prometheus" / "data" / "01STALEBLOCK"
    stale.mkdir(parents=True)
    d = demo("--once", keep_path=True)
    wait_for(lambda: "waiting for Prometheus's first scrape" in d.stdout())
    assert not stale.exists()
    d.proc.send_signal(signal.SIGINT)
    assert d.finish() == 130


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_event_loop_cancels_its_work_cleanly_then_interrupts(sig: signal.Signals) -> None:
    """The workload runs in asyncio: a stop signal cancels it (its tasks see CancelledError and clean up inside the
    loop) and Interrupted is raised once the loop is closed. (Raised by the handler amid the loop's work, it left a
    task half run: "Task was destroyed but it is pending!" and a traceback in the demo's output, now and then.)"""
    import asyncio
    import threading

    from llmpath.demo.supervisor import Interrupted, run_async, stop_signals

    seen: list[str] = []

    async def work() -> None:
        async def worker() -> None:
            try:
                await asyncio.sleep(30)
            except BaseException as exc:  # what the worker sees
                seen.append(type(exc).__name__)
                raise

        async with asyncio.TaskGroup() as group:
            group.create_task(worker())
            threading.Timer(0.2, os.kill, (os.getpid(), sig)).start()

    with pytest.raises(Interrupted) as raised, stop_signals():
        run_async(work())
    assert raised.value.signum == sig and seen == ["CancelledError"]
