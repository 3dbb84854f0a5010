"""llmpath SLOs: Sloth-compatible specs (plus LLM extensions) compiled to Prometheus rules.

from llmpath.slo import load_specs, compile_slos, CompileOptions, default_spec_path, SpecError
docs = load_specs(["slos.yaml", "specs/"])
result = compile_slos(docs, CompileOptions(period="30d"))
result.files          # output file name -> rule-file YAML (one per input document)
result.slos[0].alerts  # AlertInfo: name, severity, kind, expr, labels, annotations, windows, runbook_file
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from llmpath.slo.compiler import compile_slos
from llmpath.slo.errors import Issue, SpecError
from llmpath.slo.loaders import load_specs
from llmpath.slo.model import (
    AlertInfo,
    BurnWindow,
    CompiledSLO,
    CompileOptions,
    CompileResult,
    SLIInfo,
    SpecDocument,
)

DEFAULT_SPEC_NAME = "llm-api.yaml"


def default_spec_path() -> Path:
    """Path of the shipped default LLM API spec (``llmpath slo init`` copies it)."""
    return Path(str(importlib.resources.files("llmpath.slo") / "specs" / DEFAULT_SPEC_NAME))


__all__ = [
    "AlertInfo",
    "BurnWindow",
    "CompileOptions",
    "CompileResult",
    "CompiledSLO",
    "Issue",
    "SLIInfo",
    "SpecDocument",
    "SpecError",
    "compile_slos",
    "default_spec_path",
    "load_specs",
]
