"""SLO validation: Sloth's rules (same messages) plus Prometheus 2.42 label rules and the llmpath extensions."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

import promql_parser

from llmpath.instrumentation import catalog
from llmpath.slo.gofmt import format_duration, go_float, parse_duration
from llmpath.slo.gotemplate import WINDOW_VAR, TemplateError, prometheus_template_error, render_window
from llmpath.slo.model import PERIOD_RULE_COUNT, AlertMeta, SLOSpec, code_of, has_comment
from llmpath.slo.windows import AlertWindows

NAME_RE = re.compile(r"^[A-Za-z0-9][-A-Za-z0-9_.]*[A-Za-z0-9]$")
LABEL_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
METRIC_NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
RESERVED_PREFIX = "sloth_"
#: Labels the compiler sets on llmpath alerts.
LLMPATH_ALERT_LABELS = ("stage", "owner")

Problem = tuple[str, str]  # (logical field, message)
QueryValidator = Callable[[str], str | None]


def promql_error(query: str) -> str | None:
    """The parser's message if ``query`` (rendered with ``window=1m``) is not valid PromQL, else ``None``."""
    try:
        rendered = render_window(query, "1m")
    except TemplateError as exc:
        return str(exc)
    # The parser knows Prometheus 3, which renamed 2.x's holt_winters (same arguments).
    try:
        expr = promql_parser.parse(_HOLT_WINTERS.sub("double_exponential_smoothing(", rendered))
    except ValueError as exc:
        return str(exc) or "invalid PromQL"
    return prometheus2_problem(rendered, expr)


# Prometheus 2.42's PromQL (promql/parser/functions.go, lex.go): the rules must load into it and into promtool 2.42.
_PROM2_FUNCTIONS = frozenset(
    [
        "abs",
        "absent",
        "absent_over_time",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "avg_over_time",
        "ceil",
        "changes",
        "clamp",
        "clamp_max",
        "clamp_min",
        "cos",
        "cosh",
        "count_over_time",
        "days_in_month",
        "day_of_month",
        "day_of_week",
        "day_of_year",
        "deg",
        "delta",
        "deriv",
        "exp",
        "floor",
        "histogram_count",
        "histogram_sum",
        "histogram_fraction",
        "histogram_quantile",
        "holt_winters",
        "hour",
        "idelta",
        "increase",
        "irate",
        "label_replace",
        "label_join",
        "last_over_time",
        "ln",
        "log10",
        "log2",
        "max_over_time",
        "min_over_time",
        "minute",
        "month",
        "pi",
        "predict_linear",
        "present_over_time",
        "quantile_over_time",
        "rad",
        "rate",
        "resets",
        "round",
        "scalar",
        "sgn",
        "sin",
        "sinh",
        "sort",
        "sort_desc",
        "sqrt",
        "stddev_over_time",
        "stdvar_over_time",
        "sum_over_time",
        "tan",
        "tanh",
        "time",
        "timestamp",
        "vector",
        "year",
    ]
)
_PROM2_AGGREGATIONS = frozenset(
    ["sum", "avg", "count", "min", "max", "group", "stddev", "stdvar", "topk", "bottomk", "count_values", "quantile"]
)
_HOLT_WINTERS = re.compile(r"\bholt_winters\s*\(")
#: Outside strings: a duration that is not a range or an offset (a number in Prometheus 3 only), and a quoted
#: name inside a selector's braces (Prometheus 3's UTF-8 names).
_PROM2_TOKEN = re.compile(
    r"""(?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)|(?P<comment>#[^\n]*)|(?P<open>[\[{(])"""
    r"""|(?P<close>[\]})])|(?P<comma>,)|(?P<offset>\boffset\s*-?)|(?P<dur>(?<![\w.])\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*(?![\w.]))"""
)


def _result_type(expr: object) -> str:
    if isinstance(expr, promql_parser.ParenExpr):
        return _result_type(expr.expr)
    if isinstance(expr, promql_parser.MatrixSelector | promql_parser.SubqueryExpr):
        return "range vector"
    if isinstance(expr, promql_parser.StringLiteral):
        return "string"
    if isinstance(expr, promql_parser.Call):
        returns = expr.func.return_type
        if returns == promql_parser.ValueType.Matrix:
            return "range vector"
        return "string" if returns == promql_parser.ValueType.String else "vector"
    return "vector"


