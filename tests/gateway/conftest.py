"""Gateway test fixtures: module-scoped real engines and gateways, an OTLP/HTTP collector, headless Chromium.

Processes are started with the ``llmpath`` CLI under the project's process supervisor
(:mod:`llmpath.demo.supervisor`), so they are always stopped by PID.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Callable, Iterator

import pytest

from llmpath.demo.supervisor import Supervisor
from tests.gateway.stack import Chromium, Keys, OtlpCollector, Stack
from tests.loopback import Answer, Loopback


@pytest.fixture(scope="session")
def keys() -> type[Keys]:
    return Keys


@pytest.fixture(scope="module")
def stack(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Real processes shared by one test module; stopped by PID at the end, logs printed if a test failed."""
    tmp = tmp_path_factory.mktemp("stack")
    supervisor = Supervisor(tmp)
    failed_before = request.session.testsfailed
    try:
        yield Stack(supervisor, tmp)
    finally:
        supervisor.stop_all()
        if request.session.testsfailed > failed_before:
            print(supervisor.logs())


@pytest.fixture(scope="module")
def otlp_collector() -> Iterator[OtlpCollector]:
    """Request it before ``stack`` so that it outlives the processes exporting to it."""
    collector = OtlpCollector()
    yield collector
    collector.close()


@pytest.fixture(scope="module")
def chromium(stack: Stack) -> Chromium:
    binary = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
    if binary is None:
        pytest.skip("chromium not installed (make test installs it via apt-get)")
    return Chromium(binary, stack.supervisor, stack.tmp / "chromium-profile")


@pytest.fixture
def answering() -> Iterator[Callable[..., str]]:
    """``start(status, body, headers)``: servers answering every POST so; returns their URLs."""
    with contextlib.ExitStack() as servers:

        def start(status: int, body: bytes, headers: dict[str, str] | None = None) -> str:
            answer = Answer(status, body, {"content-type": "application/json", **(headers or {})})
            return servers.enter_context(Loopback(lambda _: answer, methods=("POST",))).url

        yield start
