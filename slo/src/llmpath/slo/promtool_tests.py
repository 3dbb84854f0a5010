"""Generated ``promtool test rules`` files: synthetic traffic that burns each SLO's budget at chosen rates, and the
alerts the math predicts, minute by minute.

For every SLO four scenarios run against the real generated rule file:

* a fast burn (about 20x the budget): the page alert fires at the step the windows predict (and not one step
  earlier);
* a slow burn (about 4x, between the ticket and the page factors): the ticket fires, the page never does;
* a low burn (0.5x): nothing fires;
* zero traffic: only the absent alert fires, where the SLO has one.

Input series are built from the SLI's own PromQL: the selectors of ``sum(rate(...))`` terms become counters whose
labels satisfy the matchers (good/bad/total roles inferred from the expression's shape, ``le`` spellings included).
A counter on the left of ``or`` (``bad or 0 * total``) appears only just before its first increment, so both sides
of the ``or`` are evaluated. Expected values come from a simulator that evaluates the recording expressions the way
Prometheus 2.42 does (closed range windows, ``rate`` extrapolation, float operation order), so ``promql_expr_test``
values are exact.
SLIs whose PromQL has another shape get their ``slo:sli_error:ratio_rate<window>`` series injected directly, which
tests the alerting layer (windows, factors, labels, annotations) but not the SLI query itself.
"""

from __future__ import annotations

import itertools
import math
import re
import urllib.parse
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import promql_parser
import yaml

from llmpath.slo import rules as R
from llmpath.slo.errors import IssueLog
from llmpath.slo.gofmt import duration_hours, format_duration, go_float, go_quote, parse_duration
from llmpath.slo.matchers import Matcher, matches_all, satisfy
from llmpath.slo.model import Rule
from llmpath.slo.names import bounded_file_name

if TYPE_CHECKING:
    from llmpath.slo.compiler import Compiled

MAX_STEPS = 6000
_OPS = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}


class Unsupported(Exception):
    """The expression or template is beyond what the test generator can model."""


# --------------------------------------------------------------------------------------------
# A tiny PromQL evaluator for the shapes SLI queries use.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Leaf:
    """``sum [by (...)] (rate|increase(selector[range]))``."""

    matchers: tuple[Matcher, ...]
    func: str
    range_s: int
    by: tuple[str, ...]


Tree = tuple  # ("leaf", Leaf) | ("const", float) | (op, a, b) with op in + - * / or >


def to_tree(node: Any) -> Tree:
    """Convert a promql_parser AST into the evaluator's tree; :class:`Unsupported` for anything else."""
    if isinstance(node, promql_parser.ParenExpr):
        return to_tree(node.expr)
    if isinstance(node, promql_parser.NumberLiteral):
        return ("const", float(node.val))
    if isinstance(node, promql_parser.AggregateExpr):
        if str(node.op) != "sum" or node.param is not None:
            raise Unsupported(f"aggregation {node.op}")
        by: tuple[str, ...] = ()
        if node.modifier is not None:
            if "By" not in str(node.modifier.type):
                raise Unsupported("sum without")
            by = tuple(node.modifier.labels)
        call = node.expr
        if not isinstance(call, promql_parser.Call) or call.func.name not in ("rate", "increase"):
            raise Unsupported("sum of something other than rate/increase")
        matrix = call.args[0]
        if not isinstance(matrix, promql_parser.MatrixSelector):
            raise Unsupported("rate of a non-selector")
        vs = matrix.vector_selector
        if vs.offset is not None or vs.at is not None or not vs.name:
            raise Unsupported("offset/@ or nameless selector")
        matchers = [Matcher("__name__", "=", vs.name)]
        matchers += [Matcher(m.name, _OPS[str(m.op).split(".")[-1]], m.value) for m in vs.matchers.matchers]
        return ("leaf", Leaf(tuple(matchers), call.func.name, int(matrix.range.total_seconds()), by))
    if isinstance(node, promql_parser.BinaryExpr):
        op = str(node.op)
        # `or` always carries many-to-many matching; only on(...)/ignoring(...) change what it does.
        plain_or = op == "or" and node.modifier is not None and node.modifier.matching is None
        if op not in ("+", "-", "*", "/", "or", ">") or (node.modifier is not None and not plain_or):
            raise Unsupported(f"binary operator {op} with vector matching")
        lhs, rhs = to_tree(node.lhs), to_tree(node.rhs)
        if op == ">" and rhs[0] != "const":
            raise Unsupported("comparison with a vector")
        return (op, lhs, rhs)
    raise Unsupported(type(node).__name__)


def parse_tree(expr: str) -> Tree:
    try:
        return to_tree(promql_parser.parse(expr))
    except (ValueError, AttributeError, TypeError) as exc:
        raise Unsupported(str(exc)) from exc


def leaves(tree: Tree) -> list[Leaf]:
    if tree[0] == "leaf":
        return [tree[1]]
    if tree[0] == "const":
        return []
    return leaves(tree[1]) + leaves(tree[2])


def _sum(values: list[float]) -> float:
    """Prometheus' ``sum_over_time``: Kahan-Neumaier compensated summation, left to right (``kahanSumInc``)."""
    total = comp = 0.0
    for v in values:
        t = total + v
        if abs(total) >= abs(v):
            comp += (total - t) + v
        else:
            comp += (v - t) + total
        total = t
    return total if math.isinf(total) else total + comp


