"""llmpath runbooks: one Markdown runbook per alert, generated from SLO specs and the stage knowledge file.

``build_runbooks(compiled_slos, grafana_url, panel_titles=...)`` returns ``{file name: Markdown}`` (file names are
the compiler's ``AlertInfo.runbook_file``) plus the index ``README.md``; ``load_knowledge()`` reads the curated
``stage_knowledge.toml`` that sits next to the stage catalog.
"""

from llmpath.runbooks.budget import budget_spent, exhaustion_time, humanize
from llmpath.runbooks.knowledge import Knowledge, KnowledgeError, StageKnowledge, load_knowledge, parse_knowledge
from llmpath.runbooks.render import INDEX, RunbookError, build_runbooks, is_generated

__all__ = [
    "INDEX",
    "Knowledge",
    "KnowledgeError",
    "RunbookError",
    "StageKnowledge",
    "budget_spent",
    "build_runbooks",
    "exhaustion_time",
    "humanize",
    "is_generated",
    "load_knowledge",
    "parse_knowledge",
]
