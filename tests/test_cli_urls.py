"""URLs the command line is given: each one that no link or exporter could use is exit code 2 naming the option, the
value and the reason, before anything is written (they went into every generated link, or failed at the first
export); good ones are used as given."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from llmpath.backends.engine.args import otlp_endpoint_problem
from llmpath.backends.engine.tracing import otlp_traces_url
from llmpath.slo import default_spec_path

SPEC = default_spec_path()


def llmpath(llmpath_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, *map(str, args)], capture_output=True, text=True, timeout=120)


BAD_BASE_URLS = [
    ("notaurl", "absolute http(s) URL with a host"),
    ("grafana:3000", "absolute http(s) URL with a host"),
    ("http://", "absolute http(s) URL with a host"),
    ("javascript:alert(1)", "absolute http(s) URL with a host"),
    ("https://g.example.com/?orgId=1", "no query or fragment"),
    ("https://g.example.com:99999", "Port out of range"),
    ("https://g.example.com/a b", "without spaces"),
    ("file://server/share/runbooks", "absolute http(s) URL with a host"),  # only a local folder's file:/// URL
]


COMMANDS = [
    ["runbooks", "build", "--dashboard-base-url"],
    ["dashboards", "build", "--runbook-base-url"],
    ["slo", "compile", str(SPEC), "--dashboard-base-url"],
    ["slo", "compile", str(SPEC), "--runbook-base-url"],  # a relative path is a runbook base there: below
]
CASES = [
    pytest.param(command, url, reason, id=f"{command[0]} {command[-1]} {url}")
    for command in COMMANDS
    for url, reason in BAD_BASE_URLS
    if not (command[0] == "slo" and command[-1] == "--runbook-base-url" and url == "notaurl")
]


@pytest.mark.parametrize(("command", "url", "reason"), CASES)
def test_a_base_url_no_link_could_use_is_refused(
    llmpath_bin: str, tmp_path: Path, command: list[str], url: str, reason: str
) -> None:
    out_dir = tmp_path / "out"
    *head, option = command
    out = llmpath(llmpath_bin, *head, "-o", out_dir, option, url)
    assert out.returncode == 2, out.stdout + out.stderr
    message = " ".join(out.stderr.replace("│", " ").split())
    assert f"Invalid value for {option}:" in message and repr(url) in message and reason in message, message
    assert "Traceback" not in out.stderr
    assert not out_dir.exists()


def test_good_urls_are_used_as_given(llmpath_bin: str, tmp_path: Path) -> None:
    bases = ["--runbook-base-url", "runbooks/generated", "--dashboard-base-url", "https://grafana.example.com/g"]
    out = llmpath(llmpath_bin, "slo", "compile", SPEC, "-o", tmp_path / "rules", *bases)
    assert out.returncode == 0, out.stderr
    rules = (tmp_path / "rules" / "llm-api.yaml").read_text()
    assert "runbook_url: runbooks/generated/" in rules and "dashboard_url: https://grafana.example.com/g/d/" in rules
    local = tmp_path / "runbooks"
    out = llmpath(llmpath_bin, "slo", "compile", SPEC, "-o", tmp_path / "r2", "--runbook-base-url", local.as_uri())
    assert out.returncode == 0, out.stderr  # the demo links its alerts to the runbooks it built
    assert f"runbook_url: {local.as_uri()}/" in (tmp_path / "r2" / "llm-api.yaml").read_text()
    built = llmpath(llmpath_bin, "runbooks", "build", "-o", tmp_path / "rb", "--dashboard-base-url", "http://g:3000")
    assert built.returncode == 0, built.stderr
    assert "http://g:3000/d/" in "".join(p.read_text() for p in (tmp_path / "rb").glob("*.md"))


@pytest.mark.parametrize(
    ("endpoint", "reason"),
    [
        ("grpc://collector:4317", "use http:// or https://"),
        ("collector:notaport", "not a valid URL"),
        ("http://", "no host"),
        ("http://collector :4318", "without spaces"),
    ],
)
def test_an_otlp_endpoint_the_engine_cannot_export_to_is_refused(llmpath_bin: str, endpoint: str, reason: str) -> None:
    out = llmpath(llmpath_bin, "engine", "serve", "--preset", "tiny", "--port", "0", "--otlp-traces-endpoint", endpoint)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().startswith(f"llmpath engine serve: --otlp-traces-endpoint {endpoint!r}: ")
    assert reason in out.stderr


@pytest.mark.parametrize("endpoint", ["localhost:4317", "collector:4318", "http://c:4318/v1/traces", "https://c/otlp"])
def test_otlp_endpoints_in_either_form_are_accepted(endpoint: str) -> None:
    assert otlp_endpoint_problem(endpoint) is None


@pytest.mark.parametrize(
    ("endpoint", "url"),
    [
        ("localhost:4318", "http://localhost:4318/v1/traces"),
        ("https://c/otlp/", "https://c/otlp/v1/traces"),
        ("http://c:4318/v1/traces", "http://c:4318/v1/traces"),
    ],
)
def test_the_endpoint_checked_is_the_url_the_engine_exports_to(endpoint: str, url: str) -> None:
    assert otlp_traces_url(endpoint) == url