def prometheus2_problem(rendered: str, expr: object) -> str | None:
    """What in a parsed query Prometheus 2.42 cannot evaluate as an SLI: another result type than an instant vector
    or a scalar (the compiler divides and compares it), or syntax and functions that only Prometheus 3 has."""
    result = _result_type(expr)
    if result != "vector":
        return f"the query returns a {result}; an SLI query must return an instant vector or a scalar"
    newer: list[str] = []
    if re.search(r"\bdouble_exponential_smoothing\s*\(", rendered):
        newer.append("function double_exponential_smoothing() (holt_winters() in Prometheus 2)")

    def visit(node: object) -> None:
        if isinstance(node, promql_parser.Call):
            name = node.func.name
            if name not in _PROM2_FUNCTIONS and name != "double_exponential_smoothing":
                newer.append(f"function {name}()")
        elif isinstance(node, promql_parser.AggregateExpr) and str(node.op) not in _PROM2_AGGREGATIONS:
            newer.append(f"aggregation {node.op}")

    promql_parser.walk(expr, visit)  # type: ignore[arg-type]
    brackets: list[str] = []
    previous: tuple[str | None, int] = (None, 0)  # the kind of the token before, and where it ended
    for m in _PROM2_TOKEN.finditer(rendered):
        kind = m.lastgroup
        before, end = previous
        adjacent = not rendered[end : m.start()].strip()
        name_position = adjacent and brackets[-1:] == ["{"] and before in ("open", "comma")
        if kind == "str" and name_position:
            newer.append(f"the quoted name {m.group()}")
        elif kind == "open":
            brackets.append(m.group())
        elif kind == "close" and brackets:
            brackets.pop()
        elif kind == "dur" and brackets[-1:] != ["["] and not (before == "offset" and adjacent):
            newer.append(f"the duration {m.group()} as a number")
        previous = (kind, m.end())
    if newer:
        return f"{newer[0]} needs Prometheus 3; the rules are for Prometheus 2.42 (promtool 2.42 rejects them)"
    return None


def metricsql_error(query: str) -> str | None:
    """A light check for VictoriaMetrics' MetricsQL (no Python parser exists): template and bracket balance."""
    try:
        rendered = render_window(query, "1m")
    except TemplateError as exc:
        return str(exc)
    stack: list[str] = []
    pairs = {")": "(", "]": "[", "}": "{"}
    quote: str | None = None
    prev = ""
    for ch in rendered:
        if quote:
            if ch == quote and prev != "\\":
                quote = None
        elif ch in "\"'`":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in pairs and (not stack or stack.pop() != pairs[ch]):
            return f"unbalanced {ch!r}"
        prev = ch
    if quote or stack:
        return "unclosed quote or bracket"
    return None


def name_error(value: str) -> str | None:
    if not value:
        return "required"
    if not NAME_RE.fullmatch(value):
        return "name must start and end with an alphanumeric and can only contain alphanumeric, '.', '_', and '-'"
    return None


def label_key_error(key: str) -> str | None:
    if key == "__name__":
        return 'the label key "__name__" is not allowed'
    if not LABEL_NAME_RE.fullmatch(key):
        return f"the label key {key!r} is not valid (Prometheus label names match [a-zA-Z_][a-zA-Z0-9_]*)"
    if key.startswith(RESERVED_PREFIX):
        return f"the label key {key!r} is reserved: sloth_* labels identify the SLO's series and cannot be set"
    return None


def label_field(slo: SLOSpec, key: str) -> str | None:
    """Where a label of ``slo.labels`` is set: the SLO's ``labels.<key>``, the document's top-level
    ``^labels.<key>``, or ``None`` for an ``--extra-label`` (checked once, as an option)."""
    if key in slo.own_labels:
        return f"labels.{key}"
    if key in slo.service_labels:
        return f"^labels.{key}"
    return None


def _slo_labels(slo: SLOSpec) -> Iterator[Problem]:
    """Sloth's SLO label checks, each reported where the label is set."""
    for key in slo.labels:
        field = label_field(slo, key)
        if field is not None:
            yield from _labels({key: slo.labels[key]}, field.rsplit(".", 1)[0], "SLO")


