"""The stage catalog: the single source of truth for stage names, order, owners and metric names.

Everything else in llmpath (SLO specs, dashboards, runbooks, the gateway) reads from here.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace

STAGE_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*$")

#: The pseudo-stage for time before the first token that no stage covers; it makes the stages tile TTFT.
UNATTRIBUTED = "unattributed"


@dataclass(frozen=True, slots=True)
class Stage:
    """One stage of the LLM API request path."""

    name: str
    meaning: str
    owner: str
    #: True for stages that happen before the first token (they tile TTFT); False for decode.
    before_first_token: bool = True


DEFAULT_STAGES: tuple[Stage, ...] = (
    Stage("auth", "Ingress and authentication: the API key is checked and mapped to a tenant.", "gateway"),
    Stage("validate", "Request validation and shaping: schema, limits and normalisation of the body.", "api"),
    Stage("route", "Routing: choosing the backend (prefix affinity, load, health).", "platform"),
    Stage("assemble", "Retrieval and prompt assembly: templates, system prompt and retrieved context.", "application"),
    Stage(
        "cache_lookup", "Prompt-cache lookup: finding the cached prefix the backend can reuse (KV reuse).", "platform"
    ),
    Stage(
        "schedule", "Scheduling: admission queue in the gateway plus the backend's queue before a GPU slot.", "serving"
    ),
    Stage("prefill", "Prefill: the forward pass over the uncached prompt, up to the first token.", "serving"),
    Stage("decode", "Decode: generating output tokens after the first one.", "serving", before_first_token=False),
)


class PlacementError(ValueError):
    """A custom stage placed where it cannot run: a pre-first-token stage after one that runs after the first
    token, or the other way round."""


class StageCatalog:
    """An ordered, validated set of stages with owners; the defaults are :data:`DEFAULT_STAGES`.

    Owners are overridable and custom stages may be added (names must match ``[a-z][a-z0-9_]*``), at a given place
    in the pipeline and as members of stage groups (see :meth:`with_stage`).
    """

    __slots__ = ("_by_name", "_group_members", "_group_owners", "_stages")

    def __init__(
        self,
        stages: Iterable[Stage] = DEFAULT_STAGES,
        group_owners: Mapping[str, str] | None = None,
        group_members: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        ordered = tuple(stages)
        by_name: dict[str, Stage] = {}
        for st in ordered:
            validate_stage_name(st.name)
            if st.name in by_name:
                raise ValueError(f"duplicate stage name {st.name!r}")
            by_name[st.name] = st
        self._stages = ordered
        self._by_name = by_name
        self._group_owners = dict(group_owners or {})
        #: Custom stages added to the built-in stage groups.
        self._group_members = {g: tuple(members) for g, members in (group_members or {}).items()}

    def __iter__(self) -> Iterator[Stage]:
        return iter(self._stages)

    def __len__(self) -> int:
        return len(self._stages)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __getitem__(self, name: str) -> Stage:
        try:
            return self._by_name[name]
        except KeyError:
            known = ", ".join(self.names)
            raise KeyError(f"unknown stage {name!r}; known stages: {known}") from None

    def __repr__(self) -> str:
        return f"StageCatalog({', '.join(f'{s.name}→{s.owner}' for s in self._stages)})"

    @property
    def names(self) -> tuple[str, ...]:
        """Stage names in pipeline order."""
        return tuple(s.name for s in self._stages)

    @property
    def names_with_unattributed(self) -> tuple[str, ...]:
        """Stage names in pipeline order with ``unattributed`` after the pre-first-token stages."""
        pre = [s.name for s in self._stages if s.before_first_token]
        post = [s.name for s in self._stages if not s.before_first_token]
        return (*pre, UNATTRIBUTED, *post)

    def owner(self, name: str) -> str:
        """The owning team of a stage (``unattributed`` is owned by the gateway team)."""
        if name == UNATTRIBUTED:
            return self._by_name["auth"].owner if "auth" in self._by_name else "gateway"
        return self[name].owner

    @property
    def groups(self) -> tuple[StageGroup, ...]:
        """The stage groups (:data:`STAGE_GROUPS`) with this catalog's owners and custom members (in stage order)."""
        out = []
        for g in STAGE_GROUPS:
            members = {*g.stages, *self._group_members.get(g.name, ())}
            stages = tuple(n for n in self.names if n in members) if g.name in self._group_members else g.stages
            out.append(replace(g, owner=self._group_owners.get(g.name, g.owner), stages=stages))
        return tuple(out)

    def group(self, name: str | None) -> StageGroup | None:
        """The stage group ``name`` with this catalog's owner, or ``None``."""
        return next((g for g in self.groups if g.name == name), None)

    def with_owners(self, owners: Mapping[str, str]) -> StageCatalog:
        """A copy with some owners overridden, of stages or stage groups, e.g. ``{"route": "traffic-team"}``."""
        for name in owners:
            if name not in STAGE_GROUPS_BY_NAME:
                self[name]  # raises a clear KeyError for unknown stages
        groups = {**self._group_owners, **{n: o for n, o in owners.items() if n in STAGE_GROUPS_BY_NAME}}
        stages = (replace(s, owner=owners.get(s.name, s.owner)) for s in self._stages)
        return StageCatalog(stages, groups, self._group_members)

    def with_stage(self, stage: Stage, *, after: str | None = None, groups: Iterable[str] = ()) -> StageCatalog:
        """A copy with a custom stage added.

        It goes right after the stage ``after`` when given (e.g. ``after="validate"`` for a moderation step the
        gateway runs before routing); otherwise a pre-first-token stage goes before the first post-first-token one
        (``decode``) and a post-first-token stage last. ``groups`` names stage groups the stage belongs to, e.g.
        ``["gateway_overhead"]`` for a step the gateway runs before calling the backend: its time then counts in
        ``llmpath_stage_group_duration_seconds{group="gateway_overhead"}``.
        """
        validate_stage_name(stage.name)
        if stage.name in self._by_name or stage.name == UNATTRIBUTED:
            raise ValueError(f"stage {stage.name!r} already exists")
        if stage.name in STAGE_GROUPS_BY_NAME:
            raise ValueError(f"{stage.name!r} is the name of a stage group")
        stages = list(self._stages)
        if after is not None:
            previous = self[after]  # a clear KeyError for an unknown stage
            idx = stages.index(previous) + 1
            if stage.before_first_token and not previous.before_first_token:
                raise PlacementError(f"stage {stage.name!r} runs before the first token: it cannot follow {after!r}")
            if not stage.before_first_token and idx < len(stages) and stages[idx].before_first_token:
                raise PlacementError(
                    f"stage {stage.name!r} runs after the first token: it cannot precede {stages[idx].name!r}"
                )
        elif stage.before_first_token:
            idx = next((i for i, s in enumerate(stages) if not s.before_first_token), len(stages))
        else:
            idx = len(stages)
        stages.insert(idx, stage)
        members = dict(self._group_members)
        for group in groups:
            if group not in STAGE_GROUPS_BY_NAME:
                raise ValueError(f"unknown stage group {group!r}; known: {', '.join(STAGE_GROUPS_BY_NAME)}")
            members[group] = (*members.get(group, ()), stage.name)
            run = {*STAGE_GROUPS_BY_NAME[group].stages, *members[group]}
            at = [i for i, s in enumerate(stages) if s.name in run]
            if at[-1] - at[0] + 1 != len(at):  # a group is a run of consecutive stages
                raise PlacementError(
                    f"stage {stage.name!r} is not next to the other stages of {group!r} "
                    f"({', '.join(stages[i].name for i in at)}): place it among them with after="
                )
        return StageCatalog(stages, self._group_owners, members)


