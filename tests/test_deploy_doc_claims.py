"""What docs/deploy.md tells an operator to run, run for real: its ConfigMap command against the dashboards' real
size (kubectl)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
GUIDE = ROOT / "docs" / "deploy.md"
#: Kubernetes refuses an object whose annotations exceed 256 KiB; a client-side `kubectl apply` stores the whole
#: object in its `kubectl.kubernetes.io/last-applied-configuration` annotation.
ANNOTATIONS_LIMIT = 256 * 1024
#: The most a ConfigMap may hold.
CONFIGMAP_LIMIT = 1024 * 1024


def guide_block(language: str, needle: str) -> str:
    """The one fenced ``language`` block of the deploy guide that contains ``needle``."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```", GUIDE.read_text(encoding="utf-8"), re.S | re.M)
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, f"deploy.md: expected one {language} block containing {needle!r}, found {len(found)}"
    return found[0]


def run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in ``cwd``; fail the test with its output unless it exits 0."""
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
    return done


def test_dashboards_configmap_needs_the_server_side_apply_the_guide_uses(
    tmp_path: Path, llmpath_bin: str, require_binary
) -> None:
    """The guide's ConfigMap of the three dashboards, made by kubectl itself: too big for the annotation a
    client-side `kubectl apply` writes, small enough for one ConfigMap."""
    kubectl = require_binary("kubectl")
    run([llmpath_bin, "dashboards", "build", "-o", "build/dashboards"], tmp_path)
    block = guide_block("sh", "create configmap llmpath-dashboards")
    create, apply = (part.strip() for part in block.replace("\\\n", " ").splitlines()[0].split("|"))
    assert apply == "kubectl apply --server-side -f -"
    args = create.split()
    assert args[0] == "kubectl" and args[-2:] == ["-o", "yaml"]
    configmap = yaml.safe_load(run([kubectl, *args[1:]], tmp_path).stdout)
    assert sorted(configmap["data"]) == ["llmpath-api-path.json", "llmpath-backends.json", "llmpath-slos.json"]
    size = len(json.dumps(configmap, separators=(",", ":")))
    assert ANNOTATIONS_LIMIT < size < CONFIGMAP_LIMIT, size
