"""Loading spec files: format detection (as Sloth detects it), parsing, and mapping to :class:`SLOSpec`."""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from llmpath.slo import schema
from llmpath.slo.errors import Issue, IssueLog
from llmpath.slo.model import (
    K8S_V1,
    LLMPATH_V1,
    OPENSLO_V1ALPHA,
    PROMETHEUS_V1,
    SLI,
    AlertMeta,
    ExtraAlert,
    Locator,
    PluginRef,
    SLOSpec,
    SpecDocument,
)
from llmpath.slo.yamlin import RawDocument, YAMLSyntaxError, iter_spec_files, load_yaml, position, split_documents

_PROM_V1 = re.compile(r"(?m)^version: +['\"]?prometheus/v1['\"]?\r?\n? *$")
_LLMPATH_V1 = re.compile(r"(?m)^version: +['\"]?llmpath/v1['\"]? *$")
_K8S_KIND = re.compile(r"(?m)^kind: +['\"]?PrometheusServiceLevel['\"]? *$")
_K8S_API = re.compile(r"(?m)^apiVersion: +['\"]?sloth.slok.dev\/v1['\"]? *$")
_OSLO_KIND = re.compile(r"(?m)^kind: +['\"]?SLO['\"]? *$")
_OSLO_API = re.compile(r"(?m)^apiVersion: +['\"]?openslo\/v1alpha['\"]? *$")
_WINDOWS_KIND = re.compile(r"(?m)^kind: +['\"]?AlertWindows['\"]? *$")
_RULE_FILE = re.compile(r"(?m)^(groups:|kind: +['\"]?PrometheusRule['\"]? *$)")

_K8S_RENAME = {
    "error_query": "errorQuery",
    "total_query": "totalQuery",
    "error_ratio_query": "errorRatioQuery",
    "page_alert": "pageAlert",
    "ticket_alert": "ticketAlert",
}


def detect(text: str) -> str | None:
    """The spec format of one document, detected with Sloth's regular expressions (``None`` if unknown)."""
    if _PROM_V1.search(text):
        return PROMETHEUS_V1
    if _LLMPATH_V1.search(text):
        return LLMPATH_V1
    if _K8S_KIND.search(text) and _K8S_API.search(text):
        return K8S_V1
    if _OSLO_KIND.search(text) and _OSLO_API.search(text):
        return OPENSLO_V1ALPHA
    return None


def _unknown_format_message(data: Any) -> str:
    supported = (
        '`version: "prometheus/v1"`, `version: llmpath/v1`, `apiVersion: sloth.slok.dev/v1` with '
        "`kind: PrometheusServiceLevel`, or `apiVersion: openslo/v1alpha` with `kind: SLO`"
    )
    if isinstance(data, dict):
        if "version" in data:
            return f"unknown spec version {data['version']!r}; supported: {supported}"
        if "apiVersion" in data or "kind" in data:
            return (
                f"unknown spec apiVersion/kind {data.get('apiVersion')!r}/{data.get('kind')!r}; supported: {supported}"
            )
    return f"not an SLO spec: expected {supported}"