def _div(a: float, b: float) -> float:
    if b == 0:
        if a == 0 or math.isnan(a):
            return math.nan
        return math.copysign(math.inf, a)
    return a / b


# Values: float (a vector element of this group), ("s", x) for a scalar, None for an empty result.
def _binop(op: str, a: Any, b: Any) -> Any:
    if op == "or":
        return a if a is not None else b
    if a is None or b is None:
        return None
    sa, sb = isinstance(a, tuple), isinstance(b, tuple)
    x, y = (a[1] if sa else a), (b[1] if sb else b)
    if op == ">":
        return a if x > y else None
    out = {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y, "/": lambda: _div(x, y)}[op]()
    return ("s", out) if sa and sb else out


# --------------------------------------------------------------------------------------------
# Synthetic traffic.
# --------------------------------------------------------------------------------------------


@dataclass
class Series:
    """One synthetic counter: its labels (``__name__`` included), group, and role (total/good/bad).

    A ``lazy`` counter does not exist until just before its first increment (it then starts at 0), as a client
    library creates a labelled counter (``code="500"``) with its first error: the SLI's ``or 0 * total``
    fallback is what answers while it is absent.
    """

    labels: dict[str, str]
    group: int
    role: str
    lazy: bool = False

    def sort_key(self) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(self.labels.items()))

    def text(self) -> str:
        name = self.labels.get("__name__", "")
        inner = ",".join(f"{k}={go_quote(v)}" for k, v in sorted(self.labels.items()) if k != "__name__")
        return f"{name}{{{inner}}}"


@dataclass
class Scenario:
    """Per-step counts: ``total`` requests per step on every group, ``errors`` per step on burning groups."""

    name: str
    total: int
    errors: int
    start: int
    steps: int
    traffic: bool = True
    target: str | None = None

    def increments(self, role: str, burning: bool, step: int) -> int:
        if not self.traffic or step == 0:
            return 0
        err = self.errors if burning and step > self.start else 0
        return {"total": self.total, "bad": err, "good": self.total - err}[role]


@dataclass
class Fixture:
    """How one SLO's SLI is fed: counters built from its selectors, or injected SLI ratio series."""

    kind: str  # "counters" | "injected"
    series: list[Series] = field(default_factory=list)
    groups: list[dict[str, str]] = field(default_factory=list)
    burning: list[bool] = field(default_factory=list)


