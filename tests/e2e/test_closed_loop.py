"""The closed loop, end to end: real engines, gateway, Prometheus 2.42 and Alertmanager 0.25 on loopback.

A steady shared-prefix workload runs throughout. Faults injected at the engines must fire the SLO alert owned by
the right stage, reach the right Alertmanager receiver with a runbook that names that stage, and resolve once
cleared. Then the SLI Prometheus computes from the recording rules is checked against the usage ledger, and the
gateway's token counts against the engines' own counters.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmpath.dashboards import queries
from llmpath.demo.prometheus import find_alertmanager, find_prometheus
from llmpath.demo.routes import DEMO_ROUTES
from llmpath.demo.stack import Stack, StackConfig, start_stack
from llmpath.demo.workload import WorkloadSpec, run_workload
from llmpath.instrumentation.usage import read_jsonl
from llmpath.live.promapi import PrometheusClient
from tests.loopback import PostRecorder

LLMPATH = str(Path(sys.executable).parent / "llmpath")

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.solo]

WINDOWS = Path(__file__).with_name("windows-e2e.yaml")
SCRAPE = 1.0  # seconds: scrape and rule-evaluation interval
SHORTEST_WINDOW = 15.0  # seconds: windows-e2e.yaml's shortest alert window
TTFT_THRESHOLD = 0.5  # the default spec's TTFT SLO: 95% of requests under 0.5 s


# ----------------------------------------------------------------------------------------------- helpers


@dataclass
class Notification:
    receiver: str
    status: str  # firing | resolved
    labels: dict[str, str]
    annotations: dict[str, str]
    received: float


class WebhookReceiver(PostRecorder):
    """Alertmanager's webhook receivers (one path per receiver), served by the test over loopback."""

    def since(self, t0: float) -> list[Notification]:
        """Each alert of the notifications received from ``t0`` on."""
        return [
            Notification(post.path.strip("/"), alert["status"], alert["labels"], alert["annotations"], post.received)
            for post in self.posts()
            if post.received >= t0
            for alert in post.body["alerts"]
        ]

    def wait_for(self, predicate: Callable[[Notification], bool], since: float, timeout: float) -> Notification:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = next((n for n in self.since(since) if predicate(n)), None)
            if match is not None:
                return match
            time.sleep(0.5)
        seen = [(n.receiver, n.status, n.labels.get("alertname"), n.labels.get("stage")) for n in self.since(since)]
        raise AssertionError(f"no matching notification within {timeout:.0f}s; received: {seen}")


