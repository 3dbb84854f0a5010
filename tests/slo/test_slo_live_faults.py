"""`llmpath slo status` and `slo validate --prometheus` when Prometheus is not in a normal state: slow, behind a
proxy answering HTML, refusing queries, answering oddly shaped data, behind auth, without the SLO's recording
rules, or firing alerts of an SLO it does not describe. A loopback server speaks Prometheus's HTTP API faithfully
except for the fault under test. The contract: a clear error on stderr, exit 2 when the answer is not known, no
traceback, no printed credential, and --json output that is valid JSON (NaN is not)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

from llmpath.demo.supervisor import free_port
from tests.loopback import Answer, Loopback, Request

INFO = {"__name__": "sloth_slo_info", "sloth_id": "api-availability", "sloth_service": "api", "sloth_slo":
        "availability", "sloth_objective": "99.9", "owner": "serving", "stage": "route"}  # fmt: skip
SLO = {"sloth_id": "api-availability", "sloth_service": "api", "sloth_slo": "availability"}
HEALTHY = {
    "sloth_slo_info": [(INFO, "1")],
    "slo:current_burn_rate:ratio": [({"__name__": "slo:current_burn_rate:ratio", **SLO}, "0.5")],
    "slo:period_error_budget_remaining:ratio": [
        ({"__name__": "slo:period_error_budget_remaining:ratio", **SLO}, "0.8")
    ],  # fmt: skip
    "slo:sli_error:ratio_rate5m": [
        ({"__name__": "slo:sli_error:ratio_rate5m", "sloth_window": "5m", **SLO}, "0.0005")
    ],  # fmt: skip
}


@dataclass
class Behaviour:
    """What the fake Prometheus answers: ``series`` by metric name, ``alerts``, and an optional ``fault`` that
    answers instead (status, content type, body) or ``delay`` seconds before answering."""

    series: dict[str, list[tuple[dict[str, str], str]]] = field(default_factory=lambda: dict(HEALTHY))
    alerts: list[dict[str, Any]] = field(default_factory=list)
    #: The recording rules /api/v1/rules lists (the SLO's, by default).
    rules: list[dict[str, Any]] = field(
        default_factory=lambda: [{"type": "recording", "name": "slo:sli_error:ratio_rate5m", "labels": SLO}]
    )
    fault: Callable[[str, dict[str, str]], tuple[int, str, bytes] | None] | None = None
    delay: float = 0.0
    prefix: str = ""
    warnings: list[str] = field(default_factory=list)
    auth: str | None = None


class _FakePrometheus:
    """Prometheus's HTTP API, answering as its current ``behaviour`` says."""

    behaviour = Behaviour()

    @classmethod
    def answer(cls, request: Request) -> Answer:
        b = cls.behaviour
        url = urlparse(request.path)
        params = {k: v[0] for k, v in parse_qs(url.query).items()}
        time.sleep(b.delay)
        if b.auth is not None and request.headers.get("authorization") != b.auth:
            return _answer(401, "text/plain", b"Unauthorized\n")
        path = url.path.removeprefix(b.prefix)
        if b.fault is not None and (answer := b.fault(path, params)) is not None:
            return _answer(*answer)
        if path == "/api/v1/query":
            query = params["query"]
            name = query.split("{")[0]
            if not name:  # {__name__=~"slo:sli_error:ratio_rate.+"}
                picked = [s for n, ss in b.series.items() if n.startswith("slo:sli_error:ratio_rate") for s in ss]
            else:
                picked = b.series.get(name, [])
            data: dict[str, Any] = {
                "resultType": "vector",
                "result": [{"metric": m, "value": [time.time(), v]} for m, v in picked],
            }
        elif path == "/api/v1/alerts":
            data = {"alerts": b.alerts}
        elif path == "/api/v1/rules":
            data = {"groups": [{"name": "sloth-slo-sli-recordings-api-availability", "rules": b.rules}]}
        else:
            return _answer(404, "text/plain", b"404 page not found\n")
        body: dict[str, Any] = {"status": "success", "data": data}
        if b.warnings:
            body["warnings"] = b.warnings
        return _answer(200, "application/json", json.dumps(body).encode())


def _answer(status: int, content_type: str, body: bytes) -> Answer:
    return Answer(status, body, {"content-type": content_type})


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with Loopback(_FakePrometheus.answer) as httpd:
        yield httpd.url


