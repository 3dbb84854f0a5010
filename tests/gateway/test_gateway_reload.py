"""Configuration reload (``POST /admin/reload`` and ``SIGHUP``) on a real gateway process in front of a real engine:
keys, limits and routes change without a restart or a dropped stream; other sections are reported as needing a
restart; a bad file changes nothing."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from llmpath.gateway.config import hash_key

pytestmark = pytest.mark.slow

NEW_KEY = "sk-rotated-9c1e5a7b3d2f"


@pytest.fixture(scope="module")
def engines(stack) -> list:
    """Two engines for the module, started together; fault injection on (the drain test slows decoding down)."""
    return stack.start_engines(2, "--enable-fault-injection")


@pytest.fixture
def gw(stack, keys, engines):
    """A fresh gateway per test (each one rewrites its configuration file)."""
    engine = engines[0]
    config = {
        "backends": [{"url": engine.url, "name": engine.name}],
        "routes": [{"name": "chat", "model": "chat"}],
        "tokenizer": {"chars_per_token": 1},
        "api_keys": keys.config(),
        "limits": {"max_tokens": 64, "default_max_tokens": 16},
    }
    gateway = stack.start_gateway(f"reload-{time.monotonic_ns()}", config)
    yield gateway
    gateway.proc.terminate()
    gateway.proc.wait(timeout=20)


def config_path(gw) -> Path:
    return Path(next(arg for arg in gw.proc.args if str(arg).endswith(".yaml")))


def rewrite(gw, **changes: Any) -> dict[str, Any]:
    """Write the gateway's configuration file again with ``changes`` (top-level sections) applied."""
    path = config_path(gw)
    config = {**yaml.safe_load(path.read_text()), **changes}
    path.write_text(yaml.safe_dump(config))
    return config


def chat(gw, key: str, model: str = "chat", **extra: Any) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "Reload drill."}], "max_tokens": 3, **extra}
    return httpx.post(f"{gw.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"},
                      timeout=30)  # fmt: skip


def reload(gw, key: str) -> httpx.Response:
    return httpx.post(f"{gw.url}/admin/reload", headers={"Authorization": f"Bearer {key}"}, timeout=30)


def long_stream(gw, key: str, streamed: list[str]) -> threading.Thread:
    """A thread streaming 60 tokens through ``gw``, its ``data:`` lines collected into ``streamed``."""

    def run() -> None:
        body = {"model": "chat", "messages": [{"role": "user", "content": "Stream through the reload."}],
                "max_tokens": 60, "ignore_eos": True, "stream": True}  # fmt: skip
        with httpx.stream("POST", f"{gw.url}/v1/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {key}"}, timeout=60) as resp:  # fmt: skip
            streamed.extend(line for line in resp.iter_lines() if line.startswith("data: "))

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def test_keys_limits_and_routes_change_without_a_restart_or_a_dropped_stream(gw, keys) -> None:
    pid = gw.proc.pid
    streamed: list[str] = []
    stream = long_stream(gw, keys.other, streamed)
    time.sleep(0.2)
    api_keys = [k for k in keys.config() if k["tenant"] != "beta"] + [{"sha256": hash_key(NEW_KEY), "tenant": "new"}]
    rewrite(
        gw,
        api_keys=api_keys,
        routes=[{"name": "chat", "model": "chat"}, {"name": "brief", "model": "brief", "system_prompt": "Be brief."}],
        limits={"max_tokens": 16, "default_max_tokens": 16},
    )
    resp = reload(gw, keys.admin)
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"applied": ["routes", "api_keys", "limits"], "restart_required": []}

    stream.join(timeout=60)
    assert streamed[-1] == "data: [DONE]" and len(streamed) > 10  # the stream that began before the reload
    assert chat(gw, keys.other).status_code == 401  # its key was removed
    assert chat(gw, NEW_KEY, model="brief").status_code == 200  # a new key on a new route
    too_long = chat(gw, NEW_KEY, max_tokens=32)
    assert too_long.status_code == 422 and too_long.json()["error"]["param"] == "max_tokens"  # the new limit
    chat_schema = httpx.get(f"{gw.url}/openapi.json").json()["components"]["schemas"]["ChatCompletionRequest"]
    assert chat_schema["properties"]["model"]["enum"] == ["chat", "brief"]  # the schema documents the new config
    maxima = [b.get("maximum") for b in chat_schema["properties"]["max_tokens"]["anyOf"] if b["type"] == "integer"]
    assert maxima == [16]
    assert gw.proc.pid == pid and gw.proc.poll() is None
    metrics = gw.metrics()
    assert metrics['llmpath_gateway_config_reloads_total{result="success"}'] == 1
    assert metrics["llmpath_gateway_config_last_reload_successful"] == 1


