"""The gateway tests' real parts: engines and gateways started under the process supervisor, an OTLP/HTTP
collector, headless Chromium, a hand-moved clock. The fixtures that make them are in ``conftest.py``; other test
folders import them from here."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from llmpath.demo.supervisor import Supervisor, free_port, wait_ready
from llmpath.gateway.config import hash_key
from tests.loopback import Answer, Loopback, Request

LLMPATH = str(Path(sys.executable).parent / "llmpath")


class Keys:
    """The test API keys: tenants ``acme`` and ``beta``, ``slow`` (rate limited), ``metered`` (a token budget of
    300, refilled at 1 token/s) and the admin ``ops``."""

    user = "sk-acme-0f4c2a9d7e1b"
    other = "sk-beta-5d8e3c1a9b7f"
    limited = "sk-slow-2b6d9f1e4c8a"
    budgeted = "sk-metered-8c1f5a3e7d9b"
    admin = "sk-admin-7a3e9c5b1d2f"
    tenants = {user: "acme", other: "beta", limited: "slow", budgeted: "metered", admin: "ops"}

    @staticmethod
    def auth(key: str = user) -> dict[str, str]:
        return {"Authorization": f"Bearer {key}"}

    @classmethod
    def config(cls) -> list[dict[str, Any]]:
        """The ``api_keys`` section (stored as sha256 digests)."""
        out: list[dict[str, Any]] = []
        for key, tenant in cls.tenants.items():
            entry: dict[str, Any] = {"sha256": hash_key(key), "tenant": tenant}
            if key == cls.admin:
                entry["admin"] = True
            if key == cls.limited:
                entry["rate"] = {"requests_per_second": 0.2, "burst": 1}
            if key == cls.budgeted:
                entry["tokens"] = {"tokens_per_minute": 60, "burst": 300}
            out.append(entry)
        return out


def parse_metrics(text: str, prefix: str) -> dict[str, float]:
    """``{'name{labels}': value}`` for samples starting with ``prefix`` plus ``{'name': sum}`` per series name."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(prefix):
            continue
        series, _, value = line.rpartition(" ")
        out[series] = float(value)
        name = series.split("{", 1)[0]
        if name != series:
            out[name] = out.get(name, 0.0) + float(value)
    return out


@dataclass
class Engine:
    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def metrics(self) -> dict[str, float]:
        """``sglang:*`` samples of the engine's /metrics (and their sums over labels)."""
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=5).text, "sglang:")


@dataclass
class GatewayProc:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path
    config: dict[str, Any]
    ledger: Path | None = None

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def metrics(self, prefix: str = "llmpath_") -> dict[str, float]:
        return parse_metrics(httpx.get(f"{self.url}/metrics", timeout=5).text, prefix)

    def requests_json(self, limit: int = 200) -> list[dict[str, Any]]:
        resp = httpx.get(f"{self.url}/debug/requests.json", params={"limit": limit}, headers=Keys.auth(Keys.admin))
        resp.raise_for_status()
        return resp.json()["requests"]

    def record(self, request_id: str, timeout: float = 5.0) -> dict[str, Any]:
        """The waterfall record of one request (records are written when the response completes)."""
        deadline = time.monotonic() + timeout
        while True:
            for rec in self.requests_json():
                if rec["request_id"] == request_id:
                    return rec
            if time.monotonic() > deadline:
                raise AssertionError(f"no record of request {request_id}")
            time.sleep(0.05)


@dataclass
class Stack:
    """Engines and gateways of one test module."""

    supervisor: Supervisor
    tmp: Path
    engines: list[Engine] = field(default_factory=list)

    def start_engines(
        self, count: int, *extra: str, env: dict[str, str] | None = None, port: int | None = None, name: str = ""
    ) -> list[Engine]:
        """``count`` tiny engines (one torch thread each), started together; ``port``/``name`` for a restart."""
        started = []
        for i in range(count):
            port = port or free_port()
            name = name or f"e{len(self.engines) + i}"
            cmd = [LLMPATH, "engine", "serve", "--preset", "tiny", "--threads", "1", "--port", str(port), *extra]
            managed = self.supervisor.spawn(name, cmd, env=env)
            started.append((Engine(name, f"http://127.0.0.1:{port}", managed.popen), managed))
            port, name = None, ""
        for engine, managed in started:  # started together, waited for together: the imports overlap
            wait_ready(managed, f"{engine.url}/health", 90)
        self.engines.extend(engine for engine, _ in started)
        return [engine for engine, _ in started]

    def start_gateway(
        self, name: str, config: dict[str, Any], *extra: str, env: dict[str, str] | None = None
    ) -> GatewayProc:
        port = free_port()
        config = {**config, "listen": {**config.get("listen", {}), "host": "127.0.0.1", "port": port}}
        path = self.tmp / f"{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        url = f"http://127.0.0.1:{port}"
        cmd = [LLMPATH, "gateway", "serve", "--config", str(path), *extra]
        managed = self.supervisor.spawn(name, cmd, ready_url=f"{url}/readyz", env=env, timeout=60)
        ledger = config.get("usage", {}).get("ledger")
        return GatewayProc(url, managed.popen, managed.log_path, config, Path(ledger) if ledger else None)


#: An exported histogram series: (metric name, its data point's attributes as sorted pairs).
HistogramKey = tuple[str, tuple[tuple[str, Any], ...]]


