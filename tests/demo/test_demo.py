"""``llmpath demo --once``: the newcomer's first command, run as a user would (a real stack on loopback)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from llmpath.demo.routes import DEMO_ROUTES
from llmpath.instrumentation import STAGES
from llmpath.instrumentation.usage import read_jsonl
from llmpath.slo import default_spec_path

pytestmark = pytest.mark.slow

QUICK = ["--once", "--preset", "tiny", "--conversations", "6", "--concurrency", "2", "--duration", "30"]


def run_demo(llmpath_bin: str, cwd: Path, env: dict[str, str] | None = None) -> tuple[str, Path]:
    """Run the demo in ``cwd`` with a relative work folder, as ``make demo`` does (an absolute one hid a broken
    ledger path); returns the report and the work folder."""
    proc = subprocess.run(
        [llmpath_bin, "demo", *QUICK, "--workdir", "build"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout, cwd / "build"


def table_rows(report: str, title: str) -> list[list[str]]:
    """The rows of the report table titled ``title`` (cells split on runs of spaces)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title))
    rule = next(i for i in range(start, len(lines)) if set(lines[i].strip()) == {"─"})
    rows = []
    for line in lines[rule + 1 :]:
        if not line.strip():
            break
        rows.append(re.split(r"\s{2,}", line.strip()))
    return rows


def slo_names() -> list[str]:
    spec = yaml.safe_load(default_spec_path().read_text())
    return [s["name"] for s in spec["slos"]]


def test_demo_reports_stages_cache_tokens_and_slos_read_back_from_prometheus(llmpath_bin, require_binary, tmp_path):
    require_binary("prometheus")
    report, workdir = run_demo(llmpath_bin, tmp_path)
    ledger = list(read_jsonl(workdir / "usage.jsonl"))

    first = re.search(r"^(\d+) requests, (\d+) server errors", report, re.M)
    assert first is not None, report
    assert int(first[1]) == len(ledger) > 0 and int(first[2]) == 0

    stage_rows = {row[0]: row for row in table_rows(report, "Where the time goes")}
    assert [name for name in stage_rows if name != "unattributed"] == [s.name for s in STAGES]
    assert stage_rows["prefill"][1] == "serving" and stage_rows["auth"][1] == "gateway"

    cache_rows = {row[0]: row for row in table_rows(report, "Prompt cache by route")}
    assert set(cache_rows) == {r.name for r in DEMO_ROUTES}
    for route, row in cache_rows.items():
        cached, prompt = (int(x.replace(",", "")) for x in row[4].split(" / "))
        mine = [r for r in ledger if r.route == route]
        assert (cached, prompt) == (sum(r.cached_tokens for r in mine), sum(r.input_tokens for r in mine))

    total = next(row for row in table_rows(report, "By tenant") if row[0] == "total")
    counts = [int(x.replace(",", "")) for x in total[1:]]
    assert counts[:3] == [len(ledger), sum(r.status_code == 429 for r in ledger), 0]  # requests, 429, 5xx
    assert counts[3:] == [sum(getattr(r, f"{k}_tokens") for r in ledger) for k in ("input", "cached", "output")]

    slo_rows = table_rows(report, "SLOs, read back from Prometheus")
    named = [row[0] for row in slo_rows if len(row) == 8]
    assert sorted(named) == sorted(slo_names())
    routes = {row[-6] for row in slo_rows}  # one row per SLO and route (a route Prometheus has a rate for)
    assert routes and routes <= {r.name for r in DEMO_ROUTES}
    assert all(row[-3] == "–" or row[-3].endswith("×") for row in slo_rows)  # burn rate
    slis = [row[-4] for row in slo_rows]
    assert all(re.fullmatch(r"\d+\.\d%", sli) for sli in slis), slo_rows  # every SLI has data (warm-up scraped)

    for folder, pattern in (("rules", "*.yaml"), ("dashboards", "*.json"), ("runbooks", "*.md")):
        assert list((workdir / folder).glob(pattern)), folder
    logs = "\n".join(p.read_text(errors="replace") for p in (workdir / "logs").glob("*"))
    assert "Ticket #" not in logs and "Hello," not in logs  # prompt text is never logged


def test_demo_without_prometheus_runs_and_says_what_it_skipped(llmpath_bin, tmp_path):
    env = {**os.environ, "PATH": str(Path(sys.executable).parent)}  # no prometheus on PATH
    report, workdir = run_demo(llmpath_bin, tmp_path, env)
    assert "skipped: Prometheus (not installed" in report
    assert "SLO status skipped: Prometheus is not running" in report
    assert table_rows(report, "Where the time goes") and table_rows(report, "By tenant")
    assert (workdir / "rules").is_dir() and list((workdir / "runbooks").glob("*.md"))
