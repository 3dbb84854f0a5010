"""P3 — prefix-aware routing: round robin vs llmpath's prefix policy vs SGLang's own router, in one run.

A shared-prefix workload — groups of conversations that share a long system prompt, each conversation several
turns long (every turn resends the history) — is sent to N embedded engines (``small`` preset, limited KV pool)
three times, through:

* ``round_robin``  — the llmpath gateway with ``--policy round_robin``;
* ``llmpath``      — the llmpath gateway with its prefix policy (chained block hashes + load thresholds);
* ``sglang-router``— ``sglang-router launch --policy cache_aware`` (its approximate radix tree) in front of the
  same engines.

Engine caches are flushed between policies. Figures come from the engines' own ``/metrics``
(``sglang:cached_tokens_total`` / ``sglang:prompt_tokens_total``, ``sglang:num_requests_total`` per engine) and
from the clients (streaming TTFT). The oracle is one unbounded radix cache that sees every request in order.

    .venv/bin/python bench/routing.py                      # 4 engines, 8 groups × 3 conversations × 3 turns
    .venv/bin/python bench/routing.py --engines 8 --groups 16

Targets (issue 4): llmpath ≥ 0.95 × oracle hit rate, ≥ sglang-router's hit rate at load spread ≤ 1.25, and
TTFT p50 ≥ 2× better than round robin.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from llmpath.demo.supervisor import Supervisor, free_port, wait_ready

LLMPATH = str(Path(sys.executable).parent / "llmpath")
SGLANG_ROUTER = str(Path(sys.executable).parent / "sglang-router")
KEY = "sk-bench-routing"
WORDS: tuple[str, ...] = (
    "account", "latency", "region", "cluster", "token", "prefix", "cache", "policy", "router", "engine",
    "batch", "queue", "tenant", "request", "stream", "decode", "prefill", "budget", "error", "alert",
    "window", "burn", "rate", "owner", "stage", "gateway", "metric", "label", "trace", "span",
)  # fmt: skip


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


@dataclass
class Conversation:
    group: int
    system: str
    questions: list[str]


def workload(groups: int, conversations: int, turns: int, system_words: int, seed: int) -> list[Conversation]:
    rng = random.Random(seed)
    convs = []
    for g in range(groups):
        system = f"Group {g} policy. " + " ".join(rng.choice(WORDS) for _ in range(system_words))
        for c in range(conversations):
            questions = [
                f"Conversation {g}.{c}, turn {t}: " + " ".join(rng.choice(WORDS) for _ in range(8))
                for t in range(turns)
            ]
            convs.append(Conversation(g, system, questions))
    rng.shuffle(convs)
    return convs


@dataclass
class Result:
    ttfts: list[float] = field(default_factory=list)
    #: (messages, reply) in the order the requests were sent (for the oracle).
    transcript: list[tuple[list[dict[str, str]], str]] = field(default_factory=list)


async def run_workload(url: str, convs: list[Conversation], concurrency: int, max_tokens: int) -> Result:
    """Each worker takes whole conversations and plays their turns in order (a turn resends the history)."""
    result = Result()
    queue = list(convs)
    headers = {"Authorization": f"Bearer {KEY}"}
    async with httpx.AsyncClient(timeout=300) as client:

        async def turn(messages: list[dict[str, str]]) -> str:
            body = {
                "model": "bench",
                "messages": messages,
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
            }
            start = time.perf_counter()
            ttft = None
            parts: list[str] = []
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body, headers=headers) as resp:
                resp.raise_for_status()
                async for line in resp.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    choices = json.loads(line[6:]).get("choices") or []
                    text = choices[0].get("delta", {}).get("content") if choices else None
                    if text:
                        if ttft is None:
                            ttft = time.perf_counter() - start
                        parts.append(text)
            result.ttfts.append(ttft if ttft is not None else time.perf_counter() - start)
            reply = "".join(parts)
            result.transcript.append((messages, reply))
            return reply

        async def worker() -> None:
            while queue:
                conv = queue.pop()
                messages = [{"role": "system", "content": conv.system}]
                for question in conv.questions:
                    messages = [*messages, {"role": "user", "content": question}]
                    reply = await turn(messages)
                    messages = [*messages, {"role": "assistant", "content": reply}]

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return result


# ------------------------------------------------------------------------------------------------
# The oracle: one unbounded radix cache over token ids (the engine's byte tokenizer and chat template)
# ------------------------------------------------------------------------------------------------


def oracle_hit_rate(transcript: list[tuple[list[dict[str, str]], str]]) -> float:
    from llmpath.backends.chat_template import render_chatml
    from llmpath.backends.engine.tokenizer import ByteTokenizer

    tok = ByteTokenizer()
    root: dict[int, dict] = {}
    cached = total = 0
    for messages, reply in transcript:
        prompt = tok.encode(render_chatml(messages))
        node, n = root, 0
        for t in prompt:
            child = node.get(t)
            if child is None:
                break
            node, n = child, n + 1
        cached += min(n, len(prompt) - 1)  # the last prompt token is always computed
        total += len(prompt)
        node = root
        for t in prompt + tok.encode(reply)[1:]:  # the engine keeps the generated tokens too (no BOS)
            node = node.setdefault(t, {})
    return cached / total if total else 0.0


# ------------------------------------------------------------------------------------------------
# Engine metrics
# ------------------------------------------------------------------------------------------------


def engine_totals(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        for name in ("sglang:prompt_tokens_total", "sglang:cached_tokens_total", "sglang:num_requests_total"):
            if line.startswith(name):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def flush(engines: list[str]) -> None:
    for url in engines:
        for _ in range(50):
            if httpx.post(f"{url}/flush_cache", timeout=10).status_code == 200:
                break
            time.sleep(0.2)


@dataclass
class PolicyFigures:
    name: str
    hit_rate: float
    ttft_p50: float
    ttft_p99: float
    spread: float
    per_engine: list[int]
    oracle: float


def measure(
    name: str, url: str, engines: list[str], convs: list[Conversation], args: argparse.Namespace
) -> PolicyFigures:
    flush(engines)
    before = [engine_totals(u) for u in engines]
    result = asyncio.run(run_workload(url, convs, args.concurrency, args.max_tokens))
    after = [engine_totals(u) for u in engines]

    def delta(name: str, i: int) -> float:
        return after[i].get(name, 0.0) - before[i].get(name, 0.0)

    prompt = sum(delta("sglang:prompt_tokens_total", i) for i in range(len(engines)))
    cached = sum(delta("sglang:cached_tokens_total", i) for i in range(len(engines)))
    per_engine = [int(delta("sglang:num_requests_total", i)) for i in range(len(engines))]
    mean = statistics.mean(per_engine) if per_engine else 0
    ttfts = sorted(result.ttfts)
    return PolicyFigures(
        name=name,
        hit_rate=cached / prompt if prompt else 0.0,
        ttft_p50=ttfts[len(ttfts) // 2],
        ttft_p99=ttfts[min(len(ttfts) - 1, int(0.99 * len(ttfts)))],
        spread=max(per_engine) / mean if mean else 0.0,
        per_engine=per_engine,
        oracle=oracle_hit_rate(result.transcript),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--engines", type=int, default=4)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--conversations", type=int, default=3, help="per group")
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-words", type=int, default=150, help="length of each group's system prompt")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--kv-tokens", type=int, default=6144, help="KV pool per engine (forces evictions)")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not Path(SGLANG_ROUTER).exists():
        parser.error(f"{SGLANG_ROUTER} not found: the comparison needs SGLang's router (pip install sglang-router; "
                     "make install and make test put it in .venv)")  # fmt: skip

    tmp = Path(tempfile.mkdtemp(prefix="llmpath-bench-routing-"))
    with Supervisor(tmp) as sup:
        engines, procs = [], []
        for i in range(args.engines):
            port = free_port()
            cmd = [LLMPATH, "engine", "serve", "--preset", args.preset, "--port", str(port), "--threads", "1"]
            cmd += ["--kv-tokens", str(args.kv_tokens), "--max-running", "8"]
            procs.append(sup.spawn(f"engine{i}", cmd))
            engines.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(engines, procs, strict=True):  # started together: their imports overlap
            wait_ready(proc, f"{url}/health", 120)

        from llmpath.gateway.config import hash_key

        convs = workload(args.groups, args.conversations, args.turns, args.system_words, args.seed)
        figures: list[PolicyFigures] = []
        for policy in ("round_robin", "prefix"):
            port = free_port()
            config = tmp / f"gateway-{policy}.yaml"
            config.write_text(
                json.dumps(
                    {
                        "listen": {"host": "127.0.0.1", "port": port},
                        "backends": [{"url": u, "name": f"e{i}"} for i, u in enumerate(engines)],
                        "routing": {"policy": policy},
                        "routes": [{"name": "bench", "model": "bench"}],
                        "api_keys": [{"sha256": hash_key(KEY), "tenant": "bench"}],
                        "tokenizer": {"chars_per_token": 1},
                        "prompt_cache": {"block_tokens": 16, "min_prefix_tokens": 64},
                        "limits": {"timeouts": {"read_s": 300}},
                    }
                )
            )
            cmd = [LLMPATH, "gateway", "serve", "--config", str(config)]
            gateway = sup.spawn(f"gateway-{policy}", cmd, ready_url=f"http://127.0.0.1:{port}/readyz")
            name = "llmpath" if policy == "prefix" else "round_robin"
            figures.append(measure(name, f"http://127.0.0.1:{port}", engines, convs, args))
            sup.stop(gateway)

        port, metrics_port = free_port(), free_port()
        router_cmd = [SGLANG_ROUTER, "launch", "--worker-urls", *engines, "--policy", "cache_aware"]
        router_cmd += ["--host", "127.0.0.1", "--port", str(port)]
        router_cmd += ["--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port), "--log-level", "warn"]
        router = sup.spawn("sglang-router", router_cmd, ready_url=f"http://127.0.0.1:{port}/v1/models")
        time.sleep(2)  # worker registration finishes after "Router ready"
        figures.append(measure("sglang-router", f"http://127.0.0.1:{port}", engines, convs, args))
        sup.stop(router)

    report(figures, args, tmp)


def report(figures: list[PolicyFigures], args: argparse.Namespace, tmp: Path) -> None:
    requests = args.groups * args.conversations * args.turns
    print(
        f"P3 routing — {args.engines} × {args.preset} engines (KV {args.kv_tokens} tokens each), "
        f"{args.groups} groups × {args.conversations} conversations × {args.turns} turns = {requests} requests, "
        f"concurrency {args.concurrency}; load avg {os.getloadavg()[0]:.2f}"
    )
    header = ("policy", "hit rate", "oracle", "×oracle", "TTFT p50", "p99", "spread")
    print("{:>14} {:>9} {:>7} {:>8} {:>9} {:>8} {:>7}  per engine".format(*header))
    for f in figures:
        print(
            f"{f.name:>14} {f.hit_rate:>9.3f} {f.oracle:>7.3f} {f.hit_rate / f.oracle:>8.3f} "
            f"{f.ttft_p50 * 1e3:>7.0f}ms {f.ttft_p99 * 1e3:>6.0f}ms {f.spread:>7.2f}  {f.per_engine}"
        )
    by = {f.name: f for f in figures}
    ours, rr, smg = by["llmpath"], by["round_robin"], by["sglang-router"]
    checks = [
        (f"llmpath hit rate ≥ 0.95 × oracle ({ours.hit_rate / ours.oracle:.3f})", ours.hit_rate >= 0.95 * ours.oracle),
        (
            f"llmpath hit rate ≥ sglang-router's ({ours.hit_rate:.3f} vs {smg.hit_rate:.3f})",
            ours.hit_rate >= smg.hit_rate,
        ),
        (f"load spread ≤ 1.25 ({ours.spread:.2f})", ours.spread <= 1.25),
        (
            f"TTFT p50 ≥ 2× better than round robin ({rr.ttft_p50 / ours.ttft_p50:.2f}×)",
            rr.ttft_p50 >= 2 * ours.ttft_p50,
        ),
    ]
    for text, ok in checks:
        print(f"target: {text}: {'MET' if ok else 'MISSED'}")
    print(f"logs: {tmp}")


if __name__ == "__main__":
    main()
