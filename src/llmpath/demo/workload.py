"""A realistic shared-prefix workload: routes with long system prompts, multi-turn chats, several tenants.

Conversations run concurrently; each turn is a streaming OpenAI chat request through the gateway, and the
assistant's reply is appended to the history, so later turns share ever longer prefixes with earlier ones.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httpx
from httpx_sse import aconnect_sse

TOPICS = (
    "my invoice shows a duplicate charge for the March subscription",
    "the export to CSV drops every row after the first thousand",
    "how do I rotate the API key without downtime for the mobile app",
    "the latency of the search endpoint doubled after the last deploy",
    "a customer cannot reset the password because the email never arrives",
    "which plan includes single sign-on and audit logs",
    "the webhook retries are flooding our endpoint after an outage",
    "can we move the workspace data to the EU region",
    "the dashboard shows numbers that do not match the billing page",
    "the batch job fails with a timeout when the file is larger than 2 GB",
)
FOLLOW_UPS = (
    "Thanks. Can you give me the exact steps?",
    "That did not work. What else could cause it?",
    "Is there a way to avoid this in the future?",
    "Please summarise the answer in three bullet points.",
    "Who should I contact if the problem persists?",
)

#: The workload's HTTP timeouts: a turn may wait behind a long prefill on a busy CPU engine.
CLIENT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)


@dataclass(frozen=True)
class Tenant:
    name: str
    api_key: str


@dataclass(frozen=True)
class WorkloadSpec:
    """What to send: ``routes`` are the gateway route names clients put in ``model``."""

    routes: Sequence[str]
    tenants: Sequence[Tenant]
    conversations: int = 24
    turns: tuple[int, int] = (2, 4)
    max_tokens: int = 16
    concurrency: int = 4
    seed: int = 7


@dataclass
class RequestResult:
    route: str
    tenant: str
    status: int
    ttft_s: float | None
    duration_s: float
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


@dataclass
class WorkloadResult:
    requests: list[RequestResult] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def failures(self) -> int:
        return sum(r.status != 200 for r in self.requests)


@dataclass(frozen=True)
class Conversation:
    tenant: Tenant
    route: str
    opening: str
    follow_ups: tuple[str, ...]


def plan_conversations(spec: WorkloadSpec) -> list[Conversation]:
    """The deterministic list of conversations for ``spec`` (same seed, same workload)."""
    rng = random.Random(spec.seed)
    plan = []
    for i in range(spec.conversations):
        turns = rng.randint(*spec.turns)
        plan.append(
            Conversation(
                tenant=spec.tenants[i % len(spec.tenants)],
                route=spec.routes[rng.randrange(len(spec.routes))],
                opening=f"Hello, {rng.choice(TOPICS)}. Ticket #{rng.randint(1000, 9999)}.",
                follow_ups=tuple(rng.choice(FOLLOW_UPS) for _ in range(turns - 1)),
            )
        )
    return plan


async def chat_once(
    client: httpx.AsyncClient, tenant: Tenant, route: str, messages: list[dict[str, str]], max_tokens: int
) -> tuple[RequestResult, str]:
    """One streaming chat request; returns its result and the assistant's text."""
    body = {
        "model": route,
        "messages": messages,
        "stream": True,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {tenant.api_key}"}
    start = time.perf_counter()
    ttft: float | None = None
    parts: list[str] = []
    result = RequestResult(route, tenant.name, 0, None, 0.0)
    try:
        async with aconnect_sse(client, "POST", "/v1/chat/completions", json=body, headers=headers) as source:
            result.status = source.response.status_code
            if result.status != 200:
                await source.response.aread()
                result.error = _error_message(source.response)
            else:
                async for event in source.aiter_sse():
                    if event.data == "[DONE]":
                        break
                    chunk = json.loads(event.data)
                    for choice in chunk.get("choices") or ():
                        delta = (choice.get("delta") or {}).get("content")
                        if delta:
                            if ttft is None:
                                ttft = time.perf_counter() - start
                            parts.append(delta)
                    if usage := chunk.get("usage"):
                        result.prompt_tokens = usage.get("prompt_tokens", 0)
                        result.completion_tokens = usage.get("completion_tokens", 0)
                        details = usage.get("prompt_tokens_details") or {}
                        result.cached_tokens = details.get("cached_tokens") or 0
    except httpx.HTTPError as exc:
        result.error = type(exc).__name__
    result.ttft_s = ttft
    result.duration_s = time.perf_counter() - start
    return result, "".join(parts)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"HTTP {response.status_code}"


async def run_workload(
    base_url: str,
    spec: WorkloadSpec,
    *,
    on_request: Callable[[RequestResult], None] | None = None,
    deadline_s: float | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> WorkloadResult:
    """Run every planned conversation (``concurrency`` at a time).

    No new turn starts after ``deadline_s`` seconds or once ``should_stop()`` returns True.
    """
    plan = plan_conversations(spec)
    result = WorkloadResult()
    start = time.perf_counter()
    queue: asyncio.Queue[Conversation] = asyncio.Queue()
    for conv in plan:
        queue.put_nowait(conv)

    def out_of_time() -> bool:
        if should_stop is not None and should_stop():
            return True
        return deadline_s is not None and time.perf_counter() - start > deadline_s

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty() and not out_of_time():
            conv = queue.get_nowait()
            messages = [{"role": "user", "content": conv.opening}]
            for follow_up in (None, *conv.follow_ups):
                if out_of_time():
                    return
                if follow_up is not None:
                    messages.append({"role": "user", "content": follow_up})
                res, text = await chat_once(client, conv.tenant, conv.route, messages, spec.max_tokens)
                result.requests.append(res)
                if on_request is not None:
                    on_request(res)
                if res.status != 200:
                    break
                messages.append({"role": "assistant", "content": text})

    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT) as client:
        await asyncio.gather(*(worker(client) for _ in range(spec.concurrency)))
    result.wall_s = time.perf_counter() - start
    return result


async def warm_up(base_url: str, spec: WorkloadSpec) -> list[RequestResult]:
    """One single-turn request per route and tenant, so that every labelled series exists before the load.

    Prometheus's ``rate()`` cannot count a series' first sample: without this, the requests that create a
    ``{route, tenant}`` series are invisible to the SLIs.
    """
    async with httpx.AsyncClient(base_url=base_url, timeout=CLIENT_TIMEOUT) as client:
        calls = [
            chat_once(client, tenant, route, [{"role": "user", "content": "Hello."}], spec.max_tokens)
            for route in spec.routes
            for tenant in spec.tenants
        ]
        return [res for res, _ in await asyncio.gather(*calls)]


def planned_requests(spec: WorkloadSpec) -> int:
    """How many requests the workload sends when it runs to completion (for progress bars)."""
    return sum(1 + len(c.follow_ups) for c in plan_conversations(spec))