class Simulation:
    """Evaluates the SLO's recording rules and alerts step by step, as Prometheus 2.42 would."""

    def __init__(self, item: Compiled, fixture: Fixture, scenario: Scenario, step_s: int, trees: dict[str, Tree]):
        self.item = item
        self.fixture = fixture
        self.scenario = scenario
        self.step_s = step_s
        self.trees = trees  # record name -> tree (counters fixtures)
        # Cumulative counts per (group, role), shared by the series that play that role.
        self.counts: dict[tuple[int, str], list[int]] = {}
        for g, burning in enumerate(fixture.burning):
            for role in ("total", "bad", "good"):
                self.counts[(g, role)] = list(
                    itertools.accumulate(scenario.increments(role, burning, k) for k in range(scenario.steps + 1))
                )
        self.values: dict[int, list[int | None]] = {}
        #: Per series, the first step it has a sample (``None``: never).
        self.born: dict[int, int | None] = {}
        for i, series in enumerate(fixture.series):
            cumulative: list[int | None] = list(self.counts[(series.group, series.role)])
            born: int | None = 0
            if series.lazy:
                born = next((k - 1 for k in range(1, len(cumulative)) if cumulative[k] != cumulative[k - 1]), None)
                cumulative = [None if born is None or k < born else v for k, v in enumerate(cumulative)]
            self.values[i], self.born[i] = cumulative, born
        self.ordered = sorted(range(len(fixture.series)), key=lambda i: fixture.series[i].sort_key())
        self._cache: dict[tuple[str, int, int], Any] = {}
        self._selection: dict[tuple[int, int], list[int]] = {}

    # ---- PromQL emulation -------------------------------------------------------------------

    def _rate(self, idx: int, leaf: Leaf, t: int) -> float | None:
        s = self.step_s
        born = self.born[idx]
        if born is None or not self.scenario.traffic:
            return None
        first = max(0, born, math.ceil((t * s - leaf.range_s) / s))
        if t - first < 1:
            return None
        now, then = self.values[idx][t], self.values[idx][first]
        assert now is not None and then is not None
        delta = float(now - then)
        sampled = float((t - first) * s)
        to_start = float(first * s - (t * s - leaf.range_s))
        if delta > 0 and then >= 0:
            to_zero = sampled * (then / delta)
            to_start = min(to_start, to_zero)
        avg = sampled / (t - first)
        interval = sampled + (to_start if to_start < avg * 1.1 else avg / 2)
        factor = interval / sampled
        if leaf.func == "rate":
            factor /= leaf.range_s
        return delta * factor

    def _selected(self, leaf: Leaf, group: int) -> list[int]:
        """Series of ``group`` the leaf's selector matches, in Prometheus' (label-sorted) order."""
        key = (id(leaf), group)
        if key not in self._selection:
            self._selection[key] = [
                i
                for i in self.ordered
                if self.fixture.series[i].group == group and matches_all(self.fixture.series[i].labels, leaf.matchers)
            ]
        return self._selection[key]

    def _leaf(self, leaf: Leaf, group: int, t: int) -> float | None:
        total: float | None = None
        for i in self._selected(leaf, group):
            value = self._rate(i, leaf, t)
            if value is None:
                continue
            total = value if total is None else total + value
        return total

    def eval(self, tree: Tree, group: int, t: int) -> Any:
        kind = tree[0]
        if kind == "const":
            return ("s", tree[1])
        if kind == "leaf":
            return self._leaf(tree[1], group, t)
        return _binop(kind, self.eval(tree[1], group, t), self.eval(tree[2], group, t))

    def recorded(self, record: str, group: int, t: int) -> float | None:
        """The value a recording rule writes for ``group`` at step ``t`` (``None``: no sample)."""
        key = (record, group, t)
        if key not in self._cache:
            if self.fixture.kind == "injected":
                value = self._injected(record, group, t)
            else:
                out = self.eval(self.trees[record], group, t)
                value = out[1] if isinstance(out, tuple) else out
            self._cache[key] = value
        return self._cache[key]

    def events_in(self, window: str, group: int, t: int) -> float | None:
        """``slo:sli_total_events:rate<window> * <window seconds>``, as a ``min_events`` guard computes it (no sample
        with injected SLI series: the guard's counters do not exist then)."""
        if self.fixture.kind != "counters":
            return None
        rate = self.recorded(R.TOTAL_EVENTS + window, group, t)
        return None if rate is None else rate * float(parse_duration(window) / 1000)

    def period_sli(self, group: int, t: int) -> float | None:
        """The period SLI rule's value (Sloth's mean of base-window ratios, or llmpath's ratio of counts)."""
        windows = self.item.windows
        span = windows.period_ms // 1000 // self.step_s
        steps = range(max(0, t - span), t + 1)
        base = format_duration(R.base_window(windows))
        if self.item.slo.period_rule == "ratio_of_counts" and R.event_queries(self.item.slo) is not None:
            if self.fixture.kind != "counters":
                return None
            errors = [v for u in steps if (v := self.recorded(R.ERROR_EVENTS + base, group, u)) is not None]
            totals = [v for u in steps if (v := self.recorded(R.TOTAL_EVENTS + base, group, u)) is not None]
            if not errors or not totals:
                return None
            total = _sum(totals)
            return _div(_sum(errors), total) if total > 0 else None
        ratios = [v for u in steps if (v := self.recorded(R.SLI_ERROR + base, group, u)) is not None]
        return _div(_sum(ratios), float(len(ratios))) if ratios else None

    def _injected(self, record: str, group: int, t: int) -> float | None:
        window_s = parse_duration(record.removeprefix(R.SLI_ERROR)) // 1000
        if not self.scenario.traffic or t < 1:
            return None
        first = max(0, math.ceil((t * self.step_s - window_s) / self.step_s))
        bad, total = self.counts[(group, "bad")], self.counts[(group, "total")]
        err, tot = bad[t] - bad[first], total[t] - total[first]
        return float(Fraction(err, tot)) if tot else None


# --------------------------------------------------------------------------------------------
# Building fixtures from the SLI expression.
# --------------------------------------------------------------------------------------------


def _roles(error: Tree, total: Tree) -> tuple[str, Leaf, Leaf, bool]:
    """('bad'|'good', the bad-or-good leaf, the total leaf, whether that leaf is the left side of an ``or``) for
    the SLI shapes the generator understands."""
    if total[0] != "leaf":
        raise Unsupported("total is not a single sum(rate())")
    tleaf = total[1]
    if error[0] == "leaf":
        return "bad", error[1], tleaf, False
    if error[0] == "or" and error[1][0] == "leaf" and tleaf in leaves(error[2]):
        return "bad", error[1][1], tleaf, True
    if error[0] == "-" and error[1] == total:
        right = error[2]
        if right[0] == "leaf":
            return "good", right[1], tleaf, False
        if right[0] == "or" and right[1][0] == "leaf" and tleaf in leaves(right[2]):
            return "good", right[1][1], tleaf, True
    raise Unsupported("unrecognised error/total shape")


def _raw_roles(query: Tree) -> tuple[str, Leaf, Leaf, bool]:
    if query[0] == "/" and query[1][0] == "leaf" and query[2][0] == "leaf":
        return "bad", query[1][1], query[2][1], False
    if query[0] == "-" and query[1] == ("const", 1.0) and query[2][0] == "/":
        div = query[2]
        if div[1][0] == "leaf" and div[2][0] == "leaf":
            return "good", div[1][1], div[2][1], False
    raise Unsupported("unrecognised raw ratio shape")


def _groups(part: Leaf, total: Leaf) -> list[dict[str, str]]:
    if part.by != total.by:
        raise Unsupported("different groupings")
    forced = {m.name: m.value for m in (*part.matchers, *total.matchers) if m.op == "="}
    if not part.by:
        return [{}]
    if all(label in forced for label in part.by):
        return [{label: forced[label] for label in part.by}]
    return [{label: forced.get(label, f"r{i}") for label in part.by} for i in (1, 2)]


