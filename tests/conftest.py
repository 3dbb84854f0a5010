"""Shared fixtures: free loopback ports, system binaries, the ``llmpath`` CLI, real child processes that are always
stopped by PID, and the default spec's compiled SLOs and dashboards."""

from __future__ import annotations

import shutil
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmpath.demo.supervisor import Supervisor, free_port

LLMPATH = str(Path(sys.executable).parent / "llmpath")


def pytest_configure(config: pytest.Config) -> None:
    """A run started in the background of a script (``make test &``) starts with SIGINT ignored (POSIX), and the
    servers the tests start would inherit that: a gateway would then drain on SIGINT but exit 0 instead of by the
    signal. Give this process Python's usual handler, so children start with the default disposition."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(name="free_port")
def free_port_fixture():
    """``free_port()`` → a TCP port on 127.0.0.1 that was free a moment ago."""
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


@pytest.fixture
def processes(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Supervisor]:
    """Real child processes for one test (``processes.spawn(name, cmd, ready_url=...)``); all are stopped by PID at
    teardown, and their logs printed when the test failed."""
    supervisor = Supervisor(tmp_path / "process-logs")
    try:
        yield supervisor
    finally:
        supervisor.stop_all()
        rep = getattr(request.node, "rep_call", None)
        if rep is not None and rep.failed:
            print(supervisor.logs())


@pytest.fixture(scope="session")
def compiled() -> Any:
    """``llmpath.slo.compile_slos`` of the packaged default spec (30d), as the dashboards and runbooks see it."""
    from llmpath.dashboards.specs import SpecOptions, compile_specs

    return compile_specs(SpecOptions())


@pytest.fixture(scope="session")
def dashboards(compiled: Any) -> dict[str, dict]:
    """The three dashboards built for the default spec, keyed by file name."""
    from llmpath.dashboards import build_dashboards
    from llmpath.dashboards.specs import recording_rule_names, slo_views

    return build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
