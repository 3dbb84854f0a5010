"""`llmpath slo validate --prometheus URL` (and `--buckets`) against a real Prometheus scraping a real instrumented
app whose latency histograms have their own buckets."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from llmpath.demo.prometheus import ScrapeTarget, find_prometheus, prometheus_config, start_prometheus
from llmpath.demo.supervisor import Supervisor, free_port

pytestmark = pytest.mark.slow

APPS = Path(__file__).parent / "apps"
TTFT = "llmpath_time_to_first_token_seconds"


@pytest.fixture(scope="module")
def prometheus_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Prometheus that has scraped the custom-buckets app after it served a few chat requests."""
    if find_prometheus() is None:
        pytest.skip("prometheus not installed (make test installs it via apt-get)")
    work = tmp_path_factory.mktemp("live-check")
    with Supervisor(work / "logs") as supervisor:
        port = free_port()
        supervisor.spawn(
            "app",
            [sys.executable, "-m", "uvicorn", "custom_buckets_app:app", "--port", str(port), "--log-level", "warning"],
            cwd=APPS,
            ready_url=f"http://127.0.0.1:{port}/metrics",
        )
        for _ in range(3):
            httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=10).raise_for_status()
        config = prometheus_config([ScrapeTarget("gateway", f"127.0.0.1:{port}")], [], scrape_interval="1s")
        server = start_prometheus(supervisor, work / "prometheus", config)
        with server.client() as client:
            deadline = time.monotonic() + 30
            while not client.query(f"{TTFT}_bucket"):
                assert time.monotonic() < deadline, "Prometheus never scraped the app"
                time.sleep(0.5)
        yield server.url


def spec(tmp_path: Path, *slos: dict) -> Path:
    path = tmp_path / "slos.yaml"
    path.write_text(yaml.safe_dump({"version": "llmpath/v1", "service": "llm-api", "slos": list(slos)}))
    return path


def ttft_slo(threshold: float) -> dict:
    return {
        "name": "ttft",
        "objective": 95,
        "stage": "prefill",
        "group_by": ["route"],
        "sli": {"latency": {"histogram": TTFT, "threshold": threshold}},
        "alerting": {"name": "TTFTBurn"},
    }


