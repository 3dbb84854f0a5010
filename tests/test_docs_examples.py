"""The Python examples in the README and docs/ run as written: a newcomer copies them first.

Each test takes a fenced ``python`` block from a Markdown file and runs it for real: the README's quickstart as a
uvicorn app over loopback HTTP, the SLO plugin file through ``llmpath slo compile --plugins``, the SLO API example
in a folder with the files it names, and the gunicorn hooks as the config file gunicorn imports. (The backend
example runs against an engine in ``tests/backends/test_backends_docs_example.py``.)
"""

from __future__ import annotations

import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import yaml

from llmpath.demo.supervisor import Supervisor
from llmpath.slo import CompileResult

ROOT = Path(__file__).resolve().parent.parent
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_blocks(markdown: Path) -> list[str]:
    """The fenced ``python`` blocks of a Markdown file, in order."""
    return _BLOCK.findall(markdown.read_text(encoding="utf-8"))


def block_with(markdown: Path, needle: str) -> str:
    """The one ``python`` block of ``markdown`` that contains ``needle``."""
    found = [b for b in python_blocks(markdown) if needle in b]
    assert len(found) == 1, f"{markdown.name}: expected one python block containing {needle!r}, found {len(found)}"
    return found[0]


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of the sample ``name`` whose labels include ``labels`` (fails if there is none)."""
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line[len(name) : line.index("}") + 1]))
        if all(sample_labels.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {name}{labels} in /metrics")


@pytest.mark.slow
def test_readme_quickstart_instruments_a_fastapi_app(tmp_path: Path, processes: Supervisor, free_port) -> None:
    (tmp_path / "quickstart.py").write_text(block_with(ROOT / "README.md", "instrument_app("))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "uvicorn", "quickstart:app", "--port", str(port), "--log-level", "warning"]
    processes.spawn("quickstart", cmd, cwd=tmp_path, ready_url=f"{base}/metrics")

    with httpx.Client(base_url=base, timeout=10) as client:
        answer = client.post("/v1/chat/completions", json={"messages": []})
        assert answer.status_code == 200
        assert answer.json() == {"choices": []}
        metrics = client.get("/metrics").text

    route = "/v1/chat/completions"
    for stage in ("auth", "route", "unattributed"):
        assert metric_value(metrics, "llmpath_stage_duration_seconds_count", stage=stage, route=route) == 1
    assert metric_value(metrics, "llmpath_time_to_first_token_seconds_count", route=route, model="llama-3-8b") == 1
    tokens = {
        t: metric_value(metrics, "llmpath_tokens_total", route=route, type=t) for t in ("input", "cached", "output")
    }
    assert tokens == {"input": 812, "cached": 768, "output": 64}
    assert metric_value(metrics, "llmpath_requests_total", route=route, code="200") == 1

    (line,) = (tmp_path / "usage.jsonl").read_text().splitlines()
    record = json.loads(line)
    assert (record["input_tokens"], record["cached_tokens"], record["output_tokens"]) == (812, 768, 64)
    assert record["status_code"] == 200
    assert [s["name"] for s in record["stages"]] == ["auth", "route"]


# What the instrumentation guide's quickstart leaves to the reader (its `...`): a key check, a backend, admission.
QUICKSTART_PLACEHOLDERS = """
import asyncio

class Answer:
    prefill_seconds, prompt_tokens, cached_tokens, completion_tokens, model = 0.01, 812, 768, 64, "llama-3-8b"

    def json(self):
        return {"choices": []}

class Backend:
    name = "engine-a"

    async def complete(self, *args):
        await asyncio.sleep(0.02)
        return Answer()

class Admission:
    async def acquire(self):
        await asyncio.sleep(0.001)

def check_key(*args):
    return "acme"

def pick_backend(*args):
    return Backend()

admission = Admission()
"""


def test_instrumentation_guide_quickstart_runs_with_its_placeholders_filled(tmp_path: Path) -> None:
    block = block_with(ROOT / "docs" / "instrumentation.md", "instrument_app(app, usage_sink=")
    ledger = tmp_path / "usage.jsonl"
    assert "/var/lib/gateway/usage.jsonl" in block
    served = """
import json
import httpx

async def call():
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw") as client:
        answer = await client.post("/v1/chat/completions", json={"messages": []})
        return answer.status_code, (await client.get("/metrics")).text