def _labels(labels: dict[str, str], field: str, what: str) -> Iterator[Problem]:
    for key, value in labels.items():
        if msg := label_key_error(key):
            yield f"{field}.{key}", f"invalid {what} label key {key!r}: {msg}"
        elif value == "":
            yield f"{field}.{key}", f"invalid {what} label value for {key!r}: the label value is required"
        elif what == "alert" and (msg := prometheus_template_error(value)):
            yield f"{field}.{key}", f"invalid {what} label value for {key!r}: {_TEMPLATE} {msg}"


#: Prometheus parses every label and annotation value of an alerting rule as a Go template.
_TEMPLATE = "not a valid Prometheus template (alert labels and annotations are Go templates):"


def _annotations(annotations: dict[str, str], field: str) -> Iterator[Problem]:
    for key, value in annotations.items():
        if not LABEL_NAME_RE.fullmatch(key):
            yield f"{field}.{key}", f"invalid alert annotation key {key!r}: the annotation key {key!r} is not valid"
        elif value == "":
            yield f"{field}.{key}", f"invalid alert annotation key {key!r}: the annotation value is required"
        elif msg := prometheus_template_error(value):
            yield f"{field}.{key}", f"invalid alert annotation {key!r}: {_TEMPLATE} {msg}"


def _query(query: str | None, field: str, what: str, check: QueryValidator) -> Iterator[Problem]:
    if not query:
        yield field, f"invalid SLI: sli {what} query template: query template is required: required"
        return
    if not WINDOW_VAR.search(query):
        yield field, f"invalid SLI: sli {what} query template: template must contain the {{{{ .window }}}} variable"
        return
    if not WINDOW_VAR.search(code_of(query)):
        yield (
            field,
            f"invalid SLI: sli {what} query template: the {{{{ .window }}}} variable is only in a string or comment, "
            "so every window would get the same SLI; use it as the range, e.g. rate(metric[{{ .window }}])",
        )
        return
    if msg := check(query):
        yield field, f"invalid SLI: sli {what} query expression: {msg}"


def sloth_problems(slo: SLOSpec, check: QueryValidator = promql_error) -> list[Problem]:
    """Sloth's ``ValidateSLO`` (all problems, Sloth's messages) plus the reserved/2.42 label-name rules."""
    out: list[Problem] = []
    if msg := name_error(slo.id):
        out.append(("name", f"invalid SLO ID: {msg}"))
    if msg := name_error(slo.name):
        out.append(("name", f"invalid SLO name: {msg}"))
    if msg := name_error(slo.service):
        out.append(("^service", f"invalid SLO service: {msg}"))
    if not 0 < slo.objective <= 100 or math.isnan(slo.objective):
        out.append(("objective", f"objective must >0 and <=100 (got {go_float(slo.objective)})"))
    out += list(_slo_labels(slo))
    sli = slo.sli
    if sli.kind == "none":
        out.append(("sli", "invalid SLI: at least one SLI type is required"))
    elif sli.kind == "multiple":
        out.append(("sli", "invalid SLI: only one SLI type is allowed"))
    elif sli.kind == "events":
        if sli.error_query == sli.total_query:
            out.append(("sli.events", "invalid SLI: both error and total queries can't be the same"))
        out += _query(sli.error_query, "sli.events.error_query", "error", check)
        out += _query(sli.total_query, "sli.events.total_query", "total", check)
    elif sli.kind == "raw" and sli.plugin_id:  # the query an SLI plugin returned
        out += [
            ("sli.plugin.id", f"SLI plugin {sli.plugin_id!r} returned an invalid query: {m}")
            for _, m in _query(sli.error_ratio_query, "", "raw", check)
        ]
    elif sli.kind == "raw":
        out += _query(sli.error_ratio_query, "sli.raw.error_ratio_query", "raw", check)
    for severity, alert in (("page", slo.page), ("ticket", slo.ticket)):
        unnamed_page = severity == "ticket" and not slo.page.disable and not slo.page.name
        out += _alert(alert, severity, report_name=not unnamed_page)
    return out


def _alert(alert: AlertMeta, severity: str, report_name: bool = True) -> Iterator[Problem]:
    field = f"alerting.{severity}_alert"
    if alert.disable:
        return
    if not alert.name and report_name:
        yield "alerting.name", f"invalid alert: {severity} alert: alert name is required"
    for f, m in _labels(alert.labels, f"{field}.labels", "alert"):
        yield f, f"invalid alert: {severity} alert: {m}"
    for f, m in _annotations(alert.annotations, f"{field}.annotations"):
        yield f, f"invalid alert: {severity} alert: {m}"