class Load:
    """The demo's shared-prefix workload, running continuously in a background thread."""

    def __init__(self, stack: Stack) -> None:
        self.spec = WorkloadSpec(
            routes=[r.name for r in DEMO_ROUTES],
            tenants=stack.tenants,
            conversations=100_000,
            turns=(2, 4),
            max_tokens=8,
            concurrency=3,
        )
        self.url = stack.gateway_url
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.statuses: list[int] = []

    def _run(self) -> None:
        asyncio.run(
            run_workload(
                self.url,
                self.spec,
                on_request=lambda r: self.statuses.append(r.status),
                should_stop=self.stopping.is_set,
            )
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(timeout=120)


@dataclass
class Loop:
    stack: Stack
    receiver: WebhookReceiver
    prom: PrometheusClient
    load: Load

    def set_fault(self, **fault: float) -> None:
        for url in self.stack.engine_urls:
            httpx.post(f"{url}/debug/fault", json=fault, timeout=5).raise_for_status()

    def clear_faults(self) -> None:
        for url in self.stack.engine_urls:
            httpx.delete(f"{url}/debug/fault", timeout=5).raise_for_status()

    def firing(self) -> list[dict[str, Any]]:
        return [a for a in self.prom.alerts() if a["state"] == "firing"]

    def wait_until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(1.0)
        raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; firing: {self.firing()}")


def runbook_text(url: str) -> str:
    """The runbook a ``runbook_url`` annotation points at (the stack writes ``file://`` URLs)."""
    parsed = urlparse(url)
    assert parsed.scheme == "file", url
    path = Path(unquote(parsed.path))
    assert path.is_file(), f"runbook {path} does not exist"
    return path.read_text()


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """A /metrics page as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def total(samples: dict, name: str, **match: str) -> float:
    return sum(
        v for (n, labels), v in samples.items() if n == name and all(dict(labels).get(k) == m for k, m in match.items())
    )


# ------------------------------------------------------------------------------------------------ fixture


@pytest.fixture(scope="module")
def loop(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loop]:
    if find_prometheus() is None or find_alertmanager() is None:
        pytest.skip("prometheus and prometheus-alertmanager must be installed (make test installs them via apt-get)")
    receiver = WebhookReceiver()
    cfg = StackConfig(
        workdir=tmp_path_factory.mktemp("closed-loop"),
        engines=2,
        preset="tiny",
        fault_injection=True,
        windows_file=WINDOWS,
        scrape_interval=f"{SCRAPE:g}s",
        evaluation_interval=f"{SCRAPE:g}s",
        alert_receivers={"page": receiver.url("page"), "ticket": receiver.url("ticket")},
    )
    try:
        with start_stack(cfg) as stack:
            assert stack.prometheus is not None and stack.alertmanager is not None, stack.skipped
            prom = stack.prometheus.client()
            load = Load(stack)
            load.start()
            loop = Loop(stack, receiver, prom, load)
            try:
                # Warm-up: every route/tenant prefix reaches the engines' caches and every series exists.
                loop.wait_until(
                    lambda: (prom.query_value("sum(llmpath_requests_total)") or 0) >= 60, 120, "warm-up traffic"
                )
                yield loop
            finally:
                load.stop()
                prom.close()
                if any(load.statuses) and not all(s == 200 for s in load.statuses[-5:]):
                    print(stack.supervisor.logs())
    finally:
        receiver.close()


# -------------------------------------------------------------------------------------------------- tests


def test_steady_load_fires_nothing_and_every_dashboard_query_has_data(loop: Loop) -> None:
    t0 = time.monotonic()
    # Alerts raised by the cold start (empty caches) must clear, then stay clear for half a minute of load.
    loop.wait_until(lambda: not loop.firing(), 120, "the cold-start alerts to clear")
    quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < 30:
        assert loop.firing() == [], "an alert fired under steady load"
        time.sleep(2)
    fired = [n for n in loop.receiver.since(quiet_since) if n.status == "firing"]
    assert fired == [], f"notifications under steady load: {fired}"

    empty = []
    for path in sorted(loop.stack.artifacts.dashboards_dir.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for expr in queries(dashboard, {"__rate_interval": "30s", "__range": "5m"}):
            if not loop.prom.query(expr):
                empty.append(f"{path.name}: {expr}")
    assert empty == [], "dashboard queries without data:\n" + "\n\n".join(empty)
    assert time.monotonic() - t0 < 240


def test_the_default_specs_validate_against_the_live_stack(loop: Loop) -> None:
    """`slo validate --prometheus`: every latency histogram of the default spec has its threshold among its live
    bucket bounds, and every SLI selector matches series the gateway exports."""
    from llmpath.slo import default_spec_path

    assert loop.stack.prometheus is not None
    cmd = [LLMPATH, "slo", "validate", str(default_spec_path()), "--prometheus", loop.stack.prometheus.url, "--strict"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "4 histogram(s) with live buckets, every SLI selector matches series" in out.stdout


def test_every_runbook_query_runs_on_the_live_stack(loop: Loop) -> None:
    """Every PromQL block of every generated runbook is accepted by Prometheus; the stage diagnosis returns data."""
    blocks = {
        query
        for path in loop.stack.artifacts.runbooks_dir.glob("*.md")
        for query in re.findall(r"```promql\n(.*?)\n```", path.read_text(), re.DOTALL)
    }
    assert len(blocks) > 30
    for query in sorted(blocks):
        loop.prom.query(query)  # raises on a Prometheus error
    prefill = [q for q in blocks if q.startswith("histogram_quantile") and '_bucket{stage="prefill"}' in q]
    assert prefill and all(loop.prom.query(q) for q in prefill)


def page_during_fault(
    loop: Loop, stage: str, while_firing: Callable[[Notification], None] | None = None, **fault: float
) -> Notification:
    """Inject ``fault`` at every engine until the page receiver gets a firing alert owned by ``stage`` (then run
    ``while_firing(page)``, the fault still on); then clear."""
    started = time.monotonic()
    loop.set_fault(**fault)
    try:
        page = loop.receiver.wait_for(
            lambda n: n.receiver == "page" and n.status == "firing" and n.labels.get("stage") == stage,
            since=started,
            timeout=180,
        )
        if while_firing is not None:
            while_firing(page)
    finally:
        loop.clear_faults()
    assert page.labels["sloth_severity"] == "page"
    text = runbook_text(page.annotations["runbook_url"])
    assert page.labels["alertname"] in text and stage in text.lower()
    return page


def check_slo_status(loop: Loop, page: Notification) -> None:
    """What on-call runs next: `llmpath slo status` shows the paging alert, its owner and its runbook."""
    prometheus = loop.stack.prometheus
    assert prometheus is not None
    group = {"route": page.labels["route"]}
    rows: list[dict] = []

    def paging(row: dict) -> dict | None:
        return next((a for a in row["alerts"] if a["name"] == page.labels["alertname"] and a["severity"] == "page"),
                    None)  # fmt: skip

    def burning_row() -> dict | None:
        out = subprocess.run([LLMPATH, "slo", "status", "--prometheus", prometheus.url, "--json"],
                             capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
        rows[:] = json.loads(out.stdout)
        row = next(r for r in rows if r["slo_id"] == page.labels["sloth_id"] and r["group"] == group)
        return row if row["burn_rate"] is not None and paging(row) is not None else None

    # The current burn rate reads the shortest window (15 s here), which has no sample while the slowed-down
    # route completes no request in it; the alert needs that window too, so it lapses with it (the page stays
    # sent): wait for a moment with both.
    loop.wait_until(lambda: burning_row() is not None, 90, "a burn rate and the page alert of the paging group")
    row = next(r for r in rows if r["slo_id"] == page.labels["sloth_id"] and r["group"] == group)
    assert (row["stage"], row["owner"]) == ("prefill", "serving") and row["burn_rate"] > 1
    alert = paging(row)
    assert alert is not None
    assert alert["runbook_url"] == page.annotations["runbook_url"]
    assert {r["slo"] for r in rows} == {"availability", "ttft", "gateway-overhead", "scheduling-latency",
                                       "prefill-latency", "time-per-output-token", "prompt-cache-hit-rate"}  # fmt: skip
    # on-call of one team: only its SLOs, only those burning
    mine = subprocess.run([LLMPATH, "slo", "status", "--prometheus", prometheus.url, "--owner", "serving",
                           "--firing", "--json"], capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    burning = json.loads(mine.stdout)
    assert burning and all(r["owner"] == "serving" and r["alerts"] for r in burning)
    assert any(r["slo_id"] == page.labels["sloth_id"] and r["group"] == group for r in burning)
    nobody = subprocess.run([LLMPATH, "slo", "status", "--prometheus", prometheus.url, "--owner", "nobody"],
                            capture_output=True, text=True, timeout=60, check=True)  # fmt: skip
    assert "no SLO owned by 'nobody'" in nobody.stdout


def test_slow_prefill_pages_the_prefill_owner_and_resolves(loop: Loop) -> None:
    started = time.monotonic()
    # Prefill takes 300x longer: a few milliseconds on the tiny engine become about a second.
    page = page_during_fault(loop, "prefill", lambda page: check_slo_status(loop, page), prefill_slowdown=300)
    assert page.labels["owner"] == "serving"
    assert page.labels["alertname"] in {"LLMAPITTFTBurn", "LLMAPIPrefillLatencyBurn"}
    # A slow prefill is not an availability problem: no request failed.
    assert not any(n.labels["alertname"] == "LLMAPIAvailabilityBurn" for n in loop.receiver.since(started))

    cleared = time.monotonic()
    loop.receiver.wait_for(
        lambda n: n.status == "resolved" and n.labels["alertname"] == page.labels["alertname"]
        and n.labels.get("route") == page.labels.get("route") and n.receiver == "page",
        since=cleared,
        timeout=180,
    )  # fmt: skip


def test_a_queue_fault_pages_the_schedule_owner(loop: Loop) -> None:
    loop.wait_until(lambda: not loop.firing(), 240, "the prefill fault's alerts to resolve")
    page = page_during_fault(loop, "schedule", queue_delay_s=0.6)
    assert page.labels["alertname"] == "LLMAPISchedulingLatencyBurn"
    assert page.labels["owner"] == "serving"


def test_slow_decode_pages_the_decode_owner(loop: Loop) -> None:
    # Every decode step takes 300x longer: about a millisecond per token on the tiny engine becomes a few hundred.
    page = page_during_fault(loop, "decode", decode_slowdown=300)
    assert page.labels["alertname"] == "LLMAPITimePerOutputTokenBurn"
    assert page.labels["owner"] == "serving" and page.labels["sloth_slo"] == "time-per-output-token"


def test_prometheus_sli_matches_the_ledger_and_token_counts_match_the_engines(loop: Loop) -> None:
    loop.load.stop()
    # The count-based period SLI sums the shortest window's rates, so an event counts in full only once a whole
    # short window has passed over it: wait that long (plus scrapes) after the last request.
    time.sleep(SHORTEST_WINDOW + 3 * SCRAPE)
    prom, stack = loop.prom, loop.stack

    # The TTFT SLI over the whole run (the 30m period window), per route, from the recording rule.
    period = prom.query('slo:sli_error:ratio_rate30m{sloth_slo="ttft"}')
    assert {r["metric"]["route"] for r in period} == {r.name for r in DEMO_ROUTES}
    ttfts = [(r, r.ttft_s) for r in read_jsonl(stack.ledger_path) if r.ttft_s is not None]
    for result in period:
        route = result["metric"]["route"]
        # increase() counts from each series' first sample: leave out the requests observed before it.
        first = prom.query_value(
            f'min_over_time(timestamp(llmpath_time_to_first_token_seconds_count{{route="{route}"}})[30m:1s])'
        )
        assert first is not None
        mine = [ttft for r, ttft in ttfts if r.route == route and r.time + ttft > first]
        ledger_bad = sum(ttft > TTFT_THRESHOLD for ttft in mine) / len(mine)
        prom_bad = float(result["value"][1])
        assert abs((1 - prom_bad) - (1 - ledger_bad)) <= 0.01 * (1 - ledger_bad), (route, prom_bad, ledger_bad)

    # Token accounting: the gateway's counters equal the engines' own.
    gateway = scrape(stack.gateway_url)
    engines = [scrape(url) for url in stack.engine_urls]
    for kind, engine_metric in (
        ("input", "sglang:prompt_tokens_total"),
        ("output", "sglang:generation_tokens_total"),
        ("cached", "sglang:cached_tokens_total"),
    ):
        ours = total(gateway, "llmpath_tokens_total", type=kind)
        theirs = sum(total(e, engine_metric) for e in engines)
        assert ours == theirs > 0, (kind, ours, theirs)
