"""The curated stage knowledge (``llmpath.instrumentation``'s ``stage_knowledge.toml``), loaded and validated."""

from __future__ import annotations

import functools
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any

from llmpath.instrumentation.catalog import (
    STAGE_DURATION,
    STAGE_GROUPS_BY_NAME,
    STAGES,
    UNATTRIBUTED,
    Stage,
    StageCatalog,
)

KNOWLEDGE_PACKAGE = "llmpath.instrumentation"
KNOWLEDGE_FILE = "stage_knowledge.toml"
#: Key of the entry for SLOs that measure the whole request path (no single stage).
PATH = "path"
_FIELDS = ("title", "summary", "causes", "diagnosis", "panels", "mitigations", "escalation")


class KnowledgeError(ValueError):
    """The knowledge file is malformed; the message names the entry and field."""


@dataclass(frozen=True, slots=True)
class Check:
    """A diagnosis step: a question, the PromQL that answers it (``$window`` to fill in), how to read it."""

    question: str
    query: str
    explain: str


@dataclass(frozen=True, slots=True)
class StageKnowledge:
    """What on-call needs to know about one stage (or stage group, or the whole path)."""

    key: str
    title: str
    summary: str
    causes: tuple[str, ...]
    diagnosis: tuple[Check, ...]
    panels: tuple[str, ...]  # "<dashboard key>/<panel key>"
    mitigations: tuple[str, ...]
    escalation: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Knowledge:
    """All entries: per stage (incl. ``unattributed``), per stage group, and the whole path."""

    path: StageKnowledge
    stages: Mapping[str, StageKnowledge]
    groups: Mapping[str, StageKnowledge]

    def with_stages(self, catalog: StageCatalog) -> Knowledge:
        """These entries plus a generic one for each stage of ``catalog`` that has none (a custom stage): its
        meaning, latency and share of the time to first token, the stage's panel, and its owning team."""
        extra = {st.name: custom_stage_entry(st) for st in catalog if st.name not in self.stages}
        return self if not extra else replace(self, stages={**self.stages, **extra})

    def entry(self, stage: str | None) -> StageKnowledge:
        """The entry for a stage or stage group name; ``None`` gives the whole-path entry."""
        if stage is None:
            return self.path
        if stage in self.stages:
            return self.stages[stage]
        if stage in self.groups:
            return self.groups[stage]
        raise KnowledgeError(f"{KNOWLEDGE_FILE}: no entry for stage {stage!r}")


@functools.cache
def load_knowledge() -> Knowledge:
    """Read and validate the packaged knowledge file (cached)."""
    text = resources.files(KNOWLEDGE_PACKAGE).joinpath(KNOWLEDGE_FILE).read_text(encoding="utf-8")
    return parse_knowledge(text)


def parse_knowledge(text: str, source: str = KNOWLEDGE_FILE) -> Knowledge:
    """Parse knowledge TOML; entries must cover exactly the catalog's stages, ``unattributed`` and stage groups."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise KnowledgeError(f"{source}: {exc}") from None
    return knowledge_from_data(data, source)


def knowledge_from_data(data: Mapping[str, Any], source: str = KNOWLEDGE_FILE) -> Knowledge:
    """Validate parsed knowledge (see :func:`parse_knowledge`)."""
    if data.get("version") != 1:
        raise KnowledgeError(f"{source}: version: expected 1, got {data.get('version')!r}")
    if not isinstance(data.get(PATH), Mapping):
        raise KnowledgeError(f"{source}: [{PATH}]: missing (the whole-request-path entry)")
    stages = _section(data, "stages", {*STAGES.names, UNATTRIBUTED}, source)
    groups = _section(data, "groups", set(STAGE_GROUPS_BY_NAME), source)
    return Knowledge(_entry(PATH, data[PATH], source), stages, groups)


def _section(data: Mapping[str, Any], name: str, expected: set[str], source: str) -> dict[str, StageKnowledge]:
    table = data.get(name, {})
    missing = sorted(expected - set(table))
    unknown = sorted(set(table) - expected)
    if missing:
        raise KnowledgeError(f"{source}: [{name}]: no entry for {', '.join(missing)}")
    if unknown:
        raise KnowledgeError(f"{source}: [{name}]: {', '.join(unknown)} not in the stage catalog")
    return {key: _entry(f"{name}.{key}", table[key], source) for key in sorted(expected)}


def _entry(where: str, raw: Mapping[str, Any], source: str) -> StageKnowledge:
    unknown = sorted(set(raw) - set(_FIELDS))
    if unknown:
        raise KnowledgeError(f"{source}: [{where}]: unknown field(s) {', '.join(unknown)}")
    for name in ("title", "summary"):
        if not isinstance(raw.get(name), str) or not raw[name].strip():
            raise KnowledgeError(f"{source}: [{where}].{name}: a non-empty string is required")
    lists = {
        name: _strings(where, name, raw.get(name), source) for name in ("causes", "panels", "mitigations", "escalation")
    }
    checks = []
    for i, item in enumerate(raw.get("diagnosis") or ()):
        missing = [f for f in ("question", "query", "explain") if not isinstance(item.get(f), str) or not item[f]]
        if missing or set(item) - {"question", "query", "explain"}:
            raise KnowledgeError(
                f"{source}: [{where}].diagnosis[{i}]: needs exactly question, query and explain (strings)"
            )
        checks.append(Check(item["question"].strip(), item["query"].strip(), item["explain"].strip()))
    if not checks:
        raise KnowledgeError(f"{source}: [{where}].diagnosis: at least one diagnosis step is required")
    return StageKnowledge(
        key=where.rpartition(".")[2],
        title=raw["title"].strip(),
        summary=raw["summary"].strip(),
        diagnosis=tuple(checks),
        **lists,
    )


def _strings(where: str, name: str, value: Any, source: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise KnowledgeError(f"{source}: [{where}].{name}: a non-empty list of strings is required")
    return tuple(v.strip() for v in value)


def custom_stage_entry(stage: Stage) -> StageKnowledge:
    """The knowledge of a stage the curated file does not know (a custom stage): generic, from the catalog."""
    name, owner = stage.name, stage.owner
    latency = f'{STAGE_DURATION}_bucket{{stage="{name}"}}'
    share = f'sum(rate({STAGE_DURATION}_sum{{stage="{name}"}}[$window]))\n/ sum(rate({STAGE_DURATION}_sum[$window]))'
    return StageKnowledge(
        key=name,
        title=name.replace("_", " ").capitalize(),
        summary=stage.meaning,
        causes=(
            "The work this stage does got slower: a service, model or store it calls, or its own CPU.",
            "More requests reach the stage than it serves at once, so they queue inside it.",
            "A change to the stage's code or configuration (a deploy, a new rule, a larger input).",
        ),
        diagnosis=(
            Check(
                "Which routes are slow in this stage?",
                f"histogram_quantile(0.95, sum by (le, route) (rate({latency}[$window])))",
                f"p95 time in {name} per route: one route points at its inputs, all routes at the stage itself.",
            ),
            Check(
                "Is the stage taking a larger share of the request's time?",
                share,
                f"{name}'s share of all stage time; a rise while other stages hold steady isolates it.",
            ),
        ),
        panels=(f"api_path/stage:{name}:latency",),
        mitigations=(
            "Roll back the last change to the stage's code or configuration.",
            "Scale out or raise the capacity of what the stage calls, if it is saturated.",
        ),
        escalation=(f"The {owner} team owns the {name} stage.",),
    )
