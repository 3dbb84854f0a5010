"""The instrumentation installs alone: only opentelemetry-api and prometheus-client come with it, and it works."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PART = Path(__file__).resolve().parents[2] / "instrumentation"
FORBIDDEN_MODULES = ["fastapi", "starlette", "torch", "grafanalib", "yaml", "opentelemetry.sdk", "httpx", "pydantic"]
FORBIDDEN_DISTS = ["fastapi", "starlette", "torch", "grafanalib", "pyyaml", "opentelemetry-sdk"]

# Runs inside the fresh venv: a bare ASGI app (no framework) instrumented with LLMPathMiddleware.
SMOKE = r"""
import asyncio, importlib.util, json, sys, tempfile
from pathlib import Path
from llmpath.instrumentation import JsonlUsageSink, LLMPathMiddleware, read_jsonl, record_usage, stage

async def app(scope, receive, send):
    with stage("auth"):
        pass
    record_usage(input_tokens=5, cached_tokens=2, output_tokens=3, model="m")
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})

ledger = Path(tempfile.mkdtemp()) / "usage.jsonl"
mw = LLMPathMiddleware(app, usage_sink=JsonlUsageSink(ledger))

async def call(path):
    sent = []
    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}
    async def send(message):
        sent.append(message)
    scope = {"type": "http", "method": "GET", "path": path, "headers": [], "query_string": b""}
    await mw(scope, receive, send)
    return sent

first = asyncio.run(call("/v1/x"))
assert first[0]["status"] == 200 and any(k == b"x-request-id" for k, _ in first[0]["headers"]), first
metrics = b"".join(m.get("body", b"") for m in asyncio.run(call("/metrics"))).decode()
assert 'llmpath_requests_total{code="200",model="m",route="/v1/x"} 1.0' in metrics, metrics
assert 'llmpath_stage_duration_seconds_count{route="/v1/x",stage="auth"} 1.0' in metrics, metrics
[rec] = list(read_jsonl(ledger))
assert (rec.input_tokens, rec.cached_tokens, rec.output_tokens, rec.trace_id) == (5, 2, 3, None), rec
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m.split(".")[0]) is None or
           (("." in m) and importlib.util.find_spec(m) is None)]
print(json.dumps({"absent": missing}))
"""


@pytest.mark.slow
def test_instrumentation_installs_alone_into_a_fresh_venv(tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = venv / "bin" / "pip"
    python = venv / "bin" / "python"
    subprocess.run(
        [str(pip), "install", "--quiet", "--disable-pip-version-check", str(PART)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    frozen = subprocess.run([str(pip), "list", "--format=freeze"], check=True, capture_output=True, text=True).stdout
    installed = {line.split("==")[0].lower().replace("_", "-") for line in frozen.splitlines() if "==" in line}
    assert {"llmpath-instrumentation", "opentelemetry-api", "prometheus-client"} <= installed
    assert not installed & set(FORBIDDEN_DISTS), installed
    # Only the two runtime dependencies and their own (small) dependencies.
    extras = installed - {"llmpath-instrumentation", "opentelemetry-api", "prometheus-client", "pip", "setuptools"}
    assert extras <= {"typing-extensions", "importlib-metadata", "zipp", "deprecated", "wrapt"}, extras

    out = subprocess.run(
        [str(python), "-c", SMOKE, *FORBIDDEN_MODULES], check=True, capture_output=True, text=True, timeout=120
    )
    absent = json.loads(out.stdout.strip().splitlines()[-1])["absent"]
    assert sorted(absent) == sorted(FORBIDDEN_MODULES), out.stdout

    # PEP 561: the installed package is typed, so a gateway's own mypy checks its calls against llmpath's signatures.
    user_code = tmp_path / "gateway_code.py"
    user_code.write_text(TYPED_USER_CODE)
    mypy = subprocess.run(
        [str(Path(sys.executable).with_name("mypy")), "--python-executable", str(python), "--no-incremental",
         "--strict", str(user_code)],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    errors = [line for line in mypy.stdout.splitlines() if ": error:" in line]
    assert len(errors) == 1, mypy.stdout
    assert (
        'gateway_code.py:9: error: Argument "output_tokens" to "record_usage" has incompatible type "str"'
        in (errors[0])
    ), mypy.stdout


# A gateway's code as its own type checker sees it: line 9 passes a str where llmpath's signature says int.
TYPED_USER_CODE = """\
from llmpath.instrumentation import LLMPathMiddleware, record_usage, stage


def handle() -> None:
    with stage("route") as scope:
        scope.set_attribute("llmpath.backend", "b1")
    record_usage(input_tokens=5, cached_tokens=2, output_tokens=3, model="m")
    middleware: LLMPathMiddleware | None = None
    record_usage(input_tokens=5, cached_tokens=2, output_tokens="3", model="m")
    print(middleware)
"""
