"""Every query of every dashboard returns data from a real Prometheus scraping a real gateway and real engines.

Two tiny embedded engines, the gateway in front of them, Prometheus 2.42 scraping all three every second and
evaluating the default spec's rules; a small shared-prefix workload; then each dashboard query (variables at "All")
goes to Prometheus' HTTP API. Catches what synthetic series cannot: labels the real exporters do not set, series that
never appear, spellings.
"""

from __future__ import annotations

import concurrent.futures
import re
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmpath.dashboards import queries
from llmpath.gateway.config import hash_key

pytestmark = pytest.mark.slow

KEY = "sk-dash-3f9a1c7e5b2d"
SYSTEM = "You are the llmpath dashboards test assistant; answer briefly and kindly. " * 6
VARIABLES = {"__rate_interval": "1m", "__range": "10m"}
ROUNDS = 10  # seconds of traffic
LLMPATH = str(Path(sys.executable).parent / "llmpath")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_manager(request: pytest.FixtureRequest, tmp: Path) -> Any:
    """The root conftest's ProcessManager (conftest modules cannot be imported in importlib mode)."""
    plugins = request.config.pluginmanager.get_plugins()
    return next(p.ProcessManager for p in plugins if hasattr(p, "ProcessManager"))(tmp)


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise TimeoutError(what)


def _chat(client: httpx.Client, route: str, question: str, stream: bool) -> None:
    body = {
        "model": route,
        "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}],
        "max_tokens": 6,
        "stream": stream,
    }
    with client.stream("POST", "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}) as r:
        r.read()
        assert r.status_code == 200, r.text


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, compiled: Any, request: pytest.FixtureRequest):
    """Engines, gateway and Prometheus (with the default spec's rules), after a short workload."""
    from llmpath.demo.prometheus import PrometheusClient

    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (make test installs it via apt-get)")
    tmp = tmp_path_factory.mktemp("live")
    manager = _process_manager(request, tmp)
    try:
        engines = []
        for i in range(2):
            port = _free_port()
            cmd = [LLMPATH, "engine", "serve", "--preset", "tiny", "--threads", "1", "--port", str(port)]
            engines.append((f"e{i}", port, manager.spawn(f"engine{i}", cmd)))
        for name, port, proc in engines:
            manager.wait_ready(name, proc, f"http://127.0.0.1:{port}/health", 90, tmp / f"engine{name[1:]}.log")
        gw_port = _free_port()
        config = {
            "listen": {"host": "127.0.0.1", "port": gw_port},
            "backends": [{"url": f"http://127.0.0.1:{port}", "name": name} for name, port, _ in engines],
            "routing": {"policy": "prefix"},
            "health": {"interval_s": 1, "timeout_s": 1},
            "tokenizer": {"chars_per_token": 1},
            "prompt_cache": {"block_tokens": 16, "min_prefix_tokens": 32},
            "routes": [{"name": "tiny"}, {"name": "support", "model": "tiny"}],
            "api_keys": [{"sha256": hash_key(KEY), "tenant": "acme"}],
            "limits": {"max_tokens": 16, "default_max_tokens": 6},
        }
        (tmp / "gateway.yaml").write_text(yaml.safe_dump(config))
        gateway = f"http://127.0.0.1:{gw_port}"
        cmd = [LLMPATH, "gateway", "serve", "--config", str(tmp / "gateway.yaml")]
        manager.spawn("gateway", cmd, ready_url=f"{gateway}/readyz", timeout=60)

        rules = []
        for name, text in compiled.files.items():
            rules.append(tmp / Path(name).name)
            rules[-1].write_text(text)
        prom_port = _free_port()
        targets = [f"127.0.0.1:{gw_port}", *(f"127.0.0.1:{port}" for _, port, _ in engines)]
        prom_config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(p) for p in rules],
            "scrape_configs": [{"job_name": "llmpath", "static_configs": [{"targets": targets}]}],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(prom_config))
        prom_url = f"http://127.0.0.1:{prom_port}"
        manager.spawn(
            "prometheus",
            [prometheus, f"--config.file={tmp / 'prometheus.yml'}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{prom_port}"],
            ready_url=f"{prom_url}/-/ready", timeout=60,
        )  # fmt: skip
        client = PrometheusClient(prom_url)
        _wait(lambda: len(client.query("up == 1")) == 3, 30, "Prometheus scrapes the gateway and both engines")

        with httpx.Client(base_url=gateway, timeout=60) as http:
            # steady traffic over several scrapes, so that every rate() sees counters move
            for second in range(ROUNDS):
                started = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(2) as pool:
                    list(pool.map(lambda w: _chat(http, *w), [
                        (route, f"question {second} about item {second % 3}", second % 2 == 0)
                        for route in ("tiny", "support")
                    ]))  # fmt: skip
                time.sleep(max(0.0, 1.0 - (time.monotonic() - started)))
        time.sleep(2)  # a last scrape and rule evaluation
        yield client
        client.close()
    finally:
        manager.stop_all()
        if request.session.testsfailed:
            print(manager.logs())


def test_every_dashboard_query_returns_data(stack, dashboards: dict[str, dict]) -> None:
    empty = []
    for name, dashboard in dashboards.items():
        for expr in queries(dashboard, VARIABLES):
            if not stack.query(expr):
                empty.append(f"{name}: {expr}")
    assert empty == [], "queries without data:\n" + "\n\n".join(empty)


def test_runbook_queries_run_on_the_live_stack(stack, compiled: Any, dashboards: dict[str, dict]) -> None:
    """Every PromQL block of every runbook is accepted by Prometheus; the stage-latency diagnosis returns data."""
    from llmpath.dashboards import panel_directory
    from llmpath.runbooks import build_runbooks

    runbooks = build_runbooks(compiled.slos, panel_titles=panel_directory(dashboards))
    blocks = {q for text in runbooks.values() for q in re.findall(r"```promql\n(.*?)\n```", text, re.DOTALL)}
    for query in sorted(blocks):
        stack.query(query)  # raises on a Prometheus error
    prefill_p95 = next(q for q in blocks if 'stage_duration_seconds_bucket{stage="prefill"}' in q)
    assert stack.query(prefill_p95.replace("[5m]", "[1m]"))
    assert len(blocks) > 30
