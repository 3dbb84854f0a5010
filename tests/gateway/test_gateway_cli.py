"""`llmpath gateway` on the command line: refusing unsafe or broken setups, hashing keys, checking configs,
and serving from flags alone (passthrough route, OpenAI-compatible backend kind, round robin)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from llmpath.gateway.config import hash_key


def run(llmpath_bin: str, *args: str, input: str | None = None, env: dict[str, str] | None = None):
    return subprocess.run(
        [llmpath_bin, "gateway", *args], capture_output=True, text=True, input=input, timeout=60, env=env
    )


def test_serve_refuses_to_start_without_keys(llmpath_bin: str) -> None:
    result = run(llmpath_bin, "serve", "--backend", "http://127.0.0.1:9")
    assert result.returncode == 2
    assert "no API keys configured" in result.stderr and "--insecure-no-auth" in result.stderr


def test_serve_exits_non_zero_when_the_port_is_taken(llmpath_bin: str) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = run(llmpath_bin, "serve", "--port", port, "--backend", "http://127.0.0.1:9", "--api-key", "sk-x")
    assert result.returncode == 3 and "address already in use" in result.stderr


def test_serve_takes_only_logging_levels(llmpath_bin: str) -> None:
    """uvicorn's "trace" is no Python logging level: refused as a bad option (it crashed at start before)."""
    result = run(llmpath_bin, "serve", "--log-level", "trace", "--backend", "http://127.0.0.1:9", "--api-key", "sk-x")
    assert result.returncode == 2 and "'trace' is not one of" in result.stderr


def test_serve_refuses_without_backends(llmpath_bin: str) -> None:
    result = run(llmpath_bin, "serve", "--api-key", "sk-x")
    assert result.returncode == 2 and "no backends" in result.stderr


