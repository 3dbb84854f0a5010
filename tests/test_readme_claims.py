"""What README.md and the parts' READMEs tell a user to run, run as written, where no other test did.

- Every relative link and ``#anchor`` in README.md, */README.md and docs/*.md resolves (GitHub's heading slugs).
- The top README's SLO, dashboard and runbook commands, through bash in a scratch folder: the default spec's seven
  SLOs, rules that promtool checks and tests, the three dashboards, one runbook per compiled alert.
- The top README's gateway command line in front of two embedded engines: the key from the environment, prefix
  routing, the seven stages on ``/metrics``, ``kill -TERM`` ends it.
- runbooks/README.md's and dashboards/README.md's commands; the dashboard variables dashboards/README.md lists.
- backends/README.md's example against a real engine: the events it names, and nothing left open.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from llmpath.demo.supervisor import Supervisor, free_port, wait_ready
from llmpath.instrumentation import STAGES
from llmpath.slo import default_spec_path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = str(Path(sys.executable).parent)
DOCS = [ROOT / "README.md", *sorted(ROOT.glob("*/README.md")), *sorted((ROOT / "docs").glob("*.md"))]
WINDOWS_1H = ROOT / "slo" / "examples" / "windows-1h.yaml"

_FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
_INLINE_CODE = re.compile(r"`[^`\n]*`")
_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6} +(.+?) *#*$", re.M)


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "")
    return re.sub(r"[^\w\- ]", "", text.strip().lower()).replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    """Every ``#anchor`` a Markdown file has (repeated headings get ``-1``, ``-2``, … as on GitHub)."""
    seen: dict[str, int] = {}
    found: set[str] = set()
    for heading in _HEADING.findall(_FENCE.sub("", markdown.read_text(encoding="utf-8"))):
        slug = github_slug(heading)
        found.add(f"{slug}-{seen[slug]}" if slug in seen else slug)
        seen[slug] = seen.get(slug, 0) + 1
    return found


def fenced_blocks(markdown: Path, language: str, section: str | None = None) -> list[str]:
    """The fenced blocks of ``language`` in a Markdown file (or in its ``## section``), in order."""
    text = markdown.read_text(encoding="utf-8")
    if section is not None:
        text = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def shell_commands(block: str) -> list[str]:
    """The commands of a shell block: continuation lines joined, comments dropped."""
    commands = []
    for line in re.sub(r"\\\n\s*", "", block).splitlines():
        command = line.split(" #", 1)[0].strip()
        if command and not command.startswith("#"):
            commands.append(command)
    return commands


def run_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run one documented command through bash in ``cwd``, with the virtual environment's ``llmpath`` first on PATH."""
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_github_slugs_match_the_headings_the_docs_link_to() -> None:
    assert github_slug("Benchmark figures (development machine, 2 shared cores, no GPU)") == (
        "benchmark-figures-development-machine-2-shared-cores-no-gpu"
    )
    assert github_slug("5. Kubernetes: Gateway API Inference Extension and llm-d") == (
        "5-kubernetes-gateway-api-inference-extension-and-llm-d"
    )
    assert github_slug("`LLMPathGatewayDown`") == "llmpathgatewaydown"


def test_every_relative_link_and_anchor_resolves() -> None:
    broken: list[str] = []
    anchored = 0
    for doc in DOCS:
        text = _INLINE_CODE.sub("", _FENCE.sub("", doc.read_text(encoding="utf-8")))
        for target in _LINK.findall(text):
            if re.match(r"[a-z][a-z+.-]*:", target):
                continue  # http(s), mailto: not checked here
            path, _, fragment = target.partition("#")
            dest = (doc.parent / path) if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and dest.suffix == ".md":
                anchored += 1
                if fragment not in anchors(dest):
                    broken.append(f"{doc.relative_to(ROOT)}: {target} (no such heading in {dest.name})")
    assert not broken, "\n".join(broken)
    assert anchored > 20  # the docs cross-link by anchor: a checker that finds none is broken


