"""Budget arithmetic against the SRE Workbook's tables."""

from __future__ import annotations

from datetime import timedelta

import pytest

from llmpath.runbooks.budget import budget_spent, duration, exhaustion_time, humanize


@pytest.mark.parametrize(
    ("period", "rate", "expected"),
    [
        ("30d", 1, timedelta(days=30)),  # Workbook table 5-4: burn 1 → 30 days
        ("30d", 2, timedelta(days=15)),
        ("30d", 10, timedelta(days=3)),
        ("30d", 1000, timedelta(minutes=43.2)),
        ("30d", 14.4, timedelta(hours=50)),
        ("4w", 13.44, timedelta(hours=50)),
        ("1h", 14.4, timedelta(seconds=250)),
    ],
)
def test_exhaustion_time(period: str, rate: float, expected: timedelta) -> None:
    assert abs(exhaustion_time(period, rate) - expected) < timedelta(milliseconds=1)


def test_budget_spent_matches_sloths_window_catalog() -> None:
    # Sloth's google-30d catalog: 2% in 1h at 14.4, 5% in 6h at 6, 10% in 1d at 3, 10% in 3d at 1.
    assert budget_spent("30d", 14.4, "1h") == pytest.approx(0.02)
    assert budget_spent("30d", 6, "6h") == pytest.approx(0.05)
    assert budget_spent("30d", 3, "1d") == pytest.approx(0.10)
    assert budget_spent("30d", 1, "3d") == pytest.approx(0.10)
    assert budget_spent("28d", 13.44, "1h") == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("span", "text"),
    [
        (timedelta(hours=50), "about 2.1 days (50 hours)"),
        (timedelta(days=30), "about 30 days (720 hours)"),
        (timedelta(hours=5), "about 5 hours"),
        (timedelta(hours=7.5), "about 7.5 hours"),
        (timedelta(minutes=43.2), "about 43 minutes"),
    ],
)
def test_humanize(span: timedelta, text: str) -> None:
    assert humanize(span) == text


def test_bad_input_is_rejected() -> None:
    with pytest.raises(ValueError, match="invalid duration '3 days'"):
        duration("3 days")
    with pytest.raises(ValueError, match="burn rate must be positive"):
        exhaustion_time("30d", 0)