def plugin_problems(slo: SLOSpec) -> list[Problem]:
    if slo.override_default_plugins and not slo.plugins:
        return [("plugins", "invalid plugins: override plugins is set but no plugins are defined")]
    return [("plugins", "invalid plugins: plugin ID is required") for p in slo.plugins if not p.id]


# --------------------------------------------------------------------------------------------
# llmpath extensions.
# --------------------------------------------------------------------------------------------


def stage_owner(stage: str, stages: catalog.StageCatalog = catalog.STAGES) -> str | None:
    """The owning team of a stage or stage group from the stage catalog (default: the built-in one); ``None`` if
    unknown."""
    if (group := stages.group(stage)) is not None:
        return group.owner
    if stage in stages:
        return stages.owner(stage)
    return None


def _known_metric(name: str) -> catalog.MetricSpec | None:
    return catalog.METRICS_BY_NAME.get(name)


def _selector(text: str) -> promql_parser.VectorSelector | str:
    try:
        expr = promql_parser.parse(text)
    except ValueError as exc:
        return str(exc) or "invalid selector"
    # The compiler writes the selector into `rate(<selector>[<window>])`.
    if (
        not isinstance(expr, promql_parser.VectorSelector)
        or not expr.name
        or expr.offset
        or expr.at
        or has_comment(text)
    ):
        return (
            'must be a plain series selector such as metric_name{label="value"} '
            "(no functions, ranges, offset, @ or comments)"
        )
    return prometheus2_problem(text, expr) or expr


def selector_labels(text: str) -> tuple[str | None, list[tuple[str, str, str]]]:
    """(metric name, [(label, op, value)]) of a plain selector (``op`` is ``=``, ``!=``, ``=~``, ``!~``)."""
    expr = _selector(text)
    if isinstance(expr, str):
        raise ValueError(expr)
    ops = {"Equal": "=", "NotEqual": "!=", "Re": "=~", "NotRe": "!~"}
    matchers = [(m.name, ops[str(m.op).split(".")[-1]], m.value) for m in expr.matchers.matchers]
    return expr.name, matchers


def _bucket_hint(threshold: float, buckets: tuple[float, ...]) -> str:
    lower = [b for b in buckets if b < threshold]
    upper = [b for b in buckets if b > threshold]
    near = [go_float(b) for b in (lower[-1:] + upper[:1])]
    return f"nearest buckets: {', '.join(near)}" if near else ""


def _check_labels_of(metric: str | None, labels: list[str], field: str) -> Iterator[Problem]:
    spec = _known_metric(metric) if metric else None
    if spec is None:
        return
    allowed = set(spec.labels) | ({"le"} if spec.kind == "histogram" else set())
    for label in labels:
        if label not in allowed:
            yield field, f"{metric} has no label {label!r} (its labels: {', '.join(spec.labels)})"


