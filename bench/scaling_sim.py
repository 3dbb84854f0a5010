"""Routing at scale: prefix-cache hit rate and TTFT as gateway replicas and workers grow (a simulation).

Every gateway replica runs llmpath's real routing core, ``llmpath.gateway.routing``: chained block hashes
(``block_hashes`` under the default ``Tokenization``), its *own* ``PrefixIndex`` (recorded at decision time and again
after the reply, as the gateway does) and a ``Router`` configured from the gateway's defaults, with its own tie-break
seed (as each gateway process draws one), fed with the loads that replica sees (its own requests in flight per
worker). A load balancer in front spreads requests over the replicas:

* ``random``        — L4 spreading, every request to any replica;
* ``conversation``  — consistent (rendezvous) hashing of the conversation id, e.g. a session header;
* ``prefix``        — consistent hashing of the prompt's first blocks (in practice: the app or system-prompt id);

and, behind random spreading, replicas sharing one ``PrefixIndex`` (each still seeing only its own loads).
``--tiebreak shared`` gives every replica the same tie-break order (the gateway before it drew a seed per process:
replicas herd onto the same workers); ``--load-view global`` shows what a load view shared by all replicas would
give (each replica comparing every replica's requests in flight).

Workers are a cost model instead of engines: a bounded prefix cache (an LRU of block hashes, capacity in tokens,
leaves evicted before their parents, prompt and reply kept), a fixed number of running slots with a FIFO queue, one
prefill at a time (queue wait + per-request overhead + time per *uncached* prompt token) and a fixed time per output
token. TTFT = slot wait + prefill wait + prefill. The oracle is one unbounded cache that sees every request
(the workload's reuse ceiling); ``1 gateway`` is also what one shared index and shared loads would achieve.

Workload: ``apps-per-worker × workers`` apps with long system prompts and Zipf popularity, multi-turn conversations
whose prompts grow (each turn resends the history and the previous reply), Poisson arrivals of new conversations at
a rate scaled with the workers, so the offered prefill load per worker is the same in every column. Everything is
deterministic given ``--seed`` (simulated time; wall time only decides how long you wait).

    .venv/bin/python bench/scaling_sim.py --quick          # 8 and 32 workers × 1 and 4 gateways: seconds
    .venv/bin/python bench/scaling_sim.py                  # 8–256 workers × 1–16 gateways: ~2 min on 2 cores (--jobs)
    .venv/bin/python bench/scaling_sim.py --markdown --json figures.json > figures.md
    .venv/bin/python bench/scaling_sim.py --tiebreak shared --load-view global --workers 256 --gateways 1 16

Figures and what they mean: docs/scaling.md.
"""

from __future__ import annotations

import argparse
import bisect
import functools
import hashlib
import heapq
import json
import math
import os
import random
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from enum import StrEnum
from pathlib import Path

from llmpath.gateway.config import PromptCacheConfig, RoutingConfig
from llmpath.gateway.routing import Candidate, Policy, PrefixIndex, Router, Tokenization, block_hashes

QUICK_WORKERS = (8, 32)
QUICK_GATEWAYS = (1, 4)
FULL_WORKERS = (8, 16, 32, 64, 128, 256)
FULL_GATEWAYS = (1, 2, 4, 8, 16)


class TieBreak(StrEnum):
    """The order in which a replica's router breaks ties between equally loaded workers (e.g. for a new prefix)."""

    PER_REPLICA = "per-replica"  #: each replica its own seed, hence its own order: what the gateway does
    SHARED = "shared"  #: every replica the same seed and order (as when the gateway broke ties by name)


class LoadView(StrEnum):
    """The loads a replica's router compares."""

    OWN = "own"  #: its own requests in flight per worker: what the gateway does
    GLOBAL = "global"  #: every replica's requests in flight (as if read from the engines' queue and running gauges)


@dataclass(frozen=True, slots=True)
class ReplicaModel:
    """How gateway replicas behave beyond their own index (what the simulation can change without code changes)."""

    tiebreak: TieBreak = TieBreak.PER_REPLICA
    load_view: LoadView = LoadView.OWN

    def describe(self) -> str:
        return f"tie-break {self.tiebreak.value}, load view {self.load_view.value}"


