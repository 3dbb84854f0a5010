"""Cost from the ledger's token counts: price files (``--prices``), the figures ``summarize`` adds, and the
command line's tables and errors."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from llmpath.instrumentation import JsonlUsageSink, StageTiming, UsageRecord
from llmpath.ledger import PriceFileError, load_prices, summarize

PRICES = """
currency = "USD"

[models."llama-3-8b"]
input = 0.20
cached_input = 0.05
output = 0.60

[models."*"]
input = 1.0
output = 2.0
"""


def record(i: int, model: str, tenant: str, route: str, tokens: tuple[int, int, int], status: int = 200) -> UsageRecord:
    return UsageRecord(
        request_id=f"r{i}", trace_id=None, time=time.time(), tenant=tenant, route=route, model=model,
        input_tokens=tokens[0], cached_tokens=tokens[1], output_tokens=tokens[2],
        stages=[StageTiming("prefill", 0.0, 0.05, "backend")], ttft_s=0.05 if status == 200 else None,
        duration_s=0.1, status_code=status, unattributed_s=0.0 if status == 200 else None,
    )  # fmt: skip


RECORDS = [
    record(1, "llama-3-8b", "acme", "chat", (1_000_000, 800_000, 100_000)),
    record(2, "llama-3-8b", "globex", "rag", (2_000_000, 0, 0)),
    record(3, "mistral", "acme", "chat", (500_000, 500_000, 1_000_000), status=500),  # failed, tokens processed
]


@pytest.fixture
def prices_file(tmp_path: Path) -> Path:
    path = tmp_path / "prices.toml"
    path.write_text(PRICES)
    return path


def test_price_file_defaults_and_the_catch_all_entry(prices_file: Path) -> None:
    prices = load_prices(prices_file)
    assert prices.currency == "USD"
    llama = prices.of("llama-3-8b")
    assert llama is not None and (llama.input, llama.cached_input, llama.output) == (0.20, 0.05, 0.60)
    other = prices.of("anything-else")
    assert other is not None and other.cached_input == other.input == 1.0  # no discount unless priced


def test_summary_prices_every_request_and_what_the_cache_saved(prices_file: Path) -> None:
    cost = summarize(RECORDS, prices=load_prices(prices_file)).cost
    assert cost is not None
    # r1: 200k uncached × 0.20 + 800k cached × 0.05 + 100k output × 0.60 = 0.04 + 0.04 + 0.06 (per million)
    # r2: 2M × 0.20 = 0.40; r3 (the * price): 500k cached × 1.0 + 1M output × 2.0 = 2.5
    assert cost.total == pytest.approx(0.14 + 0.40 + 2.5)
    assert cost.cache_saving == pytest.approx(800_000 * 0.15 / 1e6)  # r3's cache had no discount
    assert [(r.name, r.requests) for r in cost.by_tenant] == [("acme", 2), ("globex", 1)]
    assert [r.cost for r in cost.by_tenant] == pytest.approx([2.64, 0.40])
    assert {r.name: r.cost for r in cost.by_route} == pytest.approx({"chat": 2.64, "rag": 0.40})
    assert {r.name: r.cost for r in cost.by_model} == pytest.approx({"mistral": 2.5, "llama-3-8b": 0.54})
    assert cost.unpriced == {}


def test_models_without_a_price_are_left_out_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "prices.toml"
    path.write_text('[models."llama-3-8b"]\ninput = 0.2\noutput = 0.6\n')
    cost = summarize(RECORDS, prices=load_prices(path)).cost
    assert cost is not None and cost.unpriced == {"mistral": 1}
    assert cost.total == pytest.approx((200_000 * 0.2 + 800_000 * 0.2 + 100_000 * 0.6 + 2_000_000 * 0.2) / 1e6)
    assert summarize(RECORDS).cost is None  # no price file, no cost


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[models.m]\ninput = 0.2\n", "models.m: missing output"),
        ("[models.m]\ninput = -1\noutput = 1\n", "models.m.input: must be a price ≥ 0 per million tokens"),
        ('[models.m]\ninput = 0.2\noutput = "1"\n', "models.m.output: must be a price"),
        ("[models.m]\ninput = 0.2\ncached_input = 0.3\noutput = 1\n", "models.m.cached_input: 0.3 is above input"),
        ("[models.m]\ninput = 0.2\noutput = 1\ncache = 0.1\n", "models.m: unknown key(s) cache"),
        ('currency = "USD"\n', "models: give at least one"),
        ("[models\n", "not valid TOML"),
    ],
)
def test_invalid_price_files_name_the_file_and_field(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "prices.toml"
    path.write_text(text)
    with pytest.raises(PriceFileError) as exc:
        load_prices(path)
    assert str(exc.value).startswith(f"{path}: ") and reason in str(exc.value)


def test_usage_summary_prints_cost_tables(llmpath_bin: str, prices_file: Path, tmp_path: Path) -> None:
    ledger = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(ledger)
    for r in RECORDS:
        sink.write(r)
    sink.close()

    def usage(*args: str | Path) -> subprocess.CompletedProcess[str]:
        cmd = [llmpath_bin, "usage", "summary", str(ledger), *map(str, args)]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})

    shown = usage("--prices", prices_file)
    assert shown.returncode == 0, shown.stderr
    assert "Cost by tenant (USD)" in shown.stdout and "Cost by route (USD)" in shown.stdout
    total_line = next(line for line in shown.stdout.splitlines() if line.split()[:1] == ["total"] and "3.04" in line)
    assert total_line.split()[1:] == ["3", "3.04", "0.1200"]
    as_json = json.loads(usage("--prices", prices_file, "--json").stdout)
    assert as_json["cost"]["total"] == pytest.approx(3.04) and as_json["cost"]["currency"] == "USD"
    assert "Cost by" not in usage().stdout

    bad = tmp_path / "bad.toml"
    bad.write_text("[models.m]\ninput = 0.2\n")
    refused = usage("--prices", bad)
    assert refused.returncode == 2 and f"--prices {bad}: models.m: missing output" in refused.stderr
