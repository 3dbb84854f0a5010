"""Chunked prefill in the embedded engine (SGLang's ``--chunked-prefill-size`` and ``--enable-mixed-chunk``), over
real loopback HTTP: same outputs as a whole-prompt prefill, chunks counted in SGLang's per-stage metric, running
requests stalled by the chunks unless mixed, and no KV leaked when a client leaves mid-prefill."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import httpx
import pytest

from llmpath.backends.engine.args import EngineArgs, default_chunked_prefill_size
from tests.backends.test_engine_http import metric

pytestmark = pytest.mark.slow

#: ≈ 2,000 tokens with the byte tokenizer: a prefill of tens of chunks.
PROMPT = " ".join(f"item {i} costs {i * 7 % 13} coins;" for i in range(90))
CHUNK = 32


@pytest.fixture(scope="module")
def whole(engine_factory) -> str:
    return engine_factory("--chunked-prefill-size", "-1", name="whole").url


@pytest.fixture(scope="module")
def chunked(engine_factory) -> str:
    return engine_factory("--chunked-prefill-size", str(CHUNK), "--enable-fault-injection", name="chunked").url


@pytest.fixture(scope="module")
def mixed(engine_factory) -> str:
    return engine_factory("--chunked-prefill-size", str(CHUNK), "--enable-mixed-chunk", name="mixed").url


def generate(url: str, text: str, max_new_tokens: int = 12) -> dict:
    params = {"max_new_tokens": max_new_tokens, "temperature": 1.0, "sampling_seed": 11, "ignore_eos": True}
    resp = httpx.post(f"{url}/generate", json={"text": text, "sampling_params": params}, timeout=120)
    resp.raise_for_status()
    return resp.json()


def test_server_info_reports_the_chunk_settings(whole: str, chunked: str, mixed: str) -> None:
    info = {url: httpx.get(f"{url}/server_info").json() for url in (whole, chunked, mixed)}
    assert (info[whole]["chunked_prefill_size"], info[whole]["enable_mixed_chunk"]) == (-1, False)
    assert (info[chunked]["chunked_prefill_size"], info[chunked]["enable_mixed_chunk"]) == (CHUNK, False)
    assert (info[mixed]["chunked_prefill_size"], info[mixed]["enable_mixed_chunk"]) == (CHUNK, True)


def test_chunks_compute_the_same_outputs_and_are_counted(whole: str, chunked: str) -> None:
    before = httpx.get(f"{chunked}/metrics").text
    reference, out = generate(whole, PROMPT), generate(chunked, PROMPT)
    after = httpx.get(f"{chunked}/metrics").text

    # Seeded sampling at temperature 1 follows the logits closely: any KV computed wrong changes the tokens.
    assert out["output_ids"] == reference["output_ids"]
    prompt = out["meta_info"]["prompt_tokens"]
    assert prompt > 20 * CHUNK
    chunks = math.ceil((prompt - out["meta_info"]["cached_tokens"]) / CHUNK)

    def stage_count(text: str, stage: str) -> float:
        return metric(text, "sglang:per_stage_req_latency_seconds_count", stage=stage)

    assert stage_count(after, "chunked_prefill") - stage_count(before, "chunked_prefill") == chunks - 1
    assert stage_count(after, "prefill_forward") - stage_count(before, "prefill_forward") == 1
    # prefill_forward covers every chunk, as SGLang measures it: the prefill the request's meta_info reports.
    meta = out["meta_info"]
    prefill_sum = metric(after, "sglang:per_stage_req_latency_seconds_sum", stage="prefill_forward") - metric(
        before, "sglang:per_stage_req_latency_seconds_sum", stage="prefill_forward"
    )
    assert prefill_sum == pytest.approx(meta["prefill_finished_time"] - meta["forward_entry_time"], abs=0.005)
    # Each chunk's KV went into the radix cache: the same prompt again is cached but for its last token.
    again = generate(chunked, PROMPT)
    assert again["meta_info"]["cached_tokens"] == prompt - 1
    assert again["output_ids"] == reference["output_ids"]


async def _stream_token_times(client: httpx.AsyncClient, url: str, text: str, tokens: int) -> list[float]:
    """Epoch arrival time of each streamed chunk of a long generation."""
    params = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    times: list[float] = []
    body = {"text": text, "sampling_params": params, "stream": True}
    async with client.stream("POST", f"{url}/generate", json=body) as resp:
        async for line in resp.aiter_lines():
            if line.startswith("data: {"):
                times.append(time.time())
    return times


async def _decode_during_long_prefill(url: str) -> tuple[int, float, int]:
    """Tokens a running request streamed while a long prompt was prefilled, the prefill's seconds, and its
    chunks."""
    async with httpx.AsyncClient(timeout=120) as client:
        running = asyncio.create_task(_stream_token_times(client, url, "Tell me a story.", 1500))
        await asyncio.sleep(0.3)  # it is decoding now
        long = await asyncio.to_thread(generate, url, f"{uuid.uuid4()} {PROMPT}", 1)  # nothing of it cached
        times = await running
    meta = long["meta_info"]
    start, end = meta["forward_entry_time"], meta["prefill_finished_time"]
    # Client-side arrival times: a token sent just before the prefill began can arrive a little after it on a
    # loaded machine, hence the 50 ms margin.
    during = sum(1 for t in times if start + 0.05 < t < end)
    return during, end - start, math.ceil((meta["prompt_tokens"] - meta["cached_tokens"]) / CHUNK)


async def test_chunks_stall_running_requests_unless_mixed(chunked: str, mixed: str) -> None:
    during, seconds, chunks = await _decode_during_long_prefill(chunked)
    assert chunks > 20 and seconds > 0
    # As SGLang without --enable-mixed-chunk: the chunks run back to back ahead of decode (a stray token or two
    # delivered late, against one per chunk when mixed).
    assert during <= max(2, chunks // 8)

    during, seconds, chunks = await _decode_during_long_prefill(mixed)
    assert during >= chunks // 3  # one decode token rides along each chunk's forward (some delivered together)


def _loads(url: str) -> dict:
    return httpx.get(f"{url}/v1/loads").json()["loads"][0]


def test_client_leaving_mid_prefill_frees_the_uncomputed_kv(chunked: str) -> None:
    text = f"{uuid.uuid4()} {PROMPT}"  # nothing of it cached
    body = {"text": text, "sampling_params": {"max_new_tokens": 4}, "stream": True}
    before = httpx.get(f"{chunked}/metrics").text
    httpx.post(f"{chunked}/debug/fault", json={"prefill_slowdown": 30})  # the prefill takes seconds
    try:
        with (
            pytest.raises(httpx.TimeoutException),
            httpx.stream("POST", f"{chunked}/generate", json=body, timeout=0.3) as resp,
        ):
            resp.read()
        deadline = time.monotonic() + 30
        while (loads := _loads(chunked))["num_used_tokens"] or loads["num_running_reqs"] or loads["num_waiting_reqs"]:
            assert time.monotonic() < deadline, loads
            time.sleep(0.05)
    finally:
        httpx.delete(f"{chunked}/debug/fault")
    after = httpx.get(f"{chunked}/metrics").text

    def grew(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert grew("sglang:num_aborted_requests_total") == 1
    chunks_run = grew("sglang:per_stage_req_latency_seconds_count", stage="chunked_prefill")
    assert 1 <= chunks_run < len(text) // CHUNK - 2  # aborted between chunks, well before the end
    # Nothing leaked (no KV in use, above), and the chunks computed before the abort stayed shareable.
    assert generate(chunked, text, 2)["meta_info"]["cached_tokens"] >= chunks_run * CHUNK


@pytest.mark.parametrize(
    ("gib", "size"),
    [(None, 2048), (24, 2048), (34.9, 2048), (40, 4096), (79.6, 8192), (139.8, 8192), (160, 16384), (192, 16384)],
)
def test_default_chunk_size_grows_with_gpu_memory_as_sglangs(gib: float | None, size: int) -> None:
    """CPU: 2048; an RTX 4090 (24 GiB): 2048; A100-40G: 4096; H100 (79.6 GiB): 8192; H200: 8192; B200: 16384."""
    assert default_chunked_prefill_size(gib) == size


def test_chunk_size_flag_overrides_the_default() -> None:
    assert EngineArgs(device="cpu").chunk_size == 2048
    assert EngineArgs(device="cpu", chunked_prefill_size=512).chunk_size == 512
    assert EngineArgs(device="cpu", chunked_prefill_size=-1).chunk_size is None