class Balancing(StrEnum):
    """How the load balancer in front of the gateway replicas picks one."""

    RANDOM = "random"
    CONVERSATION = "conversation"
    PREFIX = "prefix"


# ------------------------------------------------------------------------------------------------
# Parameters
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CostModel:
    """A worker (one SGLang server) as a cost model. Defaults: roughly an 8–14B model on one large GPU, with the
    KV capacity scaled down with the workload so that a short simulation reaches steady state."""

    slots: int = 32  #: requests running at once (SGLang --max-running-requests)
    overhead_ms: float = 10.0  #: per request, before prefill (tokenize, schedule, first forward's fixed cost)
    prefill_ms_per_token: float = 0.1  #: per uncached prompt token (10k tokens/s)
    decode_ms_per_token: float = 10.0  #: per output token, independent of batch size
    cache_tokens: int = 48_000  #: prefix-cache capacity per worker

    def prefill_s(self, uncached_tokens: int) -> float:
        return (self.overhead_ms + uncached_tokens * self.prefill_ms_per_token) / 1e3


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Shared-prefix chat traffic; sizes are in tokens, drawn uniformly from the closed ranges."""

    apps_per_worker: int = 4
    zipf_s: float = 1.0  #: popularity of app rank r ∝ r^-s
    system_tokens: tuple[int, int] = (1000, 4000)
    user_tokens: tuple[int, int] = (20, 400)
    output_tokens: tuple[int, int] = (50, 400)
    mean_turns: float = 4.0  #: 1 + geometric; capped at max_turns
    max_turns: int = 16
    think_s: float = 3.0  #: mean (exponential) time between a reply and the next turn
    requests_per_worker: int = 60
    load: float = 0.8  #: offered prefill utilisation per worker if nothing were cached
    warmup: float = 0.25  #: share of the arrival span not measured (caches filling)


@dataclass(frozen=True, slots=True)
class Scenario:
    workers: int
    gateways: int
    balancing: Balancing
    policy: Policy
    #: One prefix index shared by every replica (each still sees only its own loads).
    shared_index: bool = False

    @property
    def label(self) -> str:
        """The load balancer's part: none with one gateway."""
        return self.balancing.value if self.gateways > 1 else "-"

    @property
    def index(self) -> str:
        return "-" if self.gateways == 1 else "shared" if self.shared_index else "own"


@dataclass(frozen=True, slots=True)
class Figures:
    """What one scenario measured (over the requests that arrived inside the measurement window)."""

    workers: int
    gateways: int
    policy: str
    lb: str  #: the load balancer's spreading: "random", "conversation", "prefix" or "-" (one gateway)
    index: str  #: "own" (one index per replica), "shared" or "-" (one gateway)
    tiebreak: str
    load_view: str
    requests: int
    hit_rate: float  #: cached / prompt tokens
    oracle_hit_rate: float  #: the same for one unbounded cache that sees every request
    ttft_p50_ms: float
    ttft_p99_ms: float
    spread: float  #: max / mean requests per worker
    gateway_spread: float  #: max / mean requests per gateway replica
    predicted_over_actual: float  #: the routing gateways' predicted cached tokens / the workers' cached tokens
    wall_s: float

    @property
    def vs_oracle(self) -> float:
        return self.hit_rate / self.oracle_hit_rate if self.oracle_hit_rate else 0.0


# ------------------------------------------------------------------------------------------------
# Workload
# ------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Conversation:
    """One conversation: the block hashes of its whole transcript, and per turn the prompt's and the prompt +
    reply's number of full blocks (every prompt is a prefix of the transcript)."""

    id: int
    app: int
    start_s: float
    hashes: list[int]
    prompt_blocks: list[int]
    full_blocks: list[int]
    prompt_tokens: list[int]
    output_tokens: list[int]
    think_s: list[float]


@dataclass(slots=True)
class Workload:
    conversations: list[Conversation]
    #: The load balancer's key for prefix affinity: each app's first blocks.
    app_keys: list[bytes]
    requests: int
    #: Arrival rate of requests (per second) and the measured window of arrival times.
    rate: float
    measure_from_s: float
    measure_to_s: float


