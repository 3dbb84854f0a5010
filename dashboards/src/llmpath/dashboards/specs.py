"""From SLO specs to what the dashboards and runbooks need, through the SLO compiler's public API (``llmpath.slo``)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmpath.dashboards.checks import PromQLError, selectors
from llmpath.dashboards.slos import LatencyBound, SloView
from llmpath.instrumentation.catalog import REQUESTS_TOTAL, STAGES, StageCatalog

BURN_KINDS = ("burn_rate", "threshold")


@dataclass(frozen=True, slots=True)
class SpecOptions:
    """Which specs to compile and how (the same knobs as ``llmpath slo compile``).

    ``inputs`` empty means the default spec packaged with ``llmpath.slo``. ``None`` base URLs keep the compiler's
    defaults (relative ``runbooks/generated`` and ``http://localhost:3000``).
    """

    inputs: tuple[Path, ...] = ()
    period: str | None = None
    #: Sloth ``AlertWindows`` file(s) or folder(s) (``--windows``).
    windows_file: Path | Sequence[Path] | None = None
    runbook_base_url: str | None = None
    dashboard_base_url: str | None = None
    #: Bucket bounds of histograms whose buckets are not the catalog's (``llmpath slo compile --buckets``).
    histogram_buckets: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    #: The stage catalog (``llmpath slo compile --catalog``); default: the built-in stages and owners.
    stages: StageCatalog = STAGES
    #: SLI and SLO plugins by id (``llmpath slo compile --plugins``, ``llmpath.slo.plugins.load_plugin_module``).
    sli_plugins: Mapping[str, Any] = field(default_factory=dict)
    slo_plugins: Mapping[str, Any] = field(default_factory=dict)


def compile_specs(options: SpecOptions) -> Any:
    """Load and compile the specs; raises ``llmpath.slo.SpecError`` on invalid input (file, SLO, field named)."""
    from llmpath.slo import CompileOptions, compile_slos, default_spec_path, load_specs

    inputs = [str(p) for p in options.inputs] or [str(default_spec_path())]
    documents = load_specs(inputs)
    return compile_slos(
        documents,
        CompileOptions(
            period=options.period,
            windows_file=options.windows_file,
            runbook_base_url=options.runbook_base_url,
            dashboard_base_url=options.dashboard_base_url,
            histogram_buckets=options.histogram_buckets,
            stages=options.stages,
            sli_plugins=options.sli_plugins,
            slo_plugins=options.slo_plugins,
        ),
    )


def _duration_key(window: str) -> float:
    from promql_parser import parse_duration

    return parse_duration(window).total_seconds()


def slo_view(slo: Any) -> SloView:
    """The SLOs dashboard's view of one ``CompiledSLO``."""
    burn = [a for a in slo.alerts if a.kind in BURN_KINDS]
    windows = {w for a in burn for pair in a.windows for w in (pair.short, pair.long)}
    if not windows:  # alerts disabled: the SLI windows the compiler recorded, minus the longest (the period)
        prefix = "slo:sli_error:ratio_rate"
        recorded = sorted({r.removeprefix(prefix) for r in slo.recordings if r.startswith(prefix)}, key=_duration_key)
        windows = set(recorded[:-1])
    return SloView(
        id=slo.id,
        service=slo.service,
        name=slo.name,
        objective=slo.objective,
        period=slo.period,
        stage=slo.stage,
        owner=slo.owner,
        description=slo.description,
        windows=tuple(sorted(windows or {"5m"}, key=_duration_key)),
        factors=tuple((a.severity, pair.factor) for a in burn for pair in a.windows),
        grouping=tuple(slo.group_by),
        latency=_latency_bound(slo.sli),
        counts_server_errors=_counts_server_errors(slo.sli),
        runbooks=tuple(
            (a.name, a.severity, url)
            for a in slo.alerts
            if (url := a.annotations.get("runbook_url", "")).startswith(("http://", "https://"))
        ),
    )


def _latency_bound(sli: Any) -> LatencyBound | None:
    if sli.kind != "latency" or not sli.histogram or sli.threshold is None:
        return None
    matchers = dict(sli.selector)
    if sli.filter:  # its matchers narrow the requests too: `stage="prefill"` as a plain label, others with their op
        for label, op, value in selectors(f"{sli.histogram}{{{sli.filter.strip().strip('{}')}}}")[0].matchers:
            matchers[label if op == "=" else f"{label}{op}"] = value
    return LatencyBound(sli.histogram, tuple(sorted(matchers.items())), float(sli.threshold))


def _counts_server_errors(sli: Any) -> bool:
    """A ``ratio`` SLI of 5xx answers (``bad``) among all of ``llmpath_requests_total`` (``total``), with no other
    matchers (``group_by`` may split it per route)."""
    if sli.kind != "ratio" or not sli.bad or not sli.total:
        return False
    try:
        (bad,), (total,) = selectors(sli.bad), selectors(sli.total)
    except (PromQLError, ValueError):  # not one plain selector each
        return False
    # Only over all requests: an SLO of some routes or models does not speak for the API path's error panels.
    return bad.name == total.name == REQUESTS_TOTAL and bad.matchers == (("code", "=~", "5.."),) and not total.matchers


def slo_views(slos: Iterable[Any]) -> list[SloView]:
    """Views of every compiled SLO, in spec order."""
    return [slo_view(s) for s in slos]


def recording_rule_names(rule_files: Iterable[str]) -> set[str]:
    """Every ``record:`` name in compiled rule files (plain Prometheus or ``PrometheusRule`` objects)."""
    names: set[str] = set()
    for text in rule_files:
        for document in yaml.safe_load_all(text):
            if not isinstance(document, dict):
                continue
            groups = document.get("groups") or (document.get("spec") or {}).get("groups") or []
            names.update(rule["record"] for group in groups for rule in group.get("rules", []) if "record" in rule)
    return names
