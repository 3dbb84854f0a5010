"""Fixtures for the dashboards tests: the default SLO spec compiled by llmpath.slo, and the dashboards built from it."""

from __future__ import annotations

from typing import Any

import pytest

from llmpath.dashboards import build_dashboards
from llmpath.dashboards.specs import SpecOptions, compile_specs, recording_rule_names, slo_views


@pytest.fixture(scope="session")
def compiled() -> Any:
    """``llmpath.slo.compile_slos`` of the packaged default spec (30d)."""
    return compile_specs(SpecOptions())


@pytest.fixture(scope="session")
def dashboards(compiled: Any) -> dict[str, dict]:
    """The three dashboards built for the default spec, keyed by file name."""
    return build_dashboards(slo_views(compiled.slos), recording_rule_names(compiled.files.values()))
