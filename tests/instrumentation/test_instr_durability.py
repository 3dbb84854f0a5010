"""Usage-ledger durability: SIGKILL the server under concurrent load; every completed response is in the ledger."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import sys
from pathlib import Path

import httpx
import pytest

from llmpath.instrumentation import read_jsonl

APP_DIR = Path(__file__).parent / "apps"
CONCURRENCY = 16


async def load(base: str, completed: list[str], failures: list[str], stop: asyncio.Event) -> None:
    limits = httpx.Limits(max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=5, limits=limits) as client:

        async def worker(n: int) -> None:
            while not stop.is_set():
                try:
                    r = await client.post(f"{base}/v1/chat/completions", json={"delay": 0.002, "tenant": f"t{n % 4}"})
                    body = r.json()  # the whole response arrived
                except (httpx.HTTPError, ValueError) as exc:
                    failures.append(type(exc).__name__)
                    await asyncio.sleep(0.01)
                    continue
                if r.status_code == 200:
                    completed.append(body["request_id"])

        await asyncio.gather(*(worker(n) for n in range(CONCURRENCY)))


@pytest.mark.slow
async def test_ledger_survives_sigkill_under_load(processes, free_port, tmp_path):
    jsonl = tmp_path / "usage.jsonl"
    db = tmp_path / "usage.sqlite"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = processes.spawn(
        "ledger-server",
        [sys.executable, "-m", "uvicorn", "--app-dir", str(APP_DIR), "instr_server_app:app", "--port", str(port)],
        ready_url=f"{base}/health",
        env={"LLMPATH_TEST_JSONL": str(jsonl), "LLMPATH_TEST_SQLITE": str(db)},
    )
    completed: list[str] = []
    failures: list[str] = []
    stop = asyncio.Event()
    driver = asyncio.create_task(load(base, completed, failures, stop))
    while len(completed) < 200:
        await asyncio.sleep(0.05)
        assert not driver.done(), driver
    processes.stop(proc, sig=signal.SIGKILL)  # mid-load: requests are in flight
    killed_at = len(completed)
    await asyncio.sleep(0.3)
    stop.set()
    await asyncio.wait_for(driver, 10)
    assert proc.returncode == -signal.SIGKILL
    assert failures, "the kill should have interrupted requests in flight"
    assert len(completed) >= killed_at >= 200

    jsonl_ids = [r.request_id for r in read_jsonl(jsonl)]
    with sqlite3.connect(db) as conn:  # recovers the WAL written before the kill
        sqlite_ids = [row[0] for row in conn.execute("SELECT request_id FROM usage")]
    assert len(jsonl_ids) == len(set(jsonl_ids))
    assert len(sqlite_ids) == len(set(sqlite_ids))
    missing_jsonl = set(completed) - set(jsonl_ids)
    missing_sqlite = set(completed) - set(sqlite_ids)
    assert not missing_jsonl, f"{len(missing_jsonl)} completed responses missing from the JSONL ledger"
    assert not missing_sqlite, f"{len(missing_sqlite)} completed responses missing from the SQLite ledger"