def test_bad_config_names_file_field_and_line(llmpath_bin: str, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text("backends:\n  - url: http://127.0.0.1:1\n    wieght: 2\nrouting: {policy: fastest}\n")
    for args in (["serve", "--config", str(path), "--insecure-no-auth"], ["check-config", str(path)]):
        result = run(llmpath_bin, *args)
        assert result.returncode == 2
        assert f"{path}: invalid configuration (2 problem(s))" in result.stderr
        assert "backends[0].wieght (line 3): unknown field" in result.stderr
        assert "routing.policy (line 4)" in result.stderr


def test_chat_template_problems_are_config_errors_in_check_config_and_serve(llmpath_bin: str, tmp_path: Path) -> None:
    """A misspelt name and a Jinja syntax error: exit code 2 with the field and line, no traceback, from both."""
    path = tmp_path / "gw.yaml"
    head = f"backends: [{{url: 'http://127.0.0.1:9'}}]\napi_keys: [{{sha256: {hash_key('k')}, tenant: t}}]\n"
    cases = {
        "chatML": "tokenizer.chat_template (line 3): unknown chat template 'chatML'; did you mean 'chatml'?",
        "'{% for m in messages %}{{ m.content }'": "tokenizer.chat_template (line 3): Jinja syntax error at line 1",
    }
    for value, expected in cases.items():
        path.write_text(f"{head}tokenizer: {{chat_template: {value}}}\n")
        for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
            result = run(llmpath_bin, *args)
            assert result.returncode == 2, (args, result.stderr)
            assert f"error: {path}: invalid configuration (1 problem(s)):" in result.stderr
            assert expected in result.stderr and "Traceback" not in result.stderr


def test_runaway_templates_are_config_errors_in_check_config_and_serve(llmpath_bin: str, tmp_path: Path) -> None:
    """Templates that would run for hours (nested ranges) or take all the memory (a billion characters) are
    rendered once at load within their render budget: exit code 2 naming the file, each field, its line and the
    limit, at once and without a traceback, from both."""
    path = tmp_path / "gw.yaml"
    path.write_text(
        f"backends: [{{url: 'http://127.0.0.1:9'}}]\napi_keys: [{{sha256: {hash_key('k')}, tenant: t}}]\n"
        "routes:\n"
        "  - name: loops\n"
        "    system_prompt: '{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}'\n"
        "  - name: memory\n"
        "    system_prompt: \"{{ 'x' * 10**9 }}\"\n"
        "tokenizer: {chat_template: \"{% for m in messages %}{{ m['content'] * 10**9 }}{% endfor %}\"}\n"
    )
    budget = "template exceeded its render budget"
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = run(llmpath_bin, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.splitlines() == [
            f"error: {path}: invalid configuration (3 problem(s)):",
            "  tokenizer.chat_template (line 8): the template fails to render a single user message: "
            f"{budget} (32,000,088 characters of output and of the strings and lists it builds)",
            f"  routes[0].system_prompt (line 5): {budget} (1,000,000 steps: loop iterations, range() items, lookups, "
            "operators, filters and calls) at line 1 of the template",
            f"  routes[1].system_prompt (line 7): {budget} (32,000,000 characters of output and of the strings and "
            "lists it builds) at line 1 of the template",
        ]


def test_check_config_reports_what_serve_would_refuse(llmpath_bin: str, tmp_path: Path) -> None:
    """No backends and no keys: serve refuses to start, so check-config fails too, unless the same flags or
    environment that serve would get supply them."""
    path = tmp_path / "gw.yaml"
    path.write_text("listen: {port: 9000}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPATH_GATEWAY_")}
    for args in (["check-config", str(path)], ["serve", "--config", str(path)]):
        result = run(llmpath_bin, *args, env=env)
        assert result.returncode == 2
        assert result.stderr.splitlines() == [
            f"error: {path}: no API keys configured: add `api_keys` to the config, pass --api-key KEY (or "
            "LLMPATH_GATEWAY_API_KEYS), or pass --insecure-no-auth to serve without authentication",
            f"error: {path}: no backends: add `backends` to the config or pass --backend URL",
        ]
    result = run(
        llmpath_bin,
        *("check-config", str(path), "--backend", "http://127.0.0.1:9"),
        env={**env, "LLMPATH_GATEWAY_API_KEYS": "sk-a sk-b", "LLMPATH_GATEWAY_ADMIN_KEYS": "sk-c"},
    )
    assert result.returncode == 0, result.stderr
    assert "127.0.0.1:9 (sglang)" in result.stdout and "3 (1 admin)" in result.stdout
    result = run(llmpath_bin, "check-config", str(path), "--backend", "http://127.0.0.1:9", "--insecure-no-auth")
    assert result.returncode == 0 and "api keys    0 (0 admin)" in result.stdout


def test_serve_refuses_bad_listen_addresses_and_keys_before_starting(llmpath_bin: str, tmp_path: Path) -> None:
    """An empty --host listened on every interface; an empty or space-padded key (no request can send it: the
    gateway strips the header's value) served a gateway nobody could use; a backend's unset key variable sent no key.
    Each is refused with exit code 2 and the reason, before anything starts, never echoing the key."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPATH_GATEWAY_") and k != "NO_SUCH_KEY_VAR"}
    backend = ("--backend", "http://127.0.0.1:9")
    cases: list[tuple[list[str], str]] = [
        (["serve", "--host", "", "--port", "0", *backend, "--api-key", "sk-x"], "listen.host: "),
        (["serve", "--host", "not a host", "--port", "0", *backend, "--api-key", "sk-x"], "listen.host: "),
        (["serve", "--port", "70000", *backend, "--api-key", "sk-x"], "listen.port: "),
        (["serve", "--port", "0", *backend, "--api-key", ""], "--api-key: an empty key"),
        (["serve", "--port", "0", *backend, "--api-key", " sk-padded "], "--api-key: an empty key, or one with spaces"),
        (["check-config", str(tmp_path / "gw.yaml"), "--admin-key", "sk-y\t"], "--admin-key: an empty key"),
        (["check-config", str(tmp_path / "gw.yaml")], "backends[0].api_key_env: the environment variable "
         "NO_SUCH_KEY_VAR is not set (or empty): the backend 127.0.0.1:1 would get no key"),
    ]  # fmt: skip
    (tmp_path / "gw.yaml").write_text(
        "backends: [{url: 'http://127.0.0.1:1', kind: openai, api_key_env: NO_SUCH_KEY_VAR}]\ninsecure_no_auth: true\n"
    )
    for args, expected in cases:
        result = run(llmpath_bin, *args, env=env)
        assert result.returncode == 2, (args, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, (args, result.stderr)
        assert "sk-padded" not in result.stderr
    result = run(llmpath_bin, "check-config", str(tmp_path / "gw.yaml"), env={**env, "NO_SUCH_KEY_VAR": "sk-up"})
    assert result.returncode == 0, result.stderr


def test_a_config_that_is_no_utf8_text_or_no_file(llmpath_bin: str, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(b"backends:\n  - url: 'http://127.0.0.1:1'\n    name: caf\xe9\n")
    for args in (["check-config", str(path)], ["serve", "--config", str(path), "--insecure-no-auth"]):
        result = run(llmpath_bin, *args)
        assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr == f"error: {path}: not UTF-8 text (line 3: byte 0xe9)\n"
    result = run(llmpath_bin, "check-config", str(tmp_path))
    assert result.returncode == 2 and result.stderr == f"error: {tmp_path}: cannot read: Is a directory\n"


def test_check_config_summarises(llmpath_bin: str, tmp_path: Path) -> None:
    path = tmp_path / "gw.yaml"
    path.write_text(
        "backends: [{url: 'http://127.0.0.1:1', name: a}]\n"
        "routes: [{name: chat, system_prompt: 'Hi {{ tenant }}'}]\n"
        f"api_keys: [{{sha256: {hash_key('k')}, tenant: t, admin: true, tokens: {{tokens_per_minute: 1000}}}}]\n"
        "limits: {max_concurrency: 8, max_queue: 4, tenant_rate: {requests_per_second: 2, burst: 5}}\n"
        "listen: {drain_s: 45}\n"
    )
    result = run(llmpath_bin, "check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout and "a (sglang)" in result.stdout and "chat" in result.stdout
    assert "1 (1 admin)" in result.stdout
    admission = next(line for line in result.stdout.splitlines() if line.strip().startswith("admission"))
    assert admission.split(None, 1)[1] == (
        "8 concurrent, queue 4 for 30 s; per tenant 2 requests/s (burst 5); no token budget; "
        "1 key(s) with their own limits"
    )
    assert "drains for 45 s" in result.stdout
    stages = next(line for line in result.stdout.splitlines() if line.strip().startswith("stages"))
    assert "auth → gateway" in stages and "route → platform" in stages and "(built-in catalog)" in stages
    (tmp_path / "stages.toml").write_text('[owners]\nroute = "traffic"\n')
    path.write_text(path.read_text() + "stage_catalog: stages.toml\n")
    result = run(llmpath_bin, "check-config", str(path))
    stages = next(line for line in result.stdout.splitlines() if line.strip().startswith("stages"))
    assert "route → traffic" in stages and f"({tmp_path / 'stages.toml'})" in stages
    path.write_text("routes: [{name: chat, system_prompt: '{% if %}'}]\n")
    result = run(llmpath_bin, "check-config", str(path))
    assert result.returncode == 2 and "template syntax error" in result.stderr


def test_hash_key_reads_stdin(llmpath_bin: str) -> None:
    result = run(llmpath_bin, "hash-key", input="sk-secret\n")
    assert result.returncode == 0 and result.stdout.strip() == hash_key("sk-secret")
    assert run(llmpath_bin, "hash-key", input="\n").returncode == 2
    for spaced in (run(llmpath_bin, "hash-key", input="sk-secret \n"), run(llmpath_bin, "hash-key", " sk-secret")):
        assert spaced.returncode == 2 and spaced.stdout == ""  # its hash was printed: a key no request can send
        assert spaced.stderr == "error: the key has spaces around it, which no request can send\n"


@pytest.mark.slow
def test_serve_from_flags_with_an_openai_backend(llmpath_bin: str, processes, free_port) -> None:
    """No config file: keys from the environment, the engine's OpenAI endpoints as an ``openai`` backend."""
    engine_port, port = free_port(), free_port()
    processes.spawn(
        "engine",
        [llmpath_bin, "engine", "serve", "--preset", "tiny", "--threads", "1", "--port", str(engine_port)],
        ready_url=f"http://127.0.0.1:{engine_port}/health",
    )
    cmd = [
        llmpath_bin, "gateway", "serve", "--port", str(port), "--backend", f"http://127.0.0.1:{engine_port}",
        "--backend-kind", "openai", "--policy", "round_robin",
    ]  # fmt: skip
    env = {"LLMPATH_GATEWAY_API_KEYS": "sk-one sk-two", "LLMPATH_GATEWAY_ADMIN_KEYS": "sk-root"}
    processes.spawn("gateway", cmd, ready_url=f"http://127.0.0.1:{port}/readyz", env=env)
    url = f"http://127.0.0.1:{port}"
    messages = [{"role": "user", "content": "hi"}]
    body = {"model": "anything-goes", "messages": messages, "max_tokens": 3, "ignore_eos": True}
    for key in ("sk-one", "sk-two"):
        resp = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["model"] == "anything-goes" and resp.json()["usage"]["completion_tokens"] == 3
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer sk-one"}).json()
    assert [m["id"] for m in models["data"]] == ["default"]
    records = httpx.get(f"{url}/debug/requests.json", headers={"Authorization": "Bearer sk-root"}).json()
    rec = records["requests"][0]
    assert rec["tenant"] == "default" and rec["route"] == "default" and rec["model"] == "anything-goes"
    assert rec["extra"]["routing_reason"] == "round_robin"
    prefill = next(s for s in rec["stages"] if s["name"] == "prefill")
    assert prefill["source"] == "gateway"  # an OpenAI-compatible server reports no stage timings

    # a hang-up mid-stream: the prompt count comes only with the final chunk, so the gateway's estimate is recorded
    long = {**body, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=long, headers={"Authorization": "Bearer sk-one"}) as r:
        request_id = r.headers["x-request-id"]
        next(line for line in r.iter_lines() if line.startswith("data: "))
    deadline = time.monotonic() + 10
    while not (found := [x for x in _records(url) if x["request_id"] == request_id]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    cut = found[0]
    assert cut["status_code"] == 499 and cut["extra"]["usage_partial"] is True
    assert cut["extra"]["input_tokens_estimated"] is True and cut["input_tokens"] > 0
    assert 1 <= cut["output_tokens"] < 400


@pytest.mark.parametrize("log_format", ["json", "text"])
def test_serve_logs_carry_the_request_id_and_trace_id(llmpath_bin: str, processes, free_port, log_format: str) -> None:
    """Every line the gateway writes while serving a request names it (the id in ``x-request-id`` and the ledger,
    the trace id); ``--log-format json`` makes every line a JSON object, uvicorn's access lines included."""
    port = free_port()
    cmd = [
        llmpath_bin, "gateway", "serve", "--port", str(port), "--backend", f"http://127.0.0.1:{free_port()}",
        "--api-key", "sk-one", "--access-log", "--log-format", log_format,
    ]  # fmt: skip
    gateway = processes.spawn("gateway", cmd, ready_url=f"http://127.0.0.1:{port}/healthz")
    trace_id = "0af7651916cd43dd8448eb211c80319c"
    resp = httpx.post(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        json={"model": "m", "messages": [{"role": "user", "content": "a prompt that is never logged"}]},
        headers={"Authorization": "Bearer sk-one", "traceparent": f"00-{trace_id}-b7ad6b7169203331-01"},
    )
    assert resp.status_code == 503  # the backend's port is closed: failed its first probe, never used
    request_id = resp.headers["x-request-id"]
    # A client's mistakes: a key in the URL, as a value or alone; and a name that would decode to a forged line.
    url = f"http://127.0.0.1:{port}/v1/models?api_key=sk-in-the-url&limit=1&sk-alone-in-the-url&x%0AFORGED=1"
    assert httpx.get(url).status_code == 401
    deadline = time.monotonic() + 10
    while request_id not in (text := gateway.log_path.read_text()):
        assert time.monotonic() < deadline, text
        time.sleep(0.05)
    assert "a prompt that is never logged" not in text and "sk-one" not in text and "-in-the-url" not in text
    assert "GET /v1/models?api_key=***&limit=***&***&x%0AFORGED=*** HTTP/1.1" in text  # names stay, for on-call
    assert not any(line.startswith("FORGED") for line in text.splitlines())
    if log_format == "text":
        assert f'"POST /v1/chat/completions HTTP/1.1" 503 request_id={request_id} trace_id={trace_id}' in text, text
        assert "failed its first health check" in text
        return
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]  # every line is JSON
    [access] = [x for x in lines if x.get("request_id") == request_id]
    assert access["logger"] == "uvicorn.access" and access["level"] == "INFO"
    assert (access["method"], access["path"], access["status"], access["trace_id"]) == (
        "POST", "/v1/chat/completions", 503, trace_id,
    )  # fmt: skip
    [probe] = [x for x in lines if "failed its first health check" in x["message"]]
    assert probe["level"] == "WARNING" and "request_id" not in probe and probe["time"].endswith("+00:00")


def _records(url: str) -> list[dict]:
    return httpx.get(f"{url}/debug/requests.json", headers={"Authorization": "Bearer sk-root"}).json()["requests"]
