"""Build the three dashboards, check them, and render them as deterministic JSON files."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from llmpath.dashboards import api_path, backends, slos
from llmpath.dashboards.checks import dashboard_problems, iter_panels, known_metric_names
from llmpath.dashboards.grafana import finalize
from llmpath.dashboards.slos import SloView
from llmpath.instrumentation.catalog import DASHBOARD_UIDS, STAGES, StageCatalog


class DashboardError(ValueError):
    """A generated dashboard failed its checks (schema, structure, PromQL, metric names)."""

    def __init__(self, file_name: str, problems: Sequence[str]) -> None:
        self.file_name = file_name
        self.problems = list(problems)
        super().__init__(f"{file_name}: {len(self.problems)} problem(s):\n  " + "\n  ".join(self.problems))


def file_name(key: str) -> str:
    """Output file of a dashboard: ``<uid>.json`` (e.g. ``llmpath-api-path.json``)."""
    return f"{DASHBOARD_UIDS[key]}.json"


def build_dashboards(
    views: Sequence[SloView] = (), rule_names: Iterable[str] = (), stages: StageCatalog = STAGES
) -> dict[str, dict[str, Any]]:
    """All dashboards as Grafana JSON, keyed by file name; raises :class:`DashboardError` if any check fails.

    ``views`` are the SLOs for the SLOs dashboard (and the SLO thresholds marked on the API path); ``rule_names``
    the recording rules they compile to (queries may read them); ``stages`` the stage catalog (a latency panel
    per stage, owners in the titles).
    """
    known = known_metric_names(rule_names)
    built = {"api_path": api_path.build(stages, views), "slos": slos.build(views), "backends": backends.build()}
    result: dict[str, dict[str, Any]] = {}
    for key, dashboard in built.items():
        name = file_name(key)
        data = finalize(dashboard)
        problems = dashboard_problems(data, known)
        if problems:
            raise DashboardError(name, problems)
        result[name] = data
    return result


def panel_directory(dashboards: Mapping[str, Mapping[str, Any]]) -> dict[tuple[str, int], str]:
    """``(dashboard key, panel id)`` → ``"<panel title> (<dashboard title>)"`` for every panel, for deep links."""
    keys = {file_name(key): key for key in DASHBOARD_UIDS}
    return {
        (keys[name], panel["id"]): f"{panel['title']} ({data['title']})"
        for name, data in dashboards.items()
        for panel in iter_panels(data)
    }


def render(dashboard: Mapping[str, Any]) -> str:
    """Deterministic JSON text (sorted keys, 2-space indent, trailing newline) for committing and ``--check``."""
    return json.dumps(dashboard, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def render_all(dashboards: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """File name → JSON text."""
    return {name: render(data) for name, data in dashboards.items()}


def is_generated(path: Path) -> bool:
    """Whether a file in the output folder is one of ours (so ``--check`` can report leftovers)."""
    return path.suffix == ".json" and path.stem.startswith("llmpath-")
