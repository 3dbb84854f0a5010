"""Admission: bounded FIFO queue, timeouts, cancellation, and per-tenant token buckets."""

from __future__ import annotations

import asyncio

import pytest

from llmpath.gateway.admission import (
    Admission,
    AdmissionRejected,
    TenantRateLimiter,
    TenantTokenLimiter,
    TokenBucket,
    openai_duration,
)
from llmpath.gateway.config import RateConfig, TokenRateConfig
from tests.gateway.stack import FakeClock


async def test_fifo_queue_and_queue_full() -> None:
    adm = Admission(max_concurrency=1, max_queue=2, queue_timeout_s=5)
    seen: list[tuple[int, int]] = []
    adm.on_change = lambda inflight, depth: seen.append((inflight, depth))
    assert await adm.acquire() == 0.0
    order: list[str] = []

    async def waiter(name: str) -> None:
        await adm.acquire()
        order.append(name)

    t1 = asyncio.create_task(waiter("first"))
    t2 = asyncio.create_task(waiter("second"))
    await asyncio.sleep(0)
    assert adm.queue_depth == 2
    with pytest.raises(AdmissionRejected) as rej:
        await adm.acquire()
    assert rej.value.reason == "queue_full" and rej.value.retry_after_s >= 1
    adm.release()
    await t1
    adm.release()
    await t2
    assert order == ["first", "second"]
    adm.release()
    assert (adm.inflight, adm.queue_depth) == (0, 0)
    assert seen[-1] == (0, 0) and (1, 2) in seen


async def test_queue_timeout() -> None:
    adm = Admission(max_concurrency=1, max_queue=4, queue_timeout_s=0.05)
    await adm.acquire()
    with pytest.raises(AdmissionRejected) as rej:
        await adm.acquire()
    assert rej.value.reason == "queue_timeout"
    assert adm.queue_depth == 0 and adm.inflight == 1


async def test_cancelled_waiter_leaves_the_queue_and_slots_are_not_lost() -> None:
    adm = Admission(max_concurrency=1, max_queue=4, queue_timeout_s=5)
    await adm.acquire()
    task = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert adm.queue_depth == 0
    adm.release()
    assert adm.inflight == 0
    assert await adm.acquire() == 0.0


async def test_waits_are_measured() -> None:
    adm = Admission(max_concurrency=1, max_queue=4, queue_timeout_s=5)
    await adm.acquire()
    task = asyncio.create_task(adm.acquire())
    await asyncio.sleep(0.05)
    adm.release()
    assert 0.04 < await task < 1


