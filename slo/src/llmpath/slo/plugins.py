"""Sloth's SLO plugin chain and its built-in plugins, in Python.

A plugin is a factory ``config -> processor``; the processor receives a :class:`PluginRequest` and mutates the
:class:`SLORules` being built. Default plugins (validate, SLI, metadata, alerts) have priority 0; chain plugins with
a negative priority run before them, the others after (stable order by priority), exactly as Sloth orders them.
Custom plugins are passed in :attr:`CompileOptions.slo_plugins`; SLI plugins in :attr:`CompileOptions.sli_plugins`.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from llmpath.slo import rules as R
from llmpath.slo.gofmt import format_duration, go_float, parse_duration, prom_filter
from llmpath.slo.gotemplate import render_window
from llmpath.slo.model import LLMPATH_V1, PluginRequest, Rule, RuleGroup, SLIPlugin, SLOPluginFactory, SLORules
from llmpath.slo.validate import (
    Problem,
    llmpath_problems,
    metricsql_error,
    page_delay_warnings,
    plugin_problems,
    promql_error,
    reachability_problems,
    sloth_problems,
)

Processor = Callable[[PluginRequest, SLORules], None]

VALIDATE = "sloth.dev/core/validate/v1"
SLI_RULES = "sloth.dev/core/sli_rules/v1"
METADATA_RULES = "sloth.dev/core/metadata_rules/v1"
ALERT_RULES = "sloth.dev/core/alert_rules/v1"
DEFAULT_CHAIN = (VALIDATE, SLI_RULES, METADATA_RULES, ALERT_RULES)


class PluginError(ValueError):
    """A plugin rejected the SLO; ``problems`` are (logical field, message) pairs."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("; ".join(m for _, m in problems))


def _config(config: Any, plugin: str) -> Mapping[str, Any]:
    if config is None:
        return {}
    if not isinstance(config, Mapping):
        raise PluginError([("plugins", f"plugin {plugin!r}: config must be a mapping")])
    return config