@pytest.mark.slow
def test_readme_slo_dashboard_and_runbook_commands_run_as_written(tmp_path: Path, require_binary) -> None:
    """The top README's "Write and compile SLOs" and "Generate dashboards and runbooks" blocks, in order. The two
    commands that read a live Prometheus are left to tests/slo/test_slo_live_check.py and test_slo_status_live.py;
    ``promtool test rules`` runs one of the seven test files here (a minute for all on 2 cores), enough to show the
    layout works: tests/slo/test_slo_promtool.py runs them all."""
    require_binary("promtool")
    readme = ROOT / "README.md"
    sections = ("Write and compile SLOs", "Generate dashboards and runbooks")
    commands = [c for s in sections for b in fenced_blocks(readme, "bash", s) for c in shell_commands(b)]
    live = [c for c in commands if "--prometheus" in c]
    assert [c.split()[:3] for c in live] == [["llmpath", "slo", "validate"], ["llmpath", "slo", "status"]]
    promtool = "promtool check rules rules/*.yaml && promtool test rules rules/tests/*.yaml"
    assert promtool in commands
    for command in (c for c in commands if c not in live):
        done = run_shell(command.replace("rules/tests/*.yaml", "rules/tests/*availability*.yaml"), tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stdout}{done.stderr}"

    spec = yaml.safe_load((tmp_path / "slos.yaml").read_text())
    assert [s["name"] for s in spec["slos"]] == [
        "availability", "ttft", "gateway-overhead", "scheduling-latency", "prefill-latency", "time-per-output-token",
        "prompt-cache-hit-rate",
    ]  # fmt: skip
    assert all(s["stage"] for s in spec["slos"])  # "each owned by a stage"
    rule_file = tmp_path / "rules" / "slos.yaml"
    test_files = sorted(p.name for p in (tmp_path / "rules" / "tests").glob("*.test.yaml"))
    assert test_files == sorted(f"llm-api-{s['name']}.test.yaml" for s in spec["slos"])

    titles = {json.loads(p.read_text())["title"] for p in (tmp_path / "dashboards").glob("*.json")}
    assert titles == {"llmpath / LLM API path", "llmpath / SLOs", "llmpath / Backends"}

    rules = [rule for group in yaml.safe_load(rule_file.read_text())["groups"] for rule in group["rules"]]
    runbook_files = {Path(r["annotations"]["runbook_url"]).name for r in rules if "alert" in r}
    assert len(runbook_files) == 16
    assert {p.name for p in (tmp_path / "runbooks").glob("*.md")} == runbook_files | {"README.md"}
    index = (tmp_path / "runbooks" / "README.md").read_text()
    assert all(f"]({name})" in index for name in runbook_files)


def copy_user_files(folder: Path) -> None:
    """What the part READMEs' examples assume is there: a folder of specs, the example window catalog, the committed
    artefacts and a dashboard someone edited."""
    (folder / "my-slos").mkdir()
    shutil.copy(default_spec_path(), folder / "my-slos" / "api.yaml")
    (folder / "slo" / "examples").mkdir(parents=True)
    shutil.copy(WINDOWS_1H, folder / "slo" / "examples")
    for part in ("dashboards", "runbooks"):
        shutil.copytree(ROOT / part / "generated", folder / part / "generated")
    shutil.copy(ROOT / "dashboards" / "generated" / "llmpath-api-path.json", folder / "my-edited-dashboard.json")


@pytest.mark.slow
def test_runbooks_readme_commands_run_as_written(tmp_path: Path) -> None:
    copy_user_files(tmp_path)
    (default, own_specs, check) = shell_commands(fenced_blocks(ROOT / "runbooks" / "README.md", "sh")[0])
    for command in (default, own_specs):
        done = run_shell(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
    runbook = (tmp_path / "build" / "runbooks" / "LLMAPITTFTBurn-page.md").read_text()
    assert "](https://grafana.example.com/d/llmpath-slos?viewPanel=" in runbook  # the --dashboard-base-url
    checked = run_shell(check, tmp_path)
    assert checked.returncode == 0 and "17 runbook files up to date" in checked.stdout, checked.stderr


@pytest.mark.slow
def test_dashboards_readme_commands_run_as_written(tmp_path: Path) -> None:
    copy_user_files(tmp_path)
    commands = shell_commands(fenced_blocks(ROOT / "dashboards" / "README.md", "sh")[0])
    *simple, lint_with_windows = commands
    printed = []
    for command in simple:
        done = run_shell(command, tmp_path)
        assert done.returncode == 0, f"{command}\n{done.stderr}"
        printed.append(done.stdout)
    assert "dashboards/generated: 3 dashboard files up to date" in printed[2]
    assert "1 dashboard(s) OK" in printed[3]

    # "Give lint the options build was given": dashboards built with the 1h catalog pass that lint, not a plain one.
    built = run_shell(f"llmpath dashboards build --slo my-slos/ --windows {WINDOWS_1H} -o build/dashboards", tmp_path)
    assert built.returncode == 0, built.stderr
    linted = run_shell(lint_with_windows, tmp_path)
    assert linted.returncode == 0 and "3 dashboard(s) OK" in linted.stdout, linted.stderr
    plain = run_shell("llmpath dashboards lint build/dashboards/*.json", tmp_path)
    assert plain.returncode == 1 and "unknown metric 'slo:sli_error:ratio_rate1m'" in plain.stderr


def test_dashboard_variables_are_the_ones_the_readme_lists() -> None:
    """datasource and route on every dashboard; model where the metrics carry a model label (not the SLO series)."""
    variables = {
        p.name: [v["name"] for v in json.loads(p.read_text())["templating"]["list"]]
        for p in (ROOT / "dashboards" / "generated").glob("*.json")
    }
    assert variables == {
        "llmpath-api-path.json": ["datasource", "route", "model"],
        "llmpath-backends.json": ["datasource", "route", "model"],
        "llmpath-slos.json": ["datasource", "route"],
    }


@dataclass(frozen=True)
class Engines:
    """Two tiny embedded engines started for this module."""

    urls: tuple[str, str]


@pytest.fixture(scope="module")
def engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Engines]:
    with Supervisor(tmp_path_factory.mktemp("engines")) as supervisor:
        started = []
        for index in range(2):
            port = free_port()
            cmd = [f"{VENV_BIN}/llmpath", "engine", "serve", "--preset", "tiny", "--threads", "1", "--port", str(port)]
            started.append((supervisor.spawn(f"engine-{index}", cmd), f"http://127.0.0.1:{port}"))
        for process, url in started:  # started together, waited for in turn
            wait_ready(process, f"{url}/health", timeout=120)
        yield Engines((started[0][1], started[1][1]))