def validate_stage_name(name: str) -> str:
    """Return ``name`` if it is a valid stage name, else raise ``ValueError``."""
    if not isinstance(name, str) or not STAGE_NAME_RE.match(name):
        raise ValueError(f"invalid stage name {name!r}: must match [a-z][a-z0-9_]*")
    if name == UNATTRIBUTED:
        raise ValueError(f"{UNATTRIBUTED!r} is reserved for time no stage covers")
    return name


#: The default catalog; ``STAGES.names`` is the canonical pipeline order.
STAGES = StageCatalog()


@dataclass(frozen=True, slots=True)
class StageGroup:
    """A named run of consecutive stages measured as one duration per request (e.g. the gateway's overhead)."""

    name: str
    stages: tuple[str, ...]
    owner: str
    meaning: str


STAGE_GROUPS: tuple[StageGroup, ...] = (
    StageGroup(
        "gateway_overhead",
        ("auth", "validate", "route", "assemble", "cache_lookup"),
        "gateway",
        "Time the gateway adds before the backend is called: auth, validation, routing, assembly and cache lookup.",
    ),
)
STAGE_GROUPS_BY_NAME: Mapping[str, StageGroup] = {g.name: g for g in STAGE_GROUPS}

# --------------------------------------------------------------------------------------------
# Span and attribute names. Stage spans live in the ``llmpath.`` namespace; ``gen_ai.*`` is used
# only on the model-call span and the GenAI metrics (semantic conventions v1.41).
# --------------------------------------------------------------------------------------------