def llmpath_problems(
    slo: SLOSpec,
    histogram_buckets: Mapping[str, Sequence[float]] | None = None,
    stages: catalog.StageCatalog = catalog.STAGES,
) -> list[Problem]:
    """Checks for llmpath/v1 specs beyond Sloth's (stages, histograms, selectors, alert options).

    ``histogram_buckets``: the bucket bounds of histograms whose buckets are not the catalog's (an instrumentation
    with its own ``latency_buckets``, a histogram of another exporter); latency thresholds are checked against them.
    ``stages``: the stage catalog the SLO's ``stage`` must be in (default: the built-in one).
    """
    out: list[Problem] = []
    if slo.stage is not None and stage_owner(slo.stage, stages) is None:
        known = ", ".join([*stages.names, *(g.name for g in stages.groups)])
        out.append(("stage", f"unknown stage {slo.stage!r}; stages and stage groups: {known}"))
    absent_alert = any(extra.kind == "absent" for extra in slo.extra_alerts)
    for key, value in slo.labels.items():
        if key in LLMPATH_ALERT_LABELS and (field := label_field(slo, key)) is not None:
            out.append((field, f"label {key!r} is set by the compiler from `{key}:`; use that key instead"))
        elif absent_alert and (field := label_field(slo, key)) and (msg := prometheus_template_error(value)):
            out.append((field, f"the absent alert carries the SLO's labels, and this value is {_TEMPLATE} {msg}"))
    if slo.owner and (msg := prometheus_template_error(slo.owner)):
        out.append(("owner", f"the owner is a label of every alert, and this value is {_TEMPLATE} {msg}"))
    for label in slo.group_by:
        if not LABEL_NAME_RE.fullmatch(label) or label.startswith(RESERVED_PREFIX) or label == "le":
            out.append(("group_by", f"invalid grouping label {label!r}"))
        elif label in slo.labels or label in slo.service_labels:
            out.append(("group_by", f"grouping label {label!r} is also a static label of the SLO"))
    sli = slo.sli
    if slo.group_by and sli.kind not in ("latency", "ratio"):
        out.append(
            ("group_by", "group_by works with latency and ratio SLIs; write `sum by (...)` in events/raw queries")
        )
    if slo.period_rule == PERIOD_RULE_COUNT and sli.kind not in ("events", "latency", "ratio"):
        out.append(("period_rule", "ratio_of_counts needs an events, latency or ratio SLI (error and total counts)"))
    if slo.min_events is not None and sli.kind not in ("events", "latency", "ratio"):
        out.append(("alerting.min_events", "min_events needs an events, latency or ratio SLI (a count of events)"))
    if sli.kind == "latency":
        out += _latency_problems(slo, histogram_buckets or {})
    elif sli.kind == "ratio":
        out += _ratio_problems(slo)
    out += _alert_option_problems(slo)
    out += _alert_name_problems(slo)
    return out


def _alert_name_problems(slo: SLOSpec) -> Iterator[Problem]:
    """Two alerts of one SLO with the same name and severity have the same labels (Prometheus cannot tell them
    apart) and the same runbook file."""
    alerts = [
        (severity, meta.name, "alerting.name", f"{severity} burn-rate alert")
        for severity, meta in (("page", slo.page), ("ticket", slo.ticket))
        if not meta.disable
    ]
    alerts += [(e.severity, e.name, f"alerting.{e.kind}_alert.name", f"{e.kind} alert") for e in slo.extra_alerts]
    seen: dict[tuple[str, str], str] = {}
    for severity, name, field, what in alerts:
        if not name:
            continue
        if (name, severity) in seen:
            yield (
                field,
                f"the {what} is named {name!r} with severity {severity}, like the {seen[name, severity]}: both "
                f"alerts would have the same labels and runbook ({name}-{severity}.md); give this one its own name",
            )
        else:
            seen[name, severity] = what


def _latency_problems(slo: SLOSpec, histogram_buckets: Mapping[str, Sequence[float]]) -> Iterator[Problem]:
    sli = slo.sli
    hist = sli.histogram or ""
    if not METRIC_NAME_RE.fullmatch(hist):
        yield "sli.latency.histogram", f"invalid metric name {hist!r}"
        return
    if hist.endswith(("_bucket", "_count", "_sum")):
        base, suffix = hist.rsplit("_", 1)
        yield "sli.latency.histogram", f"give the histogram's base name ({base!r}), not a {suffix} series"
        return
    threshold = sli.threshold if sli.threshold is not None else float("nan")
    if not (threshold > 0 and math.isfinite(threshold)):
        yield "sli.latency.threshold", f"threshold must be a positive number of seconds, got {threshold!r}"
    spec = _known_metric(hist)
    if spec is not None and spec.kind != "histogram":
        yield "sli.latency.histogram", f"{hist} is a {spec.kind}, not a histogram"
        return
    given = histogram_buckets.get(hist)
    if given is not None:
        buckets, default = tuple(sorted(given)), False
    elif spec is not None:
        buckets = catalog.TPOT_BUCKETS if hist == catalog.TIME_PER_OUTPUT_TOKEN else catalog.LATENCY_BUCKETS
        default = True
    else:
        buckets, default = (), False  # another exporter's histogram: its buckets are unknown here
    if buckets and threshold > 0 and threshold not in buckets:
        hint = _bucket_hint(threshold, buckets)
        if default:
            hint += "; if your instrumentation sets other latency_buckets, give them with --buckets"
        yield (
            "sli.latency.threshold",
            f"{go_float(threshold)} s is not a bucket boundary of {hist}, so no bucket series would match ({hint})",
        )
    for key in sli.selector:
        if not LABEL_NAME_RE.fullmatch(key) or key == "le":
            yield f"sli.latency.selector.{key}", f"invalid selector label {key!r}"
    yield from _check_labels_of(hist, [*sli.selector, *slo.group_by], "sli.latency.selector")
    if sli.filter:
        expr = _selector(f"{hist}{{{sli.filter}}}")
        if isinstance(expr, str):
            yield "sli.latency.filter", f"invalid label matchers {sli.filter!r}: {expr}"
        else:
            yield from _check_labels_of(hist, [m.name for m in expr.matchers.matchers], "sli.latency.filter")


