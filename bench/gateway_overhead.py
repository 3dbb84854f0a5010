"""P2 — gateway overhead: the same engine called directly and through the gateway, streaming, side by side.

Direct: ``POST /generate`` on the engine (what the gateway itself sends, with the chat template applied
client-side). Through the gateway: ``POST /v1/chat/completions`` with ``stream: true`` (auth, validation,
assembly, prompt-cache lookup, prefix routing, admission, instrumentation, SSE re-framing). Proxy: the direct
requests through a byte-forwarding TCP proxy (``bench/tcp_proxy.py``), the cheapest extra process a request can
cross, for reference. TTFT is measured by the client: request sent → first chunk carrying a token. Modes alternate
within each round, at each concurrency, over the same warmed prompts, so machine drift hits them alike;
percentiles pool all rounds. The CPU table says what limits each closed loop's throughput (and so, by Little's
law, its latency): the cores, or one process's busy thread.

The load generator shares the 2 cores with what it measures, so it is kept cheap: aiohttp with orjson costs
≈ 0.2 ms of CPU per streamed request at 32 clients, where httpx cost ≈ 2.6 ms and, by saturating the cores,
tripled the engine's own TTFT and inflated the difference between the modes.

    .venv/bin/python bench/gateway_overhead.py                  # starts a tiny engine, a proxy and a gateway
    .venv/bin/python bench/gateway_overhead.py --requests 400 --rounds 5 --concurrency 1 8 32

Target (issue 4): added TTFT ≤ 1 ms at p50 and ≤ 5 ms at p99 on 2 cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import httpx
import orjson

from llmpath.demo.supervisor import Supervisor, free_port

LLMPATH = str(Path(sys.executable).parent / "llmpath")
KEY = "sk-bench-overhead"
_JSON = {"content-type": "application/json"}
_GATEWAY_HEADERS = {**_JSON, "Authorization": f"Bearer {KEY}"}
SYSTEM = "You are a helpful assistant. Answer briefly and precisely. "


def _prompts(n: int, size: int) -> list[str]:
    base = SYSTEM * (1 + size // len(SYSTEM))
    return [f"{base[:size]} Question {i}: what is {i} squared?" for i in range(n)]


def _chatml(user: str) -> str:
    from llmpath.backends.chat_template import render_chatml

    return render_chatml([{"role": "user", "content": user}])


async def _direct(client: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "text": _chatml(prompt),
        "sampling_params": {"max_new_tokens": max_tokens, "temperature": 0, "ignore_eos": True},
        "stream": True,
    }
    return await _ttft(client, f"{url}/generate", body, _JSON, lambda event: bool(event.get("text")))


async def _gateway(client: aiohttp.ClientSession, url: str, prompt: str, max_tokens: int) -> tuple[float, float]:
    body = {
        "model": "bench",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }

    def has_token(event: dict[str, Any]) -> bool:
        choices = event["choices"]
        return bool(choices and choices[0]["delta"].get("content"))

    return await _ttft(client, f"{url}/v1/chat/completions", body, _GATEWAY_HEADERS, has_token)


async def _ttft(
    client: aiohttp.ClientSession,
    url: str,
    body: dict[str, Any],
    headers: dict[str, str],
    has_token: Callable[[dict[str, Any]], bool],
) -> tuple[float, float]:
    """Seconds from sending a streamed request to the first SSE event that carries a token, and to the end of the
    stream."""
    start = time.perf_counter()
    ttft = None
    async with client.post(url, data=orjson.dumps(body), headers=headers) as resp:
        resp.raise_for_status()
        async for line in resp.content:
            if ttft is None and line.startswith(b"data: {") and has_token(orjson.loads(line[6:])):
                ttft = time.perf_counter() - start
    assert ttft is not None
    return ttft, time.perf_counter() - start


Call = Callable[[aiohttp.ClientSession, str, str, int], Awaitable[tuple[float, float]]]


async def _run(
    call: Call, url: str, prompts: list[str], requests: int, concurrency: int, max_tokens: int
) -> list[tuple[float, float]]:
    """``(TTFT, whole request)`` seconds of each request, ``concurrency`` clients in a closed loop."""
    results: list[tuple[float, float]] = []
    todo = iter(range(requests))
    connector = aiohttp.TCPConnector(limit=concurrency * 2)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, cookie_jar=aiohttp.DummyCookieJar()
    ) as client:

        async def worker() -> None:
            for i in todo:
                results.append(await call(client, url, prompts[i % len(prompts)], max_tokens))

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def _cpu_seconds(pid: int | None) -> float:
    """User + system CPU time of a process (Linux ``/proc``), 0 when unknown."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    """User + system CPU time of this process (the load generator)."""
    t = os.times()
    return t.user + t.system


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _overhead_histogram(url: str) -> tuple[float, float]:
    """From the gateway's own ``llmpath_stage_group_duration_seconds{group="gateway_overhead"}``: the share of
    requests under 1 ms and under 2.5 ms."""
    text = httpx.get(f"{url}/metrics").text
    buckets: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("llmpath_stage_group_duration_seconds_bucket") and 'group="gateway_overhead"' in line:
            le = line.split('le="', 1)[1].split('"', 1)[0]
            buckets[le] = buckets.get(le, 0.0) + float(line.rsplit(" ", 1)[1])
    total = buckets.get("+Inf", 0.0) or 1.0
    return buckets.get("0.001", 0.0) / total, buckets.get("0.0025", 0.0) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per mode, concurrency and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--prompt-bytes", type=int, default=400)
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--engine-threads", type=int, default=1)
    parser.add_argument(
        "--against",
        nargs=2,
        metavar=("ENGINE_URL", "GATEWAY_URL"),
        help="measure running processes instead (the gateway must route model 'bench' to the engine and "
        f"accept the key {KEY!r})",
    )
    parser.add_argument(
        "--ledger",
        action="store_true",
        help="give the gateway a usage ledger and print where its slowest requests spent their time (stage by "
        "stage): the way to tell the gateway's own delay from the engine's queue, prefill or pauses",
    )
    args = parser.parse_args()
    if args.against and args.ledger:
        parser.error("--ledger needs the gateway this script starts (with --against, read your gateway's ledger)")
    if args.against:
        _measure(args, {"direct": args.against[0], "gateway": args.against[1]}, {})
        return

    tmp = Path(tempfile.mkdtemp(prefix="llmpath-bench-gw-"))
    engine_port, gw_port = free_port(), free_port()
    engine_url, gw_url = f"http://127.0.0.1:{engine_port}", f"http://127.0.0.1:{gw_port}"
    with Supervisor(tmp) as sup:
        engine_cmd = [LLMPATH, "engine", "serve", "--preset", args.preset, "--port", str(engine_port)]
        engine_cmd += ["--threads", str(args.engine_threads), "--max-running", "64"]
        engine = sup.spawn("engine", engine_cmd, ready_url=f"{engine_url}/health", timeout=120)
        from llmpath.gateway.config import hash_key

        config = tmp / "gateway.yaml"
        config.write_text(
            json.dumps(
                {
                    "listen": {"host": "127.0.0.1", "port": gw_port},
                    "backends": [{"url": engine_url, "name": "engine"}],
                    "routes": [{"name": "bench", "model": "bench"}],
                    "api_keys": [{"sha256": hash_key(KEY), "tenant": "bench"}],
                    "tokenizer": {"chars_per_token": 1},
                    "limits": {"max_concurrency": 256},
                    **({"usage": {"ledger": str(tmp / "usage.jsonl")}} if args.ledger else {}),
                }
            )
        )
        cmd = [LLMPATH, "gateway", "serve", "--config", str(config), "--log-level", "warning"]
        gateway = sup.spawn("gateway", cmd, ready_url=f"{gw_url}/readyz")
        proxy_port = free_port()
        proxy_url = f"http://127.0.0.1:{proxy_port}"
        proxy_cmd = [sys.executable, str(Path(__file__).with_name("tcp_proxy.py")), "--port", str(proxy_port)]
        proxy = sup.spawn(
            "proxy", [*proxy_cmd, "--upstream", f"127.0.0.1:{engine_port}"], ready_url=f"{proxy_url}/health"
        )
        urls = {"direct": engine_url, "proxy": proxy_url, "gateway": gw_url}
        since = _measure(args, urls, {"engine": engine.pid, "proxy": proxy.pid, "gateway": gateway.pid})
    if args.ledger:
        _explain_slowest(tmp / "usage.jsonl", since)
    print(f"logs, gateway configuration{' and ledger' if args.ledger else ''}: {tmp}")


def _explain_slowest(ledger: Path, since: float, count: int = 8) -> None:
    """The slowest measured requests through the gateway (started at ``since`` or later: not the warm-up), stage
    by stage, from its usage ledger (``llmpath usage slowest``); ``unattributed`` is gateway time no stage covers,
    e.g. the event loop or a pause."""
    from rich.console import Console

    from llmpath.ledger import read_ledger, slowest
    from llmpath.ledger.render import slowest_table

    Console(width=200).print(slowest_table(slowest(read_ledger(ledger, since=since), count), "ttft"))


#: The processes each mode crosses (whose CPU it is charged); the load generator is this process.
_CROSSES = {
    "direct": ("load generator", "engine"),
    "proxy": ("load generator", "engine", "proxy"),
    "gateway": ("load generator", "engine", "gateway"),
}


def _measure(args: argparse.Namespace, urls: dict[str, str], pids: dict[str, int]) -> float:
    """Run every mode at every concurrency, interleaved, and print the comparison.

    ``urls``: mode → base URL (``direct`` and ``gateway``, and ``proxy`` for the reference hop); ``pids``:
    process name → pid, for the CPU figures (empty with ``--against``). Returns when the measured requests
    began (epoch seconds; the warm-up requests came before)."""
    prompts = _prompts(64, args.prompt_bytes)
    calls: dict[str, Call] = {"direct": _direct, "proxy": _direct, "gateway": _gateway}
    modes = [mode for mode in calls if mode in urls]
    for mode in modes:  # warm both radix namespaces (the gateway sends a tenant cache_salt)
        asyncio.run(_run(calls[mode], urls[mode], prompts, len(prompts), 4, args.max_tokens))
    measured_since = time.time()

    ttft: dict[tuple[int, str], list[float]] = {}
    latency: dict[tuple[int, str], list[float]] = {}
    per_round: dict[tuple[int, str], list[float]] = {}
    #: (concurrency, mode) → CPU seconds per process it crosses, and wall seconds.
    cpu: dict[tuple[int, str], dict[str, float]] = {}
    wall: dict[tuple[int, str], float] = {}

    def cpu_now(mode: str) -> dict[str, float]:
        return {
            name: _self_cpu() if name == "load generator" else _cpu_seconds(pids.get(name)) for name in _CROSSES[mode]
        }

    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for c in args.concurrency:
            for mode in modes if r % 2 == 0 else reversed(modes):
                before, t0 = cpu_now(mode), time.perf_counter()
                results = asyncio.run(_run(calls[mode], urls[mode], prompts, args.requests, c, args.max_tokens))
                wall[(c, mode)] = wall.get((c, mode), 0.0) + time.perf_counter() - t0
                spent = cpu.setdefault((c, mode), {})
                for name, seconds in cpu_now(mode).items():
                    spent[name] = spent.get(name, 0.0) + seconds - before[name]
                ttft.setdefault((c, mode), []).extend(first for first, _ in results)
                latency.setdefault((c, mode), []).extend(whole for _, whole in results)
                per_round.setdefault((c, mode), []).append(statistics.median(first for first, _ in results))
    load_after = os.getloadavg()[0]

    served = f"against {urls['direct']} and {urls['gateway']}" if args.against else f"preset {args.preset}"
    print(f"P2 gateway overhead — {served}, {args.prompt_bytes}-byte prompts, {args.max_tokens} tokens,")
    print(f"{args.rounds} rounds × {args.requests} requests per mode; load avg {load_before:.2f} → {load_after:.2f}")
    print(f"{'conc':>4} {'mode':>8} {'TTFT p50 ms':>12} {'p99 ms':>9}   added to direct p50 / p99")
    verdicts = []
    for c in args.concurrency:
        d = ttft[(c, "direct")]
        for mode in modes:
            values = ttft[(c, mode)]
            added = "" if mode == "direct" else f"   {_added(values, d, 0.5):+.3f} / {_added(values, d, 0.99):+.3f} ms"
            print(f"{c:>4} {mode:>8} {_pct(values, 0.5) * 1e3:>12.3f} {_pct(values, 0.99) * 1e3:>9.3f}{added}")
        g = ttft[(c, "gateway")]
        added50, added99 = _added(g, d, 0.5), _added(g, d, 0.99)
        round_deltas = [
            (gw - di) * 1e3 for gw, di in zip(per_round[(c, "gateway")], per_round[(c, "direct")], strict=True)
        ]
        print(
            f"     added TTFT at {c}: p50 {added50:+.3f} ms (median of per-round p50 deltas "
            f"{statistics.median(round_deltas):+.3f} ms), p99 {added99:+.3f} ms; "
            f"ratio gateway/direct p50 {_pct(g, 0.5) / _pct(d, 0.5):.3f}"
        )
        if "proxy" in modes:
            p = ttft[(c, "proxy")]
            print(f"     gateway over the reference proxy hop: p50 {_added(g, p, 0.5):+.3f} ms, "
                  f"p99 {_added(g, p, 0.99):+.3f} ms")  # fmt: skip
        verdicts.append((c, added50 <= 1.0, added99 <= 5.0))
    under_1ms, under_2_5ms = _overhead_histogram(urls["gateway"])
    print(
        f"gateway's own gateway_overhead stage group (auth+validate+route+assemble+cache_lookup): "
        f"{under_1ms:.1%} of requests under 1 ms, {under_2_5ms:.1%} under 2.5 ms"
    )
    if pids:
        _print_cpu(args, modes, cpu, wall, latency)
    for c, ok50, ok99 in verdicts:
        verdict50, verdict99 = ("MET" if ok else "MISSED" for ok in (ok50, ok99))
        print(f"target at concurrency {c}: p50 ≤ 1 ms {verdict50}; p99 ≤ 5 ms {verdict99}")
    return measured_since


def _added(values: list[float], base: list[float], q: float) -> float:
    """Milliseconds ``values`` adds to ``base`` at quantile ``q``."""
    return (_pct(values, q) - _pct(base, q)) * 1e3


def _print_cpu(
    args: argparse.Namespace,
    modes: list[str],
    cpu: dict[tuple[int, str], dict[str, float]],
    wall: dict[tuple[int, str], float],
    latency: dict[tuple[int, str], list[float]],
) -> None:
    """CPU per request of each process a mode crosses, throughput, and how busy each process kept a core.

    In a closed loop the mean latency is clients / throughput (Little's law), so this shows what limits the
    throughput, and with it the latency: the cores as a whole, or one process's single busy thread (the engine's
    scheduler, an event loop), which can sit at a whole core while the other core has room."""
    n = args.requests * args.rounds
    names = list(dict.fromkeys(name for mode in modes for name in _CROSSES[mode]))
    cores = os.cpu_count() or 1
    print("per request: CPU ms of each process; throughput; mean latency (= clients / throughput); share of one")
    print(f"core each process kept busy, and of all {cores} cores:")
    print(f"{'conc':>4} {'mode':>8}  " + " ".join(f"{name:>14}" for name in names) + "     req/s  latency ms  busy")
    for c in args.concurrency:
        for mode in modes:
            seconds, spent = wall[(c, mode)], cpu[(c, mode)]
            cells = [
                f"{spent[name] / n * 1e3:5.2f} ({spent[name] / seconds:4.0%})" if name in spent else f"{'-':>14}"
                for name in names
            ]
            print(
                f"{c:>4} {mode:>8}  " + " ".join(f"{cell:>14}" for cell in cells)
                + f"  {n / seconds:8.0f}  {statistics.fmean(latency[(c, mode)]) * 1e3:10.2f}"
                + f"  {sum(spent.values()) / seconds / cores:4.0%}"
            )  # fmt: skip


if __name__ == "__main__":
    main()
