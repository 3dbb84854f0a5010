"""The `llmpath/v1` example of docs/slo.md works end to end, as a reader would run it: validate, compile with
tests, promtool check and test, runbooks build; and its alerts are told apart by name and severity."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml

from llmpath.slo import CompileOptions, compile_slos, load_specs

REPO = Path(__file__).resolve().parents[2]
DOC = REPO / "docs" / "slo.md"


def doc_example() -> str:
    """The first ``yaml`` block after the ``### `llmpath/v1``` heading of docs/slo.md."""
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### `llmpath/v1`") :]
    match = re.search(r"^```yaml\n(.*?)^```", section, re.S | re.M)
    assert match is not None, "docs/slo.md: no yaml block in the llmpath/v1 section"
    return match.group(1)


def _run(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*map(str, args)], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_docs_llmpath_v1_example_validates_compiles_tests_and_builds_runbooks(
    tmp_path: Path, llmpath_bin: str, require_binary
) -> None:
    promtool = require_binary("promtool")
    spec = tmp_path / "slos.yaml"
    spec.write_text(doc_example())
    assert "threshold_alert:" in spec.read_text() and "absent_alert:" in spec.read_text()

    validate = _run(llmpath_bin, "slo", "validate", spec, cwd=tmp_path)
    assert validate.returncode == 0, validate.stderr
    assert validate.stdout == "OK: 1 SLOs in 1 file(s) are valid.\n"

    compiled = _run(llmpath_bin, "slo", "compile", spec, "-o", "rules", "--tests", cwd=tmp_path)
    assert compiled.returncode == 0, compiled.stderr
    rule_file = tmp_path / "rules" / "slos.yaml"
    rules = [r for g in yaml.safe_load(rule_file.read_text())["groups"] for r in g["rules"]]
    assert len(rules) == 25  # 8 SLI windows, 2 event rates (ratio_of_counts), 4 long-window event rates (min_events),
    # 7 metadata rules, 4 alerts
    check = _run(promtool, "check", "rules", rule_file, cwd=tmp_path)
    assert check.returncode == 0 and "SUCCESS: 25 rules found" in check.stdout, check.stdout + check.stderr
    test = _run(promtool, "test", "rules", "llm-api-ttft.test.yaml", cwd=tmp_path / "rules" / "tests")
    assert test.returncode == 0 and "SUCCESS" in test.stdout, test.stdout + test.stderr

    alerts = [r for r in rules if "alert" in r]
    identities = [(a["alert"], a["labels"]["sloth_severity"]) for a in alerts]
    assert identities == [
        ("LLMAPITTFTBurn", "page"),
        ("LLMAPITTFTBurn", "ticket"),
        ("LLMAPITTFTNoData", "ticket"),
        ("LLMAPITTFTSlow", "ticket"),
    ]
    assert [a["labels"]["severity"] for a in alerts] == ["critical", "warning", "warning", "warning"]
    assert all(a["labels"]["category"] == "latency" for a in alerts)
    runbooks = [a["annotations"]["runbook_url"] for a in alerts]
    assert len(set(runbooks)) == 4

    built = _run(llmpath_bin, "runbooks", "build", "--slo", spec, "-o", "runbooks", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    assert sorted(p.name for p in (tmp_path / "runbooks").iterdir()) == [
        "LLMAPITTFTBurn-page.md",
        "LLMAPITTFTBurn-ticket.md",
        "LLMAPITTFTNoData-ticket.md",
        "LLMAPITTFTSlow-ticket.md",
        "README.md",
    ]
    assert [f"runbooks/generated/{p}" for p in sorted(p.name for p in (tmp_path / "runbooks").glob("*-*.md"))] == (
        sorted(runbooks)
    )


def test_a_threshold_alert_without_a_name_is_named_after_the_burn_alerts(tmp_path: Path) -> None:
    text = doc_example().replace("        name: LLMAPITTFTSlow     # default <name>Threshold\n", "")
    assert "LLMAPITTFTSlow" not in text
    spec = tmp_path / "slos.yaml"
    spec.write_text(text)
    (slo,) = compile_slos(load_specs([spec]), CompileOptions()).slos
    assert [(a.name, a.severity, a.kind, a.runbook_file) for a in slo.alerts] == [
        ("LLMAPITTFTBurn", "page", "burn_rate", "LLMAPITTFTBurn-page.md"),
        ("LLMAPITTFTBurn", "ticket", "burn_rate", "LLMAPITTFTBurn-ticket.md"),
        ("LLMAPITTFTNoData", "ticket", "absent", "LLMAPITTFTNoData-ticket.md"),
        ("LLMAPITTFTBurnThreshold", "ticket", "threshold", "LLMAPITTFTBurnThreshold-ticket.md"),
    ]
