"""Input schemas (pydantic) for the four spec formats, plus unknown-key detection with paths.

Sloth's formats are read leniently like Sloth (unknown keys are warnings; Go-style scalar-to-string coercion);
``llmpath/v1`` is strict (unknown keys are errors).
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from llmpath.slo.yamlin import go_string

# --------------------------------------------------------------------------------------------
# Scalar coercions (Go decoding semantics, clear messages).
# --------------------------------------------------------------------------------------------


def _go_str(value: object) -> str:
    text = go_string(value)
    if text is None:
        raise ValueError(f"expected a string, got a {'mapping' if isinstance(value, dict) else 'list'}")
    return text


def _strict_str(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ValueError(f"expected a string, got {type(value).__name__} {value!r}")
    return value


def _labels(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"expected a mapping of names to values, got {type(value).__name__}")
    out = {}
    for k, v in value.items():
        text = go_string(v)
        if text is None:
            raise ValueError(f"value of {k!r} must be a string, got a {type(v).__name__}")
        out[str(k)] = text
    return out


def _number(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    return float(value)


def _flag(value: object) -> bool:
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _int(value: object) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _str_list(value: object) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError("expected a list of strings")
    return list(value)


def _empty_if_none(value: object) -> object:
    return {} if value is None else value


def _list_if_none(value: object) -> object:
    return value or []


GoStr = Annotated[str, BeforeValidator(_go_str)]
StrictStr = Annotated[str, BeforeValidator(_strict_str)]
Labels = Annotated[dict[str, str], BeforeValidator(_labels)]
Number = Annotated[float, BeforeValidator(_number)]
Flag = Annotated[bool, BeforeValidator(_flag)]
Int = Annotated[int, BeforeValidator(_int)]
StrList = Annotated[list[str], BeforeValidator(_str_list)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=False, frozen=True)


# --------------------------------------------------------------------------------------------
# Sloth prometheus/v1 (snake_case; plugin chains keep Sloth's camelCase ``overridePrevious``).
# --------------------------------------------------------------------------------------------


class PluginItem(_Model):
    id: GoStr = ""
    config: Any = None
    priority: Int = 0


class PluginChain(_Model):
    override_previous: Flag = Field(False, alias="overridePrevious")
    chain: Annotated[list[PluginItem], BeforeValidator(_list_if_none)] = Field(default_factory=list)


Chain = Annotated[PluginChain, BeforeValidator(_empty_if_none)]


class PV1Alert(_Model):
    disable: Flag = False
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)


AlertOpt = Annotated[PV1Alert, BeforeValidator(_empty_if_none)]


class PV1Alerting(_Model):
    name: GoStr = ""
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
    page_alert: AlertOpt = Field(default_factory=PV1Alert)
    ticket_alert: AlertOpt = Field(default_factory=PV1Alert)


class PV1Events(_Model):
    error_query: GoStr = ""
    total_query: GoStr = ""


class PV1Raw(_Model):
    error_ratio_query: GoStr = ""


class SLIPluginRef(_Model):
    id: GoStr = ""
    options: Labels = Field(default_factory=dict)


class PV1SLI(_Model):
    events: PV1Events | None = None
    raw: PV1Raw | None = None
    plugin: SLIPluginRef | None = None


class PV1SLO(_Model):
    name: GoStr = ""
    description: GoStr = ""
    objective: Number = 0.0
    labels: Labels = Field(default_factory=dict)
    plugins: Chain = Field(default_factory=PluginChain)
    sli: Annotated[PV1SLI, BeforeValidator(_empty_if_none)] = Field(default_factory=PV1SLI)
    alerting: Annotated[PV1Alerting, BeforeValidator(_empty_if_none)] = Field(default_factory=PV1Alerting)


class PV1Spec(_Model):
    version: GoStr = ""
    service: GoStr = ""
    labels: Labels = Field(default_factory=dict)
    slo_plugins: Chain = Field(default_factory=PluginChain)
    slos: Annotated[list[PV1SLO], BeforeValidator(_list_if_none)] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Sloth Kubernetes CR (camelCase).
# --------------------------------------------------------------------------------------------


class K8sAlerting(_Model):
    name: GoStr = ""
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
    page_alert: AlertOpt = Field(default_factory=PV1Alert, alias="pageAlert")
    ticket_alert: AlertOpt = Field(default_factory=PV1Alert, alias="ticketAlert")


class K8sEvents(_Model):
    error_query: GoStr = Field("", alias="errorQuery")
    total_query: GoStr = Field("", alias="totalQuery")


class K8sRaw(_Model):
    error_ratio_query: GoStr = Field("", alias="errorRatioQuery")


class K8sSLI(_Model):
    events: K8sEvents | None = None
    raw: K8sRaw | None = None
    plugin: SLIPluginRef | None = None


class K8sSLO(_Model):
    name: GoStr = ""
    description: GoStr = ""
    objective: Number = 0.0
    labels: Labels = Field(default_factory=dict)
    plugins: Chain = Field(default_factory=PluginChain)
    sli: Annotated[K8sSLI, BeforeValidator(_empty_if_none)] = Field(default_factory=K8sSLI)
    alerting: Annotated[K8sAlerting, BeforeValidator(_empty_if_none)] = Field(default_factory=K8sAlerting)


class K8sSpec(_Model):
    service: GoStr = ""
    labels: Labels = Field(default_factory=dict)
    slo_plugins: Chain = Field(default_factory=PluginChain, alias="sloPlugins")
    slos: Annotated[list[K8sSLO], BeforeValidator(_list_if_none)] = Field(default_factory=list)


#: Standard Kubernetes ObjectMeta fields that are accepted silently.
K8S_META_FIELDS = frozenset(
    (
        *("uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp"),
        *("deletionGracePeriodSeconds", "managedFields", "ownerReferences", "finalizers", "generateName", "selfLink"),
    )
)


class K8sMeta(_Model):
    name: GoStr = ""
    namespace: GoStr = ""
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)


class K8sDoc(_Model):
    api_version: GoStr = Field("", alias="apiVersion")
    kind: GoStr = ""
    metadata: Annotated[K8sMeta, BeforeValidator(_empty_if_none)] = Field(default_factory=K8sMeta)
    spec: Annotated[K8sSpec, BeforeValidator(_empty_if_none)] = Field(default_factory=K8sSpec)


# --------------------------------------------------------------------------------------------
# OpenSLO v1alpha (the subset Sloth reads; other fields are accepted as documented by OpenSLO).
# --------------------------------------------------------------------------------------------


class OSQuery(_Model):
    source: GoStr = ""
    query_type: GoStr = Field("", alias="queryType")
    query: GoStr = ""


class OSRatio(_Model):
    good: Annotated[OSQuery, BeforeValidator(_empty_if_none)] = Field(default_factory=OSQuery)
    total: Annotated[OSQuery, BeforeValidator(_empty_if_none)] = Field(default_factory=OSQuery)
    incremental: Any = None


class OSObjective(_Model):
    display_name: GoStr = Field("", alias="displayName")
    op: Any = None
    value: Any = None
    target: Number | None = None
    time_slice_target: Any = Field(None, alias="timeSliceTarget")
    ratio_metrics: OSRatio | None = Field(None, alias="ratioMetrics")


class OSTimeWindow(_Model):
    unit: GoStr = ""
    count: Int = 0
    is_rolling: Any = Field(None, alias="isRolling")
    calendar: Any = None


class OSSpec(_Model):
    description: GoStr = ""
    service: GoStr = ""
    indicator: Any = None
    budgeting_method: GoStr = Field("", alias="budgetingMethod")
    objectives: Annotated[list[OSObjective], BeforeValidator(_list_if_none)] = Field(default_factory=list)
    time_windows: Annotated[list[OSTimeWindow], BeforeValidator(_list_if_none)] = Field(
        default_factory=list, alias="timeWindows"
    )


class OSMeta(_Model):
    name: GoStr = ""
    display_name: GoStr = Field("", alias="displayName")


class OSDoc(_Model):
    api_version: GoStr = Field("", alias="apiVersion")
    kind: GoStr = ""
    metadata: Annotated[OSMeta, BeforeValidator(_empty_if_none)] = Field(default_factory=OSMeta)
    spec: Annotated[OSSpec, BeforeValidator(_empty_if_none)] = Field(default_factory=OSSpec)


# --------------------------------------------------------------------------------------------
# llmpath/v1: prometheus/v1's keys plus the LLM extensions; strict.
# --------------------------------------------------------------------------------------------

Severity = Literal["page", "ticket"]


class LAlert(_Model):
    disable: Flag = False
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
    for_: StrictStr | None = Field(None, alias="for")


class LAbsentAlert(_Model):
    disable: Flag = False
    name: StrictStr = ""
    severity: Severity = "ticket"
    for_: StrictStr | None = Field(None, alias="for")
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)


class LThresholdAlert(_Model):
    disable: Flag = False
    name: StrictStr = ""
    severity: Severity = "ticket"
    short_window: StrictStr | None = None
    long_window: StrictStr | None = None
    factor: Number = 1.0
    for_: StrictStr | None = Field(None, alias="for")
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)


class LAlerting(_Model):
    name: StrictStr = ""
    labels: Labels = Field(default_factory=dict)
    annotations: Labels = Field(default_factory=dict)
    for_: StrictStr | None = Field(None, alias="for")
    min_events: Int | None = Field(None, ge=1)
    page_alert: Annotated[LAlert, BeforeValidator(_empty_if_none)] = Field(default_factory=LAlert)
    ticket_alert: Annotated[LAlert, BeforeValidator(_empty_if_none)] = Field(default_factory=LAlert)
    absent_alert: LAbsentAlert | None = None
    threshold_alert: LThresholdAlert | None = None


class LLatency(_Model):
    histogram: StrictStr
    threshold: Number
    selector: Labels = Field(default_factory=dict)
    filter: StrictStr | None = None


class LRatio(_Model):
    good: StrictStr | None = None
    bad: StrictStr | None = None
    total: StrictStr


class LEvents(_Model):
    error_query: StrictStr = ""
    total_query: StrictStr = ""


class LRaw(_Model):
    error_ratio_query: StrictStr = ""


class LSLI(_Model):
    events: LEvents | None = None
    raw: LRaw | None = None
    latency: LLatency | None = None
    ratio: LRatio | None = None


class LSLO(_Model):
    name: StrictStr = ""
    description: StrictStr = ""
    objective: Number
    stage: StrictStr | None = None
    owner: StrictStr | None = None
    labels: Labels = Field(default_factory=dict)
    group_by: StrList = Field(default_factory=list)
    period_rule: Literal["mean_of_ratios", "ratio_of_counts"] = "mean_of_ratios"
    sli: LSLI
    alerting: Annotated[LAlerting, BeforeValidator(_empty_if_none)] = Field(default_factory=LAlerting)


class LSpec(_Model):
    version: StrictStr
    service: StrictStr = ""
    description: StrictStr = ""
    labels: Labels = Field(default_factory=dict)
    period: StrictStr | None = None
    slos: Annotated[list[LSLO], BeforeValidator(_list_if_none)] = Field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Unknown keys.
# --------------------------------------------------------------------------------------------


def _model_of(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """('model'|'list'|'other', model class) for a field annotation (unwrapping Optional/Annotated)."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _model_of(typing.get_args(annotation)[0])
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            kind, model = _model_of(arg)
            if model is not None:
                return kind, model
        return "other", None
    if origin is list:
        kind, model = _model_of(typing.get_args(annotation)[0])
        return ("list", model) if model is not None else ("other", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    return "other", None


def unknown_keys(
    data: object, model: type[BaseModel], path: tuple[object, ...] = (), ignore: frozenset[str] = frozenset()
) -> list[tuple[tuple[object, ...], str]]:
    """Paths of keys in ``data`` that ``model`` does not define, with a "did you mean" hint."""
    if not isinstance(data, dict):
        return []
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    out: list[tuple[tuple[object, ...], str]] = []
    for key, value in data.items():
        if key not in fields:
            if key in ignore:
                continue
            close = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(sorted(fields))}"
            out.append(((*path, key), hint))
            continue
        kind, sub = _model_of(fields[key].annotation)
        if sub is None:
            continue
        sub_ignore = K8S_META_FIELDS if sub is K8sMeta else frozenset()
        if kind == "model":
            out += unknown_keys(value, sub, (*path, key), sub_ignore)
        elif kind == "list" and isinstance(value, list):
            for i, item in enumerate(value):
                out += unknown_keys(item, sub, (*path, key, i))
    return out