#: Stage span name: ``llmpath.<stage>`` (e.g. ``llmpath.route``), a child of the request's SERVER span.
STAGE_SPAN_NAME = "llmpath.{stage}"
ATTR_STAGE = "llmpath.stage.name"
ATTR_STAGE_OWNER = "llmpath.stage.owner"
ATTR_ROUTE = "llmpath.route.name"
ATTR_MODEL = "llmpath.model"
ATTR_TENANT = "llmpath.tenant"
ATTR_REQUEST_ID = "llmpath.request_id"
#: Where a stage's timing was measured: ``gateway`` (a ``stage()`` block) or ``backend`` (``record_stage``).
ATTR_TIMING_SOURCE = "llmpath.timing.source"
TIMING_SOURCES: tuple[str, ...] = ("gateway", "backend")
#: Request header carrying the request id (honoured when valid, assigned otherwise, always returned).
REQUEST_ID_HEADER = "x-request-id"
#: The value the cardinality guard puts in place of label values over the cap.
OVERFLOW_LABEL_VALUE = "__other__"
#: The value of a label nobody set (model, tenant): always admitted, it takes no slot under the guard's cap.
UNKNOWN_LABEL_VALUE = "unknown"
#: The route label of a request no route matched: always admitted too.
UNMATCHED_ROUTE = "__unmatched__"

#: GenAI semantic-convention metrics (v1.41 names) emitted through the OTel metrics API.
GENAI_SERVER_REQUEST_DURATION = "gen_ai.server.request.duration"
GENAI_SERVER_TIME_TO_FIRST_TOKEN = "gen_ai.server.time_to_first_token"
GENAI_SERVER_TIME_PER_OUTPUT_TOKEN = "gen_ai.server.time_per_output_token"
GENAI_CLIENT_OPERATION_DURATION = "gen_ai.client.operation.duration"
GENAI_CLIENT_TIME_TO_FIRST_CHUNK = "gen_ai.client.operation.time_to_first_chunk"
GENAI_CLIENT_TIME_PER_OUTPUT_CHUNK = "gen_ai.client.operation.time_per_output_chunk"
GENAI_CLIENT_TOKEN_USAGE = "gen_ai.client.token.usage"


# --------------------------------------------------------------------------------------------
# Metric names: a public contract shared by the instrumentation, the gateway, SLO specs,
# dashboards and runbooks. Keep them exactly.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """A Prometheus metric family exposed by llmpath (name without the ``_total``/``_bucket`` suffixes of samples)."""

    name: str
    kind: str  # "counter" | "histogram" | "gauge"
    labels: tuple[str, ...]
    help: str
    #: The stage this metric primarily describes, if any (used by runbooks and dashboards).
    stage: str | None = None
    #: Free-form hints, e.g. ``multiprocess_mode`` for gauges (how prometheus-client merges worker values).
    extra: Mapping[str, str] = field(default_factory=dict)

    @property
    def sample_names(self) -> tuple[str, ...]:
        """Series names as they appear in Prometheus (counters keep ``_total``; histograms get the suffixes)."""
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_count", f"{self.name}_sum")
        return (self.name,)