def _violating(base: list[Matcher], violate: tuple[Matcher, ...], seed: dict[str, str]) -> dict[str, str] | None:
    for m in violate:
        labels = satisfy(base, must_not=m, base=seed)
        if labels is not None and not matches_all(labels, violate):
            return labels
    return None


def _series_for(role: str, part: Leaf, total: Leaf, group: dict[str, str], idx: int, lazy: bool) -> list[Series]:
    gm = [Matcher(k, "=", v) for k, v in group.items()]
    other = "good" if role == "bad" else "bad"
    # Overlap: the total selector also selects the part's series (e.g. requests{code=~"5.."} within requests).
    part_labels = satisfy([*total.matchers, *part.matchers, *gm])
    if part_labels is not None:
        rest = _violating([*total.matchers, *gm], part.matchers, part_labels)
        if rest is not None:
            return [Series(part_labels, idx, role, lazy), Series(rest, idx, other)]
    # Disjoint: separate series for the part and for the total (e.g. histogram _bucket vs _count).
    part_only = _violating([*part.matchers, *gm], total.matchers, {})
    total_only = _violating([*total.matchers, *gm], part.matchers, {})
    if part_only is None or total_only is None:
        raise Unsupported("no label values satisfy the selectors")
    return [Series(part_only, idx, role, lazy), Series(total_only, idx, "total")]


def _alternative_le(series: list[Series], leaf: Leaf) -> None:
    """On the second group, spell ``le`` the other way (``1.0`` vs ``1``, ``5e-05`` vs ``0.00005``) when the matcher
    accepts both."""
    le = next((m for m in leaf.matchers if m.name == "le" and m.op == "=~"), None)
    if le is None:
        return
    for s in series:
        if "le" not in s.labels:
            continue
        try:
            exponent = go_float(float(s.labels["le"]))
        except ValueError:
            exponent = s.labels["le"]
        for other in (s.labels["le"] + ".0", exponent):
            if other != s.labels["le"] and re.fullmatch(le.value, other):
                s.labels["le"] = other
                break


def build_fixture(item: Compiled) -> tuple[Fixture, dict[str, Tree], str]:
    """The fixture for one SLO, the recording trees it needs, and a one-line description of how it is fed."""
    slo = item.slo
    events = R.event_queries(slo)
    try:
        if events is not None:
            role, part, total, lazy = _roles(parse_tree(_window(events[0])), parse_tree(_window(events[1])))
        else:
            role, part, total, lazy = _raw_roles(parse_tree(_window(slo.sli.error_ratio_query or "")))
        groups = _groups(part, total)
        series: list[Series] = []
        for i, group in enumerate(groups):
            built = _series_for(role, part, total, group, i, lazy)
            if i == 1:
                _alternative_le(built, part)
            series += built
        period = R.sli_metric(item.windows.period_ms)
        trees = {r.record: parse_tree(r.expr) for r in item.rules.sli.rules if r.record and r.record != period}
        fixture = Fixture("counters", series, groups, [True] + [False] * (len(groups) - 1))
        _sanity_check(item, fixture, trees)
        grouping = "; groups " + ", ".join(_g(g) for g in groups) if groups != [{}] else ""
        how = f"counters for the SLI's selectors ({role} and total{grouping})"
        if lazy and role == "bad":
            how += (
                "; the bad counter appears (at 0) just before its first error, so the `or 0 * total` fallback answers "
                "until then and on the healthy groups"
            )
        elif lazy:
            how += "; the good counter appears (at 0) just before its first good event"
        return fixture, trees, how
    except (Unsupported, ValueError, TypeError, AttributeError) as exc:
        return Fixture("injected", groups=[{}], burning=[True]), {}, f"injected SLI series ({exc})"


def _g(group: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in group.items())


def _window(template: str) -> str:
    from llmpath.slo.gotemplate import TemplateError, render_window

    try:
        return render_window(template, "1m")
    except TemplateError as exc:
        raise Unsupported(str(exc)) from exc


def _sanity_check(item: Compiled, fixture: Fixture, trees: dict[str, Tree]) -> None:
    """The synthetic counters must reproduce the intended error ratio on every SLI window."""
    scenario = Scenario("check", total=1000, errors=250, start=0, steps=4)
    sim = Simulation(item, fixture, scenario, 60, trees)
    for rule in item.rules.sli.rules:
        if not (rule.record or "").startswith(R.SLI_ERROR) or rule.record not in trees:
            continue
        value = sim.recorded(rule.record, 0, 4)
        if value is None or abs(value - 0.25) > 1e-9:
            raise Unsupported(f"synthetic counters give {value} for {rule.record}, expected 0.25")


# --------------------------------------------------------------------------------------------
# Alerts: conditions, timelines, expected labels and annotations.
# --------------------------------------------------------------------------------------------

_TEMPLATE = re.compile(r"\{\{-?\s*(.*?)\s*-?\}\}")
_LABEL_REF = re.compile(r"^(?:\$labels|\.Labels)\.([A-Za-z_][A-Za-z0-9_]*)(\s*\|\s*urlquery)?$")


def render_template(text: str, labels: dict[str, str]) -> str:
    """Prometheus alert templating for ``{{ $labels.x }}`` / ``{{ .Labels.x }}`` (optionally ``| urlquery``)."""

    def sub(m: re.Match[str]) -> str:
        ref = _LABEL_REF.match(m.group(1))
        if ref is None:
            raise Unsupported(f"template {m.group(0)!r}")
        value = labels.get(ref.group(1), "")
        return urllib.parse.quote_plus(value, safe="") if ref.group(2) else value

    return _TEMPLATE.sub(sub, text)


