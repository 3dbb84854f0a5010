"""Fixtures of the bench/ script tests."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"


@pytest.fixture(scope="session")
def bench_script() -> Callable[[str], ModuleType]:
    """Loads ``bench/<name>.py`` as a module (once per name; the scripts are not a package)."""

    def load(name: str) -> ModuleType:
        module_name = f"llmpath_bench_{name}"
        if module_name in sys.modules:
            return sys.modules[module_name]
        spec = importlib.util.spec_from_file_location(module_name, BENCH / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and pickling (the process pool) resolve it by name
        spec.loader.exec_module(module)
        return module

    return load
