"""One stage catalog for the gateway and every generator: a TOML file (``load_catalog``) with other owners and a
custom stage reaches the SLO rules, the dashboards, the runbooks and the ledger report through ``--catalog``."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from llmpath.instrumentation import (
    STAGES,
    CatalogFileError,
    JsonlUsageSink,
    StageTiming,
    UsageRecord,
    load_catalog,
)

CATALOG = """
[owners]
route = "traffic"
gateway_overhead = "edge"

[[stages]]
name = "moderation"
meaning = "Content moderation: the prompt is checked against the usage policy."
owner = "trust-safety"
after = "validate"
groups = ["gateway_overhead"]

[[stages]]
name = "postprocess"
meaning = "Output filtering after the first token."
owner = "trust-safety"
before_first_token = false
"""

SPEC = {
    "version": "llmpath/v1",
    "service": "llm-api",
    "slos": [
        {
            "name": "moderation-latency",
            "objective": 99,
            "stage": "moderation",
            "group_by": ["route"],
            "sli": {
                "latency": {
                    "histogram": "llmpath_stage_duration_seconds",
                    "selector": {"stage": "moderation"},
                    "threshold": 0.1,
                }
            },
            "alerting": {"name": "ModerationLatencyBurn"},
        },
        {
            "name": "gateway-overhead",
            "objective": 99,
            "stage": "gateway_overhead",
            "sli": {
                "latency": {
                    "histogram": "llmpath_stage_group_duration_seconds",
                    "selector": {"group": "gateway_overhead"},
                    "threshold": 0.1,
                }
            },
            "alerting": {"name": "GatewayOverheadBurn"},
        },
        {
            "name": "availability",
            "objective": 99.9,
            "stage": "route",
            "group_by": ["route"],
            "sli": {"ratio": {"bad": 'llmpath_requests_total{code=~"5.."}', "total": "llmpath_requests_total"}},
            "alerting": {"name": "AvailabilityBurn"},
        },
    ],
}


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    catalog, spec = tmp_path / "stages.toml", tmp_path / "slos.yaml"
    catalog.write_text(CATALOG)
    spec.write_text(yaml.safe_dump(SPEC))
    return catalog, spec


def run(llmpath_bin: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "250"}
    return subprocess.run([llmpath_bin, *map(str, args)], capture_output=True, text=True, timeout=120, env=env)


def test_load_catalog_applies_owners_and_places_custom_stages(files: tuple[Path, Path]) -> None:
    catalog = load_catalog(files[0])
    assert catalog.owner("route") == "traffic" and catalog.owner("auth") == STAGES.owner("auth")
    assert catalog.owner("moderation") == "trust-safety"
    group, default_group = catalog.group("gateway_overhead"), STAGES.group("gateway_overhead")
    assert group is not None and default_group is not None
    assert group.owner == "edge" and default_group.owner == "gateway"
    names = catalog.names_with_unattributed
    # a pre-first-token stage joins the stages that tile TTFT, at its place; the other one follows decode
    assert names[:4] == ("auth", "validate", "moderation", "route")
    assert names.index("unattributed") < names.index("decode") < names.index("postprocess")
    assert catalog["postprocess"].before_first_token is False
    assert "moderation" in group.stages


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[owners]\nrouting = 'x'\n", "owners.routing: unknown stage or stage group; known: auth, validate"),
        ("[owners]\nroute = ''\n", "owners.route: the owning team must be a non-empty string"),
        ("[[stages]]\nname = 'Bad-Name'\nmeaning = 'm'\nowner = 'o'\n", "stages[0].name: invalid stage name"),
        ("[[stages]]\nname = 'auth'\nmeaning = 'm'\nowner = 'o'\n", "stages[0].name: stage 'auth' already exists"),
        ("[[stages]]\nname = 'x'\nowner = 'o'\n", "stages[0]: missing meaning"),
        (
            "[[stages]]\nname = 'gateway_overhead'\nmeaning = 'm'\nowner = 'o'\n",
            "stages[0].name: 'gateway_overhead' is the name of a stage group",
        ),
        ("[[stages]]\nname = 'x'\nmeaning = 'm'\nowner = 'o'\nteam = 'o'\n", "stages[0]: unknown key(s) team"),
        ("[[stages]]\nname='x'\nmeaning='m'\nowner='o'\nbefore_first_token='yes'\n", "before_first_token: must be"),
        ("[[stages]]\nname='x'\nmeaning='m'\nowner='o'\nafter='nope'\n", "stages[0].after: must name a stage"),
        (
            "[[stages]]\nname='x'\nmeaning='m'\nowner='o'\nafter='decode'\n",
            "stages[0].after: stage 'x' runs before the first token: it cannot follow 'decode'",
        ),
        (
            "[[stages]]\nname='x'\nmeaning='m'\nowner='o'\nbefore_first_token=false\nafter='auth'\n",
            "stages[0].after: stage 'x' runs after the first token: it cannot precede 'validate'",
        ),
        ("[[stages]]\nname='x'\nmeaning='m'\nowner='o'\ngroups=['edge']\n", "stages[0].groups: must be a list of"),
        (
            "[[stages]]\nname='x'\nmeaning='m'\nowner='o'\ngroups=['gateway_overhead']\n",  # placed before decode
            "stages[0].after: stage 'x' is not next to the other stages of 'gateway_overhead'",
        ),
        ("stage = []\n", "unknown key(s) stage (expected [owners] and [[stages]])"),
        ("[owners\n", "not valid TOML"),
    ],
)
def test_invalid_catalog_files_name_the_file_and_field(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / "stages.toml"
    path.write_text(text)
    with pytest.raises(CatalogFileError) as exc:
        load_catalog(path)
    assert str(exc.value).startswith(f"{path}: ") and reason in str(exc.value)


def test_slo_rules_name_the_catalogs_owners(llmpath_bin: str, files: tuple[Path, Path], tmp_path: Path) -> None:
    catalog, spec = files
    refused = run(llmpath_bin, "slo", "compile", spec, "-o", tmp_path / "rules.yaml")
    assert refused.returncode == 1 and "unknown stage 'moderation'" in refused.stderr

    out = tmp_path / "rules.yaml"
    done = run(llmpath_bin, "slo", "compile", spec, "--catalog", catalog, "-o", out)
    assert done.returncode == 0, done.stderr
    alerts = [r for g in yaml.safe_load(out.read_text())["groups"] for r in g["rules"] if "alert" in r]
    owners = {(a["labels"]["stage"], a["labels"]["owner"]) for a in alerts}
    assert owners == {("moderation", "trust-safety"), ("route", "traffic"), ("gateway_overhead", "edge")}

    bad = tmp_path / "bad.toml"
    bad.write_text("[owners]\nrouting = 'x'\n")
    usage_error = run(llmpath_bin, "slo", "validate", spec, "--catalog", bad)
    assert (
        usage_error.returncode == 2
        and f"--catalog {bad}: owners.routing: unknown stage or stage group" in usage_error.stderr
    )


def test_dashboards_and_runbooks_follow_the_catalog(llmpath_bin: str, files: tuple[Path, Path], tmp_path: Path) -> None:
    catalog, spec = files
    dash = tmp_path / "dashboards"
    built = run(llmpath_bin, "dashboards", "build", "--slo", spec, "--catalog", catalog, "-o", dash)
    assert built.returncode == 0, built.stderr
    panels = json.loads((dash / "llmpath-api-path.json").read_text())["panels"]
    titles = {p["title"] for p in panels}
    assert "moderation — p50 / p95 / p99 (owner: trust-safety)" in titles
    assert "route — p50 / p95 / p99 (owner: traffic)" in titles
    assert "gateway_overhead — p50 / p95 / p99 (owner: edge)" in titles  # a stage group's owner
    overhead = next(p for p in panels if p["title"].startswith("gateway_overhead —"))
    assert "Stages: auth, validate, moderation, route, assemble, cache_lookup." in overhead["description"]
    stacked = next(p for p in panels if p["title"].startswith("Mean time per stage"))
    assert 'stage="moderation"' in " ".join(t["expr"] for t in stacked["targets"])

    books = tmp_path / "runbooks"
    built = run(llmpath_bin, "runbooks", "build", "--slo", spec, "--catalog", catalog, "-o", books)
    assert built.returncode == 0, built.stderr
    page = books / "ModerationLatencyBurn-page.md"  # the alert's runbook_file
    text = page.read_text()
    assert text.startswith("<!-- Generated by `llmpath runbooks build` from slos.yaml, stages.toml and stage_knowledge")
    assert "Content moderation: the prompt is checked against the usage policy." in text
    assert "The trust-safety team owns the moderation stage." in text
    assert "auth → validate → **moderation** → route → assemble → cache_lookup → schedule → prefill →" in text
    assert 'stage="moderation"' in text  # the generic diagnosis queries the stage's own histogram
    overhead_page = (books / "GatewayOverheadBurn-page.md").read_text()
    assert "**auth** → **validate** → **moderation** → **route** → **assemble** → **cache_lookup** → schedule" in (
        overhead_page
    )
    index = (books / "README.md").read_text()
    assert "change the SLO specs, stages.toml or stage_knowledge.toml" in index.splitlines()[0]
    assert "trust-safety" in index and "traffic" in index and "`gateway_overhead` — edge" in index


def test_usage_summary_keeps_custom_stages_and_names_their_owners(
    llmpath_bin: str, files: tuple[Path, Path], tmp_path: Path
) -> None:
    ledger = tmp_path / "usage.jsonl"
    sink = JsonlUsageSink(ledger)
    for i in range(4):
        stages = [
            StageTiming("auth", 0.0, 0.001),
            StageTiming("moderation", 0.001, 0.040),
            StageTiming("prefill", 0.041, 0.059, "backend"),
            StageTiming("decode", 0.1, 0.2, "backend"),
        ]
        sink.write(
            UsageRecord(
                request_id=f"r{i}",
                trace_id=None,
                time=time.time(),
                tenant="acme",
                route="chat",
                model="m",
                input_tokens=10,
                cached_tokens=0,
                output_tokens=5,
                stages=stages,
                ttft_s=0.1,
                duration_s=0.3,
                status_code=200,
                unattributed_s=0.0,
            )  # fmt: skip
        )
    sink.close()

    def moderation_row(*args: str | Path) -> dict:
        out = run(llmpath_bin, "usage", "summary", ledger, "--json", *args)
        assert out.returncode == 0, out.stderr
        return next(r for r in json.loads(out.stdout)["stages"] if r["stage"] == "moderation")

    unknown = moderation_row()  # not in the built-in catalog: kept, not dropped
    assert unknown["owner"] == "unknown" and unknown["mean_s"] == pytest.approx(0.040)
    assert unknown["ttft_share"] == pytest.approx(0.4)  # it ended before the first token
    known = moderation_row("--catalog", files[0])
    assert known["owner"] == "trust-safety" and known["ttft_share"] == pytest.approx(0.4)
