"""What the on-call engineer acts on in the generated runbooks: every query returns data over series of every metric
it names (or the runbook says when it is empty), and every config key, CLI flag, endpoint and label value a step
names exists in the real gateway, engine and CLI."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from functools import cache
from pathlib import Path
from typing import Any, get_args

import httpx
import yaml
from pydantic import BaseModel, TypeAdapter

from llmpath.dashboards.synthetic import promtool_returns_data
from llmpath.gateway.admission import REJECTION_REASONS
from llmpath.gateway.config import GatewayConfig, hash_key
from llmpath.gateway.prompt_cache import CacheResult
from llmpath.gateway.routing import RouteReason
from llmpath.instrumentation import catalog
from llmpath.runbooks import load_knowledge
from llmpath.runbooks.knowledge import StageKnowledge, custom_stage_entry

LLMPATH = str(Path(sys.executable).parent / "llmpath")
PROMQL_BLOCK = re.compile(r"```promql\n(.*?)\n```", re.DOTALL)
ALERT_BLOCK = re.compile(
    r"<summary>Alert expression</summary>\n\n```promql\n(.*?)\n```\n\n(.*?)\n\n</details>", re.DOTALL
)
#: The SLI's queries listed under "What the SLI measures" (runnable as they are).
SLI_LINE = re.compile(
    r"^- (?:(?:Good|Bad|All)-events counter|(?:Bad events|All events|Error ratio) over \w+): `(.+)`$", re.M
)
BACKTICKED = re.compile(r"`([^`\n]+)`")
CONFIG_KEY = re.compile(r"^([a-z_]+(?:\[\])?(?:\.[a-z_]+(?:\[\])?)+)(?:: (\S+))?$")
ENDPOINT = re.compile(r"^(?:(GET|POST) )?(/[\w/.-]*)(?:\?\S*)?$")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z-]*)(?: ([a-z0-9_]+))?")
#: SGLang 0.5.23 server flags the runbooks name beside the embedded engine's own (which takes neither).
SGLANG_ONLY_FLAGS = {"--max-running-requests", "--mem-fraction-static"}
#: The commands whose options a runbook's bare ``--flag`` may be.
COMMANDS = (("engine", "serve"), ("gateway", "serve"), ("usage", "slowest"), ("usage", "show"))
#: Label values the gateway emits, per (metric, label): what a diagnosis explanation may name.
LABEL_VALUES: dict[tuple[str, str], set[str]] = {
    (catalog.ROUTE_DECISIONS_TOTAL, "reason"): {r.value for r in RouteReason},
    (catalog.ADMISSION_REJECTIONS_TOTAL, "reason"): set(REJECTION_REASONS),
    (catalog.PROMPT_CACHE_LOOKUPS_TOTAL, "result"): {r.value for r in CacheResult},
}


def _entries() -> list[StageKnowledge]:
    """Every knowledge entry, rendered by the default spec or not, and the generic entry of a custom stage."""
    k = load_knowledge()
    return [k.path, *k.stages.values(), *k.groups.values(), custom_stage_entry(catalog.STAGES["auth"])]


def _prose(entry: StageKnowledge) -> list[str]:
    return [entry.summary, *entry.causes, *entry.mitigations, *entry.escalation,
            *(t for c in entry.diagnosis for t in (c.question, c.explain))]  # fmt: skip


def _runbook_prose(text: str) -> str:
    """A runbook without its PromQL blocks (the SLI lines' queries are backticked PromQL too)."""
    return SLI_LINE.sub("", PROMQL_BLOCK.sub("", text))


def _named(runbooks: dict[str, str]) -> dict[str, set[str]]:
    """Every backticked span of the runbooks' and the knowledge file's prose → where it appears."""
    where: dict[str, set[str]] = {}
    for name, text in runbooks.items():
        for span in BACKTICKED.findall(_runbook_prose(text)):
            where.setdefault(span, set()).add(name)
    for entry in _entries():
        for text in _prose(entry):
            for span in BACKTICKED.findall(text):
                where.setdefault(span, set()).add(f"stage_knowledge.toml [{entry.key}]")
    return where


def _rule_files(compiled: Any, tmp: Path) -> list[Path]:
    paths = []
    for name, text in compiled.files.items():
        path = tmp / Path(name).name
        path.write_text(text)
        paths.append(path)
    return paths


def test_every_runbook_query_returns_data(compiled: Any, runbooks: dict[str, str], tmp_path: Path,
                                          require_binary) -> None:  # fmt: skip
    """promtool evaluates every query a runbook asks on-call to run (diagnosis blocks and the SLI's queries) over
    synthetic series of every catalog metric plus the spec's recording rules: each returns data."""
    promtool = require_binary("promtool")
    queries = set()
    for text in runbooks.values():
        text = ALERT_BLOCK.sub("", text)
        queries |= {*PROMQL_BLOCK.findall(text), *SLI_LINE.findall(text)}
    result = promtool_returns_data(promtool, tmp_path, sorted(queries), _rule_files(compiled, tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(queries) > 100


def test_every_knowledge_query_returns_data(compiled: Any, tmp_path: Path, require_binary) -> None:
    """Also the entries the default spec renders no runbook for (auth, validate, assemble, unattributed, a custom
    stage): a spec that owns an SLO by one of them gets these queries."""
    promtool = require_binary("promtool")
    queries = sorted({c.query.replace("$window", "5m") for e in _entries() for c in e.diagnosis})
    result = promtool_returns_data(promtool, tmp_path, queries, _rule_files(compiled, tmp_path))
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert len(queries) > 30


def test_alert_expression_is_the_rule_and_says_when_it_is_empty(
    compiled: Any, runbooks: dict[str, str], tmp_path: Path, require_binary
) -> None:
    """The one query expected to be empty on a healthy system says so; an absent() alert's expression is empty over
    series that have data, as its note says."""
    promtool = require_binary("promtool")
    absent = []
    for slo in compiled.slos:
        for alert in slo.alerts:
            block, note = ALERT_BLOCK.search(runbooks[alert.runbook_file]).groups()  # type: ignore[union-attr]
            assert block == alert.expr.strip(), alert.runbook_file
            if alert.kind == "absent":
                assert note.startswith("Returns 1 while the SLI has no series at all"), note
                absent.append(block)
            else:
                assert note.startswith("Empty while the alert is not firing"), note
    assert absent
    result = promtool_returns_data(promtool, tmp_path, [], _rule_files(compiled, tmp_path), empty=absent)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_an_absent_alert_is_not_said_to_name_the_route(compiled: Any, runbooks: dict[str, str]) -> None:
    """absent() carries only its selector's equality matchers, never the SLO's group_by labels: its runbook must not
    send on-call to "the alert's route label"."""
    checked = 0
    for slo in compiled.slos:
        for alert in (a for a in slo.alerts if a.kind == "absent" and slo.group_by):
            assert not set(slo.group_by) & set(re.findall(r'(\w+)="', alert.expr))
            text = runbooks[alert.runbook_file]
            assert "the alert's labels say which one" not in text
            assert "to the alert's route label" not in text
            assert f"fires only when no `{slo.group_by[0]}` has data" in text
            checked += 1
    assert checked


def _resolve(key: str) -> Any:
    """The annotation of a dotted gateway config key (``routes[].backends``); KeyError when a part is unknown."""
    model: Any = GatewayConfig
    annotation: Any = None
    for part in key.split("."):
        name = part.removesuffix("[]")
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or name not in model.model_fields:
            raise KeyError(f"{key}: no {name!r} in {getattr(model, '__name__', model)}")
        annotation = model.model_fields[name].annotation
        if part.endswith("[]"):
            annotation = get_args(annotation)[0]  # tuple[X, ...] → X
        model = next((a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(
            a, BaseModel)), annotation)  # fmt: skip
    return annotation


def test_every_backticked_config_key_resolves_against_the_config_model(runbooks: dict[str, str]) -> None:
    """``limits.max_queue``, ``routes[].backends``, ``routing.policy: least_load``: the key exists in the gateway's
    configuration model and the value, when one is given, validates."""
    keys = {span: where for span, where in _named(runbooks).items() if CONFIG_KEY.match(span)}
    for span, where in keys.items():
        key, value = CONFIG_KEY.match(span).groups()  # type: ignore[union-attr]
        annotation = _resolve(key)
        if value is not None:
            TypeAdapter(annotation).validate_python(yaml.safe_load(value) if value != "off" else "off")
        assert where
    assert {"limits.max_queue", "limits.max_concurrency", "routes[].backends", "usage.ledger"} <= set(keys)


@cache
def _help(*command: str) -> str:
    result = subprocess.run([LLMPATH, *command, "--help"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "COLUMNS": "250"})  # fmt: skip
    assert result.returncode == 0, (command, result.stderr)
    return result.stdout


def test_every_cli_command_and_flag_exists(runbooks: dict[str, str]) -> None:
    """``llmpath usage slowest LEDGER --since 1h``: the command runs with --help and lists the flag (and a lowercase
    value's choice); a bare ``--flag`` is an option of the engine, gateway or usage commands, or one of SGLang's."""
    checked = 0
    for span, where in _named(runbooks).items():
        if span.startswith("llmpath "):
            words = span.split()[1:]
            command = tuple(w for w in words[: next((i for i, w in enumerate(words) if not w.islower()
                                                     or w.startswith("-")), len(words))])  # fmt: skip
            helps = [_help(*command)]
            rest = words[len(command) :]
            arguments = rest[: next((i for i, w in enumerate(rest) if w.startswith("-")), len(rest))]  # ID LEDGER
            usage = next(line for line in helps[0].splitlines() if "Usage:" in line)
            assert len(arguments) >= len(re.findall(r"\{\w+\}", usage)), (span, sorted(where), usage.strip())
        elif span.startswith("--"):
            helps = [_help(*c) for c in COMMANDS]
        else:
            continue
        for flag, value in FLAG.findall(span):
            if flag in SGLANG_ONLY_FLAGS:
                continue
            text = next((h for h in helps if re.search(rf"{re.escape(flag)}\b", h)), None)
            assert text is not None, f"{flag} ({span!r} in {sorted(where)}) is no option of {helps[0][:200]}"
            assert not value or value in text, (span, sorted(where))
            checked += 1
    assert checked >= 8


def test_label_values_named_in_explanations_are_emitted(runbooks: dict[str, str]) -> None:
    """A diagnosis step grouped by ``reason`` or ``result`` names the values to look for in backticks, and the gateway
    emits each of them (the routing reasons, admission rejection reasons, cache lookup results)."""
    checked = 0
    for entry in _entries():
        for check in entry.diagnosis:
            grouped = {g.strip() for by in re.findall(r"by \(([^)]*)\)", check.query) for g in by.split(",")}
            allowed = {v for (metric, label), values in LABEL_VALUES.items()
                       if metric in check.query and label in grouped for v in values}  # fmt: skip
            if not allowed:
                continue
            named = {s for s in BACKTICKED.findall(check.explain) if re.fullmatch(r"[a-z_]+", s)}
            assert named and named <= allowed, (entry.key, check.question, named - allowed)
            checked += 1
    assert checked >= 3


def test_endpoints_and_signals_answer_on_a_real_gateway_and_engine(
    runbooks: dict[str, str], processes: Any, free_port: Any, llmpath_bin: str, tmp_path: Path
) -> None:
    """Every endpoint a runbook names (``POST /admin/reload``, ``/debug/requests?id=ID``, an engine's ``/health``)
    answers 200 on a real gateway (with an admin key) or engine over loopback, and ``kill -HUP`` reloads."""
    endpoints = {span: where for span, where in _named(runbooks).items() if ENDPOINT.match(span)}
    assert {"POST /admin/reload", "/debug/requests?id=ID", "/health"} <= set(endpoints)
    engine_port, gateway_port = free_port(), free_port()
    engine = f"http://127.0.0.1:{engine_port}"
    processes.spawn("engine", [llmpath_bin, "engine", "serve", "--preset", "tiny", "--threads", "1", "--port",
                               str(engine_port)], ready_url=f"{engine}/health", timeout=120)  # fmt: skip
    admin = "sk-admin-oncall-1b7d"
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump({
        "listen": {"port": gateway_port}, "backends": [{"url": engine, "name": "e0"}],
        "api_keys": [{"sha256": hash_key(admin), "tenant": "ops", "admin": True}],
    }))  # fmt: skip
    gateway = f"http://127.0.0.1:{gateway_port}"
    proc = processes.spawn("gateway", [llmpath_bin, "gateway", "serve", "--config", str(config)],
                           ready_url=f"{gateway}/readyz", timeout=60)  # fmt: skip
    headers = {"Authorization": f"Bearer {admin}"}
    for span, where in endpoints.items():
        method, path = ENDPOINT.match(span).groups()  # type: ignore[union-attr]
        url_path = span.split(" ")[-1].replace("ID", "0" * 16)
        answers = [httpx.request(method or "GET", base + url_path, headers=headers, timeout=30).status_code
                   for base in (gateway, engine)]  # fmt: skip
        assert 200 in answers, (span, sorted(where), answers)

    def reloads() -> float:
        text = httpx.get(f"{gateway}/metrics", timeout=5).text
        match = re.search(rf'^{catalog.CONFIG_RELOADS_TOTAL}\{{result="success"\}} (\S+)$', text, re.M)
        assert match, text[-2000:]
        return float(match.group(1))

    assert any("`kill -HUP`" in text for text in runbooks.values())
    before = reloads()
    proc.popen.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while reloads() == before:
        assert time.monotonic() < deadline, "kill -HUP did not reload the gateway"
        time.sleep(0.05)


def test_drain_steps_say_an_empty_backend_list_means_every_backend() -> None:
    """``routes[].backends`` empty (the default) lets a route use every backend: "leave it out of the list" drains
    nothing there, so each drain step must say to list the others."""
    steps = [m for e in _entries() for m in e.mitigations if "`routes[].backends`" in m]
    assert len(steps) >= 3
    for step in steps:
        assert "list the other backends" in step and "empty list means every backend" in step, step
