"""Prefix reuse and continuous batching of the embedded engine, measured side by side in one run.

    .venv/bin/python bench/engine_prefix.py                       # small preset on CPU (issue 3, P4)
    .venv/bin/python bench/engine_prefix.py --device cuda --preset llama-8b --prompt-tokens 8192 --compare-eager
    .venv/bin/python bench/engine_prefix.py --url http://127.0.0.1:30000   # any SGLang-compatible server

1. TTFT cold vs warm: prompts of ``--prompt-tokens`` random tokens; each trial sends a prompt whose 90 % prefix
   was never seen (cold), then another prompt with the same prefix and a new 10 % suffix (warm: the prefix comes
   from the radix cache). Medians and their ratio. Target: warm ≤ 0.2 × cold (the compute limit is ~0.1 ×).
2. Decode throughput: 1 and 8 concurrent requests of ``--decode-tokens`` tokens each; total tokens/s and their
   ratio (continuous batching must raise total throughput).
3. ``--compare-eager`` (needs ``transformers``): a plain eager Hugging Face ``LlamaForCausalLM`` forward of the
   same shape and prompt length, cold and with a 90 % cached prefix (``DynamicCache``), for reference.
   Issue 3's GPU targets at the 8B shape: cold ≤ 1.1 × eager, warm ≤ 50 ms.

In-process runs go through the engine's scheduler (queue, radix cache, batching) without HTTP; ``--url`` measures a
server over HTTP (streaming ``/generate``), so the same numbers can be taken from a real SGLang.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import random
import statistics
import sys
import time
import warnings
from collections.abc import Awaitable, Callable

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

Generate = Callable[[list[int], int], Awaitable[tuple[float, int]]]


def random_ids(rng: random.Random, n: int) -> list[int]:
    """``n`` printable-byte token ids (valid for the byte tokenizer and any real vocabulary's low ids)."""
    return [rng.randrange(32, 127) for _ in range(n)]


async def measure_ttft(
    generate: Generate, prompt_tokens: int, trials: int, seed: int
) -> tuple[list[float], list[float]]:
    rng = random.Random(seed)
    shared = int(prompt_tokens * 0.9)
    cold, warm = [], []
    await generate(random_ids(rng, prompt_tokens), 1)  # warm-up (allocator, kernels), not measured
    for _ in range(trials):
        prefix = random_ids(rng, shared)
        cold.append((await generate(prefix + random_ids(rng, prompt_tokens - shared), 1))[0])
        warm.append((await generate(prefix + random_ids(rng, prompt_tokens - shared), 1))[0])
    return cold, warm


async def measure_decode(generate: Generate, concurrency: int, tokens: int, seed: int) -> float:
    """Total generated tokens per second with ``concurrency`` requests in flight."""
    rng = random.Random(seed)
    prompts = [random_ids(rng, 64) for _ in range(concurrency)]
    start = time.perf_counter()
    results = await asyncio.gather(*(generate(p, tokens) for p in prompts))
    elapsed = time.perf_counter() - start
    return sum(n for _, n in results) / elapsed


def in_process(args: argparse.Namespace) -> tuple[Generate, Callable[[], None], str]:
    from llmpath.backends.engine.runtime import Engine, EngineArgs
    from llmpath.backends.engine.sampling import SamplingParams

    engine = Engine(
        EngineArgs(
            preset=args.preset,
            device=args.device,
            threads=args.threads,
            kv_tokens=args.kv_tokens,
            chunked_prefill_size=args.chunked_prefill_size,
            context_length=max(args.prompt_tokens * 2, 4096),
            enable_metrics=False,
        )  # fmt: skip
    )
    engine.start()

    async def generate(ids: list[int], max_new: int) -> tuple[float, int]:
        params = SamplingParams(max_new_tokens=max_new, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        ttft, n = None, 0
        async for out in engine.submit(ids, params, stream=True):
            ttft = ttft if ttft is not None else time.perf_counter() - start
            n += len(out.new_ids)
        return ttft or 0.0, n

    cfg = engine.config
    chunk = engine.args.chunk_size
    label = (f"embedded engine, preset {args.preset} ({cfg.num_parameters() / 1e6:.0f}M params), {_device_name(args)}, "
             f"{str(engine.dtype).removeprefix('torch.')}, torch threads {args.threads or 'default'}, "
             f"chunked prefill {chunk or 'off'}")  # fmt: skip
    return generate, engine.stop, label


def _device_name(args: argparse.Namespace) -> str:
    import torch

    return torch.cuda.get_device_name() if args.device == "cuda" else "cpu"


def over_http(url: str) -> tuple[Generate, Callable[[], None], str]:
    import json

    import httpx

    client = httpx.AsyncClient(base_url=url, timeout=600)

    async def generate(ids: list[int], max_new: int) -> tuple[float, int]:
        body = {"input_ids": ids, "stream": True,
                "sampling_params": {"max_new_tokens": max_new, "ignore_eos": True, "temperature": 0}}  # fmt: skip
        start = time.perf_counter()
        ttft, n = None, 0
        async with client.stream("POST", "/generate", json=body) as resp:
            resp.raise_for_status()
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ttft = ttft if ttft is not None else time.perf_counter() - start
                n = json.loads(line[6:])["meta_info"]["completion_tokens"]
        return ttft or 0.0, n

    return generate, lambda: None, f"server at {url} (HTTP /generate streaming)"


def eager_reference(args: argparse.Namespace) -> tuple[float, float] | None:
    """Median cold and 90 %-cached TTFT of a plain Hugging Face eager forward of the same shape, or None."""
    try:
        import torch
        from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM
    except ImportError:
        print("eager reference: transformers is not importable; skipped")
        return None
    from llmpath.backends.engine.presets import PRESETS

    c = PRESETS[args.preset]
    # rope_theta: a keyword transformers 4 takes as is and 5 maps into rope_parameters (its stubs lack it).
    cfg = LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.hidden_size, num_hidden_layers=c.num_hidden_layers,
                      num_attention_heads=c.num_attention_heads, num_key_value_heads=c.num_key_value_heads,
                      intermediate_size=c.intermediate_size, max_position_embeddings=max(args.prompt_tokens * 2, 4096),
                      rope_theta=c.rope_theta)  # type: ignore[call-arg, unused-ignore]  # fmt: skip
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its dtype on its device: an 8B model never exists in float32
    try:
        with torch.device(args.device):
            model = LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    rng = random.Random(args.seed)
    shared = int(args.prompt_tokens * 0.9)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    cold, warm = [], []
    with torch.inference_mode():
        for i in range(args.trials + 1):
            ids = torch.tensor([random_ids(rng, args.prompt_tokens)], device=args.device)
            sync()
            t = time.perf_counter()
            out = model(input_ids=ids, logits_to_keep=1, use_cache=True)
            sync()
            if i:
                cold.append(time.perf_counter() - t)
            cache: DynamicCache = out.past_key_values
            cache.crop(-(args.prompt_tokens - shared))
            sync()
            t = time.perf_counter()
            model(input_ids=ids[:, shared:], past_key_values=cache, logits_to_keep=1, use_cache=True)
            sync()
            if i:
                warm.append(time.perf_counter() - t)
    del model
    return statistics.median(cold), statistics.median(warm)


async def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="small")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--kv-tokens", type=int, default=None)
    p.add_argument("--chunked-prefill-size", type=int, default=None, help="as the engine's flag (-1: off)")
    p.add_argument("--prompt-tokens", type=int, default=1024)
    p.add_argument("--trials", type=int, default=5)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--url", default=None, help="measure a running SGLang-compatible server instead")
    p.add_argument("--compare-eager", action="store_true", help="also time a plain HF transformers forward")
    args = p.parse_args()
    if args.compare_eager and args.url:
        p.error("--compare-eager times the in-process engine against a Hugging Face forward: not with --url")

    generate, close, label = over_http(args.url) if args.url else in_process(args)
    print(f"# {label}")
    try:
        cold, warm = await measure_ttft(generate, args.prompt_tokens, args.trials, args.seed)
        c, w = statistics.median(cold), statistics.median(warm)
        shared = int(args.prompt_tokens * 0.9)
        print(f"TTFT, {args.prompt_tokens}-token prompts, {shared} shared ({args.trials} trials, medians):")
        print(f"  cold {c * 1000:8.1f} ms   (min {min(cold) * 1000:.1f}, max {max(cold) * 1000:.1f})")
        print(f"  warm {w * 1000:8.1f} ms   (min {min(warm) * 1000:.1f}, max {max(warm) * 1000:.1f})")
        print(f"  warm / cold = {w / c:.3f}   (target ≤ 0.2)")
        one = await measure_decode(generate, 1, args.decode_tokens, args.seed)
        eight = await measure_decode(generate, 8, args.decode_tokens, args.seed + 1)
        print(f"decode, {args.decode_tokens} tokens per request:")
        print(f"  1 concurrent  {one:8.1f} tok/s")
        print(f"  8 concurrent  {eight:8.1f} tok/s total   (×{eight / one:.2f})")
    finally:
        close()
    del generate, close  # the engine's model and KV pool: freed before the reference model is built
    gc.collect()
    if args.device == "cuda":
        import torch

        torch.cuda.empty_cache()
    if args.compare_eager:
        ref = eager_reference(args)
        if ref is not None:
            ec, ew = ref
            print(f"eager HF forward, same shape: cold {ec * 1000:.1f} ms, 90 % cached {ew * 1000:.1f} ms")
            print(f"  engine cold / eager cold = {c / ec:.2f}   (target ≤ 1.1);  engine warm = {w * 1000:.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
