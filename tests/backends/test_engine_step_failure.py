"""A forward step that raises (a device error, injected with ``step_error_rate``) fails every request in flight
over real HTTP — those of the prefill batch that was running included, which used to be dropped (their clients waited
for ever, their KV slots and request ids were never released) — and the engine goes on serving. The one way a client
could make a step raise (banning every sampleable token before ``min_new_tokens``) is refused with a 400."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from tests.backends.engine_loads import wait_loads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(engine_factory: Callable[..., object]) -> str:
    return engine_factory("--enable-fault-injection", name="step-failure").url  # type: ignore[attr-defined]


async def test_a_failed_prefill_answers_its_batch_and_releases_their_kv_and_ids(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        (await client.post("/debug/fault", json={"step_error_rate": 1.0})).raise_for_status()
        try:
            calls = [
                client.post("/generate", json={"text": f"hello {i}", "rid": f"fail-{i}", "sampling_params": {}})
                for i in range(3)
            ]
            answers = await asyncio.wait_for(asyncio.gather(*calls), 10)  # they used to hang for ever
        finally:
            (await client.delete("/debug/fault")).raise_for_status()
        loads = await wait_loads(client, num_running_reqs=0, num_waiting_reqs=0, num_used_tokens=0)
        again = await client.post("/generate", json={"text": "hi", "rid": "fail-0", "sampling_params": {}})
    assert [a.status_code for a in answers] == [500, 500, 500]
    assert all("internal engine error" in a.json()["error"]["message"] for a in answers)
    assert loads["num_used_tokens"] == 0  # their KV slots are back in the pool
    assert again.status_code == 200  # the request id is free again (not "Duplicate request ID")


async def test_banning_every_sampleable_token_before_min_new_tokens_is_a_400(url: str) -> None:
    """With EOS and ``stop_token_ids`` masked until ``min_new_tokens``, nothing is left to sample: sampling used to
    raise inside the step and fail every request in flight (one client's request took down everyone's)."""
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        info = (await client.get("/model_info")).json()
        every = sorted({10, *range(32, 127), *info["eos_token_ids"]})  # the byte tokenizer's sampleable ids
        bystander = client.post("/generate", json={"text": "hello", "sampling_params": {"max_new_tokens": 16}})
        refused = client.post(
            "/generate",
            json={"text": "hi", "sampling_params": {"min_new_tokens": 1, "stop_token_ids": every, "temperature": 1}},
        )
        ok, bad = await asyncio.gather(bystander, refused)
        left = min(set(every) - set(info["eos_token_ids"]))
        stops = [t for t in every if t != left]
        one_short = {"min_new_tokens": 1, "stop_token_ids": stops, "temperature": 1.0, "max_new_tokens": 2}
        allowed = await client.post("/generate", json={"text": "hi", "sampling_params": one_short})
    assert bad.status_code == 400 and "none is left to generate" in bad.json()["error"]["message"]
    assert ok.status_code == 200 and allowed.status_code == 200
    assert allowed.json()["output_ids"][0] == left  # the one token left is what it samples


async def test_a_failed_decode_step_caches_no_kv_it_may_not_have_computed(url: str) -> None:
    """A decode step that raises (a device error inside the forward) leaves each running request's newest KV slot
    uncomputed: the radix cache takes the prompt and the tokens before the last one, never that slot (a later
    request sharing the prefix would reuse KV no step wrote)."""
    prompt = list(b"a failing decode step, token by token")
    body = {
        "input_ids": prompt,
        "stream": True,
        "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
    }
    ids: list[int] = []
    error = None
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        try:
            async with client.stream("POST", "/generate", json=body) as stream:
                async for line in stream.aiter_lines():
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[len("data: ") :])
                    if "error" in event:
                        error = event["error"]
                        break
                    ids = event["output_ids"]
                    if len(ids) >= 2 and not error:  # decoding: make the next step fail
                        (await client.post("/debug/fault", json={"step_error_rate": 1.0})).raise_for_status()
        finally:
            (await client.delete("/debug/fault")).raise_for_status()
        assert error is not None and "internal engine error" in error["message"]
        await wait_loads(client, num_running_reqs=0, num_waiting_reqs=0)
        probe = {"input_ids": [*prompt, *ids, 10], "sampling_params": {"max_new_tokens": 1}}
        meta = (await client.post("/generate", json=probe)).json()["meta_info"]
    assert meta["cached_tokens"] == len(prompt) + len(ids) - 1  # not the last token's slot, whose step failed
