"""Two embedded engines behind SGLang's own router (``sglang-router`` 0.3.2, cache_aware policy)."""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

import httpx
import pytest

from llmpath.backends import (
    BackendRequest,
    Done,
    FirstToken,
    SamplingParams,
    Scheduled,
    SGLangBackend,
    TimingSource,
    TokenDelta,
)

pytestmark = pytest.mark.slow

ROUTER = shutil.which("sglang-router", path=str(Path(sys.executable).parent)) or shutil.which("sglang-router")
SHARED = "You are the support bot of a large bank. Policies: be precise, never guess, cite the handbook. " * 6


def wait_for_workers(url: str, timeout: float = 30.0) -> None:
    """The router answers before its background worker registration is done: wait until a request goes through."""
    deadline = time.monotonic() + timeout
    ping = {"text": "ping", "sampling_params": {"max_new_tokens": 1}}
    while time.monotonic() < deadline:
        try:
            if httpx.post(f"{url}/generate", json=ping, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError("sglang-router never routed a request")


async def requests_served(client: httpx.AsyncClient, engine_url: str) -> float:
    text = (await client.get(f"{engine_url}/metrics")).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("sglang:num_requests_total{"))  # fmt: skip


@pytest.mark.skipif(ROUTER is None, reason="sglang-router is not installed (pip install sglang-router==0.3.2)")
async def test_engines_behind_sglang_router(engine_factory, processes, free_port) -> None:
    workers = [engine_factory(name="worker-a"), engine_factory(name="worker-b")]
    port, metrics_port = free_port(), free_port()
    url = f"http://127.0.0.1:{port}"
    processes.spawn(
        "sglang-router",
        [ROUTER, "launch", "--worker-urls", *(w.url for w in workers), "--policy", "cache_aware",
         "--host", "127.0.0.1", "--port", str(port), "--prometheus-host", "127.0.0.1",
         "--prometheus-port", str(metrics_port)],
        ready_url=f"{url}/v1/models",
        timeout=60,
    )  # fmt: skip
    wait_for_workers(url)
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        await through_router(client, url, workers)


async def through_router(client: httpx.AsyncClient, url: str, workers: list) -> None:
    assert (await client.get("/v1/models")).json()["data"][0]["id"] == "llmpath-tiny"

    # Native /generate, non-streaming and streaming, through the router (it adds "model": null and friends).
    params = {"max_new_tokens": 4, "ignore_eos": True}
    out = await client.post("/generate", json={"text": "Hello router", "sampling_params": params})
    assert out.status_code == 200 and out.json()["meta_info"]["completion_tokens"] == 4
    stream = await client.post("/generate", json={"text": "Hello router", "stream": True, "sampling_params": params})
    events = [e.removeprefix("data: ") for e in stream.text.split("\n\n") if e]
    assert events[-1] == "[DONE]" and json.loads(events[-2])["meta_info"]["completion_tokens"] == 4

    # OpenAI chat completions through the router, plain and streamed with usage.
    chat = {"model": "llmpath-tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3,
            "ignore_eos": True}  # fmt: skip
    resp = await client.post("/v1/chat/completions", json=chat)
    assert resp.status_code == 200 and resp.json()["usage"]["completion_tokens"] == 3
    streamed = {**chat, "stream": True, "stream_options": {"include_usage": True}}
    resp = await client.post("/v1/chat/completions", json=streamed)
    assert resp.text.endswith("data: [DONE]\n\n") and '"completion_tokens":3' in resp.text

    # The SGLang backend works unchanged through the router, with the engine's own timings.
    backend = SGLangBackend(url)
    try:
        sampling = SamplingParams(max_tokens=4, ignore_eos=True)
        req = BackendRequest("via-router-1", "llmpath-tiny", prompt=SHARED + "Question 0?", sampling=sampling)
        evs = [ev async for ev in backend.generate(req)]
    finally:
        await backend.aclose()
    assert isinstance(evs[0], (Scheduled, FirstToken))
    assert evs[0].source is TimingSource.BACKEND and isinstance(evs[-1], Done)
    assert sum(e.num_tokens for e in evs if isinstance(e, TokenDelta)) == 4

    # cache_aware: requests sharing a long prefix stick to one worker, so they hit its radix cache.
    before = [await requests_served(client, w.url) for w in workers]
    cached = []
    for i in range(1, 5):
        body = {"text": SHARED + f"Question {i}?", "sampling_params": {"max_new_tokens": 2}}
        cached.append((await client.post("/generate", json=body)).json()["meta_info"]["cached_tokens"])
    served = [await requests_served(client, w.url) - b for w, b in zip(workers, before, strict=True)]
    assert sorted(served) == [0, 4]
    assert all(c >= len(SHARED) for c in cached)

    # The router's /engine_metrics aggregates the workers' metrics, renamed sglang_… with worker_addr.
    agg = (await client.get("/engine_metrics")).text
    assert {w.url for w in workers} <= set(re.findall(r'worker_addr="([^"]+)"', agg)), agg[:300]
    assert "sglang_num_requests_total" in agg
