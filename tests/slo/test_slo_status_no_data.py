"""`llmpath slo status` against a real Prometheus 2.42 where an SLO has no data: one SLO's rules are loaded but
its metric is never scraped (no data, a known answer: exit 0), another has only its metadata rule
(``sloth_slo_info``) loaded and not its SLI recording rules (its state is unknown: exit 2, named on stderr)."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from llmpath.demo.prometheus import find_prometheus, prometheus_config, start_prometheus
from llmpath.demo.supervisor import Supervisor
from llmpath.slo import CompileOptions, compile_slos, load_specs

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
WINDOWS_1H = REPO / "slo" / "examples" / "windows-1h.yaml"


def _spec(service: str) -> str:
    return f"""\
version: llmpath/v1
service: {service}
slos:
  - name: availability
    objective: 99.9
    stage: route
    sli:
      ratio: {{bad: 'never_scraped_total{{code=~"5.."}}', total: never_scraped_total}}
    alerting:
      name: {service.capitalize()}Availability
"""


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make test installs it via apt-get)")
    work = tmp_path_factory.mktemp("nodata")
    rule_files = []
    for service, only_meta in (("idle", False), ("halfloaded", True)):
        (work / f"{service}.yaml").write_text(_spec(service))
        result = compile_slos(load_specs([work / f"{service}.yaml"]), CompileOptions(windows_file=WINDOWS_1H))
        for name, text in result.files.items():
            doc = yaml.safe_load(text)
            if only_meta:
                doc["groups"] = [g for g in doc["groups"] if "meta" in g["name"]]
            path = work / f"{service}-{name}"
            path.write_text(yaml.safe_dump(doc))
            rule_files.append(path)
    with Supervisor(work / "logs") as supervisor:
        config = prometheus_config([], rule_files, scrape_interval="1s", evaluation_interval="1s")
        prometheus = start_prometheus(supervisor, work / "prometheus", config)
        with prometheus.client() as client:
            deadline = time.monotonic() + 60
            while len(client.query("sloth_slo_info")) < 2:
                assert time.monotonic() < deadline, "sloth_slo_info never recorded"
                time.sleep(0.5)
        yield prometheus.url


def _status(llmpath_bin: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [llmpath_bin, "slo", "status", "--prometheus", url, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})


def test_rules_without_series_are_no_data_and_missing_rules_are_unknown(prometheus_url: str, llmpath_bin: str) -> None:
    idle = _status(llmpath_bin, prometheus_url, "--service", "idle", "--json")
    assert idle.returncode == 0, idle.stderr
    (row,) = json.loads(idle.stdout)
    assert (row["recorded"], row["rules_loaded"], row["burn_rate"], row["sli"]) == (False, True, None, None)
    assert "SLO 'idle-availability' has no data" in idle.stderr

    both = _status(llmpath_bin, prometheus_url)
    assert both.returncode == 2, both.stderr
    assert "SLO 'halfloaded-availability' has no recorded series" in both.stderr
    assert "Traceback" not in both.stderr
    assert both.stdout.count("no data") == 2