def validate(llmpath_bin: str, path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    cmd = [llmpath_bin, "slo", "validate", str(path), *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=60)


def test_a_threshold_on_custom_buckets_passes_with_their_bounds(
    llmpath_bin: str, tmp_path: Path, prometheus_url: str
) -> None:
    path = spec(tmp_path, ttft_slo(0.35))
    static = validate(llmpath_bin, path)
    assert static.returncode == 1
    assert f"0.35 s is not a bucket boundary of {TTFT}" in static.stderr
    assert "give them with --buckets" in static.stderr

    given = validate(llmpath_bin, path, "--buckets", f"{TTFT}=0.05,0.35,0.7,3")
    assert given.returncode == 0, given.stderr

    live = validate(llmpath_bin, path, "--prometheus", prometheus_url)
    assert live.returncode == 0, live.stderr
    assert "1 histogram(s) with live buckets, every SLI selector matches series" in live.stdout


def test_a_threshold_the_live_histogram_lacks_is_an_error(
    llmpath_bin: str, tmp_path: Path, prometheus_url: str
) -> None:
    path = spec(tmp_path, ttft_slo(0.5))  # a catalog bound: fine statically, absent from the app's buckets
    assert validate(llmpath_bin, path).returncode == 0
    live = validate(llmpath_bin, path, "--prometheus", prometheus_url)
    assert live.returncode == 1
    assert (
        f"0.5 s is not a bucket boundary of {TTFT}, so no bucket series would match (nearest buckets: 0.35, 0.7)"
        in (live.stderr)
    )


def test_selectors_without_data_are_named_with_the_part_that_does_not_match(
    llmpath_bin: str, tmp_path: Path, prometheus_url: str
) -> None:
    def events(name: str, error: str, total: str) -> dict:
        return {
            "name": name,
            "objective": 99,
            "sli": {
                "events": {
                    "error_query": f"sum(rate({error}[{{{{.window}}}}]))",
                    "total_query": f"sum(rate({total}[{{{{.window}}}}]))",
                }
            },
            "alerting": {"name": name.title().replace("-", "")},
        }

    path = spec(
        tmp_path,
        # fine: no 5xx yet is no reason to warn; the total matches
        events("ok", 'llmpath_requests_total{code=~"5.."}', 'llmpath_requests_total{route="chat"}'),
        events("value-typo", 'llmpath_requests_total{code=~"5.."}', 'llmpath_requests_total{route="chta"}'),
        events("label-typo", 'llmpath_requests_total{code=~"5.."}', 'llmpath_requests_total{rute="chat"}'),
        events("metric-typo", 'llmpath_request_total{code=~"5.."}', "llmpath_requests_total"),
    )
    live = validate(llmpath_bin, path, "--prometheus", prometheus_url)
    assert live.returncode == 0, live.stderr  # warnings
    warnings = [line for line in live.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3, live.stderr
    by_slo = {w.split("SLO '")[1].split("'")[0]: w for w in warnings}
    assert set(by_slo) == {"llm-api-value-typo", "llm-api-label-typo", "llm-api-metric-typo"}
    assert "slos[1].sli.events.total_query" in by_slo["llm-api-value-typo"]
    assert re.match(rf"warning: {re.escape(str(path))}:\d+:\d+: SLO", by_slo["llm-api-value-typo"])  # line, column
    assert "no series of llmpath_requests_total has route=\"chta\" (its values: 'chat')" in by_slo["llm-api-value-typo"]
    label_typo = "no series of llmpath_requests_total has the label 'rute'; the SLI has no data"
    assert label_typo in by_slo["llm-api-label-typo"]
    assert "sli.events.error_query" in by_slo["llm-api-metric-typo"]
    assert "no series of llmpath_request_total in Prometheus" in by_slo["llm-api-metric-typo"]
    assert "3 warning(s) about SLI data" in live.stdout

    strict = validate(llmpath_bin, path, "--prometheus", prometheus_url, "--strict")
    assert strict.returncode == 1
    assert "3 errors." in strict.stderr


def test_an_unreadable_prometheus_is_exit_code_2(llmpath_bin: str, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    proc = validate(llmpath_bin, spec(tmp_path, ttft_slo(0.5)), "--prometheus", url)
    assert proc.returncode == 2
    assert f"cannot read Prometheus at {url}: ConnectError" in proc.stderr


def test_bad_bucket_options_name_the_option(llmpath_bin: str, tmp_path: Path) -> None:
    path = spec(tmp_path, ttft_slo(0.5))
    for bad in ("no-equals", f"{TTFT}=0.1,fast", f"{TTFT}="):
        proc = validate(llmpath_bin, path, "--buckets", bad)
        assert proc.returncode == 2 and "--buckets" in proc.stderr and "HISTOGRAM=BOUND" in proc.stderr
    proc = validate(llmpath_bin, path, "--buckets", "not a name=0.1")
    assert proc.returncode == 1 and "invalid histogram name 'not a name'" in proc.stderr


def test_raw_sli_selectors_are_checked_for_their_metric_and_labels(
    llmpath_bin: str, tmp_path: Path, prometheus_url: str
) -> None:
    ratio = 'sum(rate({error}[{{{{.window}}}}])) / sum(rate(llmpath_requests_total{{route="chat"}}[{{{{.window}}}}]))'
    path = spec(
        tmp_path,
        {
            "name": "raw-ok",
            "objective": 99,
            "sli": {"raw": {"error_ratio_query": ratio.format(error='llmpath_requests_total{code=~"5.."}')}},
            "alerting": {"name": "RawOk"},
        },
        {
            "name": "raw-typo",
            "objective": 99,
            "sli": {"raw": {"error_ratio_query": ratio.format(error='llmpath_requests_totl{code=~"5.."}')}},
            "alerting": {"name": "RawTypo"},
        },
    )
    live = validate(llmpath_bin, path, "--prometheus", prometheus_url)
    assert live.returncode == 0, live.stderr
    (warning,) = [line for line in live.stderr.splitlines() if line.startswith("warning:")]
    assert "SLO 'llm-api-raw-typo'" in warning and "sli.raw.error_ratio_query" in warning
    assert "no series of llmpath_requests_totl in Prometheus" in warning