@pytest.fixture
def prom(server: str) -> Iterator[tuple[str, Behaviour]]:
    behaviour = Behaviour()
    _FakePrometheus.behaviour = behaviour
    yield server, behaviour
    _FakePrometheus.behaviour = Behaviour()


def run(llmpath_bin: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("LLMPATH_PROMETHEUS")}
    full_env.update({"COLUMNS": "200", **(env or {})})
    return subprocess.run([llmpath_bin, *args], capture_output=True, text=True, timeout=60, env=full_env)


def status(llmpath_bin: str, url: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return run(llmpath_bin, "slo", "status", "--prometheus", url, *args, **kw)


def strict_json(text: str) -> Any:
    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def assert_clean_failure(proc: subprocess.CompletedProcess[str], *phrases: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


def test_healthy_fake_is_healthy(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, _ = prom
    proc = status(llmpath_bin, url, "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = strict_json(proc.stdout)
    assert (row["objective"], row["burn_rate"], row["recorded"]) == (99.9, 0.5, True)


def test_a_slow_prometheus_times_out_as_configured(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.delay = 5
    started = time.monotonic()
    proc = status(llmpath_bin, url, "--timeout", "0.5", "--json")
    assert time.monotonic() - started < 4.5
    assert_clean_failure(proc, f"Prometheus at {url}: timeout: no answer within 0.5s")
    assert proc.stdout == ""


def test_a_proxy_error_page_is_named_with_its_status(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.fault = lambda path, params: (502, "text/html", b"<html><body>Bad Gateway</body></html>")
    assert_clean_failure(status(llmpath_bin, url), "HTTP 502, not a Prometheus API response (text/html)")


def test_a_refused_query_names_the_error(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    error = {"status": "error", "errorType": "timeout", "error": "query timed out in expression evaluation"}
    behaviour.fault = lambda path, params: (503, "application/json", json.dumps(error).encode())
    assert_clean_failure(status(llmpath_bin, url, "--json"), "HTTP 503, timeout: query timed out")


@pytest.mark.parametrize(
    "data",
    [
        {"resultType": "vector", "result": [{"metric": {}, "value": None}]},
        {"resultType": "vector", "result": [{"metric": {}, "value": [1, "not a number"]}]},
        {"resultType": "matrix", "result": [{"metric": INFO, "values": [[1, "1"]]}]},
        {"resultType": "vector"},
    ],
)
def test_an_oddly_shaped_answer_is_an_error_not_a_traceback(
    llmpath_bin: str, prom: tuple[str, Behaviour], data: dict[str, Any]
) -> None:
    url, behaviour = prom
    body = json.dumps({"status": "success", "data": data}).encode()
    behaviour.fault = lambda path, params: (200, "application/json", body) if path == "/api/v1/query" else None
    assert_clean_failure(status(llmpath_bin, url, "--json"), "not an instant vector")


def test_a_malformed_url_is_an_error_not_a_traceback(llmpath_bin: str) -> None:
    assert_clean_failure(status(llmpath_bin, "http://[::1"), "cannot read SLOs from Prometheus at http://[::1")


def test_a_url_with_a_query_is_refused_without_printing_its_credential(llmpath_bin: str) -> None:
    """``?access_token=`` (a proxy's way) never worked: the HTTP client dropped the query and the API path with it,
    so every query went to the proxy's root. It is refused, naming the way to pass a token, and not printed."""
    proc = status(llmpath_bin, "http://127.0.0.1:9/prom?access_token=SECRET-TOKEN")
    assert_clean_failure(proc, "http://127.0.0.1:9/prom?access_token=*** has a query or fragment")
    assert "--bearer-token-file" in proc.stderr and "SECRET-TOKEN" not in proc.stderr + proc.stdout


def test_basic_auth_from_the_url_is_sent_and_never_printed(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.auth = "Basic " + base64.b64encode(b"oncall:s3cr3t-pw").decode()
    authed = url.replace("http://", "http://oncall:s3cr3t-pw@")
    ok = status(llmpath_bin, authed, "--json")
    assert ok.returncode == 0, ok.stderr
    behaviour.fault = lambda path, params: (500, "text/plain", b"boom")
    failed = status(llmpath_bin, authed)
    assert_clean_failure(failed, "HTTP 500")
    assert "s3cr3t-pw" not in failed.stderr + failed.stdout
    assert "oncall:***@" in failed.stderr
    down = f"http://oncall:s3cr3t-pw@127.0.0.1:{free_port()}"
    refused = status(llmpath_bin, down)
    assert_clean_failure(refused, "ConnectError")
    assert "s3cr3t-pw" not in refused.stderr + refused.stdout


def test_a_bearer_token_from_a_file_or_the_environment(
    llmpath_bin: str, prom: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = prom
    behaviour.auth = "Bearer tok-123"
    token = tmp_path / "token"
    token.write_text("tok-123\n")
    assert status(llmpath_bin, url, "--bearer-token-file", str(token)).returncode == 0
    assert status(llmpath_bin, url, env={"LLMPATH_PROMETHEUS_TOKEN": "tok-123"}).returncode == 0
    unauthorized = status(llmpath_bin, url, env={"LLMPATH_PROMETHEUS_TOKEN": "wrong-tok"})
    assert_clean_failure(unauthorized, "HTTP 401")
    assert "wrong-tok" not in unauthorized.stderr + unauthorized.stdout


def test_a_path_prefix_and_trailing_slash_are_kept(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.prefix = "/prometheus"
    proc = status(llmpath_bin, f"{url}/prometheus/", "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(strict_json(proc.stdout)) == 1


def test_a_nan_objective_keeps_json_valid(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.series = {**HEALTHY, "sloth_slo_info": [({k: v for k, v in INFO.items() if k != "sloth_objective"},
                                                       "1")]}  # fmt: skip
    proc = status(llmpath_bin, url, "--json")
    assert proc.returncode == 0, proc.stderr
    (row,) = strict_json(proc.stdout)
    assert row["objective"] is None


def test_missing_recording_rules_are_unknown_not_healthy(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.series = {"sloth_slo_info": HEALTHY["sloth_slo_info"]}
    behaviour.rules = []
    as_json = status(llmpath_bin, url, "--json")
    assert_clean_failure(as_json, "SLO 'api-availability' has no recorded series", "recording rules are not loaded")
    (row,) = strict_json(as_json.stdout)
    assert row["recorded"] is False and row["burn_rate"] is None
    table = status(llmpath_bin, url)
    assert_clean_failure(table)
    assert "no data" in table.stdout


def test_loaded_rules_without_series_say_no_data(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    """No traffic yet (or unscraped SLI metrics): the rules are loaded but record nothing. Not healthy either: the
    table says no data and stderr says why, but the answer (nothing to measure) is known."""
    url, behaviour = prom
    behaviour.series = {"sloth_slo_info": HEALTHY["sloth_slo_info"]}
    table = status(llmpath_bin, url)
    assert table.returncode == 0, table.stderr
    assert "no data" in table.stdout
    assert "SLO 'api-availability' has no data" in table.stderr and "recording rules are loaded" in table.stderr
    (row,) = strict_json(status(llmpath_bin, url, "--json").stdout)
    assert (row["recorded"], row["rules_loaded"], row["burn_rate"]) == (False, True, None)


def test_no_slo_rules_at_all_is_not_an_answer(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.series = {}
    proc = status(llmpath_bin, url, "--json")
    assert_clean_failure(proc, "sloth_slo_info has no series")


def test_an_alert_of_an_unknown_slo_is_reported(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.alerts = [{"labels": {"alertname": "GhostBurn", "sloth_id": "ghost-slo", "sloth_severity": "page"},
                         "annotations": {}, "state": "firing", "value": "1e+00"}]  # fmt: skip
    proc = status(llmpath_bin, url, "--json")
    assert_clean_failure(proc, "GhostBurn (page) fires for SLO 'ghost-slo', which no sloth_slo_info")
    assert len(strict_json(proc.stdout)) == 1


def test_prometheus_warnings_are_passed_on(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.warnings = ["remote read: store unavailable, partial response"]
    proc = status(llmpath_bin, url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert "warned: remote read: store unavailable, partial response" in proc.stderr


def test_validate_has_the_timeout_and_hides_credentials(
    llmpath_bin: str, prom: tuple[str, Behaviour], tmp_path: Path
) -> None:
    url, behaviour = prom
    behaviour.delay = 5
    path = tmp_path / "slos.yaml"
    slo = {"name": "availability", "objective": 99.9, "stage": "route",
           "sli": {"ratio": {"bad": 'llmpath_requests_total{code=~"5.."}', "total": "llmpath_requests_total"}},
           "alerting": {"name": "ApiAvailability"}}  # fmt: skip
    path.write_text(yaml.safe_dump({"version": "llmpath/v1", "service": "api", "slos": [slo]}))
    authed = url.replace("http://", "http://oncall:s3cr3t-pw@")
    started = time.monotonic()
    proc = run(llmpath_bin, "slo", "validate", str(path), "--prometheus", authed, "--timeout", "0.5")
    assert time.monotonic() - started < 4.5
    assert_clean_failure(proc, "timeout: no answer within 0.5s")
    assert "s3cr3t-pw" not in proc.stderr + proc.stdout


def test_missing_rules_of_another_teams_slo_do_not_fail_my_view(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    behaviour.series = {"sloth_slo_info": HEALTHY["sloth_slo_info"]}
    behaviour.rules = []
    proc = status(llmpath_bin, url, "--owner", "platform")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "no SLO owned by 'platform'"


def test_thousands_of_groups(llmpath_bin: str, prom: tuple[str, Behaviour]) -> None:
    url, behaviour = prom
    routes = [f"r{i}" for i in range(3000)]
    behaviour.series = {
        "sloth_slo_info": HEALTHY["sloth_slo_info"],
        **{
            name: [({**metric, "route": r}, value) for r in routes]
            for name, [(metric, value)] in HEALTHY.items()
            if name != "sloth_slo_info"
        },
    }
    started = time.monotonic()
    proc = status(llmpath_bin, url, "--json")
    assert proc.returncode == 0, proc.stderr
    assert len(strict_json(proc.stdout)) == 3000
    assert time.monotonic() - started < 20


def test_label_values_that_look_like_markup_are_printed_as_they_are(
    llmpath_bin: str, prom: tuple[str, Behaviour]
) -> None:
    """Label values are Prometheus's text: a route `[/]` or a runbook `[bold]x` is printed, not read as markup."""
    url, behaviour = prom
    labels = {**SLO, "route": "[/]"}
    behaviour.series = {**HEALTHY, "slo:current_burn_rate:ratio": [({"__name__": "x", **labels}, "2")]}
    behaviour.alerts = [{"labels": {"alertname": "Burn[/]", "sloth_severity": "[/]page", **labels}, "state": "firing",
                         "annotations": {"runbook_url": "[bold]runbook"}}]  # fmt: skip
    proc = status(llmpath_bin, url)
    assert proc.returncode == 0, proc.stderr
    assert "[/]" in proc.stdout
    assert "firing Burn[/] ([/]page) route=[/]: stage route, owner serving — runbook [bold]runbook" in proc.stdout


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("https://oncall:pw@prom:9090/x", "https://oncall:***@prom:9090/x"),
        ("https://oncall:p/w@prom:9090", "https://oncall:***@prom:9090"),
        ("https://oncall:p@w@prom:9090", "https://oncall:***@prom:9090"),
        ("https://tok123@prom", "https://***@prom"),
        ("http://prom:9090/prefix/", "http://prom:9090/prefix/"),
        # A credential in the query string (a proxy's ?access_token=, a presigned URL): its value; nothing else.
        ("https://prom/api?access_token=abc&x=1", "https://prom/api?access_token=***&x=1"),
        (
            "https://p:pw@prom/?X-Amz-Signature=s&API_KEY=k&query=up",
            "https://p:***@prom/?X-Amz-Signature=***&API_KEY=***&query=up",
        ),
        # Up to the last @ is userinfo: a password with ?, / or @ in it is masked whole.
        ("http://oncall:s3cr?et@127.0.0.1:9", "http://oncall:***@127.0.0.1:9"),
        ("https://user:p@ss?w0rd@prom", "https://user:***@prom"),
        ("https://tok?en@prom", "https://***@prom"),
        ("https://prom/?next=a@b", "https://***@b"),  # an @ in a query masks more than it needs: never less
    ],
)
def test_urls_in_messages_never_show_a_secret(url: str, shown: str) -> None:
    from llmpath.live.promapi import redact

    assert redact(url) == shown
