"""docs/scaling.md, claim by claim, where an operator scaling the gateway out relies on it and no other test checks:
each replica routes from its own prefix index (a prefix another replica placed is new to it), each gateway process
breaks ties in its own order (replicas with the same configuration do not herd onto the same workers), the series
budget of the stage histogram, and the trace sampling decision that the gateway passes on to the workers.

Real ``llmpath gateway serve`` processes over loopback, in front of SGLang stand-ins (the backends tests'
:class:`LoopbackServer` answering ``/health`` and ``/generate`` with a recorded SGLang reply): routing, metrics and
trace propagation are the gateway's, whatever the model computes. The simulation's own claims are checked in
``tests/bench/test_scaling_sim.py``."""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmpath.demo.supervisor import Supervisor
from tests.backends.canned_server import LoopbackServer
from tests.gateway.stack import GatewayProc, OtlpCollector, Stack

REPLY = (Path(__file__).parent / "backends" / "fixtures" / "generate_stream_metrics.sse").read_bytes()
WORKERS = 8
#: Six blocks of 64 bytes (16 tokens of 4 characters): more than the 4-block minimum prefix.
FILLER = "You answer questions about the ACME product catalogue, briefly and politely. " * 5


@pytest.fixture(scope="module")
def workers() -> Iterator[list[LoopbackServer]]:
    """Eight SGLang stand-ins, served from an event loop of their own so that gateway processes can reach them
    while the tests block on HTTP calls."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    servers = [LoopbackServer() for _ in range(WORKERS)]
    for server in servers:
        server.reply("/health")
        server.reply("/generate", REPLY)
        asyncio.run_coroutine_threadsafe(server.start(), loop).result(10)
    yield servers
    for server in servers:
        asyncio.run_coroutine_threadsafe(server.stop(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture(scope="module")
def otlp() -> Iterator[OtlpCollector]:
    collector = OtlpCollector()
    yield collector
    collector.close()


@pytest.fixture(scope="module")
def stack(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, otlp: OtlpCollector
) -> Iterator[Stack]:
    """The gateway processes of this module; stopped by PID at the end (before ``otlp``, which they export to), their
    logs printed if a test failed."""
    tmp = tmp_path_factory.mktemp("scaling")
    failed_before = request.session.testsfailed
    with Supervisor(tmp) as supervisor:
        yield Stack(supervisor, tmp)
        if request.session.testsfailed > failed_before:
            print(supervisor.logs())


def worker_config(workers: list[LoopbackServer]) -> dict[str, Any]:
    backends = [{"url": server.url, "name": f"w{i}"} for i, server in enumerate(workers)]
    return {"insecure_no_auth": True, "backends": backends}


def start_replicas(stack: Stack, workers: list[LoopbackServer], *envs: dict[str, str]) -> list[GatewayProc]:
    """Fresh replicas (one per ``envs`` item) with the same configuration, in front of the same workers."""
    first = len(stack.supervisor.processes)
    return [stack.start_gateway(f"replica-{first + i}", worker_config(workers), env=env) for i, env in enumerate(envs)]


def complete(gateway: GatewayProc, prompt: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One completion through ``gateway``; returns its waterfall record (backend, routing reason, matched tokens)."""
    body = {"model": "m", "prompt": prompt, "max_tokens": 3}
    resp = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return gateway.record(resp.headers["x-request-id"])


def generate_calls(workers: list[LoopbackServer]) -> list[int]:
    return [sum(r.path == "/generate" for r in server.requests) for server in workers]


def test_each_replica_breaks_ties_in_its_own_order(stack: Stack, workers: list[LoopbackServer]) -> None:
    """New prefixes on idle workers tie: each replica places the same eight prompts in an order of its own, one per
    worker (by what its index holds), so replicas started alike do not all send new prefixes to the same worker."""
    orders = []
    for gateway in start_replicas(stack, workers, {}, {}, {}):
        picks = []
        for app in range(WORKERS):
            before = generate_calls(workers)
            record = complete(gateway, f"app {app}: {FILLER}")
            assert record["extra"]["routing_reason"] == "no_prefix"
            grew = [i for i, (was, now) in enumerate(zip(before, generate_calls(workers), strict=True)) if now > was]
            assert [f"w{i}" for i in grew] == [record["extra"]["backend"]]
            picks.append(grew[0])
        assert sorted(picks) == list(range(WORKERS))
        orders.append(tuple(picks))
    # orders drawn at random per process all agree once in (8!)² runs; one order for every replica always does
    assert len(set(orders)) > 1, orders