REQUESTS_TOTAL = "llmpath_requests_total"
REQUEST_DURATION = "llmpath_request_duration_seconds"
STAGE_DURATION = "llmpath_stage_duration_seconds"
TIME_TO_FIRST_TOKEN = "llmpath_time_to_first_token_seconds"
TIME_PER_OUTPUT_TOKEN = "llmpath_time_per_output_token_seconds"
TOKENS_TOTAL = "llmpath_tokens_total"
STAGE_GROUP_DURATION = "llmpath_stage_group_duration_seconds"
LABEL_OVERFLOW_TOTAL = "llmpath_label_overflow_total"
USAGE_RECORD_FAILURES_TOTAL = "llmpath_usage_record_failures_total"

# Gateway (reference gateway) metrics.
PROMPT_CACHE_LOOKUPS_TOTAL = "llmpath_prompt_cache_lookups_total"
PROMPT_CACHE_PREDICTED_TOKENS_TOTAL = "llmpath_prompt_cache_predicted_tokens_total"
ROUTE_DECISIONS_TOTAL = "llmpath_route_decisions_total"
BACKEND_UP = "llmpath_backend_up"
BACKEND_INFLIGHT = "llmpath_backend_inflight_requests"
PROMPT_CACHE_INDEX_BLOCKS = "llmpath_prompt_cache_index_blocks"
ADMISSION_INFLIGHT = "llmpath_admission_inflight_requests"
ADMISSION_QUEUE_DEPTH = "llmpath_admission_queue_depth"
ADMISSION_REJECTIONS_TOTAL = "llmpath_admission_rejections_total"
CONFIG_RELOADS_TOTAL = "llmpath_gateway_config_reloads_total"
CONFIG_LAST_RELOAD_SUCCESSFUL = "llmpath_gateway_config_last_reload_successful"

#: Latency buckets (seconds) for stage, TTFT and request histograms: sub-millisecond stages to 2-minute
#: requests, including every threshold the default SLOs use (0.005 … 10 s).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5,
    0.75, 1.0, 1.5, 2.0, 2.5, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0,
)  # fmt: skip
#: Buckets for time per output token (decode), seconds.
TPOT_BUCKETS: tuple[float, ...] = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip

#: Token types of ``llmpath_tokens_total{type}``. ``cached`` is a subset of ``input``.
TOKEN_TYPES: tuple[str, ...] = ("input", "cached", "output")

METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(REQUESTS_TOTAL, "counter", ("route", "model", "code"), "Finished requests by HTTP status code."),
    MetricSpec(REQUEST_DURATION, "histogram", ("route", "model"), "Whole request duration, to the last byte."),
    MetricSpec(
        STAGE_DURATION,
        "histogram",
        ("stage", "route"),
        'Time spent in each stage of the request path (stage="unattributed" is pre-first-token time no stage covers).',
    ),
    MetricSpec(
        STAGE_GROUP_DURATION,
        "histogram",
        ("group", "route"),
        'Per-request total of a stage group (see STAGE_GROUPS), e.g. group="gateway_overhead".',
    ),
    MetricSpec(TIME_TO_FIRST_TOKEN, "histogram", ("route", "model"), "Time to first token.", stage="prefill"),
    MetricSpec(
        TIME_PER_OUTPUT_TOKEN,
        "histogram",
        ("route", "model"),
        "Mean time per output token after the first.",
        stage="decode",
    ),
    MetricSpec(
        TOKENS_TOTAL,
        "counter",
        ("route", "model", "tenant", "type"),
        "Tokens by type: input (all prompt tokens), cached (subset of input served from cache), output.",
    ),
    MetricSpec(
        LABEL_OVERFLOW_TOTAL,
        "counter",
        ("metric", "label"),
        "Label values replaced by __other__ by the cardinality guard.",
    ),
    MetricSpec(
        USAGE_RECORD_FAILURES_TOTAL,
        "counter",
        ("sink",),
        "Usage records a ledger sink failed to write (disk full, permissions, a locked database): lost to that sink.",
    ),
    MetricSpec(
        PROMPT_CACHE_LOOKUPS_TOTAL,
        "counter",
        ("route", "result"),
        "Prompt-cache lookups by result (hit, partial, miss, bypass).",
        stage="cache_lookup",
    ),
    MetricSpec(
        PROMPT_CACHE_PREDICTED_TOKENS_TOTAL,
        "counter",
        ("route",),
        "Prompt tokens the gateway predicted the backend would serve from cache.",
        stage="cache_lookup",
    ),
    MetricSpec(
        ROUTE_DECISIONS_TOTAL,
        "counter",
        ("backend", "reason"),
        "Routing decisions by chosen backend and reason.",
        stage="route",
    ),
    MetricSpec(
        BACKEND_UP,
        "gauge",
        ("backend",),
        "1 when the backend is healthy and not ejected.",
        stage="route",
        extra={"multiprocess_mode": "livemin"},
    ),
    MetricSpec(
        BACKEND_INFLIGHT,
        "gauge",
        ("backend",),
        "Requests in flight per backend.",
        stage="route",
        extra={"multiprocess_mode": "livesum"},
    ),
    MetricSpec(
        PROMPT_CACHE_INDEX_BLOCKS,
        "gauge",
        ("backend",),
        "Prompt blocks the gateway's prefix index holds for each backend (sent within the TTL and LRU bound); "
        "a prompt with no cached prefix goes to the backend holding the fewest per weight.",
        stage="route",
        extra={"multiprocess_mode": "livesum"},
    ),
    MetricSpec(
        ADMISSION_INFLIGHT,
        "gauge",
        (),
        "Requests admitted and running in the gateway.",
        stage="schedule",
        extra={"multiprocess_mode": "livesum"},
    ),
    MetricSpec(
        ADMISSION_QUEUE_DEPTH,
        "gauge",
        (),
        "Requests waiting for admission.",
        stage="schedule",
        extra={"multiprocess_mode": "livesum"},
    ),
    MetricSpec(
        ADMISSION_REJECTIONS_TOTAL,
        "counter",
        ("reason",),
        "Requests rejected by admission (queue_full, queue_timeout, rate_limited, token_rate_limited).",
        stage="schedule",
    ),
    MetricSpec(
        CONFIG_RELOADS_TOTAL,
        "counter",
        ("result",),
        "Configuration reloads (SIGHUP or POST /admin/reload) by result: success or failure.",
    ),
    MetricSpec(
        CONFIG_LAST_RELOAD_SUCCESSFUL,
        "gauge",
        (),
        "1 unless the last configuration reload failed (the gateway then runs the configuration before it).",
        extra={"multiprocess_mode": "livemin"},
    ),
)

METRICS_BY_NAME: Mapping[str, MetricSpec] = {m.name: m for m in METRICS}


def known_series_names() -> frozenset[str]:
    """Every Prometheus series name llmpath's own metrics produce (for dashboard and runbook checks)."""
    return frozenset(n for m in METRICS for n in m.sample_names)


# --------------------------------------------------------------------------------------------
# Backend (SGLang) metrics: what the embedded engine exports and the dashboards/runbooks read.
# Names and labels are SGLang 0.5.x's (``sglang:`` on a worker's own /metrics; ``sglang_`` through
# sglang-router's /engine_metrics). Queries should match both spellings.
# --------------------------------------------------------------------------------------------

SGLANG_TOKENIZER_LABELS: tuple[str, ...] = ("model_name", "engine_type")
SGLANG_SCHEDULER_LABELS: tuple[str, ...] = ("model_name", "engine_type", "tp_rank", "pp_rank", "moe_ep_rank")

