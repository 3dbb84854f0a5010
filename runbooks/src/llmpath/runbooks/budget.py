"""Error-budget arithmetic for runbooks (SRE Workbook ch. 5): how long the budget lasts at a burn rate."""

from __future__ import annotations

from datetime import timedelta

import promql_parser


def duration(text: str) -> timedelta:
    """A Prometheus duration (``5m``, ``1h30m``, ``4w``) as a timedelta; ``ValueError`` if malformed."""
    try:
        return promql_parser.parse_duration(text)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"invalid duration {text!r}: {exc}") from None


def exhaustion_time(period: str, burn_rate: float) -> timedelta:
    """At ``burn_rate`` (1 = exactly the budget over the period), the whole period's budget lasts period ÷ rate."""
    if burn_rate <= 0:
        raise ValueError(f"burn rate must be positive, got {burn_rate}")
    return duration(period) / burn_rate


def budget_spent(period: str, burn_rate: float, window: str) -> float:
    """Share of the period's budget spent while burning at ``burn_rate`` for ``window`` (0-1)."""
    return burn_rate * (duration(window) / duration(period))


def humanize(span: timedelta) -> str:
    """``about 2.1 days (50 hours)``, ``about 7 hours``, ``about 43 minutes``: the runbooks' wording."""
    hours = span.total_seconds() / 3600
    if hours < 1:
        return f"about {_num(hours * 60)} minutes"
    if hours < 48:
        return f"about {_num(hours)} hours"
    return f"about {_num(hours / 24)} days ({_num(hours)} hours)"


def _num(value: float) -> str:
    """At most one decimal, none when it is a whole number or large."""
    if value >= 10 or abs(value - round(value)) < 0.05:
        return str(round(value))
    return f"{value:.1f}"
