"""Fixtures for the SLO compiler tests: Sloth's golden files, the test plugins, and helpers."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent


def _sloth_dir() -> Path | None:
    candidates = [
        os.environ.get("LLMPATH_SLOTH_GOLDEN"),
        HERE / "sloth_golden",  # vendored copy (Apache-2.0, see its SOURCE.md)
        REPO_ROOT.parent / "shared" / "peers" / "sloth",
    ]
    for c in candidates:
        if c and (Path(c) / "SOURCE.md").is_file():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def sloth_dir() -> Path:
    """Sloth's golden files (vendored in ``tests/slo/sloth_golden``; ``$LLMPATH_SLOTH_GOLDEN`` overrides)."""
    path = _sloth_dir()
    if path is None:
        pytest.skip("Sloth golden files not found (tests/slo/sloth_golden or $LLMPATH_SLOTH_GOLDEN)")
    return path


@pytest.fixture(scope="session")
def sloth_plugins() -> tuple[dict, dict]:
    """(SLI plugins, SLO plugins): Python ports of the Go plugins Sloth's golden tests use."""
    from llmpath.slo.plugins import load_plugin_module

    return load_plugin_module(str(HERE / "sloth_plugins.py"))


@pytest.fixture(scope="session")
def sloth_plugins_file() -> Path:
    return HERE / "sloth_plugins.py"
