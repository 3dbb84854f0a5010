"""Fixtures for the runbooks tests: the default SLO spec compiled by llmpath.slo and its runbooks."""

from __future__ import annotations

from typing import Any

import pytest

from llmpath.dashboards import build_dashboards, panel_directory
from llmpath.dashboards.specs import SpecOptions, compile_specs, recording_rule_names, slo_views
from llmpath.runbooks import build_runbooks

GRAFANA = "https://grafana.example.com"


@pytest.fixture(scope="session")
def compiled() -> Any:
    """``llmpath.slo.compile_slos`` of the packaged default spec (30d)."""
    return compile_specs(SpecOptions())


@pytest.fixture(scope="session")
def dashboards(compiled: Any) -> dict[str, dict]:
    return build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))


@pytest.fixture(scope="session")
def runbooks(compiled: Any, dashboards: dict[str, dict]) -> dict[str, str]:
    """File name → Markdown for the default spec, linking to :data:`GRAFANA`."""
    return build_runbooks(compiled.slos, GRAFANA, panel_titles=panel_directory(dashboards))