def test_token_bucket_refills() -> None:
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate=2, capacity=3, clock=clock)
    assert [bucket.take() for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take() == pytest.approx(0.5)
    clock.now += 0.5
    assert bucket.take() == 0.0
    clock.now += 100
    assert [bucket.take() for _ in range(4)][-1] == pytest.approx(0.5)  # capped at capacity


def test_tenant_rate_limits_and_overrides() -> None:
    clock = FakeClock(0.0)
    limiter = TenantRateLimiter(RateConfig(requests_per_second=1, burst=1), clock=clock)
    limiter.check("a")
    with pytest.raises(AdmissionRejected) as rej:
        limiter.check("a")
    assert rej.value.reason == "rate_limited" and rej.value.retry_after_s == pytest.approx(1)
    limiter.check("b")  # tenants have their own buckets
    for _ in range(100):
        limiter.check("vip", RateConfig(requests_per_second=0))  # 0 = unlimited
    unlimited = TenantRateLimiter(RateConfig())
    for _ in range(100):
        unlimited.check("x")


async def test_resize_admits_waiters_at_once_and_drains_above_a_lower_limit() -> None:
    adm = Admission(max_concurrency=1, max_queue=4, queue_timeout_s=5)
    await adm.acquire()
    waiters = [asyncio.create_task(adm.acquire()) for _ in range(3)]
    await asyncio.sleep(0)
    adm.resize(3, 4, 5)  # two more slots: the two oldest waiters run now
    done, _ = await asyncio.wait(waiters, timeout=0.2)
    assert done == set(waiters[:2]) and adm.inflight == 3

    adm.resize(1, 4, 5)  # fewer slots: running requests finish, nobody new starts until fewer than 1 run
    adm.release()
    adm.release()
    done, _ = await asyncio.wait(waiters[2:], timeout=0.2)
    assert not done and adm.inflight == 1
    adm.release()
    await asyncio.wait_for(waiters[2], 1)
    assert (adm.inflight, adm.queue_depth) == (1, 0)


def test_rate_reconfigure_starts_every_bucket_again_at_the_new_rate() -> None:
    clock = FakeClock(0.0)
    limiter = TenantRateLimiter(RateConfig(requests_per_second=1, burst=1), clock)
    limiter.check("acme")
    with pytest.raises(AdmissionRejected):
        limiter.check("acme")
    limiter.reconfigure(RateConfig(requests_per_second=10, burst=2))
    limiter.check("acme")
    limiter.check("acme")  # burst 2 now
    with pytest.raises(AdmissionRejected) as rej:
        limiter.check("acme")
    assert rej.value.retry_after_s == pytest.approx(0.1)


def test_token_budget_reserves_estimates_and_settles_what_was_used() -> None:
    clock = FakeClock(0.0)
    limiter = TenantTokenLimiter(TokenRateConfig(tokens_per_minute=600, burst=1000), clock)  # 10 tokens/s
    first = limiter.reserve("acme", 700)
    assert first is not None and first.estimate == 700
    with pytest.raises(AdmissionRejected) as rej:
        limiter.reserve("acme", 400)  # 300 left
    assert rej.value.reason == "token_rate_limited" and rej.value.retry_after_s == pytest.approx(10)
    first.settle(150)  # it used 150 of the 700 it reserved: 550 come back
    first.settle(150)  # once only
    second = limiter.reserve("acme", 800)  # 850 left
    assert second is not None
    with pytest.raises(AdmissionRejected):
        limiter.reserve("acme", 100)  # 50 left
    second.settle(1000)  # used more than estimated (the output ran to max_tokens and the prompt was longer)
    with pytest.raises(AdmissionRejected) as rej:
        limiter.reserve("acme", 100)  # 50 - 200 = -150 left: in debt
    assert rej.value.retry_after_s == pytest.approx(25)
    assert limiter.reserve("globex", 1000) is not None  # tenants have their own budgets


def test_token_budget_lets_one_oversized_request_through_a_full_bucket() -> None:
    clock = FakeClock(0.0)
    limiter = TenantTokenLimiter(TokenRateConfig(tokens_per_minute=60), clock)  # burst: one minute's worth
    assert limiter.reserve("acme", 5000) is not None  # larger than the whole budget: passes when it is full...
    with pytest.raises(AdmissionRejected) as rej:
        limiter.reserve("acme", 5000)  # ... then the debt (-4940) must refill first
    assert rej.value.retry_after_s == pytest.approx(5000)
    clock.now += 5000
    assert limiter.reserve("acme", 5000) is not None


def test_token_budget_overrides_unlimited_and_reconfigure() -> None:
    clock = FakeClock(0.0)
    limiter = TenantTokenLimiter(TokenRateConfig(), clock)  # off by default
    assert limiter.reserve("acme", 10**9) is None
    assert limiter.reserve("vip", 10, TokenRateConfig(tokens_per_minute=60, burst=10)) is not None
    with pytest.raises(AdmissionRejected):
        limiter.reserve("vip", 10, TokenRateConfig(tokens_per_minute=60, burst=10))
    limiter.reconfigure(TokenRateConfig(tokens_per_minute=6000))
    assert limiter.reserve("vip", 10, TokenRateConfig(tokens_per_minute=60, burst=10)) is not None  # full again


def test_rate_limit_headers_say_limit_remaining_and_reset_as_openai_does() -> None:
    assert [openai_duration(x) for x in (0, 0.0173, 1, 1.54, 59.95, 60, 360, 361.2)] == [
        "0s", "18ms", "1s", "1.6s", "60s", "1m0s", "6m0s", "6m2s",
    ]  # fmt: skip
    clock = FakeClock(0.0)
    bucket = TokenBucket(rate=10, capacity=1000, clock=clock)
    assert bucket.headers("tokens") == {
        "x-ratelimit-limit-tokens": "1000", "x-ratelimit-remaining-tokens": "1000", "x-ratelimit-reset-tokens": "0s",
    }  # fmt: skip
    bucket.take(1500)  # a full bucket lets an oversized request through, into debt
    assert bucket.headers("tokens")["x-ratelimit-remaining-tokens"] == "0"
    assert bucket.headers("tokens")["x-ratelimit-reset-tokens"] == "2m30s"  # 500 in debt: 1,500 to refill at 10/s
    limiter = TenantRateLimiter(RateConfig(requests_per_second=0.2, burst=1), clock)
    limiter.check("slow")
    with pytest.raises(AdmissionRejected) as rej:
        limiter.check("slow")
    assert rej.value.headers == {
        "x-ratelimit-limit-requests": "1", "x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "5s",
    }  # fmt: skip
