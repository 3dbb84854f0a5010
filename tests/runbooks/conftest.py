"""Fixtures for the runbooks tests: the default spec's runbooks (``compiled`` and ``dashboards`` are the root
conftest's)."""

from __future__ import annotations

from typing import Any

import pytest

from llmpath.dashboards import panel_directory
from llmpath.runbooks import build_runbooks

GRAFANA = "https://grafana.example.com"


@pytest.fixture(scope="session")
def runbooks(compiled: Any, dashboards: dict[str, dict]) -> dict[str, str]:
    """File name → Markdown for the default spec, linking to :data:`GRAFANA`."""
    return build_runbooks(compiled.slos, GRAFANA, panel_titles=panel_directory(dashboards))
