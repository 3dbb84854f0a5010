"""The root `llmpath` command: its version and its sub-commands."""

from __future__ import annotations

import subprocess
from importlib.metadata import version

from llmpath.cli import PARTS


def test_version_lists_every_installed_part(llmpath_bin: str) -> None:
    out = subprocess.run([llmpath_bin, "--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"{name} {version(name)}" for name in PARTS]


def test_help_lists_every_sub_command(llmpath_bin: str) -> None:
    out = subprocess.run([llmpath_bin, "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for command in ("engine", "gateway", "slo", "dashboards", "runbooks", "usage", "demo"):
        assert f" {command} " in out.stdout
