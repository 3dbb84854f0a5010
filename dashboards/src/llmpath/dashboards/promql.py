"""Small PromQL builders for dashboard queries.

They encode the conventions every llmpath query follows: ``[$__rate_interval]`` windows, ratios guarded with
``(denominator > 0)``, both ``sglang:`` and ``sglang_`` spellings of engine metrics, and the dashboard's
``$route``/``$model`` variables applied only to metrics that carry those labels (read from the stage catalog).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from llmpath.instrumentation import catalog

RATE_INTERVAL = "$__rate_interval"

#: Dashboard variable → the label it filters, per metric family prefix.
_LLMPATH_SCOPE: Mapping[str, str] = {"route": "$route", "model": "$model"}
_SGLANG_SCOPE: Mapping[str, str] = {"model_name": "$model"}

_FAMILIES: Mapping[str, catalog.MetricSpec] = {m.name: m for m in (*catalog.METRICS, *catalog.SGLANG_METRICS)}
_SUFFIXES = ("_bucket", "_count", "_sum")


def family(series: str) -> catalog.MetricSpec:
    """The catalog entry of a series name (``x_bucket`` → histogram ``x``); ``KeyError`` if unknown."""
    if series in _FAMILIES:
        return _FAMILIES[series]
    for suffix in _SUFFIXES:
        base = series.removesuffix(suffix)
        if base != series and base in _FAMILIES and _FAMILIES[base].kind == "histogram":
            return _FAMILIES[base]
    raise KeyError(f"{series!r} is not in the stage catalog (llmpath.instrumentation.catalog)")


def sel(series: str, *matchers: str, scoped: bool = True) -> str:
    """A selector for a catalog series, with the dashboard variables its labels allow.

    ``sglang:`` names become ``{__name__=~"sglang[:_]<name>"}`` so that both a worker's own ``/metrics`` and
    sglang-router's ``/engine_metrics`` (which rewrites ``:`` to ``_``) are matched.
    """
    spec = family(series)
    scope: list[str] = []
    if scoped:
        variables = _SGLANG_SCOPE if spec.name.startswith("sglang:") else _LLMPATH_SCOPE
        scope = [f'{label}=~"{var}"' for label, var in variables.items() if label in spec.labels]
    parts = [*matchers, *scope]
    if series.startswith("sglang:"):
        pattern = "sglang[:_]" + series.removeprefix("sglang:")
        return "{" + ", ".join([f'__name__=~"{pattern}"', *parts]) + "}"
    return f"{series}{{{', '.join(parts)}}}" if parts else series


def by(labels: Iterable[str]) -> str:
    """`` by (a, b) `` or an empty string."""
    labels = tuple(labels)
    return f" by ({', '.join(labels)})" if labels else ""


def sum_rate(selector: str, group: Iterable[str] = (), window: str = RATE_INTERVAL) -> str:
    """``sum by (group) (rate(selector[window]))``."""
    return f"sum{by(group)} (rate({selector}[{window}]))"


def sum_increase(selector: str, group: Iterable[str] = (), window: str = "$__range") -> str:
    """``sum by (group) (increase(selector[window]))`` (default: over the dashboard's time range)."""
    return f"sum{by(group)} (increase({selector}[{window}]))"


def ratio(numerator: str, denominator: str) -> str:
    """``numerator / (denominator > 0)``: no division by zero, "no data" instead of NaN when idle."""
    return f"{numerator}\n/\n({denominator} > 0)"


def zero_if_absent(expr: str, like: str) -> str:
    """``expr`` or, for label sets where it has no series yet, ``like * 0``.

    Counters with labels appear only once incremented (no 5xx yet, no rejection yet); this keeps a ratio at 0
    instead of "no data" while the denominator has traffic.
    """
    return f"({expr} or {like} * 0)"


def quantile(q: float, histogram: str, *matchers: str, group: Iterable[str] = ()) -> str:
    """``histogram_quantile(q, sum by (le, group) (rate(<histogram>_bucket[...])))``."""
    bucket = sel(f"{histogram}_bucket", *matchers)
    return f"histogram_quantile({q}, {sum_rate(bucket, ('le', *group))})"


def mean(histogram: str, *matchers: str, group: Iterable[str] = ()) -> str:
    """Mean observation: ``sum(rate(_sum)) / (sum(rate(_count)) > 0)``. Means add up; percentiles do not."""
    return ratio(
        sum_rate(sel(f"{histogram}_sum", *matchers), group),
        sum_rate(sel(f"{histogram}_count", *matchers), group),
    )
