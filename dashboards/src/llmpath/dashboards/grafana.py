"""The one post-processing step between grafanalib and Grafana.

grafanalib 0.7.1 (the last release) still emits some Grafana 5-era JSON. :func:`finalize` turns its output into
current classic dashboard JSON that validates against Grafana's schema (``schema/dashboard.jsonschema.json``):

1. ``schemaVersion`` 42 (grafanalib writes 12, which makes Grafana run every migration on load); legacy dashboard
   keys (``__inputs``, ``rows``, ``style``, ``hideControls``, ``sharedCrosshair``, ``gnetId``) are dropped;
   ``editable`` is false (the JSON is generated; edit the code) and the crosshair is shared.
2. Data sources become object references ``{"type": "prometheus", "uid": "${datasource}"}`` bound to the
   ``datasource`` template variable, on every panel and every target (Grafana 8.3+; strings are only migrated
   below schemaVersion 36). Rows and text panels carry none.
3. Panel ids must already be explicit and stable (``catalog.stable_panel_id``): alerts and runbooks deep-link
   with ``?viewPanel=<id>``, so positional numbering is refused. Targets get ``refId`` A, B, C, ….
4. Legacy panel keys (``editable``, ``error``, ``span``, ``height``, ``minSpan``, table ``columns``/``styles``/
   ``fontSize``, target ``intervalFactor``/``step``/``query``, grafanalib's ``maxDataPoints: 100`` cap) and every
   ``null`` are removed (except a threshold base step's ``value: null``); ``fieldConfig`` always has
   ``overrides``; query variables refresh on time-range change (``refresh: 2``) and lose the old tag fields.

Units and thresholds are set by the panel builders (:mod:`llmpath.dashboards.panels`) as plain values.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterator
from typing import Any

from grafanalib._gen import DashboardEncoder
from grafanalib.core import Dashboard

SCHEMA_VERSION = 42
DATASOURCE_REF: dict[str, str] = {"type": "prometheus", "uid": "${datasource}"}

_DASHBOARD_LEGACY = ("__inputs", "hideControls", "rows", "sharedCrosshair", "style", "gnetId", "id", "version")
_PANEL_LEGACY = (
    "editable", "error", "height", "span", "minSpan", "columns", "styles", "fontSize", "maxDataPoints",
    "cacheTimeout", "hideTimeOverride", "transparent",
)  # fmt: skip
_TABLE_LEGACY = ("color", "mappings")  # table-level copies; the real ones live in fieldConfig.defaults
_TARGET_LEGACY = ("intervalFactor", "step", "query", "metric", "target", "datasource", "interval")
_ROW_KEYS = ("type", "collapsed", "title", "gridPos", "id", "panels", "repeat")
_VARIABLE_LEGACY = ("useTags", "tagsQuery", "tagValuesQuery", "auto", "auto_min", "auto_count", "options")


def finalize(dashboard: Dashboard) -> dict[str, Any]:
    """grafanalib ``Dashboard`` → current Grafana classic dashboard JSON (see the module docstring)."""
    data = _without_nulls(json.loads(json.dumps(dashboard.to_json_data(), cls=DashboardEncoder)))
    for key in _DASHBOARD_LEGACY:
        data.pop(key, None)
    data["schemaVersion"] = SCHEMA_VERSION
    data["editable"] = False
    data["graphTooltip"] = 1
    data["timepicker"] = {k: v for k, v in data.get("timepicker", {}).items() if k in ("hidden", "refresh_intervals")}
    data["panels"] = [_panel(p) for p in data.get("panels", [])]
    data["templating"] = {"list": [_variable(v) for v in data.get("templating", {}).get("list", [])]}
    return data


def _without_nulls(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def _panel(panel: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(panel.get("id"), int):
        raise ValueError(f"panel {panel.get('title')!r} has no explicit id; use catalog.stable_panel_id")
    if panel["type"] == "row":
        row = {k: v for k, v in panel.items() if k in _ROW_KEYS}
        row["panels"] = [_panel(p) for p in row.get("panels", [])]
        return row
    for key in _PANEL_LEGACY:
        panel.pop(key, None)
    if panel["type"] == "table":
        for key in _TABLE_LEGACY:
            panel.pop(key, None)
    for key in ("links", "transformations", "repeat", "repeatDirection", "interval"):
        if not panel.get(key):
            panel.pop(key, None)
    if panel["type"] == "text":
        panel.pop("datasource", None)
        panel.pop("targets", None)
    else:
        panel["datasource"] = dict(DATASOURCE_REF)
        panel["targets"] = [_target(t, ref) for t, ref in zip(panel.get("targets", []), _ref_ids(), strict=False)]
    field_config = panel.setdefault("fieldConfig", {})
    field_config.setdefault("overrides", [])
    for step in field_config.setdefault("defaults", {}).get("thresholds", {}).get("steps", []):
        step.setdefault("value", None)  # the base step's null was stripped with the other nulls
    return panel


def _ref_ids() -> Iterator[str]:
    for first in ("", *string.ascii_uppercase):
        for second in string.ascii_uppercase:
            yield first + second


def _target(target: dict[str, Any], ref_id: str) -> dict[str, Any]:
    for key in _TARGET_LEGACY:
        target.pop(key, None)
    if not target.get("legendFormat"):
        target.pop("legendFormat", None)
    if not target.get("hide"):
        target.pop("hide", None)
    return {**target, "datasource": dict(DATASOURCE_REF), "refId": ref_id}


def _variable(var: dict[str, Any]) -> dict[str, Any]:
    for key in _VARIABLE_LEGACY:
        var.pop(key, None)
    current = var.get("current", {})
    if current.get("text") is None or current.get("value") is None:
        var.pop("current", None)
    else:
        current.pop("tags", None)
    if var["type"] == "query":
        var["datasource"] = dict(DATASOURCE_REF)
        var["refresh"] = 2
    elif "datasource" in var and not isinstance(var["datasource"], dict):
        var.pop("datasource")
    return var