@dataclass
class AlertModel:
    rule: Rule
    name: str
    kind: str
    severity: str
    for_s: int
    pairs: list[tuple[str, str, float]]  # (short record, long record, threshold)
    absent_record: str | None
    #: The SLO's ``min_events``: a pair also needs that many events in its long window.
    min_events: int | None = None


def alert_models(item: Compiled) -> list[AlertModel]:
    budget = (100 - item.slo.objective) / 100
    out = []
    for rule in item.rules.alerts.rules:
        info = rule.info
        if rule.alert is None or not info:
            continue
        pairs = [(R.SLI_ERROR + p.short, R.SLI_ERROR + p.long, p.factor * budget) for p in info["windows"]]
        absent = R.sli_metric(R.base_window(item.windows)) if info["kind"] == "absent" else None
        for_s = parse_duration(rule.for_) // 1000 if rule.for_ else 0
        guard = item.slo.min_events if info["kind"] != "absent" else None
        out.append(AlertModel(rule, rule.alert, info["kind"], info["severity"], for_s, pairs, absent, guard))
    return out


def _series_labels(item: Compiled, fixture: Fixture, group: int, record: str) -> dict[str, str]:
    rule = next(r for r in item.rules.sli.rules if r.record == record)
    labels = {**fixture.groups[group], **rule.labels}
    labels.pop(R.WINDOW_LABEL, None)
    return labels


def expected_alert(model: AlertModel, item: Compiled, fixture: Fixture, group: int) -> dict[str, Any]:
    """The labels and rendered annotations promtool shows for one firing alert instance."""
    series = R.id_labels(item.slo) if model.absent_record else _series_labels(item, fixture, group, model.pairs[0][0])
    labels = {**series, **{k: render_template(v, series) for k, v in model.rule.labels.items()}}
    annotations = {k: render_template(v, series) for k, v in model.rule.annotations.items()}
    return {"exp_labels": labels, "exp_annotations": annotations}


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def firing(sim: Simulation, models: list[AlertModel]) -> tuple[list[dict[tuple[str, int], bool]], bool]:
    """Per step, the firing (alert model index as str, group) instances; and whether any ratio sat exactly on a
    threshold (then float rounding, not the math, would decide: the caller changes the scenario)."""
    groups = range(len(sim.fixture.groups))
    active: dict[tuple[int, int], int] = {}
    timeline = []
    tie = False
    for t in range(sim.scenario.steps + 1):
        now: dict[tuple[str, int], bool] = {}
        for mi, model in enumerate(models):
            for g in groups if not model.absent_record else [0]:
                if model.absent_record:
                    cond = all(sim.recorded(model.absent_record, gg, t) is None for gg in groups)
                else:
                    cond = False
                    for short, long, thr in model.pairs:
                        a, b = sim.recorded(short, g, t), sim.recorded(long, g, t)
                        if a is None or b is None:
                            continue
                        tie = tie or _close(a, thr) or _close(b, thr)
                        if model.min_events is not None:
                            events = sim.events_in(long.removeprefix(R.SLI_ERROR), g, t)
                            if events is None:
                                continue
                            tie = tie or _close(events, model.min_events)
                            if events < model.min_events:
                                continue
                        cond = cond or (a > thr and b > thr)
                key = (mi, g)
                if cond:
                    active.setdefault(key, t)
                    if (t - active[key]) * sim.step_s >= model.for_s:
                        now[(str(mi), g)] = True
                else:
                    active.pop(key, None)
        timeline.append(now)
    return timeline, tie


# --------------------------------------------------------------------------------------------
# Scenarios and the test document.
# --------------------------------------------------------------------------------------------


def _counts(ratio: float) -> tuple[int, int]:
    frac = Fraction(ratio).limit_denominator(100_000)
    if frac <= 0:
        return 1000, 0
    d = frac.denominator
    total = d * max(1, math.ceil(1000 / d))
    return total, total * frac.numerator // d


def _burns(models: list[AlertModel], budget: float) -> tuple[float, float, float]:
    if budget <= 0:  # a 100% objective: any error fires every alert (see _error_ratio)
        return 20.0, 4.0, 0.5
    page = [thr / budget for m in models if m.severity == "page" for _, _, thr in m.pairs]
    ticket = [thr / budget for m in models if m.severity == "ticket" for _, _, thr in m.pairs]
    fast = 20.0 if not page or max(page) < 20 else 1.25 * max(page)
    if ticket and page:
        lo, hi = max(ticket), min(page)
        slow = 4.0 if lo < 4 < hi else ((lo + hi) / 2 if lo < hi else 1.25 * lo)
    elif ticket:
        slow = 4.0 if max(ticket) < 4 else 1.25 * max(ticket)
    else:
        slow = 4.0
    every = page + ticket
    low = 0.5 if not every or min(every) > 0.5 else min(every) / 2
    return fast, slow, low


def _error_ratio(burn: float, budget: float) -> float:
    """The error ratio of a scenario burning ``burn`` times the budget, capped at 100%. A 100% objective has no
    budget to burn (every error fires every alert): its scenarios use ``burn`` % of the events bad instead."""
    return min(1.0, burn * budget if budget > 0 else burn / 100)