def _ratio_problems(slo: SLOSpec) -> Iterator[Problem]:
    sli = slo.sli
    if (sli.good is None) == (sli.bad is None):
        yield "sli.ratio", "give exactly one of `good` and `bad`, plus `total`"
    for key in ("good", "bad", "total"):
        text = getattr(sli, key)
        if text is None:
            continue
        try:
            metric, matchers = selector_labels(text)
        except ValueError as exc:
            yield f"sli.ratio.{key}", f"invalid selector {text!r}: {exc}"
            continue
        spec = _known_metric(metric or "")
        if spec is not None and spec.kind != "counter":
            yield f"sli.ratio.{key}", f"{metric} is a {spec.kind}; ratio SLIs need counters"
        yield from _check_labels_of(metric, [m[0] for m in matchers] + list(slo.group_by), f"sli.ratio.{key}")
    if (sli.good is not None and sli.good == sli.total) or (sli.bad is not None and sli.bad == sli.total):
        yield "sli.ratio", "the good/bad and total selectors can't be the same"


def _duration_problem(value: str | None, field: str, positive: bool = False) -> Iterator[Problem]:
    """A duration that Prometheus cannot load; with ``positive``, also 0 (a range window must be longer)."""
    if value is None:
        return
    try:
        if parse_duration(value) == 0 and positive:
            yield field, f"{value!r}: a window must be longer than 0"
    except ValueError as exc:
        yield field, str(exc)


def _alert_option_problems(slo: SLOSpec) -> Iterator[Problem]:
    for severity, alert in (("page", slo.page), ("ticket", slo.ticket)):
        field = f"alerting.{severity}_alert"
        yield from _duration_problem(alert.for_, f"{field}.for")
        if alert.disable and (alert.labels or alert.annotations or alert.for_):
            yield (
                field,
                f"the {severity} alert is disabled but has labels, annotations or `for`; remove them or enable it",
            )
    for extra in slo.extra_alerts:
        field = f"alerting.{extra.kind}_alert"
        if not extra.name:
            yield f"{field}.name", f"alert name is required: set alerting.name or {field}.name"
        yield from _duration_problem(extra.for_, f"{field}.for")
        for f, m in _labels(extra.labels, f"{field}.labels", "alert"):
            yield f, m
        for f, m in _annotations(extra.annotations, f"{field}.annotations"):
            yield f, m
        if extra.kind == "threshold":
            if (extra.short_window is None) != (extra.long_window is None):
                yield field, "give both short_window and long_window, or neither (the catalog's ticket-slow pair)"
            yield from _duration_problem(extra.short_window, f"{field}.short_window", positive=True)
            yield from _duration_problem(extra.long_window, f"{field}.long_window", positive=True)
            try:
                if extra.short_window and parse_duration(extra.short_window) >= parse_duration(extra.long_window or ""):
                    yield field, "short_window must be shorter than long_window"
            except ValueError:
                pass
            if not (extra.factor or 0) > 0:
                yield f"{field}.factor", "factor must be positive"


