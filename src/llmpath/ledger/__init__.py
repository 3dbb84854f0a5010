"""Reading the usage ledger the instrumentation writes (one record per request): summaries, the slowest requests,
one request's timeline. ``llmpath usage`` is the command line over it."""

from llmpath.ledger.prices import ModelPrice, PriceFileError, Prices, load_prices
from llmpath.ledger.reading import read_ledger
from llmpath.ledger.summary import (
    CacheRow,
    CostRow,
    CostSummary,
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
    "CostRow",
    "CostSummary",
    "LedgerSummary",
    "ModelPrice",
    "PriceFileError",
    "Prices",
    "RouteRow",
    "StageRow",
    "TenantRow",
    "find",
    "load_prices",
    "percentile",
    "read_ledger",
    "select",
    "slowest",
    "stage_totals",
    "summarize",
]