def _string_map(value: Any, plugin: str, key: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(isinstance(v, (str, int, float)) for v in value.values()):
        raise PluginError([("plugins", f"plugin {plugin!r}: {key} must be a mapping of strings")])
    return {str(k): str(v) for k, v in value.items()}


# --------------------------------------------------------------------------------------------
# Core plugins.
# --------------------------------------------------------------------------------------------


def _validate_factory(check: Callable[[str], str | None]) -> SLOPluginFactory:
    def factory(config: Any) -> Processor:
        def process(req: PluginRequest, result: SLORules) -> None:
            problems = sloth_problems(req.slo, check) + plugin_problems(req.slo)
            llm = req.spec == LLMPATH_V1
            if llm:
                problems += llmpath_problems(req.slo, req.options.histogram_buckets, req.options.stages)
            if not problems:
                errors, warnings = reachability_problems(req.slo, req.windows, llmpath=llm)
                problems += errors if llm else []
                req.warnings += (
                    warnings + ([] if llm else errors) + page_delay_warnings(req.slo, req.windows, llmpath=llm)
                )
            if problems:
                raise PluginError(problems)

        return process

    return factory


def _sli_rules(config: Any) -> Processor:
    disable_optimized = bool(_config(config, SLI_RULES).get("disableOptimized", False))

    def process(req: PluginRequest, result: SLORules) -> None:
        result.sli.rules = R.sli_rules(req, optimized=not disable_optimized)

    return process


def _metadata_rules(config: Any) -> Processor:
    def process(req: PluginRequest, result: SLORules) -> None:
        result.meta.rules = R.metadata_rules(req)

    return process


def _alert_rules(config: Any) -> Processor:
    def process(req: PluginRequest, result: SLORules) -> None:
        result.alerts.rules = R.alert_rules(req)

    return process


def _noop(config: Any) -> Processor:
    return lambda req, result: None


# --------------------------------------------------------------------------------------------
# Contrib plugins (Sloth v0.16's built-in ``sloth.dev/contrib/*``).
# --------------------------------------------------------------------------------------------


def _info_labels(config: Any) -> Processor:
    cfg = _config(config, "sloth.dev/contrib/info_labels/v1")
    labels = _string_map(cfg.get("labels"), "info_labels", "labels")
    metric = str(cfg.get("metricName") or R.SLO_INFO)
    if not labels:
        raise PluginError([("plugins", "plugin 'sloth.dev/contrib/info_labels/v1': at least one label is required")])

    def process(req: PluginRequest, result: SLORules) -> None:
        for rule in result.meta.rules:
            if rule.record == metric:
                rule.labels = {**rule.labels, **labels}
                break

    return process


def _interval(value: Any, key: str) -> str | None:
    if value in (None, "", 0):
        return None
    try:
        return format_duration(parse_duration(str(value)))
    except ValueError as exc:
        raise PluginError([("plugins", f"plugin 'sloth.dev/contrib/rule_intervals/v1': {key}: {exc}")]) from None


def _rule_intervals(config: Any) -> Processor:
    cfg = _config(config, "sloth.dev/contrib/rule_intervals/v1")
    interval = cfg.get("interval") or {}
    default = _interval(interval.get("default"), "interval.default")
    if default is None:
        raise PluginError(
            [("plugins", "plugin 'sloth.dev/contrib/rule_intervals/v1': at least default interval is required")]
        )
    sli = _interval(interval.get("sliError"), "interval.sliError") or default
    meta = _interval(interval.get("metadata"), "interval.metadata") or default
    alert = _interval(interval.get("alert"), "interval.alert") or default

    def process(req: PluginRequest, result: SLORules) -> None:
        result.sli.interval, result.meta.interval, result.alerts.interval = sli, meta, alert

    return process


def _denominator_corrected(config: Any) -> Processor:
    disable_optimized = bool(_config(config, "denominator_corrected_rules").get("disableOptimized", False))
    metric = "slo:numerator_correction:ratio"

    def process(req: PluginRequest, result: SLORules) -> None:
        slo, windows = req.slo, req.windows
        sli = slo.sli
        if sli.kind != "events" or not sli.error_query or not sli.total_query:
            raise PluginError([("sli", "denominator corrected SLI requires SLI event type")])
        ids = R.id_labels(slo)
        flt = prom_filter(ids)
        period = format_duration(windows.period_ms)
        new = []
        for w in [*windows.alert_windows_ms(), windows.period_ms]:
            win = format_duration(w)
            if w == windows.period_ms and disable_optimized:
                tpl = f"({sli.error_query})\n/\n({sli.total_query})\n"
            elif w == windows.period_ms:
                m = R.sli_metric(R.base_window(windows)) + flt
                win_var = "[{{.window}}]"
                tpl = f"sum_over_time({m}{win_var})\n/ ignoring ({R.WINDOW_LABEL})\ncount_over_time({m}{win_var})\n"
            else:
                tpl = f"(\n{metric}{{{{.window}}}}{flt}\n* on()\n{sli.error_query}\n)\n/\n({sli.total_query})\n"
            new.append(
                Rule(
                    expr=render_window(tpl, win),
                    record=R.sli_metric(w),
                    labels={**ids, R.WINDOW_LABEL: win, **slo.labels},
                )
            )
        result.sli.rules = new
        labels = {**ids, **slo.labels}
        for w in windows.alert_windows_ms():
            win = format_duration(w)
            expr = f"({render_window(sli.total_query, win)})/({render_window(sli.total_query, period)})"
            result.meta.rules.append(Rule(expr=expr, record=metric + win, labels=dict(labels)))

    return process


def _error_budget_exhausted(config: Any) -> Processor:
    cfg = _config(config, "error_budget_exhausted_alert")
    threshold = cfg.get("threshold", 0) or 0
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)):
        raise PluginError([("plugins", "plugin 'error_budget_exhausted_alert': threshold must be a number")])
    for_ = _interval(cfg.get("for"), "for") or "5m"
    name = str(cfg.get("alert_name") or "ErrorBudgetExhausted")
    annotations = _string_map(cfg.get("annotations"), "error_budget_exhausted_alert", "annotations")
    selector = _string_map(cfg.get("selector_labels"), "error_budget_exhausted_alert", "selector_labels")
    alert_labels = _string_map(cfg.get("alert_labels"), "error_budget_exhausted_alert", "alert_labels")

    def process(req: PluginRequest, result: SLORules) -> None:
        slo = req.slo
        labels = {**R.id_labels(slo), **slo.labels, **selector}
        expr = f"{R.BUDGET_REMAINING}{prom_filter(labels)} <= {go_float(float(threshold))}"
        result.alerts.rules.append(
            Rule(expr=expr, alert=name, for_=for_, labels=dict(alert_labels), annotations=dict(annotations))
        )

    return process


def _remove_labels(config: Any) -> Processor:
    cfg = _config(config, "remove_labels")
    preserve = {str(x) for x in cfg.get("preserveLabels") or []}
    skip = {R.SLO_INFO, *(str(x) for x in cfg.get("skipMetrics") or [])}

    def process(req: PluginRequest, result: SLORules) -> None:
        keep = {*R.id_labels(req.slo), *preserve}
        for rule in result.sli.rules:
            if rule.record not in skip:
                rule.labels = {k: v for k, v in rule.labels.items() if k in keep or k == R.WINDOW_LABEL}
        for rule in result.meta.rules:
            if rule.record not in skip:
                rule.labels = {k: v for k, v in rule.labels.items() if k in keep}

    return process