def reachability_problems(
    slo: SLOSpec, windows: AlertWindows, *, llmpath: bool = True
) -> tuple[list[Problem], list[Problem]]:
    """(errors, warnings) for alerts whose threshold an error ratio (at most 1) can never cross.

    A burn-rate pair fires when the error ratio exceeds ``factor x budget``; when that is 1 or more it never can.
    An alert whose every pair is unreachable is an error for llmpath specs (a warning for Sloth inputs, which
    Sloth accepts); a partly reachable alert is a warning.
    """
    from llmpath.slo.rules import threshold_windows

    budget = (100 - slo.objective) / 100
    errors: list[Problem] = []
    warnings: list[Problem] = []
    if not 0 < budget < 1:
        return errors, warnings
    for severity, alert in (("page", slo.page), ("ticket", slo.ticket)):
        if alert.disable:
            continue
        pairs = windows.burn_windows(severity)
        dead = [p for p in pairs if p.factor * budget >= 1]
        if not dead:
            continue
        detail = ", ".join(
            f"{go_float(p.factor)}x over {p.long}/{p.short} needs an error ratio above {go_float(p.factor * budget)}"
            for p in dead
        )
        field = f"alerting.{severity}_alert"
        if len(dead) == len(pairs):
            needed = _objective_above(min(p.factor for p in pairs))
            errors.append(
                (
                    field,
                    f"the {severity} alert can never fire with a {go_float(slo.objective)}% objective ({detail}); "
                    f"raise the objective to at least {needed}%, or disable the alert and {_use_threshold(llmpath)}",
                )
            )
        else:
            needed = _objective_above(max(p.factor for p in pairs))
            warnings.append(
                (
                    field,
                    f"part of the {severity} alert can never fire ({detail}); every window pair can fire with an "
                    f"objective of at least {needed}%",
                )
            )
    for extra in slo.extra_alerts:
        if extra.kind != "threshold":
            continue
        field = "alerting.threshold_alert"
        try:
            _short, long = threshold_windows(extra, windows)
        except ValueError:
            continue
        if long >= windows.period_ms:
            errors.append(
                (field, f"long_window {format_duration(long)} must be shorter than the {windows.period} period")
            )
        if (extra.factor or 0) * budget >= 1:
            errors.append(
                (
                    field,
                    f"factor {go_float(extra.factor or 0)} x budget {go_float(budget)} >= 1: the alert can never fire; "
                    f"use a factor below {go_float(round(1 / budget, 6))} or an objective of at least "
                    f"{_objective_above(extra.factor or 0)}%",
                )
            )
    return errors, warnings


def _use_threshold(llmpath: bool, kind: str = "a") -> str:
    """The advice to add a threshold alert: a key of llmpath/v1 specs only, so Sloth inputs are told so."""
    advice = f"add {kind} threshold_alert"
    return advice if llmpath else f"{advice} (a `version: llmpath/v1` spec)"


#: With every event bad, a page that takes longer than this to fire is too slow for an outage (a warning).
MAX_PAGE_DELAY_MS = 15 * 60_000


def page_delay_warnings(slo: SLOSpec, windows: AlertWindows, *, llmpath: bool = True) -> list[Problem]:
    """A warning when even 100 % bad events take more than :data:`MAX_PAGE_DELAY_MS` to page.

    A pair fires once its long window's error ratio passes ``factor x budget``; with every event bad that ratio
    grows by one long window per long window, so the delay is ``long x factor x budget``. Low objectives make it
    long: at 95 %, Sloth's 14.4x over 1h needs 72 % of the last hour bad, 43 minutes into an outage.
    """
    from llmpath.slo.rules import alert_pairs

    budget = (100 - slo.objective) / 100
    if not 0 < budget < 1:
        return []
    try:
        pages = [
            (parse_duration(p.long) * p.factor * budget, f"{go_float(p.factor)}x over {p.long}/{p.short}")
            for p in alert_pairs(slo, windows, "page")
            if p.factor * budget < 1
        ]
    except ValueError:  # an invalid window: reported by the other checks
        return []
    if not pages:
        return []
    delay, fastest = min(pages)
    if delay <= MAX_PAGE_DELAY_MS:
        return []
    return [
        (
            "alerting.page_alert",
            f"with every event bad, the fastest page ({fastest}) fires only after about {round(delay / 60_000)} "
            f"minutes; for a {go_float(slo.objective)}% objective {_use_threshold(llmpath, 'a page')} over short "
            f"windows (e.g. factor {go_float(round(0.5 / budget, 2))}, half the events bad, over 10m/2m) or raise "
            "the objective",
        )
    ]


def _objective_above(factor: float) -> str:
    """The smallest objective (percent, 3 decimals) whose budget times ``factor`` is below 1, so the alert can fire."""
    exact = 100 * (1 - 1 / factor)
    return go_float(round(math.floor(exact * 1000 + 1e-4) / 1000 + 0.001, 3))
