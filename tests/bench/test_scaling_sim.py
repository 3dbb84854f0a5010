"""bench/scaling_sim.py: the cost model, the load balancer and the routing-at-scale findings, at small sizes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from llmpath.gateway.routing import Policy, Router, Tokenization


@pytest.fixture(scope="module")
def sim(bench_script) -> ModuleType:
    return bench_script("scaling_sim")


def _settings(sim: ModuleType, seed: int = 7, workers: int = 16, gateways: tuple[int, ...] = (1, 4)):
    return sim.Settings((workers,), gateways, sim.WorkloadSpec(requests_per_worker=60), sim.CostModel(), seed=seed)


def _by_key(figures) -> dict[tuple[int, str, str, str], object]:
    return {(f.gateways, f.lb, f.index, f.policy): f for f in figures}


@pytest.fixture(scope="module", params=[7, 11])
def seed(request) -> int:
    return request.param


@pytest.fixture(scope="module")
def grid(sim, seed: int) -> dict[tuple[int, str, str, str], object]:
    """16 workers, 1 and 4 gateways, every setup (about a second)."""
    return _by_key(sim.run_grid(_settings(sim, seed=seed)))


# ------------------------------------------------------------------------------------------------
# Findings (properties, checked for two seeds)
# ------------------------------------------------------------------------------------------------


def test_one_gateway_prefix_policy_beats_round_robin(grid) -> None:
    prefix, rr = grid[1, "-", "-", "prefix"], grid[1, "-", "-", "round_robin"]
    assert prefix.hit_rate > rr.hit_rate + 0.2
    assert prefix.vs_oracle > 0.9
    assert prefix.ttft_p50_ms < rr.ttft_p50_ms / 2
    # round robin spreads requests evenly; prefix routing pays for its hits with some imbalance, bounded
    assert rr.spread < 1.1
    assert prefix.spread < 2.0


def test_random_lb_over_replicas_loses_hits_and_affinity_recovers_them(grid) -> None:
    one = grid[1, "-", "-", "prefix"]
    spread = grid[4, "random", "own", "prefix"]
    by_conversation = grid[4, "conversation", "own", "prefix"]
    by_prefix = grid[4, "prefix", "own", "prefix"]
    assert spread.hit_rate < 0.9 * one.hit_rate
    assert spread.ttft_p50_ms > one.ttft_p50_ms
    for affine in (by_conversation, by_prefix):
        assert affine.hit_rate > spread.hit_rate + 0.05
        assert affine.hit_rate > 0.93 * one.hit_rate
    # prefix affinity sends each app to one replica: the popular apps make the replicas uneven
    assert by_prefix.gateway_spread > spread.gateway_spread


def test_a_shared_index_recovers_what_random_lb_loses(grid) -> None:
    one = grid[1, "-", "-", "prefix"]
    own = grid[4, "random", "own", "prefix"]
    shared = grid[4, "random", "shared", "prefix"]
    assert shared.hit_rate > own.hit_rate + 0.05
    assert shared.hit_rate > 0.93 * one.hit_rate
    assert abs(shared.predicted_over_actual - 1) < abs(own.predicted_over_actual - 1) + 0.02


def test_hit_rate_never_exceeds_the_oracle(grid) -> None:
    for f in grid.values():
        assert 0 < f.hit_rate <= f.oracle_hit_rate + 1e-12
        assert f.ttft_p50_ms <= f.ttft_p99_ms
        assert f.requests > 0


def test_replicas_that_see_every_replicas_load_spread_it_like_one_gateway(sim, grid, seed: int) -> None:
    settings = dataclasses.replace(_settings(sim, seed=seed), replicas=sim.ReplicaModel(load_view=sim.LoadView.GLOBAL))
    one = grid[1, "-", "-", "prefix"]
    for scenario in [
        sim.Scenario(16, 4, sim.Balancing.PREFIX, Policy.PREFIX),
        sim.Scenario(16, 4, sim.Balancing.RANDOM, Policy.PREFIX, shared_index=True),
    ]:
        own = grid[4, scenario.balancing.value, scenario.index, "prefix"]
        everyone = sim.run_scenario(settings, scenario)
        assert everyone.load_view == "global"
        # each replica sees only its share of a worker's load, so the balance thresholds act late
        assert own.spread > 1.3 * one.spread
        assert everyone.spread < min(own.spread, 1.3 * one.spread)
        assert everyone.hit_rate > 0.93 * one.hit_rate


def test_replicas_sharing_one_tie_break_order_herd(sim, seed: int) -> None:
    """8 replicas over 32 workers, each with its own index: with one tie-break order (the gateway before it drew a
    seed per process) the replicas place new prefixes on the same idle workers, so the load is more uneven and the
    tail slower. With one shared index new prefixes go by its footprints, which all replicas see alike, so the
    order is not what decides and sharing it changes nothing."""
    base = dataclasses.replace(
        _settings(sim, seed=seed, workers=32, gateways=(8,)), spec=sim.WorkloadSpec(requests_per_worker=30)
    )
    scenarios = [sim.Scenario(32, 8, b, Policy.PREFIX, shared) for b, shared in sim.SETUPS]
    own, same = (
        [sim.run_scenario(dataclasses.replace(base, replicas=sim.ReplicaModel(tiebreak=t)), s) for s in scenarios]
        for t in (sim.TieBreak.PER_REPLICA, sim.TieBreak.SHARED)
    )
    assert base.replicas.tiebreak is sim.TieBreak.PER_REPLICA  # the default models the gateway
    assert {f.tiebreak for f in own} == {"per-replica"} and {f.tiebreak for f in same} == {"shared"}
    pairs = list(zip(own, same, strict=True))
    for mine, herd in pairs:
        if mine.index == "shared":
            assert (herd.spread, herd.ttft_p99_ms, herd.hit_rate) == (mine.spread, mine.ttft_p99_ms, mine.hit_rate)
        else:
            assert herd.spread > mine.spread
    own_index = [(mine, herd) for mine, herd in pairs if mine.index == "own"]
    assert len(own_index) == 3
    assert sum(h.ttft_p99_ms for _, h in own_index) > 1.1 * sum(m.ttft_p99_ms for m, _ in own_index)


def test_results_are_deterministic_for_a_seed(sim, grid, seed: int) -> None:
    settings = _settings(sim, seed=seed)
    scenarios = [sim.Scenario(16, 4, b, Policy.PREFIX) for b in sim.Balancing]
    sim._workload.cache_clear()  # rebuild the workload too
    again = [sim.run_scenario(settings, s) for s in scenarios]
    assert [dataclasses.replace(f, wall_s=0.0) for f in again] == [
        dataclasses.replace(grid[4, b.value, "own", "prefix"], wall_s=0.0) for b in sim.Balancing
    ]
    other = sim.run_scenario(_settings(sim, seed=seed + 1), scenarios[0])
    assert other.hit_rate != again[0].hit_rate


def test_parallel_run_matches_the_serial_one(sim) -> None:
    settings = _settings(sim, workers=8, gateways=(1, 2))
    settings = dataclasses.replace(settings, spec=sim.WorkloadSpec(requests_per_worker=30))
    serial = [dataclasses.replace(f, wall_s=0.0) for f in sim.run_grid(settings)]
    parallel = [dataclasses.replace(f, wall_s=0.0) for f in sim.run_grid(settings, jobs=2)]
    assert parallel == serial


def test_figures_do_not_depend_on_the_process_hash_seed(tmp_path: Path) -> None:
    """docs/scaling.md: "the figures below are identical on any machine for the same seed". Block hashes use Python's
    per-process ``hash``, so two runs of the script with different PYTHONHASHSEED must agree to the last digit."""
    script = Path(__file__).parents[2] / "bench" / "scaling_sim.py"
    args = ["--workers", "8", "--gateways", "1", "4", "--requests-per-worker", "20", "--jobs", "1", "--markdown"]
    runs = []
    for hash_seed in ("1", "2"):
        out = tmp_path / f"figures-{hash_seed}.json"
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        command = [sys.executable, str(script), *args, "--json", str(out)]
        subprocess.run(command, env=env, check=True, capture_output=True)
        runs.append([{k: v for k, v in f.items() if k != "wall_s"} for f in json.loads(out.read_text())["figures"]])
    assert len(runs[0]) == 6 and runs[0] == runs[1]


# ------------------------------------------------------------------------------------------------
# The parts
# ------------------------------------------------------------------------------------------------


def _conversation(sim: ModuleType, prompt_tokens: list[int], output_tokens: list[int], blocks: int) -> Any:
    hashes = list(range(1000, 1000 + blocks))
    return sim.Conversation(
        id=0,
        app=0,
        start_s=0.0,
        hashes=hashes,
        prompt_blocks=[t // 16 for t in prompt_tokens],
        full_blocks=[(p + o) // 16 for p, o in zip(prompt_tokens, output_tokens, strict=True)],
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        think_s=[0.0] * len(prompt_tokens),
    )


def test_worker_cost_model_prefill_of_uncached_tokens_queue_and_slots(sim) -> None:
    cost = sim.CostModel(slots=1, overhead_ms=10, prefill_ms_per_token=0.5, decode_ms_per_token=2, cache_tokens=1600)
    worker = sim.Worker(cost, block_tokens=16)
    conv = _conversation(sim, [320, 480], [32, 32], blocks=100)
    first = sim.Request(conv, 0, arrival_s=0.0)
    done = worker.start(first, 0.0)
    assert first.cached_tokens == 0
    assert first.ttft_s == pytest.approx((10 + 320 * 0.5) / 1e3)
    assert done == pytest.approx(first.ttft_s + 32 * 2 / 1e3)
    assert worker.free_slots == 0
    worker.free_slots += 1
    worker.cache.insert(first.full_hashes)  # the reply's KV is kept (the simulation does this at completion)
    second = sim.Request(conv, 1, arrival_s=done - 0.05)  # arrived while the first ran: waited 50 ms for a slot
    worker.start(second, done)
    assert second.cached_tokens == (320 + 32) // 16 * 16
    assert second.ttft_s == pytest.approx(0.05 + (10 + (480 - second.cached_tokens) * 0.5) / 1e3)


def test_fully_cached_prompt_still_computes_its_last_token(sim) -> None:
    worker = sim.Worker(sim.CostModel(), block_tokens=16)
    conv = _conversation(sim, [64], [16], blocks=10)
    worker.cache.insert(conv.hashes)
    req = sim.Request(conv, 0, 0.0)
    worker.start(req, 0.0)
    assert req.cached_tokens == 63


def test_block_lru_evicts_a_prompts_tail_before_its_head(sim) -> None:
    lru = sim.BlockLRU(capacity_blocks=4)
    lru.insert([1, 2, 3])
    lru.insert([9, 8])  # another prompt: 2 of the first one's blocks must go, deepest first
    assert len(lru) == 4
    assert lru.match([1, 2, 3]) == 2
    assert lru.match([9, 8]) == 2
    oracle = sim.UnboundedCache()
    oracle.insert([1, 2, 3])
    oracle.insert([9, 8])
    assert oracle.match([1, 2, 3, 4]) == 3


def test_rendezvous_hashing_is_stable_and_moves_few_keys(sim) -> None:
    keys = [b"app/%d" % i for i in range(2000)]
    four = [sim.rendezvous(k, 4) for k in keys]
    assert four == [sim.rendezvous(k, 4) for k in keys]
    counts = [four.count(b) for b in range(4)]
    assert min(counts) > 400  # about 500 each
    five = [sim.rendezvous(k, 5) for k in keys]
    moved = sum(a != b for a, b in zip(four, five, strict=True))
    assert moved == five.count(4)  # only keys that now land on the new replica move
    assert 300 < moved < 500


def test_load_balancer_modes(sim) -> None:
    workload = sim.build_workload(8, sim.WorkloadSpec(requests_per_worker=20), sim.CostModel(), Tokenization(), 3)
    convs = workload.conversations
    same_app = [c for c in convs if c.app == convs[0].app]
    prefix = sim.LoadBalancer(sim.Balancing.PREFIX, 4, workload.app_keys, 3)
    assert len({prefix.pick(c) for c in same_app}) == 1
    conversation = sim.LoadBalancer(sim.Balancing.CONVERSATION, 4, workload.app_keys, 3)
    assert all(conversation.pick(c) == conversation.pick(c) for c in convs)
    assert len({conversation.pick(c) for c in same_app}) > 1
    random_lb = sim.LoadBalancer(sim.Balancing.RANDOM, 4, workload.app_keys, 3)
    assert len({random_lb.pick(convs[0]) for _ in range(50)}) == 4
    assert sim.LoadBalancer(sim.Balancing.RANDOM, 1, workload.app_keys, 3).pick(convs[0]) == 0


def test_workload_is_shared_prefix_multi_turn_at_the_requested_load(sim) -> None:
    spec = sim.WorkloadSpec(requests_per_worker=40)
    cost = sim.CostModel()
    workload = sim.build_workload(8, spec, cost, Tokenization(), 5)
    assert workload.requests >= 8 * 40
    convs = workload.conversations
    assert sum(len(c.prompt_tokens) for c in convs) == workload.requests
    assert max(len(c.prompt_tokens) for c in convs) > 1
    for c in convs:
        assert c.prompt_blocks == sorted(c.prompt_blocks)  # each turn's prompt extends the previous one
        assert all(p < f for p, f in zip(c.prompt_blocks, c.full_blocks, strict=True))
        assert len(c.hashes) == c.full_blocks[-1]
    # conversations of one app share the system prompt's blocks; Zipf: the first app is the most popular
    apps = [c.app for c in convs]
    assert apps.count(0) == max(apps.count(a) for a in set(apps))
    a, b = [c for c in convs if c.app == 0][:2]
    assert a.hashes[:10] == b.hashes[:10] and a.hashes[-1] != b.hashes[-1]
    # the arrival rate offers `load` prefill utilisation per worker if nothing were cached
    miss = sum(cost.prefill_s(t) for c in convs for t in c.prompt_tokens) / workload.requests
    assert workload.rate * miss / 8 == pytest.approx(spec.load)


def test_gateway_replica_uses_the_gateway_router_with_its_defaults(sim) -> None:
    replica = sim.GatewayReplica(["a", "b"], Policy.PREFIX, 100, clock=lambda: 0.0, seed=5)
    assert isinstance(replica.router, Router)
    assert replica.router.min_blocks == 4  # min_prefix_tokens 64 / block_tokens 16
    assert replica.router.seed == 5
    replica.set_load(1, 2)
    assert [c.load for c in replica.candidates] == [0, 2]


def test_cli_prints_tables_and_writes_json(sim, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "figures.json"
    sim.main(["--workers", "8", "--gateways", "1", "2", "--requests-per-worker", "20", "--jobs", "1"]
             + ["--markdown", "--json", str(out)])  # fmt: skip
    text = capsys.readouterr().out
    assert "| workers | gateways | LB | index | policy | hit rate |" in text
    assert "Hit rate × oracle, LB conversation" in text
    data = json.loads(out.read_text())
    assert [(f["gateways"], f["lb"], f["index"], f["policy"]) for f in data["figures"]] == [
        (1, "-", "-", "round_robin"),
        (1, "-", "-", "prefix"),
        (2, "random", "own", "prefix"),
        (2, "conversation", "own", "prefix"),
        (2, "prefix", "own", "prefix"),
        (2, "random", "shared", "prefix"),
    ]
    with pytest.raises(SystemExit) as exc:
        sim.main(["--workers", "0"])
    assert exc.value.code == 2