status, metrics = asyncio.run(call())
print(json.dumps({"status": status, "metrics": metrics}))
"""
    program = QUICKSTART_PLACEHOLDERS + block.replace("/var/lib/gateway/usage.jsonl", str(ledger)) + served
    out = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=60, check=True)
    result = json.loads(out.stdout)
    assert result["status"] == 200
    for stage in ("auth", "route", "schedule", "prefill", "unattributed"):
        assert metric_value(result["metrics"], "llmpath_stage_duration_seconds_count", stage=stage, route="chat") == 1
    (line,) = ledger.read_text().splitlines()
    record = json.loads(line)
    assert (record["route"], record["tenant"], record["model"]) == ("chat", "acme", "llama-3-8b")
    assert (record["input_tokens"], record["cached_tokens"], record["output_tokens"]) == (812, 768, 64)
    assert [s["name"] for s in record["stages"]] == ["auth", "route", "schedule", "prefill"]
    assert record["stages"][-1]["source"] == "backend" and record["ttft_s"] is not None


def test_log_filter_example_names_the_request_in_each_line() -> None:
    """The instrumentation guide's logging set-up, then one line outside a request and one inside."""
    block = block_with(ROOT / "docs" / "instrumentation.md", "RequestLogFilter()")
    served = """
import asyncio
from llmpath.instrumentation import LLMPathMiddleware

async def app(scope, receive, send):
    logging.getLogger("gateway").warning("inside")
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

async def noop(*args):
    return {"type": "http.request", "body": b"", "more_body": False}

logging.getLogger("gateway").warning("outside")
scope = {"type": "http", "method": "GET", "path": "/x", "headers": [(b"x-request-id", b"req-42")]}
asyncio.run(LLMPathMiddleware(app)(scope, noop, noop))
"""
    out = subprocess.run([sys.executable, "-c", block + served], capture_output=True, text=True, timeout=60, check=True)
    outside, inside = out.stderr.splitlines()
    assert outside.endswith("WARNING gateway [- -] outside"), outside
    assert inside.endswith("WARNING gateway [req-42 -] inside"), inside


