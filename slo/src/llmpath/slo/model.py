"""Data model: parsed specs (any input format), compile options, and the compiled result (the public API)."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmpath.instrumentation.catalog import STAGES, StageCatalog
from llmpath.slo.errors import Issue

# Spec kinds (the ``sloth_spec`` label value of each input format).
PROMETHEUS_V1 = "prometheus/v1"
K8S_V1 = "sloth.slok.dev/v1"
OPENSLO_V1ALPHA = "openslo/v1alpha"
LLMPATH_V1 = "llmpath/v1"

#: ``sloth_mode`` per input format (Sloth's CLI modes; llmpath specs get their own).
SPEC_MODES: Mapping[str, str] = {
    PROMETHEUS_V1: "cli-gen-prom",
    K8S_V1: "cli-gen-k8s",
    OPENSLO_V1ALPHA: "cli-gen-openslo",
    LLMPATH_V1: "cli-gen-llmpath",
}

FORMAT_PROMETHEUS = "prometheus"
FORMAT_OPERATOR = "prometheus-operator"

PERIOD_RULE_MEAN = "mean_of_ratios"
PERIOD_RULE_COUNT = "ratio_of_counts"


# --------------------------------------------------------------------------------------------
# Parsed specs (what load_specs returns): one SpecDocument per YAML document.
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class Locator:
    """Maps logical SLO fields (snake_case, Sloth's prometheus/v1 names) to the spelling and line in the input."""

    file: str
    raw: Any
    base: tuple[object, ...]
    rename: Mapping[str, str] = field(default_factory=dict)

    def path(self, logical: str) -> tuple[object, ...]:
        steps: list[object] = list(self.base)
        for part in logical.split(".") if logical else ():
            steps.append(self.rename.get(part, part))
        return tuple(steps)

    def describe(self, logical: str) -> str:
        out = ""
        for step in self.path(logical):
            out += f"[{step}]" if isinstance(step, int) else (f".{step}" if out else str(step))
        return out

    def where(self, logical: str) -> dict[str, object]:
        """Keyword arguments for :class:`Issue` (file, field, line, column)."""
        from llmpath.slo.yamlin import exists, position

        parts = logical.split(".")
        # Alert labels/annotations are merged from `alerting.*` and `<kind>_alert.*`, and the burn-rate alerts'
        # `for` defaults to `alerting.for`: name where the key is.
        inherited = len(parts) >= 4 and parts[2] in ("labels", "annotations")
        inherited |= len(parts) == 3 and parts[1] in ("page_alert", "ticket_alert") and parts[2] == "for"
        if parts[0] == "alerting" and inherited:
            shared = ".".join(["alerting", *parts[2:]])
            if not exists(self.raw, self.path(logical)) and exists(self.raw, self.path(shared)):
                logical = shared
        pos = position(self.raw, self.path(logical))
        return {
            "file": self.file,
            "field": self.describe(logical) or None,
            "line": pos[0] if pos else None,
            "column": pos[1] if pos else None,
        }


@dataclass(slots=True)
class AlertMeta:
    """One Sloth alert (page or ticket) as configured in a spec."""

    disable: bool = True
    name: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    for_: str | None = None


@dataclass(slots=True)
class ExtraAlert:
    """An llmpath alert beyond Sloth's two: ``absent`` (no data) or ``threshold`` (fixed windows and factor)."""

    kind: str  # "absent" | "threshold"
    name: str
    severity: str
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    for_: str | None = None
    short_window: str | None = None
    long_window: str | None = None
    factor: float | None = None


@dataclass(slots=True)
class PluginRef:
    """A Sloth SLO plugin in a chain."""

    id: str
    config: Any = None
    priority: int = 0


@dataclass(slots=True)
class SLI:
    """The indicator. Sloth kinds ``events``/``raw``/``plugin``; llmpath adds ``latency`` and ``ratio``."""

    kind: str
    error_query: str | None = None
    total_query: str | None = None
    error_ratio_query: str | None = None
    # plugin SLI (resolved to a raw query at compile time)
    plugin_id: str | None = None
    plugin_options: dict[str, str] = field(default_factory=dict)
    # latency SLI
    histogram: str | None = None
    threshold: float | None = None
    selector: dict[str, str] = field(default_factory=dict)
    filter: str | None = None
    # ratio SLI (counter selectors)
    good: str | None = None
    bad: str | None = None
    total: str | None = None

    def __post_init__(self) -> None:
        # Rules wrap queries in `(…)` on the same line: a query whose last line ends in a PromQL comment would
        # comment out the closing parenthesis, so it gets the line break a YAML block (`|`) query has anyway.
        for name in ("error_query", "total_query", "error_ratio_query"):
            object.__setattr__(self, name, closable(getattr(self, name)))  # frozen


_PROMQL_LEXEME = re.compile(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'|`[^`]*`|#[^\n]*|[^"\'`#]+|.', re.DOTALL)


def code_of(query: str) -> str:
    """``query`` without its strings and comments."""
    return "".join(m.group() for m in _PROMQL_LEXEME.finditer(query) if m.group()[0] not in "\"'`#")


def has_comment(query: str) -> bool:
    """Whether ``query`` has a PromQL comment (``#`` outside strings)."""
    return "#" in query and any(m.group().startswith("#") for m in _PROMQL_LEXEME.finditer(query))


def closable(query: str | None) -> str | None:
    """``query`` with a final line break when its last line ends in a comment (``# …``), else unchanged."""
    if query is None or "#" not in query or query.endswith("\n"):
        return query
    last = ""
    for m in _PROMQL_LEXEME.finditer(query):
        last = m.group()
    return query + "\n" if last.startswith("#") else query


@dataclass(slots=True)
class SLOSpec:
    """One SLO, normalised from any input format."""

    id: str
    name: str
    service: str
    objective: float
    sli: SLI
    description: str = ""
    #: Every label of the SLO's rules: ``service_labels``, then ``own_labels`` (and ``--extra-label`` once compiled).
    labels: dict[str, str] = field(default_factory=dict)
    #: The document's top-level ``labels:``.
    service_labels: dict[str, str] = field(default_factory=dict)
    #: The SLO's own ``labels:``.
    own_labels: dict[str, str] = field(default_factory=dict)
    page: AlertMeta = field(default_factory=AlertMeta)
    ticket: AlertMeta = field(default_factory=AlertMeta)
    extra_alerts: list[ExtraAlert] = field(default_factory=list)
    plugins: list[PluginRef] = field(default_factory=list)
    override_default_plugins: bool = False
    period: str | None = None
    # llmpath extensions
    stage: str | None = None
    owner: str | None = None
    group_by: tuple[str, ...] = ()
    period_rule: str = PERIOD_RULE_MEAN
    guard_zero_traffic: bool = False
    #: Burn-rate and threshold alerts fire only when a pair's long window saw at least this many events.
    min_events: int | None = None
    locator: Locator | None = None

    def where(self, logical: str = "") -> dict[str, object]:
        """Issue location keywords for a field of this SLO (``^field``: of its document, named without the SLO)."""
        out: dict[str, object] = {"slo": None if logical.startswith("^") else self.id}
        if self.locator is not None:
            out.update(self.locator.where(logical))
        return out


@dataclass(slots=True)
class SpecDocument:
    """One parsed YAML document of a spec file (``slos`` are normalised; ``raw`` is the loaded YAML)."""

    path: Path
    index: int
    doc_count: int
    spec: str
    service: str
    slos: list[SLOSpec]
    raw: Any = None
    period: str | None = None
    k8s_name: str | None = None
    k8s_namespace: str | None = None
    k8s_labels: dict[str, str] = field(default_factory=dict)
    k8s_annotations: dict[str, str] = field(default_factory=dict)
    warnings: list[Issue] = field(default_factory=list)
    input_root: Path | None = None

    @property
    def file(self) -> str:
        return str(self.path)


# --------------------------------------------------------------------------------------------
# Plugins (Python counterparts of Sloth's Go plugins).
# --------------------------------------------------------------------------------------------

#: An SLI plugin: ``(meta, service_labels, options) -> raw error-ratio query`` (with ``{{.window}}``).
SLIPlugin = Callable[[Mapping[str, str], Mapping[str, str], Mapping[str, str]], str]


@dataclass(slots=True)
class Rule:
    """A Prometheus rule (recording or alerting) in the rule-file field order."""

    expr: str
    record: str | None = None
    alert: str | None = None
    for_: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    #: Compiler metadata for alerts it generated (kind, severity, windows); never written out.
    info: dict[str, Any] | None = None


@dataclass(slots=True)
class RuleGroup:
    """A rule group; ``interval`` is a Prometheus duration or ``None``."""

    name: str
    rules: list[Rule] = field(default_factory=list)
    interval: str | None = None


@dataclass(slots=True)
class SLORules:
    """What the plugin chain builds for one SLO: Sloth's three groups plus extra groups."""

    sli: RuleGroup
    meta: RuleGroup
    alerts: RuleGroup
    extra: list[RuleGroup] = field(default_factory=list)

    def groups(self) -> list[RuleGroup]:
        return [g for g in (self.sli, self.meta, self.alerts, *self.extra) if g.rules]


#: An SLO plugin factory: ``config -> processor``; the processor mutates :class:`SLORules` for a request.
SLOPluginFactory = Callable[[Any], Callable[["PluginRequest", SLORules], None]]


@dataclass(slots=True)
class PluginRequest:
    """What an SLO plugin sees: the SLO, its alert windows, and generator info."""

    slo: SLOSpec
    windows: Any  # llmpath.slo.windows.AlertWindows
    spec: str
    mode: str
    version: str
    options: CompileOptions
    #: Non-fatal problems plugins report: (logical field, message).
    warnings: list[tuple[str, str]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Compile options and results (the API the dashboards and runbooks generators code against).
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CompileOptions:
    """How to compile specs into Prometheus rules.

    ``period``: default SLO period (``30d``, ``28d`` and ``7d`` are built in; any Prometheus duration works with a
    matching ``windows_file``). ``windows_file``: Sloth ``AlertWindows`` file(s) or folder(s); their periods are
    added to (and override) the built-in catalogs, and a single file's period becomes the default when ``period``
    is not given. ``runbook_base_url``/``dashboard_base_url``: ``None`` means the defaults for llmpath specs
    (``runbooks/generated``, ``http://localhost:3000``) and no URL annotations for Sloth-format inputs (their output
    stays identical to Sloth's); an explicit value applies to every input. ``format``: ``None`` keeps Sloth's choice
    per input (``prometheus-operator`` for Kubernetes CRs, ``prometheus`` otherwise).
    """

    period: str | None = None
    windows_file: str | Path | Sequence[str | Path] | None = None
    extra_labels: Mapping[str, str] = field(default_factory=dict)
    runbook_base_url: str | None = None
    dashboard_base_url: str | None = None
    disable_alerts: bool = False
    disable_recordings: bool = False
    format: str | None = None
    tests: bool = False
    strict: bool = False
    sli_plugins: Mapping[str, SLIPlugin] = field(default_factory=dict)
    slo_plugins: Mapping[str, SLOPluginFactory] = field(default_factory=dict)
    sloth_version: str | None = None
    #: Allow the same SLO ID in different input documents (Sloth's ``--ignore-slo-duplicates``); the rules of
    #: such SLOs would write the same series if loaded into one Prometheus.
    ignore_duplicates: bool = False
    #: Histogram name → its bucket bounds, for histograms whose buckets are not the stage catalog's (e.g. an
    #: ``instrument_app(latency_buckets=...)``): latency SLI thresholds are checked against these.
    histogram_buckets: Mapping[str, Sequence[float]] = field(default_factory=dict)
    #: The stage catalog (``llmpath.instrumentation.load_catalog``): the stages an SLO's ``stage`` may name and
    #: their owners (an SLO without ``owner:`` gets its stage's). Default: the built-in stages and owners.
    stages: StageCatalog = STAGES


DEFAULT_PERIOD = "30d"
DEFAULT_RUNBOOK_BASE_URL = "runbooks/generated"
DEFAULT_DASHBOARD_BASE_URL = "http://localhost:3000"


@dataclass(frozen=True, slots=True)
class BurnWindow:
    """A multi-window pair: the alert fires when both windows burn faster than ``factor``."""

    short: str
    long: str
    factor: float
    #: Share of the period's error budget (percent) spent in ``long`` at that burn rate.
    budget_percent: float


@dataclass(frozen=True, slots=True)
class AlertInfo:
    """One generated alerting rule.

    ``kind``: ``burn_rate`` (Sloth's page/ticket multi-window alerts), ``threshold`` (one window pair with an
    explicit factor), ``absent`` (no data), or ``plugin`` (added by an SLO plugin). ``runbook_file`` is the single
    place the runbook file name is decided; ``runbook_url`` is ``<runbook_base_url>/<runbook_file>``.
    """

    name: str
    severity: str
    kind: str
    expr: str
    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    windows: tuple[BurnWindow, ...]
    for_: str | None
    runbook_file: str
    slo_id: str


@dataclass(frozen=True, slots=True)
class SLIInfo:
    """The SLI: ``kind`` and its queries (``{{.window}}`` templates), histogram, threshold and selector."""

    kind: str
    error_query: str | None = None
    total_query: str | None = None
    error_ratio_query: str | None = None
    histogram: str | None = None
    threshold: float | None = None
    selector: Mapping[str, str] = field(default_factory=dict)
    filter: str | None = None
    good: str | None = None
    bad: str | None = None
    total: str | None = None


@dataclass(frozen=True, slots=True)
class CompiledSLO:
    """One compiled SLO (``id`` is Sloth's ``<service>-<name>`` and the ``sloth_id`` label value)."""

    id: str
    service: str
    name: str
    objective: float
    period: str
    stage: str | None
    owner: str | None
    description: str
    sli: SLIInfo
    labels: Mapping[str, str]
    alerts: tuple[AlertInfo, ...]
    group_by: tuple[str, ...]
    spec: str
    source: str
    rule_file: str
    period_rule: str
    #: Names of the recording rules written for this SLO (``slo:sli_error:ratio_rate5m``, …, ``sloth_slo_info``).
    recordings: tuple[str, ...] = ()
    #: Events a pair's long window must hold for its burn-rate or threshold alert to fire (``None``: any number).
    min_events: int | None = None

    @property
    def error_budget(self) -> float:
        """The error budget as a ratio (``1 - objective/100``, as Prometheus computes it)."""
        return 1 - self.objective / 100


@dataclass(slots=True)
class CompileResult:
    """Everything a compile produced; nothing is written to disk (the CLI writes ``files`` atomically)."""

    slos: list[CompiledSLO]
    files: dict[str, str]
    test_files: dict[str, str] = field(default_factory=dict)
    warnings: list[Issue] = field(default_factory=list)
    #: Output file → SLO ids in it.
    file_slos: dict[str, list[str]] = field(default_factory=dict)
