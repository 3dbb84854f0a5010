"""``POST /abort_request`` over real HTTP: the aborted request's client gets its output so far with SGLang's
``abort`` finish reason (native and OpenAI routes, streamed or not), and the engine frees the request's KV."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

import httpx
import pytest

from tests.backends.engine_loads import wait_loads

pytestmark = pytest.mark.slow

PROMPT = "In a hole in the ground there lived a hobbit. " * 3
LONG = {"max_new_tokens": 3000, "ignore_eos": True}
#: SGLang's ``FINISH_ABORT().to_json()`` for a running request aborted by ``/abort_request``.
ABORTED = {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}
ABORTED_WAITING = {**ABORTED, "message": "Abort before prefill"}
METRIC = "sglang:num_aborted_requests_total"


@pytest.fixture(scope="module")
def url(engine_factory: Callable[..., object]) -> str:
    """An engine of its own: one running request at a time, so a second one waits in the queue."""
    return engine_factory("--max-running", "1", name="abort").url  # type: ignore[attr-defined]


def byte_text(ids: list[int]) -> str:
    """What the byte tokenizer decodes ``ids`` to (the sampler only picks ASCII, newline and special tokens)."""
    return "".join(chr(i) for i in ids if i < 256)


async def aborted_total(client: httpx.AsyncClient) -> float:
    lines = (await client.get("/metrics")).text.splitlines()
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith((METRIC + " ", METRIC + "{")))


async def abort(client: httpx.AsyncClient, rid: str) -> None:
    resp = await client.post("/abort_request", json={"rid": rid})
    assert resp.status_code == 200


async def test_non_streaming_generate_returns_the_output_so_far(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        before = await aborted_total(client)
        call = asyncio.create_task(
            client.post("/generate", json={"text": PROMPT, "rid": "ab-1", "sampling_params": LONG})
        )
        await wait_loads(client, num_running_reqs=1)
        await asyncio.sleep(0.2)  # a few tokens decoded
        await abort(client, "ab-1")
        resp = await asyncio.wait_for(call, 10)  # it used to hang forever
        loads = await wait_loads(client, num_running_reqs=0, num_used_tokens=0)
        after = await aborted_total(client)
    assert resp.status_code == 200
    out = resp.json()
    meta = out["meta_info"]
    assert meta["id"] == "ab-1" and meta["finish_reason"] == ABORTED
    assert 0 < meta["completion_tokens"] == len(out["output_ids"]) < 3000
    assert out["text"] == byte_text(out["output_ids"]) != ""
    assert meta["prompt_tokens"] == len(PROMPT) + 1 and meta["e2e_latency"] > 0
    assert loads["num_running_reqs"] == 0 and loads["num_used_tokens"] == 0
    assert after == before + 1


async def test_streaming_generate_ends_with_an_abort_chunk_and_done(url: str) -> None:
    body = {"text": PROMPT, "rid": "ab-2", "stream": True, "sampling_params": LONG}
    async with (
        httpx.AsyncClient(base_url=url, timeout=15) as client,
        client.stream("POST", "/generate", json=body) as resp,
    ):
        lines = resp.aiter_lines()
        assert (await anext(lines)).startswith("data: ")
        await abort(client, "ab-2")
        rest = [line async for line in lines if line]  # ends: the server closes the stream
    assert rest[-1] == "data: [DONE]"
    events = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    final = events[-1]
    assert final["meta_info"]["finish_reason"] == ABORTED
    assert all(e["meta_info"]["finish_reason"] is None for e in events[:-1])
    assert final["meta_info"]["completion_tokens"] == len(final["output_ids"]) > 0
    assert final["text"] == byte_text(final["output_ids"]) != ""


async def test_waiting_request_is_aborted_before_prefill(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        first = asyncio.create_task(
            client.post("/generate", json={"text": PROMPT, "rid": "ab-3a", "sampling_params": LONG})
        )
        await wait_loads(client, num_running_reqs=1)
        second = asyncio.create_task(client.post("/generate", json={"text": "queued", "rid": "ab-3b",
                                                                     "sampling_params": LONG}))  # fmt: skip
        loads = await wait_loads(client, num_waiting_reqs=1)
        assert loads["num_running_reqs"] == 1 and loads["num_waiting_reqs"] == 1  # --max-running 1: it waits
        await abort(client, "ab-3b")
        waiting = (await asyncio.wait_for(second, 10)).json()
        assert not first.done()  # the other request runs on
        await abort(client, "ab-3a")
        running = (await asyncio.wait_for(first, 10)).json()
        await wait_loads(client, num_running_reqs=0, num_used_tokens=0)
    assert waiting["meta_info"]["finish_reason"] == ABORTED_WAITING
    assert waiting["text"] == "" and waiting["output_ids"] == [] and waiting["meta_info"]["completion_tokens"] == 0
    assert running["meta_info"]["finish_reason"] == ABORTED


async def test_openai_routes_finish_with_abort(url: str) -> None:
    chat = {"model": "m", "messages": [{"role": "user", "content": PROMPT}], "max_tokens": 3000, "ignore_eos": True,
            "rid": "ab-4"}  # fmt: skip
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        call = asyncio.create_task(client.post("/v1/chat/completions", json=chat))
        await wait_loads(client, num_running_reqs=1)
        await asyncio.sleep(0.1)
        await abort(client, "ab-4")
        body = (await asyncio.wait_for(call, 10)).json()
        choice = body["choices"][0]
        assert choice["finish_reason"] == "abort" and choice["matched_stop"] is None
        assert 0 < body["usage"]["completion_tokens"] < 3000 and choice["message"]["content"]

        comp = {"model": "m", "prompt": PROMPT, "max_tokens": 3000, "ignore_eos": True, "stream": True,
                "stream_options": {"include_usage": True}, "rid": "ab-5"}  # fmt: skip
        async with client.stream("POST", "/v1/completions", json=comp) as resp:
            lines = resp.aiter_lines()
            assert (await anext(lines)).startswith("data: ")
            await abort(client, "ab-5")
            rest = [line async for line in lines if line]
    assert rest[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in rest[:-1]]
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"] is not None]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["abort"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] > 0


async def test_abort_of_an_unknown_rid_is_a_no_op_and_bad_bodies_are_400(url: str) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        await abort(client, "never-submitted")
        bad = await client.post("/abort_request", json={"rid": 7})
        assert bad.status_code == 400 and bad.json()["error"]["message"] == "abort_request needs a string 'rid'"
        out = (
            await client.post("/generate", json={"text": "still fine", "sampling_params": {"max_new_tokens": 3}})
        ).json()
    assert out["meta_info"]["finish_reason"]["type"] in ("length", "stop")


async def test_a_known_rid_aborts_its_prefix_family_and_abort_all_aborts_everything(url: str) -> None:
    """SGLang's matching: a rid the engine knows aborts every request whose rid starts with it; a prefix that is
    no request's rid, or an empty rid without ``abort_all``, aborts nothing; ``abort_all`` aborts every request."""

    def submit(client: httpx.AsyncClient, rid: str) -> asyncio.Task[httpx.Response]:
        return asyncio.create_task(client.post("/generate", json={"text": PROMPT, "rid": rid, "sampling_params": LONG}))

    async with httpx.AsyncClient(base_url=url, timeout=15) as client:
        family = submit(client, "fam")
        await wait_loads(client, num_running_reqs=1)
        child, other = submit(client, "fam-2"), submit(client, "other")
        await wait_loads(client, num_waiting_reqs=2)
        for body in ({"rid": "fa"}, {}, {"rid": "", "abort_all": False}):  # none of these aborts anything
            assert (await client.post("/abort_request", json=body)).status_code == 200
        await asyncio.sleep(0.1)
        assert not (family.done() or child.done() or other.done())

        await abort(client, "fam")
        reasons = [(await asyncio.wait_for(t, 10)).json()["meta_info"]["finish_reason"] for t in (family, child)]
        assert reasons == [ABORTED, ABORTED_WAITING]
        await wait_loads(client, num_running_reqs=1, num_waiting_reqs=0)  # "other" runs now
        assert not other.done()

        queued = submit(client, "late")
        await wait_loads(client, num_waiting_reqs=1)
        assert (await client.post("/abort_request", json={"abort_all": True})).status_code == 200
        reasons = [(await asyncio.wait_for(t, 10)).json()["meta_info"]["finish_reason"] for t in (other, queued)]
        assert reasons == [ABORTED, ABORTED_WAITING]
        loads = await wait_loads(client, num_running_reqs=0, num_waiting_reqs=0, num_used_tokens=0)
        bad = await client.post("/abort_request", json={"abort_all": "yes"})
    assert loads["num_used_tokens"] == 0
    assert bad.status_code == 400 and bad.json()["error"]["message"] == "abort_request needs a boolean 'abort_all'"


@pytest.mark.parametrize("kind", ["sglang", "openai"])
async def test_the_backends_raise_backend_aborted_for_an_aborted_request(url: str, kind: str) -> None:
    """What the gateway sees when an operator aborts a request: output cut short is no answer (``BackendAborted``,
    retried elsewhere before the first token), never a ``Done`` that would pass for a complete one."""
    from llmpath.backends import BackendAborted, BackendRequest, ChatMessage, SamplingParams, TokenDelta, create_backend

    backend = create_backend(kind, url)
    request = BackendRequest(f"ab-{kind}", "m", messages=[ChatMessage("user", PROMPT)],
                             sampling=SamplingParams(max_tokens=3000, ignore_eos=True))  # fmt: skip
    events = []
    try:
        async with httpx.AsyncClient(base_url=url, timeout=15) as client:
            with pytest.raises(BackendAborted):
                async for event in backend.generate(request):
                    events.append(event)
                    if isinstance(event, TokenDelta) and sum(isinstance(e, TokenDelta) for e in events) == 1:
                        assert (await client.post("/abort_request", json={"abort_all": True})).status_code == 200
    finally:
        await backend.aclose()
    assert sum(isinstance(e, TokenDelta) for e in events) >= 1