def _debug(config: Any) -> Processor:
    _config(config, "sloth.dev/core/debug/v1")
    return lambda req, result: None


BUILTIN_SLO_PLUGINS: Mapping[str, SLOPluginFactory] = {
    VALIDATE: _validate_factory(promql_error),
    SLI_RULES: _sli_rules,
    METADATA_RULES: _metadata_rules,
    ALERT_RULES: _alert_rules,
    "sloth.dev/core/noop/v1": _noop,
    "sloth.dev/core/debug/v1": _debug,
    "sloth.dev/contrib/info_labels/v1": _info_labels,
    "sloth.dev/contrib/rule_intervals/v1": _rule_intervals,
    "sloth.dev/contrib/denominator_corrected_rules/v1": _denominator_corrected,
    "sloth.dev/contrib/error_budget_exhausted_alert/v1": _error_budget_exhausted,
    "sloth.dev/contrib/remove_labels/v1": _remove_labels,
    "sloth.dev/contrib/validate_victoria_metrics/v1": _validate_factory(metricsql_error),
}


def build_chain(req: PluginRequest, custom: Mapping[str, SLOPluginFactory]) -> list[Processor]:
    """The processors for one SLO: pre-default chain plugins, the defaults (unless overridden), the rest."""
    registry = {**BUILTIN_SLO_PLUGINS, **custom}
    pre: list[Processor] = []
    post: list[Processor] = []
    for ref in sorted(req.slo.plugins, key=lambda p: p.priority):
        factory = registry.get(ref.id)
        if factory is None:
            known = ", ".join(sorted(registry))
            raise PluginError([("plugins", f"could not get SLO plugin {ref.id!r}: not found (available: {known})")])
        try:
            processor = factory(ref.config)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError([("plugins", f"could not create SLO plugin {ref.id!r}: {exc}")]) from exc
        (pre if ref.priority < 0 else post).append(processor)
    defaults = [] if req.slo.override_default_plugins else [registry[p](None) for p in DEFAULT_CHAIN]
    return [*pre, *defaults, *post]


def run_chain(req: PluginRequest, custom: Mapping[str, SLOPluginFactory]) -> SLORules:
    """Run the plugin chain for one SLO and return its rule groups (named as Sloth names them)."""
    slo_id = req.slo.id
    result = SLORules(
        sli=RuleGroup(f"sloth-slo-sli-recordings-{slo_id}"),
        meta=RuleGroup(f"sloth-slo-meta-recordings-{slo_id}"),
        alerts=RuleGroup(f"sloth-slo-alerts-{slo_id}"),
    )
    for processor in build_chain(req, custom):
        try:
            processor(req, result)
        except PluginError:
            raise
        except Exception as exc:
            raise PluginError([("plugins", f"slo processor failed: {exc}")]) from exc
    return result


def load_plugin_module(ref: str) -> tuple[dict[str, SLIPlugin], dict[str, SLOPluginFactory]]:
    """Import a Python plugin file (``path/to/plugins.py``) or module (``pkg.plugins``).

    The module defines ``SLI_PLUGINS`` (id → ``(meta, service_labels, options) -> raw query``) and/or
    ``SLO_PLUGINS`` (id → ``config -> processor``). Raises ``ValueError`` with the reason when it cannot be used.
    """
    path = Path(ref)
    try:
        if path.suffix == ".py":
            if not path.is_file():
                raise ValueError(f"plugin file {ref!r} not found")
            spec = importlib.util.spec_from_file_location(f"llmpath_slo_plugins_{abs(hash(path.resolve()))}", path)
            if spec is None or spec.loader is None:
                raise ValueError(f"cannot import {ref!r}")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(ref)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"cannot import plugins from {ref!r}: {type(exc).__name__}: {exc}") from exc
    sli = getattr(module, "SLI_PLUGINS", {})
    slo = getattr(module, "SLO_PLUGINS", {})
    if not isinstance(sli, Mapping) or not isinstance(slo, Mapping) or not (sli or slo):
        raise ValueError(f"{ref!r} must define SLI_PLUGINS and/or SLO_PLUGINS mappings of plugin id to callable")
    for name, fn in (*sli.items(), *slo.items()):
        if not callable(fn):
            raise ValueError(f"{ref!r}: plugin {name!r} is not callable")
    return dict(sli), dict(slo)
