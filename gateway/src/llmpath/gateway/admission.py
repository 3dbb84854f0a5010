"""Stage ``schedule`` (gateway side): global concurrency with a bounded FIFO queue, per-tenant token buckets.

A request first takes a token from its tenant's request bucket, then reserves its estimated tokens (prompt +
``max_tokens``) from the tenant's token budget (either refused at once with the time until it would pass: 429 +
``Retry-After``), then a concurrency slot: free → immediately; otherwise it waits in a FIFO queue of at most
``max_queue`` requests for at most ``queue_timeout_s``; a full queue or a timeout is a 429. When the request ends
its token reservation is settled against the tokens it really used.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal, get_args

from llmpath.gateway.config import RateConfig, TokenRateConfig

RejectionReason = Literal["queue_full", "queue_timeout", "rate_limited", "token_rate_limited"]
#: Every value of ``llmpath_admission_rejections_total{reason}``, exported at 0 from the start.
REJECTION_REASONS: tuple[RejectionReason, ...] = get_args(RejectionReason)


class AdmissionRejected(Exception):
    """Not admitted (see :data:`RejectionReason`); ``headers``: the ``x-ratelimit-*`` headers of the limit that
    refused."""

    def __init__(
        self, reason: RejectionReason, retry_after_s: float, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after_s = retry_after_s
        self.headers = headers or {}


class TokenBucket:
    """``rate`` tokens per second up to ``capacity``; starts full."""

    __slots__ = ("_stamp", "_tokens", "capacity", "clock", "rate")

    def __init__(self, rate: float, capacity: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.capacity = capacity
        self.clock = clock
        self._tokens = capacity
        self._stamp = clock()

    def take(self, n: float = 1.0) -> float:
        """Take ``n`` tokens: 0.0 on success, else the seconds until ``n`` tokens will be there. More than the
        capacity passes when the bucket is full, leaving it in debt (so no request waits forever)."""
        self._refill()
        need = min(n, self.capacity)
        if self._tokens >= need:
            self._tokens -= n
            return 0.0
        return (need - self._tokens) / self.rate

    def give(self, n: float) -> None:
        """Return ``n`` tokens (a negative ``n`` takes more, possibly into debt)."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + n)

    @property
    def tokens(self) -> float:
        """Tokens available now (negative while in debt)."""
        self._refill()
        return self._tokens

    def headers(self, unit: str) -> dict[str, str]:
        """OpenAI's rate-limit headers for this bucket (``unit``: ``requests`` or ``tokens``): the limit (the
        capacity), what remains now and the time until the bucket is full again."""
        tokens = self.tokens
        return {
            f"x-ratelimit-limit-{unit}": f"{self.capacity:.0f}",
            f"x-ratelimit-remaining-{unit}": f"{max(0, math.floor(tokens))}",
            f"x-ratelimit-reset-{unit}": openai_duration((self.capacity - tokens) / self.rate),
        }

    def _refill(self) -> None:
        now = self.clock()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now


def openai_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it: ``0s``, ``20ms``, ``1.5s``, ``6m0s``."""
    if seconds <= 0:
        return "0s"
    if seconds < 1:
        return f"{math.ceil(seconds * 1000)}ms"
    if seconds < 60:
        return f"{math.ceil(seconds * 10) / 10:g}s"
    minutes, rest = divmod(math.ceil(seconds), 60)
    return f"{minutes}m{rest}s"


class _TenantBuckets:
    """One token bucket per tenant, made on first use from the tenant's own limit or the default (``per_second``
    refill, ``capacity``; a rate of 0 means no limit)."""

    def __init__(self, default: RateConfig | TokenRateConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.clock = clock
        self._buckets: dict[str, TokenBucket | None] = {}

    def reconfigure(self, default: RateConfig | TokenRateConfig) -> None:
        """New default limit; every tenant's bucket starts again, full, at its (possibly new) rate."""
        self.default = default
        self._buckets.clear()

    def _bucket(self, tenant: str, override: RateConfig | TokenRateConfig | None) -> TokenBucket | None:
        bucket = self._buckets.get(tenant, ...)
        if bucket is ...:
            limit = override or self.default
            bucket = TokenBucket(limit.per_second, limit.capacity, self.clock) if limit.per_second else None
            self._buckets[tenant] = bucket
        return bucket


class TenantRateLimiter(_TenantBuckets):
    """Each tenant's request rate; a tenant's own ``rate`` overrides the default; rate 0 = unlimited."""

    def check(self, tenant: str, override: RateConfig | None = None) -> TokenBucket | None:
        """The tenant's bucket, one request taken (None when unlimited); raise :class:`AdmissionRejected`
        (``rate_limited``) when the tenant is over its rate."""
        bucket = self._bucket(tenant, override)
        if bucket is None:
            return None
        wait = bucket.take()
        if wait:
            raise AdmissionRejected(
                "rate_limited", wait, "Rate limit reached for this API key; retry later.", bucket.headers("requests")
            )
        return bucket


