"""Checks for generated dashboards (and any PromQL llmpath generates): JSON schema, structure, PromQL, metric names.

``queries(dashboard, variables)`` extracts every query with Grafana variables substituted, ready for
``promql_parser.parse`` or Prometheus' ``/api/v1/query``; the end-to-end test reuses it.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import resources
from typing import Any

import promql_parser

from llmpath.instrumentation import catalog

#: Series Prometheus itself provides that dashboards may read.
PROMETHEUS_BUILTINS: frozenset[str] = frozenset({"ALERTS", "ALERTS_FOR_STATE"})

#: Values used for Grafana's global variables when expanding a query outside Grafana.
DEFAULT_GLOBALS: Mapping[str, str] = {
    "__rate_interval": "1m",
    "__interval": "30s",
    "__range": "1h",
    "__range_s": "3600",
    "__range_ms": "3600000",
    "__interval_ms": "30000",
}
#: Range windows a dashboard query may use: Grafana picks them from the scrape interval and the time range.
ALLOWED_RANGES: frozenset[str] = frozenset({"$__rate_interval", "$__range", "$__interval"})

_VARIABLE_RE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)(?::\w+)?\]\]|\$(\w+)")
_RANGE_RE = re.compile(r"\[([^\]:]+)(?::[^\]]*)?\]")
_LABEL_VALUES_RE = re.compile(r"^label_values\((?:(?P<selector>.+),\s*)?(?P<label>\w+)\)$", re.DOTALL)
_ALWAYS_ALLOWED_LABELS = frozenset({"job", "instance", "__name__"})
#: Labels SGLang adds to its base labels in some deployments (priority scheduling, DP, router aggregation).
_SGLANG_OPTIONAL_LABELS = frozenset({"priority", "dp_rank", "worker_addr"})


class PromQLError(ValueError):
    """A query that does not parse (after variable substitution)."""


# ------------------------------------------------------------------------------------------------ variables


def variable_defaults(dashboard: Mapping[str, Any]) -> dict[str, str]:
    """Each template variable's value when "All" (or its current value) is selected."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("includeAll"):
            values[var["name"]] = var.get("allValue") or ".*"
        elif isinstance(var.get("current"), Mapping) and var["current"].get("value") is not None:
            value = var["current"]["value"]
            values[var["name"]] = value if isinstance(value, str) else "|".join(value)
        else:
            values[var["name"]] = var["name"]
    return values


def expand(expr: str, variables: Mapping[str, str]) -> str:
    """Substitute Grafana variables (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``); unknown ones raise ``KeyError``."""

    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g is not None)
        if name in variables:
            return variables[name]
        if name in DEFAULT_GLOBALS:
            return DEFAULT_GLOBALS[name]
        raise KeyError(f"undefined Grafana variable ${name}")

    return _VARIABLE_RE.sub(replace, expr)


