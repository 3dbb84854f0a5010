"""A scheduler step that raises fails every request in flight, over real HTTP: those of the prefill batch that was
running included, which used to be dropped (their clients waited for ever, their KV slots and request ids were never
released)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httpx
import pytest

from tests.backends.conftest import wait_loads

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def url(engine_factory: Callable[..., object]) -> str:
    return engine_factory(name="step-failure").url  # type: ignore[attr-defined]


async def test_a_failed_prefill_answers_its_batch_and_releases_their_kv_and_ids(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        info = (await client.get("/model_info")).json()
        # Every token the sampler may pick is banned until min_new_tokens: the first token's probabilities are all
        # NaN and sampling raises inside the prefill step (a scheduler failure any client can cause).
        banned = sorted({10, *range(32, 127), *info["eos_token_ids"]})
        failing = {"max_new_tokens": 4, "min_new_tokens": 1, "stop_token_ids": banned, "temperature": 1.0}
        calls = [
            client.post("/generate", json={"text": f"hello {i}", "rid": f"fail-{i}", "sampling_params": failing})
            for i in range(3)
        ]
        answers = await asyncio.wait_for(asyncio.gather(*calls), 10)  # they used to hang for ever
        loads = await wait_loads(client, num_running_reqs=0, num_waiting_reqs=0, num_used_tokens=0)
        again = await client.post("/generate", json={"text": "hi", "rid": "fail-0", "sampling_params": {}})
    assert [a.status_code for a in answers] == [500, 500, 500]
    assert all("internal engine error" in a.json()["error"]["message"] for a in answers)
    assert loads["num_used_tokens"] == 0  # their KV slots are back in the pool
    assert again.status_code == 200  # the request id is free again (not "Duplicate request ID")
