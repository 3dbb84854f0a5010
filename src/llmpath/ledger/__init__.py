"""Reading the usage ledger the instrumentation writes (one record per request): summaries, the slowest requests,
one request's timeline. ``llmpath usage`` is the command line over it."""

from llmpath.ledger.reading import read_ledger
from llmpath.ledger.summary import (
    CacheRow,
    LedgerSummary,
    RouteRow,
    StageRow,
    TenantRow,
    find,
    percentile,
    select,
    slowest,
    stage_totals,
    summarize,
)

__all__ = [
    "CacheRow",
    "LedgerSummary",
    "RouteRow",
    "StageRow",
    "TenantRow",
    "find",
    "percentile",
    "read_ledger",
    "select",
    "slowest",
    "stage_totals",
    "summarize",
]