def _merge(*maps: dict[str, str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for m in maps:
        out.update(m)
    return out


class _RootAwareLocator(Locator):
    """A locator where ``^field`` paths start at the spec container (``spec.`` for CRs) instead of the SLO."""

    def __init__(
        self, file: str, raw: Any, base: tuple[object, ...], rename: dict[str, str], root: tuple[object, ...]
    ) -> None:
        super().__init__(file, raw, base, rename)
        self._root = root

    def path(self, logical: str) -> tuple[object, ...]:
        if logical.startswith("^"):
            return (*self._root, *(self.rename.get(p, p) for p in logical[1:].split(".")))
        return super().path(logical)


class _DocLoader:
    """Loads one document; issues go to ``log`` with the file, SLO and field."""

    def __init__(self, path: Path, raw_doc: RawDocument, doc_count: int, log: IssueLog, root: Path | None) -> None:
        self.path = path
        self.file = str(path)
        self.raw_doc = raw_doc
        self.doc_count = doc_count
        self.log = log
        self.root = root
        self.data: Any = None

    def where(self, loc: tuple[object, ...]) -> dict[str, object]:
        pos = position(self.data, loc)
        field = ""
        for step in loc:
            field += f"[{step}]" if isinstance(step, int) else (f".{step}" if field else str(step))
        return {
            "file": self.file,
            "field": field or None,
            "line": pos[0] if pos else None,
            "column": pos[1] if pos else None,
        }

    def _slo_of(self, loc: tuple[object, ...], kind: str) -> str | None:
        prefix: tuple[object, ...] = ("spec", "slos") if kind == K8S_V1 else ("slos",)
        if kind == OPENSLO_V1ALPHA:
            prefix = ("spec", "objectives")
        if loc[: len(prefix)] != prefix or len(loc) <= len(prefix) or not isinstance(loc[len(prefix)], int):
            return None
        try:
            if kind == OPENSLO_V1ALPHA:
                return f"{self.data['spec']['service']}-{self.data['metadata']['name']}-{loc[len(prefix)]}"
            container = self.data["spec"] if kind == K8S_V1 else self.data
            return f"{container['service']}-{container['slos'][loc[len(prefix)]]['name']}"
        except (KeyError, IndexError, TypeError):
            return None

    def load(self, kind: str | None) -> SpecDocument | None:
        try:
            self.data, duplicates = load_yaml(self.raw_doc)
        except YAMLSyntaxError as exc:
            self.log.error(str(exc), file=self.file, line=exc.line, column=exc.column)
            return None
        for dup in duplicates:
            strict = kind == LLMPATH_V1
            where = self.where(dup.path)
            self.log.add(
                Issue(
                    f"duplicate key {dup.key!r} (first at line {dup.first_line}): "
                    + ("a key may appear only once in llmpath/v1" if strict else "Sloth uses the last value"),
                    slo=self._slo_of(dup.path, kind) if kind else None,
                    severity="error" if strict else "warning",
                    **{**where, "line": dup.line, "column": dup.column},  # type: ignore[arg-type]
                )
            )
        if kind is None:
            self.log.error(_unknown_format_message(self.data), **self.where(("version",)))
            return None
        if not isinstance(self.data, dict):
            self.log.error("a spec document must be a mapping", file=self.file)
            return None
        models: dict[str, type[BaseModel]] = {
            PROMETHEUS_V1: schema.PV1Spec,
            K8S_V1: schema.K8sDoc,
            OPENSLO_V1ALPHA: schema.OSDoc,
            LLMPATH_V1: schema.LSpec,
        }
        model_cls = models[kind]
        strict = kind == LLMPATH_V1
        for loc, hint in schema.unknown_keys(self.data, model_cls):
            self.log.add(
                Issue(
                    f"unknown key {loc[-1]!r} "
                    + ("(not allowed in llmpath/v1)" if strict else "(Sloth ignores it)")
                    + hint,
                    slo=self._slo_of(loc, kind),
                    severity="error" if strict else "warning",
                    **self.where(loc),  # type: ignore[arg-type]
                )
            )
        try:
            model = model_cls.model_validate(self.data)
        except ValidationError as exc:
            for err in exc.errors():
                loc = tuple(err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                if err["type"] == "missing":
                    msg = "required"
                self.log.error(msg, slo=self._slo_of(loc, kind), **self.where(loc))
            return None
        return self._map(kind, model)

    def _doc(self, kind: str, service: str, slos: list[SLOSpec], **extra: Any) -> SpecDocument:
        return SpecDocument(
            path=self.path,
            index=self.raw_doc.index,
            doc_count=self.doc_count,
            spec=kind,
            service=service,
            slos=slos,
            raw=self.data,
            input_root=self.root,
            **extra,
        )

    def _map(self, kind: str, model: Any) -> SpecDocument | None:
        if kind == PROMETHEUS_V1:
            if model.version != PROMETHEUS_V1:
                self.log.error(f'invalid spec version, should be "{PROMETHEUS_V1}"', **self.where(("version",)))
                return None
            return self._map_sloth(kind, model, model, ("slos",), {})
        if kind == K8S_V1:
            meta = model.metadata
            doc = self._map_sloth(kind, model.spec, model.spec, ("spec", "slos"), _K8S_RENAME)
            if doc is not None:
                doc.k8s_name, doc.k8s_namespace = meta.name, meta.namespace
                doc.k8s_labels, doc.k8s_annotations = dict(meta.labels), dict(meta.annotations)
            return doc
        if kind == OPENSLO_V1ALPHA:
            return self._map_openslo(model)
        return self._map_llmpath(model)

    def _locator(self, base: tuple[object, ...], rename: dict[str, str], root_prefix: tuple[object, ...]) -> Locator:
        return _RootAwareLocator(self.file, self.data, base, rename, root=root_prefix)

    def _map_sloth(
        self, kind: str, spec: Any, container: Any, base: tuple[object, ...], rename: dict[str, str]
    ) -> SpecDocument | None:
        if not spec.slos:
            self.log.error("at least one SLO is required", **self.where((*base[:-1], "slos")))
            return None
        group_plugins = [PluginRef(p.id, p.config, p.priority) for p in spec.slo_plugins.chain]
        slos = []
        for i, s in enumerate(spec.slos):
            plugins = list(group_plugins)
            override = spec.slo_plugins.override_previous
            if s.plugins.override_previous:
                plugins, override = [], True
            plugins += [PluginRef(p.id, p.config, p.priority) for p in s.plugins.chain]
            slo = SLOSpec(
                id=f"{container.service}-{s.name}",
                name=s.name,
                service=container.service,
                objective=s.objective,
                sli=_sloth_sli(s.sli),
                description=s.description,
                labels=_merge(container.labels, s.labels),
                service_labels=dict(container.labels),
                own_labels=dict(s.labels),
                page=_sloth_alert(s.alerting, s.alerting.page_alert),
                ticket=_sloth_alert(s.alerting, s.alerting.ticket_alert),
                plugins=plugins,
                override_default_plugins=override,
                locator=self._locator((*base, i), rename, base[:-1]),
            )
            slos.append(slo)
        return self._doc(kind, container.service, slos)

    def _map_openslo(self, model: schema.OSDoc) -> SpecDocument | None:
        spec = model.spec
        if not spec.objectives:
            self.log.error("at least one SLO is required", **self.where(("spec", "objectives")))
            return None
        period: str | None = None
        if len(spec.time_windows) > 1:
            self.log.error(
                "invalid SLO time windows: only 1 time window is supported", **self.where(("spec", "timeWindows"))
            )
            return None
        if spec.time_windows:
            tw = spec.time_windows[0]
            if tw.unit.lower() != "day":
                self.log.error(
                    "invalid SLO time windows: only days based time windows are supported",
                    **self.where(("spec", "timeWindows", 0, "unit")),
                )
                return None
            period = f"{tw.count}d"
        slos = []
        ok = True
        for idx, objective in enumerate(spec.objectives):
            slo_id = f"{spec.service}-{model.metadata.name}-{idx}"
            loc = ("spec", "objectives", idx)
            rm = objective.ratio_metrics
            problem = None
            field: tuple[object, ...] = loc
            if rm is None:
                problem = "missing ratioMetrics"
            elif rm.good.source not in ("prometheus", "sloth"):
                problem, field = "prometheus or sloth query ratio 'good' source is required", (*loc, "ratioMetrics")
            elif rm.total.source not in ("prometheus", "sloth"):
                problem, field = "prometheus or sloth query ratio 'total' source is required", (*loc, "ratioMetrics")
            elif rm.good.query_type != "promql":
                problem = f"unsupported 'good' indicator query type: {rm.good.query_type}"
                field = (*loc, "ratioMetrics", "good", "queryType")
            elif rm.total.query_type != "promql":
                problem = f"unsupported 'total' indicator query type: {rm.total.query_type}"
                field = (*loc, "ratioMetrics", "total", "queryType")
            elif objective.target is None:
                problem, field = "target is required", (*loc, "target")
            if problem is not None:
                self.log.error(f"could not map SLI: {problem}", slo=slo_id, **self.where(field))
                ok = False
                continue
            assert rm is not None and objective.target is not None
            query = (
                f"\n  1 - (\n    (\n      {rm.good.query}\n    )\n    /\n    (\n      {rm.total.query}\n    )\n  )\n"
            )
            slos.append(
                SLOSpec(
                    id=slo_id,
                    name=f"{model.metadata.name}-{idx}",
                    service=spec.service,
                    objective=objective.target * 100,
                    sli=SLI("raw", error_ratio_query=query),
                    description=spec.description,
                    period=period,
                    locator=self._locator(loc, {"sli": "ratioMetrics", "objective": "target"}, ("spec",)),
                )
            )
        if not ok:
            return None
        return self._doc(OPENSLO_V1ALPHA, spec.service, slos, period=period)

    def _map_llmpath(self, spec: schema.LSpec) -> SpecDocument | None:
        if not spec.slos:
            self.log.error("at least one SLO is required", **self.where(("slos",)))
            return None
        slos = []
        for i, s in enumerate(spec.slos):
            alerting = s.alerting
            extra: list[ExtraAlert] = []
            if (aa := alerting.absent_alert) is not None and not aa.disable:
                extra.append(
                    ExtraAlert(
                        "absent",
                        aa.name or (f"{alerting.name}NoData" if alerting.name else ""),
                        aa.severity,
                        _merge(alerting.labels, aa.labels),
                        _merge(alerting.annotations, aa.annotations),
                        aa.for_,
                    )
                )
            if (ta := alerting.threshold_alert) is not None and not ta.disable:
                extra.append(
                    ExtraAlert(
                        "threshold",
                        ta.name or (f"{alerting.name}Threshold" if alerting.name else ""),
                        ta.severity,
                        _merge(alerting.labels, ta.labels),
                        _merge(alerting.annotations, ta.annotations),
                        ta.for_,
                        ta.short_window,
                        ta.long_window,
                        ta.factor,
                    )
                )
            slos.append(
                SLOSpec(
                    id=f"{spec.service}-{s.name}",
                    name=s.name,
                    service=spec.service,
                    objective=s.objective,
                    sli=_llmpath_sli(s.sli),
                    description=s.description,
                    labels=_merge(spec.labels, s.labels),
                    service_labels=dict(spec.labels),
                    own_labels=dict(s.labels),
                    page=_llmpath_alert(alerting, alerting.page_alert),
                    ticket=_llmpath_alert(alerting, alerting.ticket_alert),
                    extra_alerts=extra,
                    period=spec.period,
                    stage=s.stage,
                    owner=s.owner,  # the stage's owner by default, from the compile's stage catalog
                    group_by=tuple(s.group_by),
                    period_rule=s.period_rule,
                    guard_zero_traffic=True,
                    min_events=alerting.min_events,
                    locator=self._locator(("slos", i), {}, ()),
                )
            )
        return self._doc(LLMPATH_V1, spec.service, slos, period=spec.period)


def _sloth_sli(sli: Any) -> SLI:
    kinds = [k for k in ("events", "raw", "plugin") if getattr(sli, k) is not None]
    if not kinds:
        return SLI("none")
    if len(kinds) > 1:
        return SLI("multiple")
    if sli.events is not None:
        return SLI("events", error_query=sli.events.error_query, total_query=sli.events.total_query)
    if sli.raw is not None:
        return SLI("raw", error_ratio_query=sli.raw.error_ratio_query)
    return SLI("plugin", plugin_id=sli.plugin.id, plugin_options=dict(sli.plugin.options))


def _sloth_alert(alerting: Any, alert: Any) -> AlertMeta:
    if alert.disable:
        return AlertMeta(disable=True)
    return AlertMeta(
        disable=False,
        name=alerting.name,
        labels=_merge(alerting.labels, alert.labels),
        annotations=_merge(alerting.annotations, alert.annotations),
    )


def _llmpath_alert(alerting: schema.LAlerting, alert: schema.LAlert) -> AlertMeta:
    if alert.disable:
        return AlertMeta(True, "", dict(alert.labels), dict(alert.annotations), alert.for_)
    return AlertMeta(
        disable=False,
        name=alerting.name,
        labels=_merge(alerting.labels, alert.labels),
        annotations=_merge(alerting.annotations, alert.annotations),
        for_=alert.for_ or alerting.for_,
    )


def _llmpath_sli(sli: schema.LSLI) -> SLI:
    kinds = [k for k in ("events", "raw", "latency", "ratio") if getattr(sli, k) is not None]
    if not kinds:
        return SLI("none")
    if len(kinds) > 1:
        return SLI("multiple")
    if sli.events is not None:
        return SLI("events", error_query=sli.events.error_query, total_query=sli.events.total_query)
    if sli.raw is not None:
        return SLI("raw", error_ratio_query=sli.raw.error_ratio_query)
    if sli.latency is not None:
        lat = sli.latency
        return SLI(
            "latency", histogram=lat.histogram, threshold=lat.threshold, selector=dict(lat.selector), filter=lat.filter
        )
    ratio = sli.ratio
    assert ratio is not None
    return SLI("ratio", good=ratio.good, bad=ratio.bad, total=ratio.total)


class SpecList(list):
    """The documents :func:`load_specs` returns, plus every warning (also for skipped files) in ``warnings``."""

    warnings: list[Issue]


def load_specs(inputs: Iterable[str | Path], strict: bool = False) -> list[SpecDocument]:
    """Load SLO specs from files and folders (any supported format, multi-document files split like Sloth).

    Raises :class:`~llmpath.slo.errors.SpecError` listing every problem (file, SLO, field, line); with
    ``strict`` unknown keys and other warnings are errors too. Each document carries its own warnings; the
    returned list's ``warnings`` has them all (skipped files in folders included).
    """
    log = IssueLog()
    docs = SpecList()
    for item in inputs:
        path = Path(item)
        if not path.exists():
            log.error("no such file or folder", file=str(path))
            continue
        if path.is_dir():
            files = list(iter_spec_files(path))
            if not files:
                log.error("no .yaml or .yml files in this folder", file=str(path))
            for file in files:
                docs += _load_file(file, log, root=path, from_dir=True)
        else:
            docs += _load_file(path, log, root=None, from_dir=False)
    for doc in docs:
        doc.warnings = [w for w in log.warnings if w.file == doc.file]
    docs.warnings = list(log.warnings)
    log.raise_if_errors(strict)
    return docs


def _load_file(path: Path, log: IssueLog, root: Path | None, from_dir: bool) -> list[SpecDocument]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        log.error("not a UTF-8 text file", file=str(path))
        return []
    except OSError as exc:
        log.error(f"cannot read: {exc.strerror or exc}", file=str(path))
        return []
    raw_docs = split_documents(text)
    if not raw_docs:
        if not from_dir:
            log.error("the file is empty (spec is required)", file=str(path))
        return []
    out = []
    for raw in raw_docs:
        kind = detect(raw.text)
        if kind is None and from_dir:
            if not _WINDOWS_KIND.search(raw.text):
                what = "a Prometheus rule file" if _RULE_FILE.search(raw.text) else "not an SLO spec"
                log.warn(f"skipped: {what}", file=str(path), line=raw.first_line)
            continue
        loader = _DocLoader(path, raw, len(raw_docs), log, root)
        if (doc := loader.load(kind)) is not None:
            out.append(doc)
    return out