def _values_text(cum: Sequence[float | None]) -> str:
    """promtool's expanding notation for a value list (``a+bxn``: n + 1 values; ``_xn``: n missing samples)."""
    out: list[str] = []
    i = 0
    n = len(cum)
    while i < n:
        if cum[i] is None:
            j = i
            while j + 1 < n and cum[j + 1] is None:
                j += 1
            out.append("_" if j == i else f"_x{j - i + 1}")
            i = j + 1
            continue
        j = i
        if i + 1 < n and cum[i + 1] is not None:
            diff = cum[i + 1] - cum[i]  # type: ignore[operator]
            exact = isinstance(cum[i], int) or diff == 0
            while exact and j + 1 < n and cum[j + 1] is not None and cum[j + 1] - cum[j] == diff:  # type: ignore[operator]
                j += 1
            if j > i:
                out.append(f"{_num(cum[i])}{'+' if diff >= 0 else '-'}{_num(abs(diff))}x{j - i}")
                i = j + 1
                continue
        out.append(_num(cum[i]))
        i += 1
    return " ".join(out)


def _num(x: float | int | None) -> str:
    return str(x) if isinstance(x, int) else repr(float(x))  # type: ignore[arg-type]


def _dur(steps: int, step_s: int) -> str:
    return format_duration(steps * step_s * 1000)


@dataclass
class TestPlan:
    item: Compiled
    fixture: Fixture
    trees: dict[str, Tree]
    how: str
    models: list[AlertModel]
    checked: list[int]
    notes: list[str]
    step_s: int


