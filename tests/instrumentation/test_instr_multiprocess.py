"""prometheus-client multiprocess mode: gunicorn with 2 uvicorn workers; scraped counters sum across workers."""

from __future__ import annotations

import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

APP_DIR = Path(__file__).parent / "apps"
GUNICORN_CONF = """\
from llmpath.instrumentation.multiprocess import gunicorn_child_exit as child_exit  # noqa: F401
from llmpath.instrumentation.multiprocess import gunicorn_on_starting as on_starting  # noqa: F401
"""


def fresh_get(url: str, **kwargs) -> httpx.Response:
    """One request on a new connection, so the kernel may hand it to either worker."""
    with httpx.Client(timeout=10) as client:
        return client.request(kwargs.pop("method", "GET"), url, **kwargs)


def sample(text: str, name: str, **labels: str) -> float:
    total = 0.0
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                total += s.value
    return total


@pytest.mark.slow
def test_two_gunicorn_workers_scrape_sums_across_workers(processes, free_port, tmp_path):
    mp_dir = tmp_path / "prom"
    mp_dir.mkdir()
    (mp_dir / "counter_99999.db").write_bytes(b"stale file of a previous run")
    (mp_dir / "keep.txt").write_text("not a metrics file: left alone")
    conf = tmp_path / "gunicorn.conf.py"
    conf.write_text(GUNICORN_CONF)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [
        sys.executable, "-m", "gunicorn", "-c", str(conf), "--chdir", str(APP_DIR),
        "-k", "uvicorn.workers.UvicornWorker", "-w", "2", "-b", f"127.0.0.1:{port}", "instr_server_app:app",
    ]  # fmt: skip
    processes.spawn(
        "gunicorn",
        cmd,
        ready_url=f"{base}/health",
        env={"PROMETHEUS_MULTIPROC_DIR": str(mp_dir), "LLMPATH_TEST_JSONL": str(tmp_path / "usage.jsonl")},
        timeout=90,
    )
    assert not (mp_dir / "counter_99999.db").exists()  # on_starting removed the stale metric files
    assert (mp_dir / "keep.txt").exists()

    pids: dict[int, int] = {}
    n = 0
    while len(pids) < 2 or n < 40:
        r = fresh_get(f"{base}/v1/chat/completions", method="POST", json={"delay": 0.001})
        assert r.status_code == 200
        pid = r.json()["pid"]
        pids[pid] = pids.get(pid, 0) + 1
        n += 1
        assert n < 400, f"one worker served everything: {pids}"
    assert len(pids) == 2

    for _ in range(4):  # whichever worker answers the scrape, it reports both workers' counts
        text = fresh_get(f"{base}/metrics").text
        assert sample(text, "llmpath_requests_total", route="chat", model="tiny", code="200") == n
        assert sample(text, "llmpath_stage_duration_seconds_count", route="chat", stage="schedule") == n
        assert sample(text, "llmpath_tokens_total", route="chat", type="input") == 50 * n
    only = fresh_get(f"{base}/metrics", params={"name[]": "llmpath_requests_total"}).text
    assert {f.name for f in text_string_to_metric_families(only)} == {"llmpath_requests"}  # ?name[] filters
    assert sample(only, "llmpath_requests_total", route="chat", model="tiny", code="200") == n
    om = fresh_get(f"{base}/metrics", headers={"accept": "application/openmetrics-text; version=1.0.0"}).text
    assert om.rstrip().endswith("# EOF") and "trace_id" not in om  # no exemplars in multiprocess mode
    assert len(list(mp_dir.glob("*.db"))) >= 2


LAUNCHER = """\
import sys
import uvicorn
from llmpath.instrumentation.multiprocess import prepare_multiprocess_dir

prepare_multiprocess_dir(sys.argv[1])  # imports prometheus-client before the variable is set
uvicorn.run("instr_server_app:app", port=int(sys.argv[2]), workers=1, log_level="warning")
"""


@pytest.mark.slow
def test_launcher_that_prepares_the_directory_then_serves_itself(processes, free_port, tmp_path):
    # docs/multiprocess.md: "or from Python before starting". With one worker the launcher serves in its own
    # process, which imported prometheus-client before PROMETHEUS_MULTIPROC_DIR was set.
    mp_dir = tmp_path / "prom"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-c", LAUNCHER, str(mp_dir), str(port)]
    env = {"LLMPATH_TEST_JSONL": str(tmp_path / "usage.jsonl"), "PYTHONPATH": str(APP_DIR)}
    processes.spawn("launcher", cmd, ready_url=f"{base}/health", env=env, timeout=60)
    for _ in range(3):
        assert fresh_get(f"{base}/v1/chat/completions", method="POST", json={"delay": 0.001}).status_code == 200
    text = fresh_get(f"{base}/metrics").text
    assert sample(text, "llmpath_requests_total", route="chat", model="tiny", code="200") == 3
    assert list(mp_dir.glob("*.db"))  # the values went to the directory the scrape aggregates
