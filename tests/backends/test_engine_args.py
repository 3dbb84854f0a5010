"""The engine's arguments are checked before torch loads: a bad flag is refused in a fraction of a second, and
``llmpath engine presets`` never loads torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

# Runs the CLI in a fresh interpreter and reports whether torch was imported by the time it returned.
_PROBE = """
import sys
from typer.testing import CliRunner
from llmpath.cli import app
result = CliRunner().invoke(app, sys.argv[1:])
print(result.exit_code, "torch" in sys.modules)
print(result.output)
"""


def probe(*args: str) -> tuple[int, bool, str]:
    out = subprocess.run([sys.executable, "-c", _PROBE, *args], capture_output=True, text=True, timeout=60, check=True)
    first, _, rest = out.stdout.partition("\n")
    code, loaded = first.split()
    return int(code), loaded == "True", rest


def test_presets_do_not_load_torch() -> None:
    code, torch_loaded, output = probe("engine", "presets")
    assert code == 0
    assert "llama-8b" in output
    assert not torch_loaded


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--max-running", "0"], "--max-running must be at least 1"),
        (["--dtype", "int4"], "--dtype must be one of float32, bfloat16, float16, got 'int4'"),
        (["--preset", "llama-8b"], "--preset llama-8b is GPU only"),
    ],
)
def test_bad_flags_are_refused_before_torch_loads(flags: list[str], message: str) -> None:
    code, torch_loaded, output = probe("engine", "serve", "--port", "1", *flags)
    assert code == 2
    assert message in output
    assert not torch_loaded


def test_engine_class_loads_torch_on_first_use() -> None:
    code = (
        "import sys, llmpath.backends.engine as engine\n"
        "before = 'torch' in sys.modules\n"
        "engine.Engine\n"
        "print(before, 'torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert out.stdout.split() == ["False", "True"]