class OtlpCollector:
    """Receives ``POST /v1/traces`` and ``POST /v1/metrics`` (OTLP/HTTP protobuf): keeps the spans as dicts and
    the latest (cumulative) count and sum of every histogram series."""

    def __init__(self) -> None:
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        spans: list[dict[str, Any]] = []
        histograms: dict[HistogramKey, tuple[int, float]] = {}
        lock = threading.Lock()
        self.spans = spans
        self.histograms = histograms
        self._lock = lock

        def keep_metrics(body: bytes) -> None:
            req = ExportMetricsServiceRequest()
            req.ParseFromString(body)
            with lock:
                for rm in req.resource_metrics:
                    for sm in rm.scope_metrics:
                        for metric in sm.metrics:
                            for point in metric.histogram.data_points:
                                attrs = tuple(sorted((a.key, _any_value(a.value)) for a in point.attributes))
                                histograms[(metric.name, attrs)] = (point.count, point.sum)

        def keep_spans(body: bytes) -> None:
            req = ExportTraceServiceRequest()
            req.ParseFromString(body)
            with lock:
                for rs in req.resource_spans:
                    service = next(
                        (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), ""
                    )
                    for ss in rs.scope_spans:
                        for sp in ss.spans:
                            spans.append(
                                {
                                    "service": service,
                                    "name": sp.name,
                                    "trace_id": sp.trace_id.hex(),
                                    "span_id": sp.span_id.hex(),
                                    "parent_id": sp.parent_span_id.hex(),
                                    "kind": sp.kind,
                                    "attributes": {a.key: _any_value(a.value) for a in sp.attributes},
                                }
                            )

        def keep(request: Request) -> Answer:
            (keep_metrics if request.path == "/v1/metrics" else keep_spans)(request.body)
            return Answer(200, headers={"content-type": "application/x-protobuf"})

        self._endpoint = Loopback(keep, methods=("POST",))
        self.url = self._endpoint.url

    def wait_for(self, predicate: Callable[[list[dict[str, Any]]], bool], timeout: float = 15) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._lock:
                snapshot = list(self.spans)
            if predicate(snapshot):
                return snapshot
            time.sleep(0.1)
        raise AssertionError(f"spans never matched; got {[(s['service'], s['name']) for s in self.spans]}")

    def histogram_snapshot(self) -> dict[HistogramKey, tuple[int, float]]:
        """The latest exported count and sum of every histogram series."""
        with self._lock:
            return dict(self.histograms)

    def settled_histograms(self, quiet_s: float = 1.5, timeout: float = 15) -> dict[HistogramKey, tuple[int, float]]:
        """The histograms once no export has changed them for ``quiet_s`` (earlier requests all exported)."""
        deadline = time.monotonic() + timeout
        last, since = self.histogram_snapshot(), time.monotonic()
        while time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.histogram_snapshot()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet_s:
                return now
        raise AssertionError("the exported histograms kept changing")

    def wait_for_histograms(
        self, predicate: Callable[[dict[HistogramKey, tuple[int, float]]], bool], timeout: float = 15
    ) -> dict[HistogramKey, tuple[int, float]]:
        """The first snapshot that matches ``predicate`` (exports are periodic)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            snapshot = self.histogram_snapshot()
            if predicate(snapshot):
                return snapshot
            time.sleep(0.1)
        raise AssertionError(f"histograms never matched; got {sorted(self.histogram_snapshot())}")

    def close(self) -> None:
        self._endpoint.close()


def _any_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    if kind == "array_value":
        return [_any_value(v) for v in value.array_value.values]
    return getattr(value, kind) if kind else None


class Chromium:
    """A headless Chromium process driven over the DevTools protocol (one page)."""

    FLAGS = (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--remote-debugging-port=0",
        "--window-size=1400,900",
    )

    def __init__(self, binary: str, supervisor: Supervisor, profile: Path) -> None:
        profile.mkdir(parents=True, exist_ok=True)
        cmd = [binary, *self.FLAGS, f"--user-data-dir={profile}", "about:blank"]
        self.proc = supervisor.spawn("chromium", cmd).popen
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"chromium did not start (rc={self.proc.poll()})")
            time.sleep(0.05)
        self.port = int(port_file.read_text().split()[0])

    def evaluate_page(self, url: str, expression: str, headers: dict[str, str] | None = None) -> tuple[int | None, Any]:
        """Load ``url`` (with extra request headers) and return (HTTP status, value of ``expression``)."""
        return asyncio.run(self._evaluate(url, expression, headers or {}))

    async def _evaluate(self, url: str, expression: str, headers: dict[str, str]) -> tuple[int | None, Any]:
        import aiohttp

        async with httpx.AsyncClient() as client:
            targets = (await client.get(f"http://127.0.0.1:{self.port}/json/list")).json()
        ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
            ids = iter(range(1, 1_000_000))
            events: list[dict[str, Any]] = []

            async def call(method: str, **params: Any) -> dict[str, Any]:
                msg_id = next(ids)
                await ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
                while True:
                    msg = json.loads((await ws.receive()).data)
                    if msg.get("id") == msg_id:
                        if "error" in msg:
                            raise RuntimeError(f"{method}: {msg['error']}")
                        return msg.get("result", {})
                    events.append(msg)

            await call("Network.enable")
            await call("Page.enable")
            await call("Network.setExtraHTTPHeaders", headers=headers)
            await call("Page.navigate", url=url)
            deadline = time.monotonic() + 20
            while not any(e.get("method") == "Page.loadEventFired" for e in events):
                if time.monotonic() > deadline:
                    raise TimeoutError("page did not load")
                events.append(json.loads((await asyncio.wait_for(ws.receive(), 20)).data))
            status = next(
                (
                    e["params"]["response"]["status"]
                    for e in events
                    if e.get("method") == "Network.responseReceived" and e["params"]["type"] == "Document"
                ),
                None,
            )
            result = await call("Runtime.evaluate", expression=expression, returnByValue=True)
            return status, result.get("result", {}).get("value")


class FakeClock:
    """A clock the test moves by hand (``clock.now = …``), for the TTL, ejection and rate-limit timings."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