def test_a_prefix_one_replica_placed_is_new_to_another(stack: Stack, workers: list[LoopbackServer]) -> None:
    """A replica's index holds only what it routed: the prompt that replica A follows to its worker is a new prefix,
    with nothing predicted, on replica B."""
    a, b = start_replicas(stack, workers, {}, {})
    system = f"conversation: {FILLER}"
    first = complete(a, system + "first question")
    again = complete(a, system + "second question")
    elsewhere = complete(b, system + "third question")
    assert first["extra"]["routing_reason"] == "no_prefix"
    assert again["extra"]["routing_reason"] == "prefix"
    assert again["extra"]["backend"] == first["extra"]["backend"]
    assert again["extra"]["matched_prefix_tokens"] >= 64  # the minimum prefix
    assert elsewhere["extra"]["routing_reason"] == "no_prefix"
    assert elsewhere["extra"]["matched_prefix_tokens"] == 0
    assert elsewhere["extra"]["cache_result"] == "miss"


def stage_series(text: str, route: str) -> dict[str, list[str]]:
    """Per ``stage`` label value, the sample names of ``llmpath_stage_duration_seconds`` for ``route`` (``le``
    values for buckets)."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        found = re.match(r"llmpath_stage_duration_seconds_(\w+)\{(.*)\} ", line)
        if found is None:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', found[2]))
        if labels["route"] == route:
            kind = found[1]
            out.setdefault(labels["stage"], []).append(f"le={labels['le']}" if kind == "bucket" else kind)
    return out


def test_the_stage_histogram_is_nine_stages_of_32_series_per_route(stack: Stack, workers: list[LoopbackServer]) -> None:
    """The series budget: per route and replica, 9 stage values (8 stages and ``unattributed``) × 28 buckets,
    ``+Inf``, ``_sum``, ``_count`` and ``_created`` (which PROMETHEUS_DISABLE_CREATED_SERIES=True drops)."""
    default, without_created = start_replicas(stack, workers, {}, {"PROMETHEUS_DISABLE_CREATED_SERIES": "True"})
    for gateway, created in ((default, True), (without_created, False)):
        complete(gateway, f"budget: {FILLER}")
        series = stage_series(httpx.get(f"{gateway.url}/metrics", timeout=5).text, "default")
        assert len(series) == 9 and "unattributed" in series
        for names in series.values():
            buckets = [n for n in names if n.startswith("le=")]
            assert len(buckets) == 29 and buckets[-1] == "le=+Inf"
            assert sorted(n for n in names if not n.startswith("le=")) == ["count", *(["created"] * created), "sum"]
            assert len(names) == 31 + created


def traceparent(workers: list[LoopbackServer], worker: int) -> tuple[str, bool]:
    """The trace id and sampled flag of the last ``traceparent`` that ``worker`` was sent."""
    header = [r for r in workers[worker].requests if r.path == "/generate"][-1].headers["traceparent"]
    _, trace_id, _, flags = header.split("-")
    return trace_id, bool(int(flags, 16) & 1)


def test_the_sampling_decision_is_taken_once_and_passed_on_to_the_workers(
    stack: Stack, workers: list[LoopbackServer], otlp: OtlpCollector
) -> None:
    """``parentbased_traceidratio``: a new trace is sampled at the ratio (0 here), a caller's decision is kept, and
    the worker gets the decision in ``traceparent``'s sampled flag, under the same trace id."""
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": otlp.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",
        "OTEL_TRACES_SAMPLER": "parentbased_traceidratio",
        "OTEL_TRACES_SAMPLER_ARG": "0",
    }
    config = {**worker_config(workers), "backends": worker_config(workers)["backends"][:1]}
    gateway = stack.start_gateway("sampled", config, env=env)
    complete(gateway, "a new trace")
    new_trace, new_sampled = traceparent(workers, 0)
    unsampled = "4bf92f3577b34da6a3ce929d0e0e4736"
    complete(gateway, "a caller's unsampled trace", {"traceparent": f"00-{unsampled}-00f067aa0ba902b7-00"})
    assert traceparent(workers, 0) == (unsampled, False)
    sampled = "0af7651916cd43dd8448eb211c80319c"
    complete(gateway, "a caller's sampled trace", {"traceparent": f"00-{sampled}-b7ad6b7169203331-01"})
    assert traceparent(workers, 0) == (sampled, True)
    assert not new_sampled and new_trace not in (sampled, unsampled)
    spans = otlp.wait_for(lambda spans: any(s["trace_id"] == sampled for s in spans))
    assert {s["trace_id"] for s in spans} == {sampled}  # exported in order: nothing of the unsampled traces