def test_slo_plugin_example_compiles_through_the_cli(tmp_path: Path, llmpath_bin: str) -> None:
    (tmp_path / "my_plugins.py").write_text(block_with(ROOT / "docs/slo.md", "SLI_PLUGINS"))
    spec = {
        "version": "prometheus/v1",
        "service": "api",
        "slo_plugins": {"chain": [{"id": "my/info_labels", "config": {"labels": {"tier": "gold"}}}]},
        "slos": [
            {
                "name": "availability",
                "objective": 99.9,
                "sli": {"plugin": {"id": "my_availability", "options": {"job": "api"}}},
                "alerting": {"name": "ApiAvailability"},
            }
        ],
    }
    (tmp_path / "slos.yaml").write_text(yaml.safe_dump(spec))
    out = tmp_path / "rules.yaml"
    done = subprocess.run(
        [llmpath_bin, "slo", "compile", "slos.yaml", "--plugins", "my_plugins.py", "--out", str(out)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    rules = [rule for group in yaml.safe_load(out.read_text())["groups"] for rule in group["rules"]]
    by_record = {rule.get("record"): rule for rule in rules}
    sli_5m = by_record["slo:sli_error:ratio_rate5m"]["expr"]
    assert 'http_requests_total{job="api",code=~"5.."}[5m]' in sli_5m  # the SLI plugin's query, window filled in
    assert by_record["sloth_slo_info"]["labels"]["tier"] == "gold"  # the SLO plugin ran


def test_slo_api_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from llmpath.slo import default_spec_path

    (tmp_path / "slos.yaml").write_text(Path(default_spec_path()).read_text())
    (tmp_path / "specs").mkdir()
    other = {
        "version": "prometheus/v1",
        "service": "batch-api",
        "slos": [
            {
                "name": "availability",
                "objective": 99.5,
                "sli": {
                    "events": {
                        "error_query": 'sum(rate(llmpath_requests_total{route="batch",code=~"5.."}[{{.window}}]))',
                        "total_query": 'sum(rate(llmpath_requests_total{route="batch"}[{{.window}}]))',
                    }
                },
                "alerting": {"name": "BatchAvailability"},
            }
        ],
    }
    (tmp_path / "specs" / "batch.yaml").write_text(yaml.safe_dump(other))
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(block_with(ROOT / "docs/slo.md", "compile_slos("), "docs/slo.md", "exec"), namespace)  # noqa: S102

    result = namespace["result"]
    assert isinstance(result, CompileResult)
    assert sorted(result.files) == ["batch.yaml", "slos.yaml"]  # one rule file per input, by file name
    services = {slo.service for slo in result.slos}
    assert services >= {"batch-api"} and len(services) >= 2
    assert all(slo.alerts for slo in result.slos if slo.service == "batch-api")


def test_gunicorn_hooks_example_is_a_loadable_config(tmp_path: Path) -> None:
    from llmpath.instrumentation.multiprocess import gunicorn_child_exit, gunicorn_on_starting

    config = tmp_path / "gunicorn.conf.py"
    config.write_text(block_with(ROOT / "docs/multiprocess.md", "gunicorn_child_exit"))
    hooks = runpy.run_path(str(config))  # what gunicorn does with -c gunicorn.conf.py
    assert hooks["child_exit"] is gunicorn_child_exit
    assert hooks["on_starting"] is gunicorn_on_starting


def test_the_scrape_page_of_the_deploy_guide_fires_when_no_gateway_is_scraped(tmp_path: Path, require_binary) -> None:
    """docs/deploy.md's target-down rule, run by promtool: silent while one of two gateways is up, a page 2 minutes
    after the last one goes down, and a page when the job has no target at all; and its lost-usage-records ticket."""
    promtool = require_binary("promtool")
    (block,) = [b for b in re.findall(r"^```yaml\n(.*?)^```", (ROOT / "docs/deploy.md").read_text(), re.S | re.M)
                if "LLMPathGatewayDown" in b]  # fmt: skip
    (tmp_path / "targets.yaml").write_text(block)
    lost = 'llmpath_usage_record_failures_total{job="llmpath-gateway",instance="a",sink="jsonl"}'
    ticket = {
        "exp_labels": {"sloth_severity": "ticket", "severity": "warning", "owner": "gateway", "instance": "a",
                       "sink": "jsonl"},
        "exp_annotations": {
            "summary": "The jsonl usage ledger of a is losing records (see its log).",
            "runbook_url": "docs/deploy.md#llmpathusagerecordslost",
        },
    }  # fmt: skip
    page = {
        "exp_labels": {"sloth_severity": "page", "severity": "critical", "owner": "gateway"},
        "exp_annotations": {
            "summary": "Prometheus scrapes no llmpath gateway: every SLO of the LLM API is blind.",
            "runbook_url": "docs/deploy.md#llmpathgatewaydown",
        },
    }
    tests = {
        "rule_files": ["targets.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": 'up{job="llmpath-gateway",instance="a"}', "values": "1x5 0x10"},
                    {"series": 'up{job="llmpath-gateway",instance="b"}', "values": "1x2 0x13"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "LLMPathGatewayDown", "exp_alerts": []},  # a is still up
                    {"eval_time": "7m", "alertname": "LLMPathGatewayDown", "exp_alerts": []},  # pending (for: 2m)
                    {"eval_time": "8m", "alertname": "LLMPathGatewayDown", "exp_alerts": [page]},
                ],
            },
            {
                "interval": "1m",
                "input_series": [{"series": 'up{job="other"}', "values": "1x10"}],
                "alert_rule_test": [
                    {"eval_time": "3m", "alertname": "LLMPathGatewayDown", "exp_alerts": [page]},
                ],
            },
            {
                "interval": "1m",  # the ledger's sink at 0 from the start, then 3 records lost at 6m
                "input_series": [{"series": lost, "values": "0x5 3x20"}],
                "alert_rule_test": [
                    {"eval_time": "5m", "alertname": "LLMPathUsageRecordsLost", "exp_alerts": []},
                    {"eval_time": "7m", "alertname": "LLMPathUsageRecordsLost", "exp_alerts": [ticket]},
                    {"eval_time": "17m", "alertname": "LLMPathUsageRecordsLost", "exp_alerts": []},  # 10m later
                ],
            },
        ],
    }
    (tmp_path / "targets.test.yaml").write_text(yaml.safe_dump(tests))
    headings = re.findall(r"^#+ (.+)$", (ROOT / "docs/deploy.md").read_text(), re.M)
    assert {"LLMPathGatewayDown", "LLMPathUsageRecordsLost"} <= set(headings)  # where their runbook_url points
    for args in (["check", "rules", "targets.yaml"], ["test", "rules", "targets.test.yaml"]):
        result = subprocess.run([promtool, *args], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