@pytest.mark.slow
def test_backends_readme_example_streams_the_events_it_names_and_closes(engines: Engines, tmp_path: Path) -> None:
    (block,) = [b for b in fenced_blocks(ROOT / "backends" / "README.md", "python") if "create_backend(" in b]
    assert "http://127.0.0.1:30000" in block
    body = textwrap.indent(block.replace("http://127.0.0.1:30000", engines.urls[0]), "    ")
    (tmp_path / "example.py").write_text(f"import asyncio\n\n\nasync def main():\n{body}\n\nasyncio.run(main())\n")
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    kinds = [line.split("(", 1)[0] for line in done.stdout.splitlines()]
    assert kinds[:2] == ["Scheduled", "FirstToken"] and kinds[-1] == "Done", kinds
    assert set(kinds[2:-1]) == {"TokenDelta"}
    assert "Unclosed" not in done.stderr, done.stderr  # aiohttp's warning for a session left open


def metric_samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    """The samples of ``name`` on a /metrics page: (labels, value)."""
    samples = []
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line[: line.index("}")]))
            samples.append((labels, float(line.rsplit(" ", 1)[1])))
    return samples


@pytest.mark.slow
def test_readme_gateway_command_serves_two_engines_with_prefix_routing(engines: Engines, processes: Supervisor) -> None:
    """``export LLMPATH_GATEWAY_API_KEYS=…`` and the README's ``llmpath gateway serve`` line, with the engines' URLs
    and a free port; requests sharing a long system prompt stay on one engine; ``kill -TERM`` stops it."""
    (block,) = [b for b in fenced_blocks(ROOT / "README.md", "bash") if "LLMPATH_GATEWAY_API_KEYS" in b]
    export, serve = shell_commands(block)[:2]
    assert export.startswith("export LLMPATH_GATEWAY_API_KEYS=")
    port = free_port()
    line = serve.replace("http://sglang-0:30000", engines.urls[0]).replace("http://sglang-1:30000", engines.urls[1])
    assert "--port 8000" in line and "--backend-kind sglang --policy prefix" in line
    cmd = shlex.split(line.replace("--port 8000", f"--port {port}"))
    url = f"http://127.0.0.1:{port}"
    gateway = processes.spawn(
        "gateway",
        [f"{VENV_BIN}/{cmd[0]}", *cmd[1:]],
        env={"LLMPATH_GATEWAY_API_KEYS": "sk-readme-7f3a"},
        ready_url=f"{url}/readyz",
    )
    system = "You review pull requests for a payments service; be precise and brief. " * 20
    with httpx.Client(base_url=url, timeout=60) as client:
        body = {"model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]}
        assert client.post("/v1/chat/completions", json=body).status_code == 401
        auth = {"Authorization": "Bearer sk-readme-7f3a"}
        for question in ("one", "two", "three"):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            answer = client.post("/v1/chat/completions", json={**body, "messages": messages}, headers=auth)
            assert answer.status_code == 200, answer.text
        metrics = client.get("/metrics").text

    decisions = metric_samples(metrics, "llmpath_route_decisions_total")
    assert len({labels["backend"] for labels, _ in decisions}) == 1  # the shared prefix kept them on one engine
    assert sum(v for labels, v in decisions if labels["reason"] == "prefix") == 2  # after the first request
    stages = {labels["stage"] for labels, _ in metric_samples(metrics, "llmpath_stage_duration_seconds_count")}
    assert {s.name for s in STAGES} <= stages

    processes.stop(gateway, signal.SIGTERM)
    assert gateway.returncode == -signal.SIGTERM  # drained, then uvicorn re-raises the signal (docs/gateway.md)