def test_sighup_reloads_and_a_bad_file_changes_nothing(gw, keys) -> None:
    rewrite(gw, api_keys=[*keys.config(), {"sha256": hash_key(NEW_KEY), "tenant": "new"}])
    os.kill(gw.proc.pid, signal.SIGHUP)
    deadline = time.monotonic() + 10
    while chat(gw, NEW_KEY).status_code != 200:
        assert time.monotonic() < deadline, "SIGHUP did not apply the new key"
        time.sleep(0.1)

    good = config_path(gw).read_text()
    rewrite(gw, limits={"max_concurrency": 0})
    resp = reload(gw, keys.admin)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["code"] == "reload_failed" and "limits.max_concurrency" in error["message"]
    config_path(gw).write_text("api_keys: [unclosed\n")
    os.kill(gw.proc.pid, signal.SIGHUP)  # a bad file on SIGHUP: logged and counted, the process keeps serving
    time.sleep(0.5)
    assert gw.proc.poll() is None
    assert chat(gw, NEW_KEY).status_code == 200 and chat(gw, keys.user).status_code == 200
    metrics = gw.metrics()
    assert metrics['llmpath_gateway_config_reloads_total{result="success"}'] == 1
    assert metrics['llmpath_gateway_config_reloads_total{result="failure"}'] == 2
    assert metrics["llmpath_gateway_config_last_reload_successful"] == 0
    assert "configuration reload (SIGHUP) failed" in gw.log.read_text()

    config_path(gw).write_text(good)
    assert reload(gw, keys.admin).status_code == 200
    assert gw.metrics()["llmpath_gateway_config_last_reload_successful"] == 1


def test_other_sections_are_reported_not_applied(gw, keys, engines) -> None:
    engine = engines[0]
    limits = {"max_tokens": 64, "default_max_tokens": 16, "timeouts": {"read_s": 30}}
    config = rewrite(gw, routing={"policy": "round_robin"}, debug={"waterfall_requests": 5}, limits=limits)
    resp = reload(gw, keys.admin)
    assert resp.status_code == 200
    # The backend clients keep the read timeout they were built with: limits otherwise unchanged, nothing applied.
    assert resp.json() == {"applied": [], "restart_required": ["routing", "debug", "limits.timeouts.read_s"]}

    # A route may only name a running backend.
    rewrite(gw, backends=[*config["backends"], {"url": "http://127.0.0.1:9", "name": "spare"}],
            routes=[{"name": "chat", "model": "chat", "backends": ["spare"]}])  # fmt: skip
    resp = reload(gw, keys.admin)
    assert resp.status_code == 400
    assert "routes[0].backends: spare not among the running backends" in resp.json()["error"]["message"]
    assert chat(gw, keys.user).status_code == 200  # still routed to the running engine
    assert httpx.get(f"{engine.url}/health").status_code == 200


def test_reload_is_for_admins_and_needs_a_file(gw, keys, llmpath_bin, processes, free_port) -> None:
    assert reload(gw, keys.user).status_code == 403
    assert httpx.post(f"{gw.url}/admin/reload").status_code == 401

    port = free_port()
    cmd = [llmpath_bin, "gateway", "serve", "--port", str(port), "--backend", gw.config["backends"][0]["url"],
           "--admin-key", keys.admin]  # fmt: skip
    flags_only = processes.spawn("flags-only", cmd, ready_url=f"http://127.0.0.1:{port}/readyz", timeout=60)
    url = f"http://127.0.0.1:{port}"
    resp = httpx.post(f"{url}/admin/reload", headers=keys.auth(keys.admin))
    assert resp.status_code == 400
    assert "started without --config" in json.dumps(resp.json())
    # Without a file nothing is reloaded: logged, never counted (a logrotate SIGHUP must not trip the alert).
    flags_only.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "SIGHUP: no configuration file to reload" not in flags_only.log_path.read_text():
        assert time.monotonic() < deadline, "SIGHUP was not logged"
        time.sleep(0.1)
    assert not _sample(url, 'llmpath_gateway_config_reloads_total{result="failure"}')
    assert _sample(url, "llmpath_gateway_config_last_reload_successful") == 1
    assert flags_only.popen.poll() is None
    assert "configuration reload (POST /admin/reload) refused: the gateway was started without --config" in (
        flags_only.log_path.read_text()
    )


