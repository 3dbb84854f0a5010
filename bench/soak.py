"""Soak: a few thousand varied requests through the gateway in front of two tiny engines, and the sizes of every
per-process structure that could grow with traffic, printed side by side: idle before, after each round, and after
the traffic stopped.

Two real engines (``llmpath engine serve --preset tiny``) run as child processes; two gateways run in this process
(uvicorn on free ports), so that their structures can be read directly: one with routes (``chat`` with per-tenant
caching, ``shared`` and ``off``), a JSON-lines ledger and a configuration file that is rewritten and reloaded with
``SIGHUP`` during the run, and one in passthrough mode (no routes: clients choose the model names). The traffic mixes
streamed and unstreamed chat and text completions over many distinct prefixes and tenants, clients that leave
mid-stream or while waiting, requests refused by validation, limits, rate limits and unknown models or keys, per-tenant
prompt-cache flushes, distinct model names on the passthrough gateway, and one engine killed and restarted on its port
mid-round.

A structure that leaks grows with every round; a bounded one stops at its bound; per-request state returns to its
idle value once the traffic stops. Two figures are bounded without returning to 0 at once: ``process.live.*`` counts
per-request objects still referenced, and asyncio keeps the context of the request that opened each backend connection
(its transport's reader callback) while that connection stays in the pool, so a few ``RequestTelemetry`` outlive their
requests, at most one per pooled connection (all gone once the gateways stop); ``pass.prompt_cache.seeds`` grows with
the distinct model names up to ``llmpath.gateway.prompt_cache.MAX_SEEDS``. Figures only: nothing here passes or fails,
and no timing is reported.

    .venv/bin/python bench/soak.py                         # 2 rounds of 1500 requests, 16 clients
    .venv/bin/python bench/soak.py --rounds 3 --requests 1000 --concurrency 8
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson
import uvicorn
import yaml
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from llmpath.demo.supervisor import ManagedProcess, Supervisor, free_port, wait_ready
from llmpath.gateway.app import HotPath, create_app
from llmpath.gateway.config import hash_key, load_config
from llmpath.instrumentation import usage

LLMPATH = str(Path(sys.executable).parent / "llmpath")
RELOADS = "llmpath_gateway_config_reloads_total"
TENANTS = 24
ADMIN = "sk-soak-admin"
LIMITED = "sk-soak-limited"  # one request per 5 s: most of its requests are refused (429)
METERED = "sk-soak-metered"  # a small token budget: token_rate_limited


def tenant_key(i: int) -> str:
    return f"sk-soak-tenant-{i:03d}"


def gateway_config(engines: list[str], port: int, ledger: Path, generation: int) -> dict[str, Any]:
    """The routed gateway's configuration; ``generation`` changes keys and limits at each reload."""
    keys: list[dict[str, Any]] = [
        {"sha256": hash_key(tenant_key(i)), "tenant": f"t{i:03d}"} for i in range(TENANTS - generation % 3)
    ]
    keys += [
        {"sha256": hash_key(ADMIN), "tenant": "ops", "admin": True},
        {"sha256": hash_key(LIMITED), "tenant": "limited", "rate": {"requests_per_second": 0.2, "burst": 1}},
        {"sha256": hash_key(METERED), "tenant": "metered", "tokens": {"tokens_per_minute": 120, "burst": 400}},
    ]
    return {
        "listen": {"host": "127.0.0.1", "port": port},
        "backends": [{"url": url, "name": f"e{i}"} for i, url in enumerate(engines)],
        "health": {"interval_s": 0.5, "timeout_s": 2, "eject_after_failures": 2, "eject_for_s": 1},
        "routes": [
            {"name": "chat", "model": "llmpath-tiny"},
            {"name": "shared", "model": "llmpath-tiny", "cache": "shared"},
            {"name": "nocache", "model": "llmpath-tiny", "cache": "off"},
        ],
        "api_keys": keys,
        "limits": {
            "max_tokens": 24 + generation % 2,
            "default_max_tokens": 8,
            "max_concurrency": 12 + generation % 2,
            "max_queue": 8,
            "timeouts": {"queue_s": 2, "read_s": 20, "connect_s": 2},
        },
        "prompt_cache": {"max_blocks_per_backend": 4096},
        "usage": {"ledger": str(ledger)},
        "debug": {"waterfall_requests": 100},
    }