SGLANG_METRICS: tuple[MetricSpec, ...] = (
    MetricSpec(
        "sglang:time_to_first_token_seconds",
        "histogram",
        (*SGLANG_TOKENIZER_LABELS, "is_streaming"),
        "Time to first token, measured by the server.",
        stage="prefill",
    ),
    MetricSpec(
        "sglang:inter_token_latency_seconds",
        "histogram",
        SGLANG_TOKENIZER_LABELS,
        "Inter-token latency (batch interval divided by new tokens).",
        stage="decode",
    ),
    MetricSpec(
        "sglang:e2e_request_latency_seconds",
        "histogram",
        (*SGLANG_TOKENIZER_LABELS, "is_streaming"),
        "End-to-end request latency at the server.",
    ),
    MetricSpec(
        "sglang:queue_time_seconds",
        "histogram",
        SGLANG_SCHEDULER_LABELS,
        "Waiting-queue time before the first forward.",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:per_stage_req_latency_seconds",
        "histogram",
        (*SGLANG_SCHEDULER_LABELS, "stage"),
        "Per-stage request latency (stage=prefill_forward for prefill).",
        stage="prefill",
    ),
    MetricSpec(
        "sglang:prompt_tokens_total",
        "counter",
        (*SGLANG_TOKENIZER_LABELS, "is_streaming"),
        "Prompt tokens of finished requests.",
    ),
    MetricSpec(
        "sglang:generation_tokens_total",
        "counter",
        (*SGLANG_TOKENIZER_LABELS, "is_streaming"),
        "Generated tokens of finished requests.",
        stage="decode",
    ),
    MetricSpec(
        "sglang:cached_tokens_total",
        "counter",
        (*SGLANG_TOKENIZER_LABELS, "cache_source"),
        "Prompt tokens served from the prefix cache.",
        stage="cache_lookup",
    ),
    MetricSpec(
        "sglang:num_requests_total",
        "counter",
        (*SGLANG_TOKENIZER_LABELS, "is_streaming"),
        "Finished requests.",
    ),
    MetricSpec(
        "sglang:num_aborted_requests_total",
        "counter",
        SGLANG_TOKENIZER_LABELS,
        "Aborted requests (client disconnects, errors).",
    ),
    MetricSpec(
        "sglang:num_running_reqs",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "Requests in the running batch.",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:num_queue_reqs",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "Requests in the waiting queue.",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:token_usage",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "KV pool occupancy (0-1).",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:num_used_tokens",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "KV token slots in use.",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:max_total_num_tokens",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "KV token slots in the pool.",
        stage="schedule",
    ),
    MetricSpec(
        "sglang:cache_hit_rate",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "Prefix-cache hit rate since the previous stats report (not rate()-able; prefer the counters).",
        stage="cache_lookup",
    ),
    MetricSpec(
        "sglang:gen_throughput",
        "gauge",
        SGLANG_SCHEDULER_LABELS,
        "Generation throughput (tokens/s).",
        stage="decode",
    ),
    MetricSpec(
        "sglang:evicted_tokens_total",
        "counter",
        ("cache_type", "tp_rank", "pp_rank", "dp_rank"),
        "Tokens evicted from the prefix cache.",
        stage="cache_lookup",
    ),
)


def sglang_series_names() -> frozenset[str]:
    """SGLang series names in both spellings (``sglang:x`` and ``sglang_x``)."""
    names = {n for m in SGLANG_METRICS for n in m.sample_names}
    return frozenset(names | {n.replace("sglang:", "sglang_", 1) for n in names})


# --------------------------------------------------------------------------------------------
# Dashboard UIDs: stable so that alerts and runbooks can deep-link (``/d/<uid>?viewPanel=<id>``).
# --------------------------------------------------------------------------------------------

DASHBOARD_UIDS: Mapping[str, str] = {
    "api_path": "llmpath-api-path",
    "slos": "llmpath-slos",
    "backends": "llmpath-backends",
}


def stable_panel_id(key: str) -> int:
    """A dashboard panel id derived from a stable key (e.g. ``"slo:<sloth_id>:burn"``, ``"stage:prefill:latency"``).

    The SLO compiler (for ``dashboard_url``), the dashboards and the runbooks compute the same id without
    importing each other; the dashboards check that no two panels collide.
    """
    return zlib.crc32(key.encode()) % 1_000_000_000 + 1