def _sample(url: str, series: str) -> float:
    """One sample of the gateway's /metrics."""
    text = httpx.get(f"{url}/metrics").text
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(series + " "))


def test_sighup_reopens_the_usage_ledger_after_logrotate_moved_it(stack, keys, engines) -> None:
    engine = engines[0]
    ledger = stack.tmp / f"rotated-{time.monotonic_ns()}.jsonl"
    config = {"backends": [{"url": engine.url, "name": engine.name}], "api_keys": keys.config(),
              "usage": {"ledger": str(ledger)}}  # fmt: skip
    gw = stack.start_gateway(f"ledger-{time.monotonic_ns()}", config)
    try:
        assert chat(gw, keys.user, model="tiny").status_code == 200
        moved = ledger.with_name(ledger.name + ".1")
        ledger.rename(moved)  # logrotate's rename; without a reopen the gateway would keep writing to `moved`
        os.kill(gw.proc.pid, signal.SIGHUP)
        time.sleep(0.3)
        assert chat(gw, keys.user, model="tiny").status_code == 200
        deadline = time.monotonic() + 5
        while not ledger.exists() or not ledger.read_text().endswith("\n"):
            assert time.monotonic() < deadline, "no new ledger file after SIGHUP"
            time.sleep(0.05)
        assert len(moved.read_text().splitlines()) == 1 and len(ledger.read_text().splitlines()) == 1
        assert "usage ledger reopened (SIGHUP)" in gw.log.read_text()
    finally:
        gw.proc.terminate()
        gw.proc.wait(timeout=20)


def test_a_backend_is_drained_by_leaving_it_out_of_the_routes(stack, keys, engines) -> None:
    """The runbooks' "drain a backend": a reload that leaves a backend out of ``routes[].backends`` sends it no new
    request, while a stream already running there finishes."""
    config = {"backends": [{"url": e.url, "name": e.name} for e in engines],
              "routes": [{"name": "chat", "model": "chat"}], "routing": {"policy": "round_robin"},
              "tokenizer": {"chars_per_token": 1}, "api_keys": keys.config(),
              "limits": {"max_tokens": 64, "default_max_tokens": 16}}  # fmt: skip
    gw = stack.start_gateway(f"drain-{time.monotonic_ns()}", config)

    def decisions() -> dict[str, float]:
        metrics = gw.metrics()
        return {e.name: sum(v for k, v in metrics.items() if k.startswith("llmpath_route_decisions_total{")
                            and f'backend="{e.name}"' in k) for e in engines}  # fmt: skip

    try:
        streamed: list[str] = []
        for engine in engines:  # about 20 ms per token: the stream runs through the reload
            httpx.post(f"{engine.url}/debug/fault", json={"decode_slowdown": 20}).raise_for_status()
        stream = long_stream(gw, keys.user, streamed)
        deadline = time.monotonic() + 10
        while not any(decisions().values()):
            assert time.monotonic() < deadline, "the stream was not routed"
            time.sleep(0.02)
        drained = next(name for name, n in decisions().items() if n)
        kept = next(e.name for e in engines if e.name != drained)
        rewrite(gw, routes=[{"name": "chat", "model": "chat", "backends": [kept]}])
        resp = reload(gw, keys.admin)
        assert stream.is_alive()
        for engine in engines:
            httpx.delete(f"{engine.url}/debug/fault").raise_for_status()
        assert resp.status_code == 200, resp.text
        assert resp.json() == {"applied": ["routes"], "restart_required": []}

        before = decisions()
        assert all(chat(gw, keys.user).status_code == 200 for _ in range(6))
        after = decisions()
        assert after[drained] == before[drained] and after[kept] == before[kept] + 6
        stream.join(timeout=60)
        assert streamed[-1] == "data: [DONE]" and len(streamed) > 10  # the drained backend's stream finished
    finally:
        for engine in engines:
            httpx.delete(f"{engine.url}/debug/fault")
        gw.proc.terminate()
        gw.proc.wait(timeout=20)