class TenantTokenLimiter(_TenantBuckets):
    """Each tenant's token budget (prompt + output tokens per minute); a tenant's own ``tokens`` overrides the
    default; 0 = unlimited. A request reserves its estimate up front and settles it with what it really used."""

    def reserve(self, tenant: str, estimate: int, override: TokenRateConfig | None = None) -> TokenReservation | None:
        """Reserve ``estimate`` tokens (None when the tenant is unlimited); raise :class:`AdmissionRejected`
        (``token_rate_limited``) when its budget cannot cover them yet."""
        bucket = self._bucket(tenant, override)
        if bucket is None:
            return None
        wait = bucket.take(estimate)
        if wait:
            raise AdmissionRejected(
                "token_rate_limited",
                wait,
                "Token rate limit reached for this API key; retry later.",
                bucket.headers("tokens"),
            )
        return TokenReservation(bucket, estimate)


class TokenReservation:
    """Tokens taken from a budget ahead of a request; :meth:`settle` once with the tokens it used."""

    __slots__ = ("bucket", "estimate", "settled")

    def __init__(self, bucket: TokenBucket, estimate: int) -> None:
        self.bucket = bucket
        self.estimate = estimate
        self.settled = False

    def settle(self, used: int) -> None:
        """Return what was reserved but not used (or take what was used beyond it); idempotent."""
        if not self.settled:
            self.settled = True
            self.bucket.give(self.estimate - used)


@dataclass(slots=True)
class _Waiter:
    future: asyncio.Future[None]


class Admission:
    """Global concurrency limit with a bounded FIFO wait queue (asyncio; one event loop)."""

    def __init__(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        self.max_concurrency = max_concurrency
        self.max_queue = max_queue
        self.queue_timeout_s = queue_timeout_s
        self.inflight = 0
        self._waiters: deque[_Waiter] = deque()
        #: Called with (inflight, queue depth) whenever either changes (metrics gauges).
        self.on_change: Callable[[int, int], None] | None = None

    @property
    def queue_depth(self) -> int:
        return len(self._waiters)

    @property
    def must_wait(self) -> bool:
        """An :meth:`acquire` now would queue (or be refused for a full queue)."""
        return self.inflight >= self.max_concurrency or bool(self._waiters)

    async def acquire(self) -> float:
        """Wait for a slot; returns the seconds waited. Raises :class:`AdmissionRejected`."""
        if self.inflight < self.max_concurrency and not self._waiters:
            self.inflight += 1
            self._changed()
            return 0.0
        if len(self._waiters) >= self.max_queue:
            raise AdmissionRejected(
                "queue_full", self._retry_hint(), "The gateway is at capacity and its queue is full; retry later."
            )
        start = time.perf_counter()
        waiter = _Waiter(asyncio.get_running_loop().create_future())
        self._waiters.append(waiter)
        self._changed()
        try:
            await asyncio.wait_for(asyncio.shield(waiter.future), self.queue_timeout_s)
        except TimeoutError:
            if waiter.future.done():  # granted just as the timer fired: keep the slot
                return time.perf_counter() - start
            self._remove(waiter)
            raise AdmissionRejected(
                "queue_timeout", self._retry_hint(), "Timed out waiting for capacity in the gateway; retry later."
            ) from None
        except asyncio.CancelledError:
            if waiter.future.done():  # granted, but the client went away: pass the slot on
                self.release()
            else:
                self._remove(waiter)
            raise
        return time.perf_counter() - start

    def release(self) -> None:
        """Give a slot back: the oldest waiter gets it, else the in-flight count drops (it only drops while more
        requests run than a lowered limit allows)."""
        while self._waiters and self.inflight <= self.max_concurrency:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)  # the slot passes on; inflight unchanged
                self._changed()
                return
        self.inflight -= 1
        self._changed()

    def resize(self, max_concurrency: int, max_queue: int, queue_timeout_s: float) -> None:
        """New limits, at once: a higher concurrency admits waiters now; a lower one lets running requests finish
        and admits nobody until fewer run. Waiters beyond a smaller queue keep their place."""
        self.max_concurrency, self.max_queue, self.queue_timeout_s = max_concurrency, max_queue, queue_timeout_s
        while self.inflight < self.max_concurrency and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.future.done():
                waiter.future.set_result(None)
                self.inflight += 1
        self._changed()

    def _remove(self, waiter: _Waiter) -> None:
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
        waiter.future.cancel()
        self._changed()

    def _retry_hint(self) -> float:
        return 1.0 + len(self._waiters) / max(1, self.max_concurrency)

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change(self.inflight, len(self._waiters))
