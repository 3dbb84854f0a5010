"""The framework apps of ``apps/instr_framework_apps.py`` behind real servers over loopback: uvicorn, hypercorn
(HTTP/1.1 and HTTP/2) and granian (ASGI). TTFT of a real stream, the usage record on disk before the last byte
reaches the client, 499 when the client leaves mid-stream, 500 with the exception's class, and ``root_path``.

All twelve servers start at once (module fixture) and are stopped by PID.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llmpath.demo.supervisor import free_port
from llmpath.instrumentation import read_jsonl

APP_DIR = Path(__file__).parent / "apps"
APP = "instr_framework_apps:app"
FRAMEWORKS = ("litestar", "quart", "django", "falcon")
SERVERS = ("uvicorn", "hypercorn", "granian")


def server_cmd(server: str, port: int, root_path: str = "") -> list[str]:
    py = sys.executable
    if server == "uvicorn":
        return [py, "-m", "uvicorn", APP, "--port", str(port), "--log-level", "warning", "--root-path", root_path]
    if server == "hypercorn":
        return [py, "-m", "hypercorn", APP, "--bind", f"127.0.0.1:{port}", "--root-path", root_path]
    cmd = [py, "-m", "granian", APP, "--interface", "asgi", "--port", str(port), "--log-level", "warning"]
    return cmd + (["--url-path-prefix", root_path] if root_path else [])


class Server:
    """One server process serving one framework app with a JSON-lines ledger."""

    def __init__(self, tmp: Path, framework: str, server: str, root_path: str = "") -> None:
        self.name = f"{framework}-{server}{root_path.replace('/', '-')}"
        self.ledger = tmp / f"{self.name}.jsonl"
        self.log = tmp / f"{self.name}.log"
        port = free_port()
        self.base = f"http://127.0.0.1:{port}"
        env = {**os.environ, "LLMPATH_TEST_FRAMEWORK": framework, "LLMPATH_TEST_JSONL": str(self.ledger)}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_DIR), env.get("PYTHONPATH")]))
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                server_cmd(server, port, root_path), cwd=APP_DIR, env=env, stdout=log, stderr=subprocess.STDOUT
            )

    def wait_ready(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                if httpx.get(f"{self.base}/metrics", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.05)
        raise AssertionError(f"{self.name} not ready: {self.log.read_text()[-2000:]}")

    def records(self) -> list:
        return list(read_jsonl(self.ledger)) if self.ledger.exists() else []

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # granian and hypercorn stop on SIGINT at once
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], Server]]:
    tmp = tmp_path_factory.mktemp("servers")
    started: dict[tuple[str, str], Server] = {}
    try:
        for framework in FRAMEWORKS:
            for server in SERVERS:
                started[framework, server] = Server(tmp, framework, server)
        deadline = time.monotonic() + 60
        for s in started.values():
            s.wait_ready(deadline)
        yield started
    finally:
        for s in started.values():
            s.stop()


def wait_for(server: Server, n: int, timeout: float = 5.0) -> list:
    deadline = time.monotonic() + timeout
    while len(records := server.records()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return records


@pytest.mark.parametrize("server_name", SERVERS)
@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_stream_disconnect_and_error_over_a_real_server(servers, framework: str, server_name: str) -> None:
    server = servers[framework, server_name]
    delay, tokens = 0.05, 4
    with httpx.Client(timeout=10) as client:
        t0 = time.perf_counter()
        with client.stream("GET", f"{server.base}/v1/stream", params={"tokens": tokens, "delay": delay}) as r:
            request_id = r.headers["x-request-id"]
            arrivals = [time.perf_counter() - t0 for chunk in r.iter_raw() if chunk]
        # The record is written before the last message is sent: on disk once the client has the whole body.
        [rec] = server.records()
        assert (rec.request_id, rec.status_code, rec.error, rec.output_tokens) == (request_id, 200, None, tokens)
        assert arrivals[0] < arrivals[-1] - 2 * delay  # not buffered
        assert rec.ttft_s is not None and delay <= rec.ttft_s <= arrivals[0] + 0.02
        assert rec.ttft_s < rec.duration_s - (tokens - 1) * delay

        with client.stream("GET", f"{server.base}/v1/stream", params={"tokens": 60, "delay": delay}) as r:
            for chunk in r.iter_raw():
                if chunk:
                    break  # leave after the first event
        left = wait_for(server, 2)[1]
        assert (left.status_code, left.error) == (499, "client_disconnect")
        assert left.ttft_s is not None and left.duration_s < 20 * delay

        r = client.get(f"{server.base}/boom")
        assert r.status_code == 500
        failed = wait_for(server, 3)[2]
        assert (failed.request_id, failed.status_code, failed.error) == (r.headers["x-request-id"], 500, "BackendDown")
        metrics = client.get(f"{server.base}/metrics").text
    assert 'llmpath_requests_total{code="499",model="unknown",route="/v1/stream"} 1.0' in metrics
    assert 'llmpath_requests_total{code="500",model="unknown",route="/boom"} 1.0' in metrics
    assert len(server.records()) == 3  # one record per request, none for /metrics


def test_hypercorn_http2_stream(servers) -> None:
    """HTTP/2 (prior knowledge): the same TTFT and record; the request id header travels lowercase."""
    server = servers["litestar", "hypercorn"]
    before = len(server.records())
    with httpx.Client(http1=False, http2=True, timeout=10) as client:
        r = client.get(f"{server.base}/v1/stream", params={"tokens": 3, "delay": 0.05})
    assert r.http_version == "HTTP/2" and r.status_code == 200
    rec = wait_for(server, before + 1)[-1]
    assert rec.request_id == r.headers["x-request-id"] and rec.status_code == 200
    assert rec.ttft_s is not None and 0.05 <= rec.ttft_s < rec.duration_s - 0.08


@pytest.mark.parametrize("server_name", SERVERS)
def test_root_path_metrics_and_probes(tmp_path: Path, server_name: str) -> None:
    """Behind a proxy prefix (``--root-path /gw``), ``/metrics`` is still served and probes still excluded. uvicorn
    puts the prefix in ``path`` (``/gw/metrics``), hypercorn and granian do not: before, under uvicorn, /metrics
    went to the app (404) and it and every health probe were counted as requests."""
    server = Server(tmp_path, "litestar", server_name, root_path="/gw")
    try:
        server.wait_ready(time.monotonic() + 30)
        with httpx.Client(timeout=10) as client:
            assert client.get(f"{server.base}/health").status_code == 404  # excluded, though the app has none
            assert client.get(f"{server.base}/items/3").json() == {"item": 3}
            metrics = client.get(f"{server.base}/metrics")
        assert metrics.status_code == 200
        assert 'llmpath_requests_total{code="200",model="unknown",route="/items/{item_id}"} 1.0' in metrics.text
        assert [r.route for r in wait_for(server, 1)] == ["/items/{item_id}"]
    finally:
        server.stop()