def _uniform(rng: random.Random, bounds: tuple[int, int]) -> int:
    return rng.randint(bounds[0], bounds[1])


def build_workload(
    workers: int, spec: WorkloadSpec, cost: CostModel, tokenization: Tokenization, seed: int
) -> Workload:
    """Conversations for ``workers`` workers; the same for every scenario with this worker count and seed."""
    rng = random.Random(f"llmpath-scaling/{seed}/{workers}/sizes")
    cpt = tokenization.chars_per_token
    size = tokenization.block_bytes
    apps = spec.apps_per_worker * workers
    app_bytes = [rng.randbytes(round(_uniform(rng, spec.system_tokens) * cpt)) for _ in range(apps)]
    app_hashes = [block_hashes(b, size) for b in app_bytes]
    affinity_bytes = size * 4  # the first 4 blocks (64 tokens by default: the gateway's minimum prefix)
    app_keys = [b[:affinity_bytes] for b in app_bytes]
    popularity = list(_cumulative(1.0 / (rank + 1) ** spec.zipf_s for rank in range(apps)))

    conversations: list[Conversation] = []
    requests = 0
    target = spec.requests_per_worker * workers
    miss_prefill_s = 0.0
    while requests < target:
        app = bisect.bisect_left(popularity, rng.random() * popularity[-1])
        turns = min(spec.max_turns, 1 + _geometric(rng, spec.mean_turns - 1))
        parts = [app_bytes[app]]
        length = len(app_bytes[app])
        conv = Conversation(len(conversations), app, 0.0, [], [], [], [], [], [])
        for _ in range(turns):
            user = rng.randbytes(round(_uniform(rng, spec.user_tokens) * cpt))
            output = _uniform(rng, spec.output_tokens)
            reply = rng.randbytes(round(output * cpt))
            parts += (user, reply)
            conv.prompt_blocks.append((length + len(user)) // size)
            conv.prompt_tokens.append(math.ceil((length + len(user)) / cpt))
            length += len(user) + len(reply)
            conv.full_blocks.append(length // size)
            conv.output_tokens.append(output)
            conv.think_s.append(rng.expovariate(1 / spec.think_s) if spec.think_s > 0 else 0.0)
            miss_prefill_s += cost.prefill_s(conv.prompt_tokens[-1])
        # The transcript's hashes: the app's (hashed once), then the rest chained on, as PromptCache.extend does.
        head = app_hashes[app]
        transcript = b"".join(parts)
        conv.hashes = head + block_hashes(transcript[len(head) * size :], size, head[-1] if head else 0)
        conversations.append(conv)
        requests += turns

    # Arrivals: Poisson, at the request rate that offers `load` prefill utilisation per worker without caching.
    rate = spec.load * workers / (miss_prefill_s / requests)
    conversation_rate = rate * len(conversations) / requests
    arrivals = random.Random(f"llmpath-scaling/{seed}/{workers}/arrivals")
    now = 0.0
    for conv in conversations:
        now += arrivals.expovariate(conversation_rate)
        conv.start_s = now
    return Workload(conversations, app_keys, requests, rate, spec.warmup * now, now)


def _cumulative(values: Iterable[float]) -> Iterable[float]:
    total = 0.0
    for v in values:
        total += v
        yield total


def _geometric(rng: random.Random, mean: float) -> int:
    """A geometric count (0, 1, 2, ...) with the given mean."""
    if mean <= 0:
        return 0
    p = 1 / (1 + mean)
    return int(math.log(1 - rng.random()) / math.log(1 - p))


# ------------------------------------------------------------------------------------------------
# Workers, gateway replicas, load balancer
# ------------------------------------------------------------------------------------------------


class BlockLRU:
    """A worker's prefix cache at block granularity: longest cached prefix, LRU eviction.

    A prompt's blocks are touched deepest first, so its tail is evicted before its head (a radix cache evicts
    leaves before their parents). Blocks held by running requests are not pinned (a simplification).
    """

    __slots__ = ("_blocks", "capacity")

    def __init__(self, capacity_blocks: int) -> None:
        self.capacity = capacity_blocks
        self._blocks: OrderedDict[int, None] = OrderedDict()

    def match(self, hashes: Sequence[int]) -> int:
        blocks = self._blocks
        n = 0
        for h in hashes:
            if h not in blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        blocks = self._blocks
        for h in reversed(hashes):
            blocks[h] = None
            blocks.move_to_end(h)
        for _ in range(len(blocks) - self.capacity):
            blocks.popitem(last=False)

    def __len__(self) -> int:
        return len(self._blocks)


class UnboundedCache:
    """The oracle: every block any request ever brought, never evicted."""

    __slots__ = ("_blocks",)

    def __init__(self) -> None:
        self._blocks: set[int] = set()

    def match(self, hashes: Sequence[int]) -> int:
        n = 0
        for h in hashes:
            if h not in self._blocks:
                break
            n += 1
        return n

    def insert(self, hashes: Sequence[int]) -> None:
        self._blocks.update(hashes)


@dataclass(slots=True, eq=False)
class Request:
    conv: Conversation
    turn: int
    arrival_s: float
    gateway: int = 0
    worker: int = 0
    predicted_tokens: int = 0
    cached_tokens: int = 0
    oracle_tokens: int = 0
    ttft_s: float = 0.0

    @property
    def prompt_hashes(self) -> list[int]:
        return self.conv.hashes[: self.conv.prompt_blocks[self.turn]]

    @property
    def full_hashes(self) -> list[int]:
        return self.conv.hashes[: self.conv.full_blocks[self.turn]]

    @property
    def prompt_tokens(self) -> int:
        return self.conv.prompt_tokens[self.turn]


class Worker:
    """One engine: slots with a FIFO queue, one prefill at a time, decode at a fixed time per token."""

    __slots__ = ("block_tokens", "cache", "cost", "free_slots", "prefill_free_s", "queue")

    def __init__(self, cost: CostModel, block_tokens: int) -> None:
        self.cost = cost
        self.block_tokens = block_tokens
        self.cache = BlockLRU(max(1, cost.cache_tokens // block_tokens))
        self.free_slots = cost.slots
        self.queue: deque[Request] = deque()
        self.prefill_free_s = 0.0

    def start(self, req: Request, now: float) -> float:
        """Take a slot for ``req`` at ``now``: match and fill the cache, return when the request completes.

        The cache is matched and filled when the prefill is scheduled; prefills run one at a time in that order,
        so a later request sees this one's blocks exactly when its own prefill starts after this one's ended."""
        self.free_slots -= 1
        hashes = req.prompt_hashes
        req.cached_tokens = min(self.cache.match(hashes) * self.block_tokens, req.prompt_tokens - 1)
        self.cache.insert(hashes)
        begin = max(now, self.prefill_free_s)
        self.prefill_free_s = begin + self.cost.prefill_s(req.prompt_tokens - req.cached_tokens)
        req.ttft_s = self.prefill_free_s - req.arrival_s
        return self.prefill_free_s + req.conv.output_tokens[req.turn] * self.cost.decode_ms_per_token / 1e3


class GatewayReplica:
    """One gateway process: its own prefix index, router (tie-break ``seed``) and view of the loads (its own
    requests in flight). ``names[i]`` is worker ``i``."""

    __slots__ = ("by_name", "candidates", "index", "inflight", "min_prefix_tokens", "names", "router")

    def __init__(
        self, names: Sequence[str], policy: Policy, capacity_blocks: int, clock: Callable[[], float], seed: int
    ) -> None:
        routing, cache = RoutingConfig(), PromptCacheConfig()
        self.names = list(names)
        self.by_name = {n: i for i, n in enumerate(self.names)}
        self.index = PrefixIndex(max_blocks_per_backend=capacity_blocks, ttl_s=cache.ttl_s, clock=clock)
        self.router = Router(
            policy,
            min_match_ratio=routing.min_match_ratio,
            min_blocks=max(1, -(-cache.min_prefix_tokens // cache.block_tokens)),
            balance_abs=routing.balance_abs_threshold,
            balance_rel=routing.balance_rel_threshold,
            seed=seed,
        )
        self.min_prefix_tokens = cache.min_prefix_tokens
        self.candidates = [Candidate(n) for n in names]
        self.inflight = [0] * len(names)

    def set_load(self, worker: int, load: int) -> None:
        self.inflight[worker] = load
        self.candidates[worker] = Candidate(self.names[worker], load)


def rendezvous(key: bytes, buckets: int) -> int:
    """Highest-random-weight (rendezvous) hashing: stable, and moving few keys when ``buckets`` changes."""
    scores = [hashlib.blake2b(key, digest_size=8, salt=b"%d" % b).digest() for b in range(buckets)]
    return max(range(buckets), key=scores.__getitem__)


class LoadBalancer:
    __slots__ = ("_memo", "balancing", "gateways", "keys", "rng")

    def __init__(self, balancing: Balancing, gateways: int, app_keys: list[bytes], seed: int) -> None:
        self.balancing = balancing
        self.gateways = gateways
        self.keys = app_keys
        self.rng = random.Random(f"llmpath-scaling/{seed}/lb")
        self._memo: dict[tuple[str, int], int] = {}

    def pick(self, conv: Conversation) -> int:
        if self.gateways == 1:
            return 0
        if self.balancing is Balancing.RANDOM:
            return self.rng.randrange(self.gateways)
        if self.balancing is Balancing.CONVERSATION:
            memo_key, key = ("c", conv.id), b"conversation/%d" % conv.id
        else:
            memo_key, key = ("p", conv.app), self.keys[conv.app]
        found = self._memo.get(memo_key)
        if found is None:
            found = self._memo[memo_key] = rendezvous(key, self.gateways)
        return found


# ------------------------------------------------------------------------------------------------
# The discrete-event simulation
# ------------------------------------------------------------------------------------------------

_ARRIVE, _DONE = 0, 1


def simulate(
    scenario: Scenario,
    workload: Workload,
    cost: CostModel,
    tokenization: Tokenization,
    seed: int,
    replicas: ReplicaModel | None = None,
) -> Figures:
    """Run one scenario over a workload; deterministic given its inputs."""
    replicas = replicas or ReplicaModel()
    started = time.perf_counter()
    bt = tokenization.block_tokens
    now = 0.0

    def clock() -> float:
        return now

    capacity_blocks = max(1, cost.cache_tokens // bt)
    workers = [Worker(cost, bt) for _ in range(scenario.workers)]
    shared = PrefixIndex(max_blocks_per_backend=capacity_blocks, ttl_s=PromptCacheConfig().ttl_s, clock=clock)
    names = [f"w{i:04d}" for i in range(scenario.workers)]
    gateways = []
    for g in range(scenario.gateways):
        # Each replica's router seed, as each gateway process draws one; one seed for all with a shared order.
        stream = f"llmpath-scaling/{seed}/router" + (f"/{g}" if replicas.tiebreak is TieBreak.PER_REPLICA else "")
        replica = GatewayReplica(names, scenario.policy, capacity_blocks, clock, random.Random(stream).getrandbits(64))
        if scenario.shared_index:
            replica.index = shared
        gateways.append(replica)
    balancer = LoadBalancer(scenario.balancing, scenario.gateways, workload.app_keys, seed)
    oracle = UnboundedCache()
    loads = [0] * scenario.workers  # every replica's requests in flight, per worker

    def add_load(req: Request, delta: int) -> None:
        loads[req.worker] += delta
        if replicas.load_view is LoadView.GLOBAL:
            for gw in gateways:
                gw.set_load(req.worker, loads[req.worker])
        else:
            gw = gateways[req.gateway]
            gw.set_load(req.worker, gw.inflight[req.worker] + delta)

    events: list[tuple[float, int, int, Request]] = []
    seq = 0
    for conv in workload.conversations:
        events.append((conv.start_s, seq, _ARRIVE, Request(conv, 0, conv.start_s)))
        seq += 1
    heapq.heapify(events)
    finished: list[Request] = []

    def start(worker: Worker, req: Request) -> None:
        nonlocal seq
        req.oracle_tokens = min(oracle.match(req.prompt_hashes) * bt, req.prompt_tokens - 1)
        oracle.insert(req.prompt_hashes)
        heapq.heappush(events, (worker.start(req, now), seq, _DONE, req))
        seq += 1

    while events:
        now, _, kind, req = heapq.heappop(events)
        if kind == _ARRIVE:
            req.gateway = balancer.pick(req.conv)
            gw = gateways[req.gateway]
            hashes = req.prompt_hashes
            matches = gw.index.match(hashes, gw.names)
            decision = gw.router.choose(gw.candidates, matches, len(hashes), gw.index.size)
            req.worker = gw.by_name[decision.backend]
            predicted = decision.matched_blocks * bt
            req.predicted_tokens = predicted if predicted >= gw.min_prefix_tokens else 0
            gw.index.insert(decision.backend, hashes)  # at decision time, as the gateway records it
            add_load(req, 1)
            worker = workers[req.worker]
            if worker.free_slots:
                start(worker, req)
            else:
                worker.queue.append(req)
        else:
            worker, gw = workers[req.worker], gateways[req.gateway]
            worker.free_slots += 1
            full = req.full_hashes
            worker.cache.insert(full)  # the engine keeps the reply's KV too
            oracle.insert(full)
            add_load(req, -1)
            gw.index.insert(gw.names[req.worker], full)  # the gateway's record_output
            if worker.queue:
                start(worker, worker.queue.popleft())
            finished.append(req)
            conv = req.conv
            if req.turn + 1 < len(conv.prompt_blocks):
                arrival = now + conv.think_s[req.turn]
                heapq.heappush(events, (arrival, seq, _ARRIVE, Request(conv, req.turn + 1, arrival)))
                seq += 1

    measured = [r for r in finished if workload.measure_from_s <= r.arrival_s <= workload.measure_to_s]
    return summarize(scenario, replicas, measured, time.perf_counter() - started)


def summarize(scenario: Scenario, replicas: ReplicaModel, measured: list[Request], wall_s: float) -> Figures:
    prompt = sum(r.prompt_tokens for r in measured)
    cached = sum(r.cached_tokens for r in measured)
    ttfts = sorted(r.ttft_s for r in measured)
    per_worker = [0] * scenario.workers
    per_gateway = [0] * scenario.gateways
    for r in measured:
        per_worker[r.worker] += 1
        per_gateway[r.gateway] += 1
    return Figures(
        workers=scenario.workers,
        gateways=scenario.gateways,
        policy=scenario.policy.value,
        lb=scenario.label,
        index=scenario.index,
        tiebreak=replicas.tiebreak.value,
        load_view=replicas.load_view.value,
        requests=len(measured),
        hit_rate=cached / prompt if prompt else 0.0,
        oracle_hit_rate=sum(r.oracle_tokens for r in measured) / prompt if prompt else 0.0,
        ttft_p50_ms=_quantile(ttfts, 0.5) * 1e3,
        ttft_p99_ms=_quantile(ttfts, 0.99) * 1e3,
        spread=_spread(per_worker),
        gateway_spread=_spread(per_gateway),
        predicted_over_actual=sum(r.predicted_tokens for r in measured) / cached if cached else 0.0,
        wall_s=wall_s,
    )


def _quantile(ordered: Sequence[float], q: float) -> float:
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _spread(counts: Sequence[int]) -> float:
    mean = sum(counts) / len(counts) if counts else 0
    return max(counts) / mean if mean else 0.0


# ------------------------------------------------------------------------------------------------
# The grid
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Settings:
    workers: tuple[int, ...]
    gateways: tuple[int, ...]
    spec: WorkloadSpec = field(default_factory=WorkloadSpec)
    cost: CostModel = field(default_factory=CostModel)
    tokenization: Tokenization = field(default_factory=Tokenization)
    seed: int = 7
    replicas: ReplicaModel = field(default_factory=ReplicaModel)


#: With several replicas: each balancing with one index per replica, then random balancing over a shared index.
SETUPS: tuple[tuple[Balancing, bool], ...] = (*((b, False) for b in Balancing), (Balancing.RANDOM, True))


def scenarios(workers: int, gateways: Sequence[int]) -> list[Scenario]:
    """Per worker count: round robin and one gateway, then each larger replica count in each setup."""
    out = [
        Scenario(workers, 1, Balancing.RANDOM, Policy.ROUND_ROBIN),
        Scenario(workers, 1, Balancing.RANDOM, Policy.PREFIX),
    ]
    for g in gateways:
        if g > 1:
            out += [Scenario(workers, g, b, Policy.PREFIX, shared) for b, shared in SETUPS]
    return out


@functools.lru_cache(maxsize=2)
def _workload(settings: Settings, workers: int) -> Workload:
    return build_workload(workers, settings.spec, settings.cost, settings.tokenization, settings.seed)


def run_scenario(settings: Settings, scenario: Scenario) -> Figures:
    """One scenario (its workload is built once per process and worker count)."""
    workload = _workload(settings, scenario.workers)
    return simulate(scenario, workload, settings.cost, settings.tokenization, settings.seed, settings.replicas)


def run_grid(settings: Settings, jobs: int = 1) -> list[Figures]:
    """Every scenario of the grid, in table order; ``jobs`` > 1 spreads them over processes."""
    grid = [s for w in sorted(settings.workers) for s in scenarios(w, settings.gateways)]
    if jobs <= 1:
        return [run_scenario(settings, s) for s in grid]
    # Largest first, grouped by worker count, so that each process builds few workloads and finishes together.
    order = sorted(range(len(grid)), key=lambda i: -grid[i].workers)
    with ProcessPoolExecutor(jobs) as pool:
        done = pool.map(run_scenario, [settings] * len(order), [grid[i] for i in order])
        results = dict(zip(order, done, strict=True))
    return [results[i] for i in range(len(grid))]


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def _reference(figures: list[Figures]) -> dict[int, Figures]:
    return {f.workers: f for f in figures if f.policy == Policy.PREFIX and f.gateways == 1}


def detail_rows(figures: list[Figures]) -> tuple[list[str], list[list[str]]]:
    header = [
        "workers",
        "gateways",
        "LB",
        "index",
        "policy",
        "hit rate",
        "×oracle",
        "×1 gw",
        "TTFT p50 ms",
        "p99 ms",
        "p99 ×1 gw",
        "spread",
        "gw spread",
        "pred/actual",
    ]
    ref = _reference(figures)
    rows = []
    for f in figures:
        one = ref.get(f.workers)
        rows.append(
            [
                str(f.workers),
                str(f.gateways),
                f.lb,
                f.index,
                f.policy,
                f"{f.hit_rate:.3f}",
                f"{f.vs_oracle:.3f}",
                f"{f.hit_rate / one.hit_rate:.3f}" if one and one.hit_rate else "-",
                f"{f.ttft_p50_ms:.0f}",
                f"{f.ttft_p99_ms:.0f}",
                f"{f.ttft_p99_ms / one.ttft_p99_ms:.2f}" if one and one.ttft_p99_ms else "-",
                f"{f.spread:.2f}",
                f"{f.gateway_spread:.2f}",
                f"{f.predicted_over_actual:.2f}",
            ]
        )
    return header, rows


def matrix_rows(
    figures: list[Figures], balancing: Balancing, shared_index: bool, value: Callable[[Figures], float]
) -> tuple[list[str], list[list[str]]]:
    """Rows: gateway replicas; columns: workers; cells: ``value`` of the prefix policy in one setup."""
    workers = sorted({f.workers for f in figures})
    gateways = sorted({f.gateways for f in figures})
    index = "shared" if shared_index else "own"
    cell = {
        (f.gateways, f.workers): value(f)
        for f in figures
        if f.policy == Policy.PREFIX and (f.gateways == 1 or (f.lb == balancing and f.index == index))
    }
    header = ["gateways \\ workers", *map(str, workers)]
    rows = [[str(g), *(f"{cell[g, w]:.3f}" if (g, w) in cell else "-" for w in workers)] for g in gateways]
    return header, rows


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def report(figures: list[Figures], settings: Settings, wall_s: float, markdown: bool) -> None:
    spec, cost = settings.spec, settings.cost
    preamble = (
        f"Routing at scale (simulated; seed {settings.seed}, {settings.replicas.describe()}): "
        f"apps {spec.apps_per_worker}/worker, "
        f"Zipf s={spec.zipf_s}, "
        f"system prompts {spec.system_tokens[0]}–{spec.system_tokens[1]} tokens, ~{spec.mean_turns:g} turns, "
        f"{spec.requests_per_worker} requests/worker, offered prefill load {spec.load:g} (uncached); worker cache "
        f"{cost.cache_tokens} tokens, {cost.slots} slots, prefill {cost.prefill_ms_per_token} ms/token "
        f"+ {cost.overhead_ms:g} ms, decode {cost.decode_ms_per_token:g} ms/token. "
        f"Wall {wall_s:.0f} s, load avg {os.getloadavg()[0]:.2f}."
    )
    tables: list[tuple[str, tuple[list[str], list[list[str]]]]] = [("Per configuration", detail_rows(figures))]
    for b, shared in SETUPS:
        title = f"Hit rate × oracle, LB {b.value}" + (", shared index" if shared else "")
        tables.append((title, matrix_rows(figures, b, shared, lambda f: f.vs_oracle)))
    if markdown:
        print(preamble + "\n")
        for title, (header, rows) in tables:
            print(f"**{title}**\n\n{_markdown(header, rows)}\n")
        return
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(preamble)
    for title, (header, rows) in tables:
        table = Table(title=title, title_justify="left")
        for h in header:
            table.add_column(h, justify="left" if h in ("LB", "index", "policy") else "right")
        previous = None
        for row in rows:
            if title.startswith("Per") and previous is not None and row[0] != previous:
                table.add_section()
            previous = row[0]
            table.add_row(*row)
        console.print(table)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small grid (8, 32 workers × 1, 4 gateways)")
    parser.add_argument("--workers", type=int, nargs="+", help=f"worker counts (default {FULL_WORKERS})")
    parser.add_argument("--gateways", type=int, nargs="+", help=f"gateway replica counts (default {FULL_GATEWAYS})")
    parser.add_argument("--requests-per-worker", type=int, help="requests simulated per worker")
    parser.add_argument("--load", type=float, help="offered prefill utilisation per worker without caching")
    parser.add_argument("--cache-tokens", type=int, help="prefix-cache capacity per worker")
    parser.add_argument("--apps-per-worker", type=int)
    parser.add_argument("--zipf", type=float, help="Zipf exponent of app popularity")
    parser.add_argument(
        "--tiebreak",
        type=TieBreak,
        choices=list(TieBreak),
        default=TieBreak.PER_REPLICA,
        help="how replicas break load ties: each in its own order (the gateway: a seed per process; default) "
        "or all in the same order (as the gateway did before: by name)",
    )
    parser.add_argument(
        "--load-view",
        type=LoadView,
        choices=list(LoadView),
        default=LoadView.OWN,
        help="loads a replica compares: its own requests in flight (the gateway; default) or all replicas'",
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="processes (default: one per CPU)")
    parser.add_argument("--markdown", action="store_true", help="print Markdown tables instead of rich ones")
    parser.add_argument("--json", metavar="PATH", help="also write every configuration's figures as JSON")
    args = parser.parse_args(argv)

    spec, cost = WorkloadSpec(), CostModel()
    overrides = {
        "requests_per_worker": args.requests_per_worker,
        "load": args.load,
        "apps_per_worker": args.apps_per_worker,
        "zipf_s": args.zipf,
    }
    spec = replace(spec, **{k: v for k, v in overrides.items() if v is not None})
    if args.cache_tokens is not None:
        cost = replace(cost, cache_tokens=args.cache_tokens)
    workers = tuple(args.workers or (QUICK_WORKERS if args.quick else FULL_WORKERS))
    gateways = tuple(args.gateways or (QUICK_GATEWAYS if args.quick else FULL_GATEWAYS))
    if min(workers) < 1 or min(gateways) < 1 or spec.requests_per_worker < 1 or spec.load <= 0:
        parser.error("worker and gateway counts, requests per worker and load must be positive")
    settings = Settings(
        workers, gateways, spec, cost, seed=args.seed, replicas=ReplicaModel(args.tiebreak, args.load_view)
    )

    started = time.perf_counter()
    figures = run_grid(settings, args.jobs)
    wall_s = time.perf_counter() - started
    report(figures, settings, wall_s, args.markdown)
    if args.json:
        payload = {"settings": asdict(settings), "figures": [asdict(f) for f in figures]}
        Path(args.json).write_text(json.dumps(payload, indent=1) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