def _fds(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/fd").iterdir())


def _threads(pid: int) -> int:
    return sum(1 for _ in Path(f"/proc/{pid}/task").iterdir())


def _connections(app: HotPath) -> int:
    """Open backend connections of a gateway's aiohttp pools (idle and in use)."""
    total = 0
    for state in app.gateway.pool.states.values():
        client = getattr(state.backend, "_http", None) or getattr(state.backend, "http", None)
        session = getattr(client, "_session", None)
        connector = getattr(session, "connector", None)
        if connector is not None:
            total += sum(len(c) for c in connector._conns.values()) + len(connector._acquired)  # noqa: SLF001
    return total


def gateway_sizes(name: str, app: HotPath) -> dict[str, int]:
    """The sizes of one in-process gateway's structures."""
    gw, llm = app.gateway, app.state.llmpath
    pc, index = gw.prompt_cache, gw.prompt_cache.index
    fam = llm.metrics
    gm = gw.metrics
    series = sum(len(m.samples) for m in llm.registry.collect())
    return {
        f"{name}.admission.inflight": gw.admission.inflight,
        f"{name}.admission.queue": gw.admission.queue_depth,
        f"{name}.pool.inflight": sum(s.inflight for s in gw.pool.states.values()),
        f"{name}.index.blocks": sum(len(b) for b in index._blocks.values()),  # noqa: SLF001
        f"{name}.index.roots": len(index._roots),  # noqa: SLF001
        f"{name}.prompt_cache.seeds": len(pc._seeds),  # noqa: SLF001
        f"{name}.prompt_cache.tenant_epochs": len(pc._tenant_epochs),  # noqa: SLF001
        **{f"{name}.routed_to.{b}": gw.router.sent(b) for b in gw.pool.states},
        **{f"{name}.available.{b}": int(s.available(time.monotonic())) for b, s in gw.pool.states.items()},
        f"{name}.waterfall": len(app.state.waterfall.recent()),
        f"{name}.rate_buckets": len(gw.rates._buckets),  # noqa: SLF001
        f"{name}.token_buckets": len(gw.tokens._buckets),  # noqa: SLF001
        f"{name}.guard.values": sum(len(v) for v in llm.guard._seen.values()),  # noqa: SLF001
        f"{name}.gateway_metrics.children": len(gm._children) if gm is not None else 0,  # noqa: SLF001
        f"{name}.metrics.route_models": len(fam._rm),  # noqa: SLF001
        f"{name}.metrics.stage_routes": len(fam._stage),  # noqa: SLF001
        f"{name}.metrics.samples": series,
        f"{name}.route_templates": len(llm.route_templates._prefixes),  # noqa: SLF001
        f"{name}.stage_span_shapes": len(llm._stage_spans),  # noqa: SLF001
        f"{name}.backend_connections": _connections(app),
        f"{name}.reloads": int(llm.registry.get_sample_value(RELOADS, {"result": "success"}) or 0),
    }


def engine_sizes(name: str, url: str, proc: ManagedProcess | None) -> dict[str, int]:
    """An engine's request table, KV and radix-cache accounting (``/server_info``), metric series and fds."""
    out: dict[str, int] = {}
    try:
        info = httpx.get(f"{url}/server_info", timeout=5).json()["internal_states"][0]
        metrics = httpx.get(f"{url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return {f"{name}.down": 1}
    out[f"{name}.running"] = info["num_running_reqs"]
    out[f"{name}.waiting"] = info["num_waiting_reqs"]
    out[f"{name}.kv_used_not_evictable"] = info["num_used_tokens"]  # slots neither free nor evictable
    out[f"{name}.radix_nodes"] = info["radix_cache_nodes"]
    out[f"{name}.metrics.samples"] = sum(1 for line in metrics.splitlines() if line and not line.startswith("#"))
    if proc is not None and proc.alive():
        out[f"{name}.fds"] = _fds(proc.pid)
        out[f"{name}.threads"] = _threads(proc.pid)
    return out


#: Per-request objects: alive only while their request is.
LIVE_TYPES = ("RequestTelemetry", "Prepared", "BackendCallResponse", "_Tracker", "ModelCallSpan", "ClientResponse")


def process_sizes() -> dict[str, int]:
    gc.collect()
    live = Counter(type(o).__name__ for o in gc.get_objects() if type(o).__name__ in LIVE_TYPES)
    return {
        **{f"process.live.{name}": live[name] for name in LIVE_TYPES},
        "process.asyncio_tasks": len(asyncio.all_tasks()),
        "process.fds": _fds(os.getpid()),
        "process.threads": _threads(os.getpid()),
        "process.line_templates": len(usage._LINE_TEMPLATES),  # noqa: SLF001
    }


class Soak:
    """The processes, the two in-process gateways and the traffic."""

    def __init__(self, supervisor: Supervisor, tmp: Path, args: argparse.Namespace) -> None:
        self.supervisor = supervisor
        self.tmp = tmp
        self.args = args
        self.rng = random.Random(args.seed)
        self.engine_ports = [free_port(), free_port()]
        self.engine_urls = [f"http://127.0.0.1:{p}" for p in self.engine_ports]
        self.engines: list[ManagedProcess | None] = [None, None]
        self.generation = 0
        self.config_path = tmp / "gateway.yaml"
        self.ledger = tmp / "usage.jsonl"
        self.port = free_port()
        self.pass_port = free_port()
        self.outcomes: Counter[str] = Counter()
        self.model_serial = 0

    def start_engine(self, i: int) -> None:
        port = self.engine_ports[i]
        cmd = [LLMPATH, "engine", "serve", "--preset", "tiny", "--threads", "1", "--port", str(port)]
        proc = self.supervisor.spawn(f"e{i}-{time.monotonic_ns()}", cmd)
        self.engines[i] = proc

    def write_config(self) -> None:
        config = gateway_config(self.engine_urls, self.port, self.ledger, self.generation)
        self.config_path.write_text(yaml.safe_dump(config))

    async def serve(self, app: HotPath, port: int) -> tuple[uvicorn.Server, asyncio.Task[None]]:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
        task = asyncio.get_running_loop().create_task(server.serve())
        while not server.started:  # noqa: ASYNC110 - uvicorn has no event for it
            await asyncio.sleep(0.05)
        return server, task

    def sizes(self) -> dict[str, int]:
        out = {**gateway_sizes("gw", self.app), **gateway_sizes("pass", self.passthrough), **process_sizes()}
        for i, url in enumerate(self.engine_urls):
            out.update(engine_sizes(f"e{i}", url, self.engines[i]))
        return out

    async def run(self) -> None:
        for i in range(2):
            self.start_engine(i)
        for i, proc in enumerate(self.engines):
            assert proc is not None
            await asyncio.to_thread(wait_ready, proc, f"{self.engine_urls[i]}/health", 90)
        self.write_config()
        path = self.config_path
        self.app = create_app(
            load_config(path),
            reload_config=lambda: load_config(path),
            registry=CollectorRegistry(),
            tracer_provider=TracerProvider(),  # sampled: stage spans are made (and dropped: no exporter)
        )
        passthrough = load_config(
            None,
            {
                "backends": [{"url": url, "name": f"e{i}"} for i, url in enumerate(self.engine_urls)],
                "api_keys": [{"sha256": hash_key(tenant_key(0)), "tenant": "t000"}],
                "limits": {"max_tokens": 16, "default_max_tokens": 4},
                "health": {"interval_s": 0.5, "timeout_s": 2, "eject_after_failures": 2, "eject_for_s": 1},
            },
        )
        self.passthrough = create_app(passthrough, registry=CollectorRegistry())
        # The routed gateway starts last: the SIGHUP handler is the event loop's one, and the last installed wins.
        servers = [await self.serve(self.passthrough, self.pass_port), await self.serve(self.app, self.port)]
        columns: list[tuple[str, dict[str, int]]] = [("idle", self.sizes())]
        try:
            connector = aiohttp.TCPConnector(limit=self.args.concurrency * 2)
            async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
                self.http = http
                for r in range(self.args.rounds):
                    await self.round(r)
                    await self.quiesce()
                    columns.append((f"round {r + 1}", self.sizes()))
            await asyncio.sleep(2.0)  # idle connections time out, health checks settle
            columns.append(("idle after", self.sizes()))
        finally:
            for server, task in servers:
                server.should_exit = True
                await task
        columns.append(("stopped", process_sizes()))
        print_table(columns)
        print("\noutcomes:", ", ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items())))

    async def quiesce(self) -> None:
        """Wait until no request is in flight anywhere (engines included) and both backends are back."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            gw = self.app.gateway
            busy = gw.admission.inflight + gw.admission.queue_depth + self.passthrough.gateway.admission.inflight
            up = all(s.available(time.monotonic()) for s in gw.pool.states.values())
            engines = [engine_sizes("e", url, None) for url in self.engine_urls]
            engine_busy = sum(e.get("e.running", 0) + e.get("e.waiting", 0) + e.get("e.down", 0) for e in engines)
            if not busy and up and not engine_busy:
                return
            await asyncio.sleep(0.2)

    async def round(self, number: int) -> None:
        """``requests`` requests in phases; between phases a reload, or the restart of the engine that a phase
        killed while its requests were in flight."""
        n = self.args.requests
        phases: list[tuple[int, Callable[[], Awaitable[None]] | None, Callable[[], Awaitable[None]] | None]] = [
            (n // 5, None, self.reload),  # (requests, during the phase, after it)
            (n // 5, lambda: self.kill_engine(1), lambda: self.restart_engine(1)),
            (n // 5, None, self.reload),
            (n - 3 * (n // 5), None, None),
        ]
        start = 0
        for count, during, after in phases:
            events = [] if during is None else [asyncio.ensure_future(self.later(during))]
            await self.traffic(range(start, start + count))
            await asyncio.gather(*events)
            if after is not None:
                await after()
            start += count
        print(f"round {number + 1}: {n} requests", file=sys.stderr)

    async def later(self, event: Callable[[], Awaitable[None]]) -> None:
        await asyncio.sleep(1.0)  # the phase's traffic is under way
        await event()

    async def traffic(self, numbers: range) -> None:
        queue: asyncio.Queue[int] = asyncio.Queue()
        for i in numbers:
            queue.put_nowait(i)

        async def worker() -> None:
            while not queue.empty():
                i = queue.get_nowait()
                kind = self.pick()
                try:
                    outcome = await asyncio.wait_for(getattr(self, f"do_{kind}")(i), 60)
                except (aiohttp.ClientError, TimeoutError) as exc:
                    outcome = type(exc).__name__
                self.outcomes[f"{kind}:{outcome}"] += 1

        await asyncio.gather(*(worker() for _ in range(self.args.concurrency)))

    # ---- events ---------------------------------------------------------------------------

    async def reload(self) -> None:
        self.generation += 1
        self.write_config()
        os.kill(os.getpid(), signal.SIGHUP)  # the routed gateway's handler: ledger reopened, file reloaded
        await asyncio.sleep(0.1)

    async def kill_engine(self, i: int) -> None:
        proc = self.engines[i]
        if proc is not None:
            await asyncio.to_thread(self.supervisor.stop, proc, signal.SIGKILL)
        self.engines[i] = None

    async def restart_engine(self, i: int) -> None:
        self.start_engine(i)
        proc = self.engines[i]
        assert proc is not None
        await asyncio.to_thread(wait_ready, proc, f"{self.engine_urls[i]}/health", 90)

    # ---- requests -------------------------------------------------------------------------

    WEIGHTS = {
        "chat_stream": 30, "chat": 12, "text": 8, "text_stream": 6, "leave_stream": 8, "leave_waiting": 4,
        "invalid": 6, "bad_json": 2, "over_limit": 4, "unknown_model": 3, "bad_key": 3, "limited": 4, "metered": 3,
        "flush": 1, "passthrough": 6,
    }  # fmt: skip

    def pick(self) -> str:
        return self.rng.choices(list(self.WEIGHTS), weights=list(self.WEIGHTS.values()))[0]

    def prompt(self, i: int) -> str:
        """One of many prefixes (shared by several requests), then a distinct question."""
        prefix = self.rng.randrange(400)
        return f"Document {prefix}: " + "lorem ipsum dolor " * (12 + prefix % 9) + f"Question {i}?"

    def chat_body(self, i: int, *, stream: bool, **extra: Any) -> dict[str, Any]:
        route = self.rng.choice(("chat", "chat", "shared", "nocache"))
        return {
            "model": route,
            "messages": [{"role": "user", "content": self.prompt(i)}],
            "max_tokens": self.rng.randint(1, 8),
            "stream": stream,
            **({"stream_options": {"include_usage": True}} if stream and i % 2 else {}),
            **extra,
        }

    def auth(self, key: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {key or tenant_key(self.rng.randrange(TENANTS - 2))}"}

    async def post(self, path: str, body: Any, key: str | None = None, port: int | None = None) -> str:
        raw = body if isinstance(body, bytes) else orjson.dumps(body)
        url = f"http://127.0.0.1:{port or self.port}{path}"
        async with self.http.post(url, data=raw, headers={**self.auth(key), "content-type": "application/json"}) as r:
            await r.read()
            return str(r.status)

    async def do_chat_stream(self, i: int) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(i, stream=True))

    async def do_chat(self, i: int) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(i, stream=False))

    async def do_text(self, i: int) -> str:
        return await self.post("/v1/completions", {"model": "chat", "prompt": self.prompt(i), "max_tokens": 4})

    async def do_text_stream(self, i: int) -> str:
        body = {"model": "shared", "prompt": self.prompt(i), "max_tokens": 6, "stream": True}
        return await self.post("/v1/completions", body)

    async def do_leave_stream(self, i: int) -> str:
        """Read the first chunk of a long stream, then close the connection."""
        body = self.chat_body(i, stream=True, max_tokens=24, ignore_eos=True)
        url = f"http://127.0.0.1:{self.port}/v1/chat/completions"
        async with self.http.post(url, data=orjson.dumps(body), headers=self.auth()) as r:
            await r.content.readany()
            r.close()
            return f"{r.status}-left"

    async def do_leave_waiting(self, i: int) -> str:
        """Leave before anything came back (queued, in assembly, or waiting for a non-streamed answer)."""
        body = self.chat_body(i, stream=False, max_tokens=24, ignore_eos=True)
        task = asyncio.ensure_future(self.post("/v1/chat/completions", body))
        await asyncio.sleep(self.rng.uniform(0.0, 0.05))
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            return await task
        return "left"

    async def do_invalid(self, i: int) -> str:
        body = self.chat_body(i, stream=False, unknown_field=i)
        return await self.post("/v1/chat/completions", body)

    async def do_bad_json(self, i: int) -> str:
        return await self.post("/v1/chat/completions", b'{"model": "chat", "messages": [')

    async def do_over_limit(self, i: int) -> str:
        body = self.chat_body(i, stream=False, max_tokens=10_000, stop=["a", "b", "c", "d", "e"])
        return await self.post("/v1/chat/completions", body)

    async def do_unknown_model(self, i: int) -> str:
        return await self.post("/v1/chat/completions", {**self.chat_body(i, stream=False), "model": f"m-{i}"})

    async def do_bad_key(self, i: int) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(i, stream=False), key=f"sk-unknown-{i}")

    async def do_limited(self, i: int) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(i, stream=False), key=LIMITED)

    async def do_metered(self, i: int) -> str:
        return await self.post("/v1/chat/completions", self.chat_body(i, stream=True), key=METERED)

    async def do_flush(self, i: int) -> str:
        tenant = f"t{self.rng.randrange(TENANTS):03d}"
        return await self.post("/admin/prompt-cache/flush", {"tenant": tenant}, key=ADMIN)

    async def do_passthrough(self, i: int) -> str:
        self.model_serial += 1
        body = {
            "model": f"client-model-{self.model_serial}",  # clients choose the names in passthrough mode
            "messages": [{"role": "user", "content": self.prompt(i)}],
            "max_tokens": 2,
        }
        return await self.post("/v1/chat/completions", body, key=tenant_key(0), port=self.pass_port)


def print_table(columns: list[tuple[str, dict[str, int]]]) -> None:
    names = list(dict.fromkeys(k for _, col in columns for k in col))
    width = max(map(len, names))
    print(f"{'structure':<{width}}  " + "  ".join(f"{title:>11}" for title, _ in columns))
    for name in names:
        cells = "  ".join(f"{col[name]:>11}" if name in col else f"{'-':>11}" for _, col in columns)
        print(f"{name:<{width}}  {cells}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--requests", type=int, default=1500, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="llmpath-soak-") as tmp, Supervisor(Path(tmp) / "logs") as supervisor:
        asyncio.run(Soak(supervisor, Path(tmp), args).run())


if __name__ == "__main__":
    main()
