"""SLO specs checked against a live Prometheus: what ``llmpath slo validate --prometheus URL`` adds to the static
checks.

An SLO whose selectors match nothing never fires: a misspelt metric or label, a target that is not scraped, or
an instrumentation whose histogram buckets do not include the threshold all compile into rules that evaluate to
no data, silently. Two checks catch that before the rules ship:

* **Bucket bounds.** :func:`live_buckets` reads the ``le`` values each latency SLI's histogram really has, so the
  compile checks thresholds against them instead of the catalog's defaults (instrumentations may set their own
  ``latency_buckets``).
* **Data.** :func:`data_issues` counts the series each SLI selector matches. A selector of the SLI's total (the
  denominator) that matches nothing means the SLI has no data; a selector of its errors may match nothing (no
  errors yet), but its metric and label names must exist. When a selector matches nothing, the message says
  which part of it does not match, and which values the label does have.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import promql_parser

from llmpath.live.promapi import PrometheusClient
from llmpath.slo import CompiledSLO, Issue
from llmpath.slo.gotemplate import render_window

#: The window the SLI templates are rendered with to find their selectors (the selectors do not depend on it).
_WINDOW = "5m"
_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}
#: How many of a label's values a message lists.
_SHOW_VALUES = 5


@dataclass(frozen=True, slots=True)
class _Query:
    field: str
    text: str
    #: The SLI's total: each selector must match series, or the SLI has no data.
    required: bool


def live_buckets(client: PrometheusClient, histograms: Iterable[str]) -> dict[str, tuple[float, ...]]:
    """Histogram name → the bucket bounds (without ``+Inf``) its ``_bucket`` series have in Prometheus; histograms
    without series are left out."""
    found: dict[str, tuple[float, ...]] = {}
    for name in sorted(set(histograms)):
        bounds = {
            float(r["metric"]["le"]) for r in client.query(f"count by (le) ({name}_bucket)") if "le" in r["metric"]
        }
        bounds.discard(float("inf"))
        if bounds:
            found[name] = tuple(sorted(bounds))
    return found


#: Where a field of a compiled SLO is written: :class:`Issue` keywords (file, slo, field, line, column).
Locate = Callable[[CompiledSLO, str], Mapping[str, object]]


def _unlocated(slo: CompiledSLO, field: str) -> Mapping[str, object]:
    return {"file": slo.source, "slo": slo.id, "field": field}


def data_issues(client: PrometheusClient, slos: Sequence[CompiledSLO], locate: Locate = _unlocated) -> list[Issue]:
    """Warnings for SLI selectors that match no series in Prometheus (see the module docstring); ``locate`` places
    them in the spec files (the SLO's ``SLOSpec.where``)."""
    issues: list[Issue] = []
    counts: dict[str, int] = {}

    def count(selector: str) -> int:
        if selector not in counts:
            counts[selector] = int(client.query_value(f"count({selector})") or 0)
        return counts[selector]

    for slo in slos:
        seen: set[tuple[str, bool]] = set()
        for query in _queries(slo):
            for selector in _selectors(query.text):
                if (str(selector), query.required) in seen:
                    continue
                seen.add((str(selector), query.required))
                message = _diagnose(client, count, selector, query.required)
                if message is not None:
                    issues.append(Issue(message, severity="warning", **locate(slo, query.field)))  # type: ignore[arg-type]
    return issues


def _queries(slo: CompiledSLO) -> Iterator[_Query]:
    sli = slo.sli
    if sli.kind == "latency":
        matchers = [f"{k}={_quote(v)}" for k, v in sli.selector.items()] + ([sli.filter] if sli.filter else [])
        selector = ",".join(matchers)
        yield _Query("sli.latency.histogram", f"{sli.histogram}_count{{{selector}}}", True)
    elif sli.kind == "ratio":
        for key in ("good", "bad"):
            if (text := getattr(sli, key)) is not None:
                yield _Query(f"sli.ratio.{key}", text, False)
        if sli.total is not None:
            yield _Query("sli.ratio.total", sli.total, True)
    elif sli.error_ratio_query is not None:  # raw (and plugin) SLIs: which selector counts what is unknown
        yield _Query(f"sli.{sli.kind}.error_ratio_query", render_window(sli.error_ratio_query, _WINDOW), False)
    else:
        if sli.error_query is not None:
            yield _Query("sli.events.error_query", render_window(sli.error_query, _WINDOW), False)
        if sli.total_query is not None:
            yield _Query("sli.events.total_query", render_window(sli.total_query, _WINDOW), True)


def _selectors(query: str) -> list[promql_parser.VectorSelector]:
    found: list[promql_parser.VectorSelector] = []

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            found.append(node)

    promql_parser.walk(promql_parser.parse(query), visit)
    return found


def _diagnose(
    client: PrometheusClient, count: Callable[[str], int], selector: promql_parser.VectorSelector, required: bool
) -> str | None:
    """Why ``selector`` matches nothing (``None`` when it matches, or when matching nothing is fine)."""
    text = str(selector)
    if count(text):
        return None
    reason = _mismatch(client, count, selector, required)
    if reason is None:
        return None
    return f"`{text}`: {reason}" + ("; the SLI has no data" if required else "")


def _mismatch(
    client: PrometheusClient, count: Callable[[str], int], selector: promql_parser.VectorSelector, required: bool
) -> str | None:
    """The first part of a selector that matches nothing: its metric, a label name, or a label matcher."""
    metric = selector.name
    if not metric:
        return "matches no series in Prometheus" if required else None
    if not count(metric):
        return f"no series of {metric} in Prometheus (misspelt, not scraped, or no traffic yet)"
    matchers = [(m.name, _OPS[str(m.op).split(".")[-1]], m.value) for m in selector.matchers.matchers]
    matchers = [m for m in matchers if m[0] != "__name__"]
    for name, _, _ in matchers:
        if not count(f'{metric}{{{name}!=""}}'):
            return f"no series of {metric} has the label {name!r}"
    if not required:
        return None  # an error selector with nothing to count yet: no errors so far
    for name, op, value in matchers:
        matcher = f"{name}{op}{_quote(value)}"
        if not count(f"{metric}{{{matcher}}}"):
            values = sorted(r["metric"].get(name, "") for r in client.query(f"count by ({name}) ({metric})"))
            shown = ", ".join(repr(v) for v in values[:_SHOW_VALUES]) + (", …" if len(values) > _SHOW_VALUES else "")
            return f"no series of {metric} has {matcher} (its values: {shown})"
    return "matches no series in Prometheus, though each of its label matchers alone does"


def _quote(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