def iter_panels(dashboard: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """Every panel, including those nested in collapsed rows, in document order."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", []) if panel.get("type") == "row" else ()


def queries(dashboard: Mapping[str, Any], variables: Mapping[str, str] | None = None) -> list[str]:
    """Every target expression of a dashboard with its variables substituted.

    ``variables`` overrides the defaults (each variable's "All" value, ``$__rate_interval`` = 1m, ``$__range`` = 1h),
    e.g. ``queries(d, {"__rate_interval": "15s", "route": "chat"})``.
    """
    values = {**variable_defaults(dashboard), **(variables or {})}
    return [
        expand(target["expr"], values)
        for panel in iter_panels(dashboard)
        for target in panel.get("targets", [])
        if target.get("expr")
    ]


# ------------------------------------------------------------------------------------------------ PromQL


@dataclass(frozen=True, slots=True)
class Selector:
    """A vector selector found in an expression."""

    name: str | None
    matchers: tuple[tuple[str, str, str], ...]  # (label, op, value)
    in_range: bool  # inside a range selector (rate(x[5m]) …)

    @property
    def name_matcher(self) -> tuple[str, str] | None:
        """(op, value) of a ``__name__`` matcher, if any."""
        return next(((op, v) for label, op, v in self.matchers if label == "__name__"), None)


def parse(expr: str) -> promql_parser.Expr:
    """Parse PromQL; raise :class:`PromQLError` with the expression on failure."""
    try:
        return promql_parser.parse(expr)
    except (ValueError, TypeError) as exc:
        raise PromQLError(f"does not parse: {exc}\n    {expr}") from None


def selectors(expr: str | promql_parser.Expr) -> list[Selector]:
    """All vector selectors of an expression, in order."""
    node = parse(expr) if isinstance(expr, str) else expr
    found: list[Selector] = []
    _collect(node, False, found)
    return found


_OPS = {"MatchOp.Equal": "=", "MatchOp.NotEqual": "!=", "MatchOp.Re": "=~", "MatchOp.NotRe": "!~"}


def _collect(node: Any, in_range: bool, out: list[Selector]) -> None:
    if isinstance(node, promql_parser.VectorSelector):
        matchers = tuple((m.name, _OPS.get(str(m.op), str(m.op)), m.value) for m in node.matchers.matchers)
        out.append(Selector(node.name or None, matchers, in_range))
    elif isinstance(node, promql_parser.MatrixSelector):
        _collect(node.vector_selector, True, out)
    elif isinstance(node, promql_parser.BinaryExpr):
        _collect(node.lhs, in_range, out)
        _collect(node.rhs, in_range, out)
    elif isinstance(node, promql_parser.Call):
        for arg in node.args:
            _collect(arg, in_range, out)
    elif isinstance(node, promql_parser.AggregateExpr):
        _collect(node.expr, in_range, out)
        if node.param is not None:
            _collect(node.param, in_range, out)
    elif isinstance(node, promql_parser.SubqueryExpr):
        _collect(node.expr, True, out)
    elif isinstance(node, promql_parser.UnaryExpr | promql_parser.ParenExpr):
        _collect(node.expr, in_range, out)


def known_metric_names(rule_names: Iterable[str] = ()) -> frozenset[str]:
    """Series a query may read: the catalog's llmpath and SGLang series, recording rules, Prometheus' ALERTS."""
    return catalog.known_series_names() | catalog.sglang_series_names() | PROMETHEUS_BUILTINS | frozenset(rule_names)


def metric_names(expr: str, known: Iterable[str]) -> set[str]:
    """The known series names an expression reads (``__name__`` regexes resolved against ``known``)."""
    known = frozenset(known)
    names: set[str] = set()
    for s in selectors(expr):
        if s.name:
            names.add(s.name)
        elif (nm := s.name_matcher) is not None:
            names |= _resolve_name_matcher(*nm, known)
    return names


def _resolve_name_matcher(op: str, value: str, known: frozenset[str]) -> set[str]:
    if op == "=":
        return {value}
    if op == "=~":
        pattern = re.compile(value)
        return {n for n in known if pattern.fullmatch(n)}
    return set()


def expression_problems(expr: str, known: Iterable[str]) -> list[str]:
    """Why an expression would not work: it does not parse, reads an unknown metric, or filters on a label
    the catalog says that metric does not have (a query that silently returns nothing)."""
    known = frozenset(known)
    try:
        found = selectors(expr)
    except PromQLError as exc:
        return [str(exc)]
    problems: list[str] = []
    for s in found:
        if s.name:
            if s.name not in known:
                problems.append(f"unknown metric {s.name!r}")
                continue
            problems.extend(_label_problems(s.name, s))
        elif (nm := s.name_matcher) is not None:
            matched = _resolve_name_matcher(*nm, known)
            if not matched:
                problems.append(f"__name__{nm[0]}{nm[1]!r} matches no known metric")
            for name in sorted(matched):
                problems.extend(_label_problems(name, s))
        else:
            problems.append("selector without a metric name")
    return problems


def _label_problems(series: str, s: Selector) -> list[str]:
    allowed = _catalog_labels(series)
    if allowed is None:
        return []
    return [
        f"{series} has no label {label!r} (catalog labels: {', '.join(sorted(allowed - _ALWAYS_ALLOWED_LABELS))})"
        for label, _, _ in s.matchers
        if label not in allowed
    ]


@functools.cache
def _catalog_labels(series: str) -> frozenset[str] | None:
    """Labels a catalog series may carry, or None for series the catalog does not describe (recording rules)."""
    canonical = series.replace("sglang_", "sglang:", 1) if series.startswith("sglang_") else series
    for spec in (*catalog.METRICS, *catalog.SGLANG_METRICS):
        if canonical in spec.sample_names:
            labels = set(spec.labels) | _ALWAYS_ALLOWED_LABELS
            if canonical.endswith("_bucket") and spec.kind == "histogram":
                labels.add("le")
            if spec.name.startswith("sglang:"):
                labels |= _SGLANG_OPTIONAL_LABELS
            return frozenset(labels)
    return None


# ------------------------------------------------------------------------------------------------ dashboards


@functools.cache
def dashboard_schema() -> dict[str, Any]:
    """Grafana's classic dashboard JSON schema (vendored from grafana-foundation-sdk, see schema/SOURCE.md)."""
    text = resources.files("llmpath.dashboards").joinpath("schema/dashboard.jsonschema.json").read_text("utf-8")
    return json.loads(text)


def schema_errors(dashboard: Mapping[str, Any]) -> list[str]:
    """Schema violations, each with its JSON path; ``oneOf`` failures are explained by their closest branch."""
    from jsonschema import Draft7Validator
    from jsonschema.exceptions import best_match

    validator = Draft7Validator(dashboard_schema())
    problems = []
    for error in sorted(validator.iter_errors(dashboard), key=lambda e: [str(p) for p in e.absolute_path]):
        cause = best_match(_branch_errors(error)) if error.context else error
        path = "/".join(str(p) for p in cause.absolute_path) or "<root>"
        problems.append(f"{path}: {cause.message}")
    return problems


def _branch_errors(error: Any) -> list[Any]:
    """For a panel's ``oneOf`` (Panel | RowPanel) failure, the errors of the branch its ``type`` selects."""
    instance = error.instance
    if isinstance(instance, Mapping) and "type" in instance:
        branch = 1 if instance["type"] == "row" else 0
        chosen = [e for e in error.context if e.relative_schema_path and e.relative_schema_path[0] == branch]
        if chosen:
            return chosen
    return list(error.context)


def dashboard_problems(dashboard: Mapping[str, Any], known: Iterable[str]) -> list[str]:
    """Everything wrong with a generated dashboard: schema, structure, and each query (see module docstring)."""
    known = frozenset(known)
    problems = schema_errors(dashboard)
    uid = dashboard.get("uid", "")
    if not 8 <= len(uid) <= 40:
        problems.append(f"uid {uid!r} must be 8-40 characters")
    defined = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
    if "datasource" not in defined:
        problems.append("no 'datasource' template variable")
    values = variable_defaults(dashboard)
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            problems.extend(f"variable {var['name']}: {p}" for p in _variable_problems(var.get("query"), values, known))
    for annotation in dashboard.get("annotations", {}).get("list", []):
        if annotation.get("expr"):
            problems.extend(
                f"annotation {annotation['name']!r}: {p}" for p in expression_problems(annotation["expr"], known)
            )
    ids: dict[int, str] = {}
    cells: dict[tuple[int, int], str] = {}
    for panel in iter_panels(dashboard):
        title = panel.get("title", "")
        where = f"panel {panel.get('id')} {title!r}"
        pid = panel.get("id")
        if not isinstance(pid, int):
            problems.append(f"{where}: no explicit id")
        elif pid in ids:
            problems.append(f"{where}: id collides with panel {ids[pid]!r}")
        else:
            ids[pid] = title
        problems.extend(f"{where}: {p}" for p in _grid_problems(panel, cells, title))
        if panel.get("type") == "row":
            continue
        problems.extend(f"{where}: {p}" for p in _panel_problems(panel, values, known))
    return problems


def _variable_problems(query: Any, values: Mapping[str, str], known: frozenset[str]) -> list[str]:
    match = _LABEL_VALUES_RE.match(query.strip()) if isinstance(query, str) else None
    if match is None:
        return [f"query {query!r} is not label_values([selector,] label)"]
    if match["selector"] is None:
        return []
    try:
        selector = expand(match["selector"], values)
    except KeyError as exc:
        return [exc.args[0]]
    problems = expression_problems(selector, known)
    if not problems:
        for name in metric_names(selector, known):
            allowed = _catalog_labels(name)
            if allowed is not None and match["label"] not in allowed:
                problems.append(f"{name} has no label {match['label']!r}")
    return problems


def _grid_problems(panel: Mapping[str, Any], cells: dict[tuple[int, int], str], title: str) -> list[str]:
    pos = panel.get("gridPos")
    if not pos:
        return ["no gridPos"]
    if pos["x"] + pos["w"] > 24:
        return [f"gridPos exceeds 24 columns: {pos}"]
    for x in range(pos["x"], pos["x"] + pos["w"]):
        for y in range(pos["y"], pos["y"] + pos["h"]):
            if (x, y) in cells:
                return [f"overlaps panel {cells[(x, y)]!r} at x={x}, y={y}"]
            cells[(x, y)] = title
    return []


def _panel_problems(panel: Mapping[str, Any], values: Mapping[str, str], known: frozenset[str]) -> list[str]:
    problems = []
    if not panel.get("title"):
        problems.append("no title")
    if not panel.get("description"):
        problems.append("no description")
    if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
        problems.append("no unit")
    if panel.get("datasource") != {"type": "prometheus", "uid": "${datasource}"}:
        problems.append(f"datasource is {panel.get('datasource')!r}, not the ${{datasource}} variable")
    targets = panel.get("targets") or []
    if not targets:
        problems.append("no targets")
    ref_ids = [t.get("refId") for t in targets]
    if any(not r for r in ref_ids) or len(set(ref_ids)) != len(ref_ids):
        problems.append(f"targets need unique refIds, got {ref_ids}")
    for target in targets:
        ref = target.get("refId")
        if target.get("datasource") != panel.get("datasource"):
            problems.append(f"target {ref}: datasource differs from the panel's")
        expr = target.get("expr", "")
        bad_ranges = sorted({r for r in _RANGE_RE.findall(expr) if r not in ALLOWED_RANGES})
        if bad_ranges:
            problems.append(f"target {ref}: fixed range {bad_ranges}; use [$__rate_interval] or [$__range]")
        try:
            expanded = expand(expr, values)
        except KeyError as exc:
            problems.append(f"target {ref}: {exc.args[0]}")
            continue
        problems.extend(f"target {ref}: {p}" for p in expression_problems(expanded, known))
        problems.extend(f"target {ref}: {p}" for p in _counter_problems(expanded))
    return problems


def _counter_problems(expr: str) -> list[str]:
    try:
        found = selectors(expr)
    except PromQLError:
        return []
    return [
        f"counter {s.name or s.name_matcher} read without rate()/increase()"
        for s in found
        if not s.in_range and ((s.name or "").endswith("_total") or (s.name_matcher or ("", ""))[1].endswith("_total"))
    ]