def _plan(item: Compiled, file_alert_names: dict[str, int]) -> TestPlan:
    fixture, trees, how = build_fixture(item)
    models = alert_models(item)
    checked, notes = [], []
    for i, m in enumerate(models):
        if file_alert_names.get(m.name, 0) > 1:
            notes.append(f"{m.name} is also used by another SLO in this file: not asserted")
            continue
        try:
            for g in range(len(fixture.groups)):
                expected_alert(m, item, fixture, g)
        except Unsupported as exc:
            notes.append(f"{m.name}: {exc}: not asserted")
            continue
        checked.append(i)
    windows_s = [w // 1000 for w in R.sli_windows(item.slo, item.windows)] + [m.for_s for m in models if m.for_s]
    step_s = math.gcd(*windows_s)
    return TestPlan(item, fixture, trees, how, models, checked, notes, step_s)


def _steps(plan: TestPlan, window: str) -> int:
    return parse_duration(window) // 1000 // plan.step_s


def _run(plan: TestPlan, scenario: Scenario) -> tuple[Simulation, list[dict], bool]:
    sim = Simulation(plan.item, plan.fixture, scenario, plan.step_s, plan.trees)
    timeline, tie = firing(sim, plan.models)
    return sim, timeline, tie


def _first(timeline: list[dict]) -> tuple[int, set[int]]:
    for t, now in enumerate(timeline):
        if now:
            return t, {int(k[0]) for k in now}
    return -1, set()


def _scenarios(plan: TestPlan) -> list[Scenario]:
    """The fast, slow and low burns and zero traffic.

    Errors start after error-free traffic that fills the windows which decide the scenario: for the fast burn the
    page windows, extended until no ticket can fire before the page (as in steady state); for the slow burn the
    ticket short windows (the ticket then fires through whichever pair the math says); the low burn needs none (no
    window can exceed the error ratio itself). Scenarios that cannot show anything new are skipped (no page alert:
    no fast burn; an error ratio capped at 100% that equals another scenario's).
    """
    budget = (100 - plan.item.slo.objective) / 100
    fast, slow, low = _burns(plan.models, budget)
    page = [m for m in plan.models if m.severity == "page" and m.pairs]
    ticket = [m for m in plan.models if m.severity == "ticket" and m.pairs]
    every_long = sorted({_steps(plan, p[1].removeprefix(R.SLI_ERROR)) for m in plan.models for p in m.pairs})
    every_short = [_steps(plan, p[0].removeprefix(R.SLI_ERROR)) for m in plan.models for p in m.pairs]
    hold = max((m.for_s for m in plan.models), default=0) // plan.step_s
    out = []

    def make(name: str, burn: float, start: int, span: int, target: str | None) -> Scenario:
        total, errors = _counts(_error_ratio(burn, budget))
        if budget:
            label = f"{name} burn ({errors / total / budget:.3g}x the error budget)"
        else:
            label = f"{name} burn ({errors / total:.3g} of the events bad; a 100% objective has no error budget)"
        return Scenario(label, total, errors, start, min(start + span + hold + 2, MAX_STEPS), target=target)

    page_long = max((_steps(plan, p[1].removeprefix(R.SLI_ERROR)) for m in page for p in m.pairs), default=0)
    if page or not ticket:
        chosen = None
        for warmup in [w for w in every_long if w >= page_long] or [page_long]:
            chosen = make("fast", fast, warmup, page_long or warmup, "page")
            _sim, timeline, _tie = _run(plan, chosen)
            _t, first = _first(timeline)
            if not page or not first or all(plan.models[i].severity == "page" for i in first):
                break
        assert chosen is not None
        out.append(chosen)
    if ticket:
        ticket_longs = [max(_steps(plan, p[1].removeprefix(R.SLI_ERROR)) for p in m.pairs) for m in ticket]
        warmup = max(_steps(plan, p[0].removeprefix(R.SLI_ERROR)) for m in ticket for p in m.pairs)
        slow_case = make("slow", slow, warmup, max(ticket_longs), "ticket")
        if not any((c.total, c.errors) == (slow_case.total, slow_case.errors) for c in out):
            out.append(slow_case)
    out.append(make("low", low, 0, max(every_short, default=1), None))
    absent_for = [m.for_s // plan.step_s for m in plan.models if m.absent_record]
    out.append(Scenario("zero traffic", 1000, 0, 0, min(max(absent_for, default=3) + 2, MAX_STEPS), traffic=False))
    return out


def _shorten(scenario: Scenario, timeline: list[dict], target: list[int]) -> int:
    """Stop a few steps after the first target alert fires (the rest of the run adds nothing)."""
    for t, now in enumerate(timeline):
        if any(int(key[0]) in target for key in now):
            return min(t + 2, scenario.steps)
    return scenario.steps


def _checkpoints(timeline: list[dict], last: int) -> list[int]:
    points = {last}
    for t in range(1, last + 1):
        if set(timeline[t]) != set(timeline[t - 1]):
            points.update({t - 1, t})
    ordered = sorted(p for p in points if p >= 0)
    if len(ordered) > 14:
        ordered = ordered[:12] + [last]
    return ordered


def _expr_tests(plan: TestPlan, sim: Simulation, t: int) -> list[dict[str, Any]]:
    item = plan.item
    ids = R.id_labels(item.slo)
    flt = ",".join(f"{k}={go_quote(v)}" for k, v in sorted(ids.items()))
    budget_rule = next((r for r in item.rules.meta.rules if r.record == R.ERROR_BUDGET), None)
    out: list[dict[str, Any]] = []
    meta_labels = next((r.labels for r in item.rules.meta.rules if r.record == R.OBJECTIVE), None)
    if meta_labels is not None and budget_rule is not None:
        objective = item.slo.objective / 100
        days = duration_hours(item.windows.period_ms) / 24
        for record, value in ((R.OBJECTIVE, objective), (R.ERROR_BUDGET, 1 - objective), (R.TIME_PERIOD_DAYS, days)):
            out.append(_sample_test(f"{record}{{{flt}}}", t, [(record, meta_labels, value)], plan.step_s))
    period_rule = next((r for r in item.rules.sli.rules if r.record == R.sli_metric(item.windows.period_ms)), None)
    remaining_rule = next((r for r in item.rules.meta.rules if r.record == R.BUDGET_REMAINING), None)
    if period_rule is not None and (item.slo.period_rule == "ratio_of_counts" or "count_over_time" in period_rule.expr):
        samples, remaining = [], []
        for g, group in enumerate(plan.fixture.groups):
            sli = sim.period_sli(g, t)
            if sli is None or math.isnan(sli):
                continue
            samples.append((period_rule.record or "", {**group, **period_rule.labels}, sli))
            if remaining_rule is not None:
                burn = _div(sli, 1 - item.slo.objective / 100)
                # period_burn_rate keeps the period SLI's labels (sloth_window included), as Sloth's rules do.
                labels = {**group, **period_rule.labels, **remaining_rule.labels}
                remaining.append((R.BUDGET_REMAINING, labels, 1 - burn))
        if samples:
            out.append(_sample_test(f"{period_rule.record}{{{flt}}}", t, samples, plan.step_s))
        # promtool 2.42 compares samples with ==, so a NaN (no errors against a zero budget, 100% objective) can
        # never match: such a check is left out.
        if remaining and not any(math.isnan(value) for _, _, value in remaining):
            out.append(_sample_test(f"{R.BUDGET_REMAINING}{{{flt}}}", t, remaining, plan.step_s))
    if plan.fixture.kind != "counters":
        return out
    for rule in item.rules.sli.rules:
        record = rule.record or ""
        if record not in sim.trees or record.startswith((R.ERROR_EVENTS, R.TOTAL_EVENTS)):
            continue
        samples = []
        for g, group in enumerate(plan.fixture.groups):
            recorded = sim.recorded(record, g, t)
            if recorded is not None and not math.isnan(recorded):
                samples.append((record, {**group, **rule.labels}, recorded))
        if samples:
            out.append(_sample_test(f"{record}{{{flt}}}", t, samples, plan.step_s))
    return out


def _sample_test(expr: str, t: int, samples: list[tuple[str, dict[str, str], float]], step_s: int) -> dict[str, Any]:
    return {
        "expr": expr,
        "eval_time": _dur(t, step_s),
        "exp_samples": [
            {"labels": f"{name}{{{','.join(f'{k}={go_quote(v)}' for k, v in sorted(labels.items()))}}}", "value": value}
            for name, labels, value in samples
        ],
    }


def _input_series(plan: TestPlan, sim: Simulation) -> list[dict[str, str]]:
    if not sim.scenario.traffic:
        return []
    if plan.fixture.kind == "counters":
        return [
            {"series": s.text(), "values": _values_text(sim.values[i])}
            for i, s in enumerate(plan.fixture.series)
            if sim.born[i] is not None
        ]
    out = []
    for rule in plan.item.rules.sli.rules:
        record = rule.record or ""
        if not record.startswith(R.SLI_ERROR) or record == R.sli_metric(plan.item.windows.period_ms):
            continue
        values = [sim.recorded(record, 0, t) for t in range(sim.scenario.steps + 1)]
        labels = ",".join(f"{k}={go_quote(v)}" for k, v in sorted(rule.labels.items()))
        out.append({"series": f"{record}{{{labels}}}", "values": _values_text(values)})
    return out


def _test_case(plan: TestPlan, scenario: Scenario) -> dict[str, Any]:
    sim, timeline, tie = _run(plan, scenario)
    for _ in range(3):
        if not tie or scenario.errors >= scenario.total:
            break
        scenario.errors += 1  # move the error ratio off an exact threshold
        sim, timeline, tie = _run(plan, scenario)
    target = [i for i, m in enumerate(plan.models) if scenario.target and m.severity == scenario.target]
    if target:
        last = _shorten(scenario, timeline, target)
        if last < scenario.steps:
            scenario.steps = last
            sim, timeline, _tie = _run(plan, scenario)
    points = _checkpoints(timeline, scenario.steps)
    names = sorted({plan.models[i].name for i in plan.checked})
    alert_tests = []
    for t in points:
        for name in names:
            expected = []
            for key in sorted(timeline[t]):
                model = plan.models[int(key[0])]
                if model.name == name and int(key[0]) in plan.checked:
                    expected.append(expected_alert(model, plan.item, plan.fixture, key[1]))
            alert_tests.append({"eval_time": _dur(t, plan.step_s), "alertname": name, "exp_alerts": expected})
    case: dict[str, Any] = {
        "name": f"{plan.item.slo.id}: {scenario.name}"
        + (f", errors from {_dur(scenario.start, plan.step_s)}" if scenario.traffic else ""),
        "interval": _dur(1, plan.step_s),
        "input_series": _input_series(plan, sim),
        "alert_rule_test": alert_tests,
    }
    if scenario.traffic:
        case["promql_expr_test"] = _expr_tests(plan, sim, scenario.steps)
    return case


def _fired_summary(case: dict[str, Any]) -> str:
    firsts: dict[str, str] = {}
    for test in case["alert_rule_test"]:
        for alert in test["exp_alerts"]:
            key = f"{test['alertname']} ({alert['exp_labels'].get(R.SEVERITY_LABEL, '?')})"
            firsts.setdefault(key, test["eval_time"])
    return ", ".join(f"{k} at {v}" for k, v in firsts.items()) or "nothing fires"


def test_file_name(slo_id: str, rule_file: str, shared_id: bool) -> str:
    """``<slo id>.test.yaml``; ``<rule file>-<slo id>.test.yaml`` (folders joined with ``-``, no extension) when
    the SLO ID is in several rule files (``--ignore-duplicates``), so that no test file replaces another."""
    if not shared_id:
        return bounded_file_name(slo_id, ".test.yaml")
    stem = PurePosixPath(rule_file).with_suffix("").as_posix()
    return bounded_file_name(f"{stem.replace('/', '-')}-{slo_id}", ".test.yaml")


def generate_tests(compiled: list[Compiled], names: dict[int, str], log: IssueLog) -> dict[str, str]:
    """promtool test files, one per SLO (:func:`test_file_name`), each referring to ``../<rule file>`` (test files
    are written to ``OUT/tests/``, rule files to ``OUT/<rule file>``)."""
    by_file: dict[str, list[Compiled]] = {}
    for item in compiled:
        by_file.setdefault(names[id(item.doc)], []).append(item)
    ids = Counter(item.slo.id for items in by_file.values() for item in items if item.rules.sli.rules)
    out: dict[str, str] = {}
    for rule_file, items in by_file.items():
        groups = [g.name for item in items for g in item.rules.groups()]
        alert_names: dict[str, int] = {}
        for item in items:
            for name in {r.alert for r in item.rules.alerts.rules if r.alert}:
                alert_names[name] = alert_names.get(name, 0) + 1
        for item in items:
            if not item.rules.sli.rules:
                continue
            plan = _plan(item, alert_names)
            cases = [_test_case(plan, s) for s in _scenarios(plan)]
            name = test_file_name(item.slo.id, rule_file, ids[item.slo.id] > 1)
            if name in out:
                log.error(f"promtool tests: two SLOs would write the test file {name!r}", **item.slo.where(""))
                continue
            doc = {
                "rule_files": [f"../{rule_file}"],
                "evaluation_interval": _dur(1, plan.step_s),
                "group_eval_order": groups,
                "tests": cases,
            }
            lines = [
                f"# promtool tests for SLO {item.slo.id} (generated by llmpath slo compile --tests; DO NOT EDIT).",
                f"# Run: promtool test rules {name}",
                f"# Traffic: {plan.how}.",
                *(f"# Scenario {c['name']}: {_fired_summary(c)}." for c in cases),
                *(f"# Note: {n}" for n in plan.notes),
            ]
            out[name] = "\n".join(lines) + "\n" + yaml.safe_dump(doc, sort_keys=False, width=1000)
            for note in plan.notes:
                log.warn(f"promtool tests: {note}", **item.slo.where(""))
    return out
