"""``GET /v1/loads`` as SGLang answers it (``srt/entrypoints/v1_loads.py``, ``LoadSnapshot``): the core figures of
each DP rank (one here), the optional sections a client asks for with ``include=``, JSON or Prometheus text."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from llmpath.backends.engine.runtime import Engine

#: ``include=`` values SGLang accepts (``LoadSnapshot.VALID_SECTIONS``).
VALID_SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})
#: Section key in a rank's figures → its ``include=`` name, which is also its Prometheus prefix.
_SECTION_PREFIXES = {"speculative": "spec", "disaggregation": "disagg"}


class LoadsRequestError(ValueError):
    """A ``/v1/loads`` query SGLang answers with 400."""


def parse_include(include: str | None) -> set[str] | None:
    """The sections asked for (``None``: SGLang's default, the core figures only)."""
    if not include:
        return None
    sections = {s.strip() for s in include.split(",")}
    if not sections <= VALID_SECTIONS:
        raise LoadsRequestError(
            f"Invalid include sections: {sections - VALID_SECTIONS}. Valid options: {sorted(VALID_SECTIONS)}"
        )
    return sections


def rank_loads(engine: Engine, include: set[str] | None) -> dict[str, Any]:
    """One rank's figures: the core keys, then each section asked for that applies to this engine (no speculative
    decoding nor LoRA here: those sections never appear, as in SGLang without them)."""
    load = engine.scheduler.loads()
    if include is None or include == {"core"}:
        return load
    every = "all" in include
    if every or "memory" in include:
        weights, kv = engine.memory_bytes()
        load["memory"] = {
            "weight_gb": round(weights / 2**30, 3),
            "kv_cache_gb": round(kv / 2**30, 3),
            "graph_gb": 0.0,  # no CUDA graphs
            "token_capacity": load["max_total_num_tokens"],
        }
    if every or "disagg" in include:  # SGLang fills it in every mode ("null" without PD disaggregation)
        load["disaggregation"] = {
            "mode": "null",
            "prefill_bootstrap_queue_reqs": 0,
            "prefill_inflight_queue_reqs": 0,
            "decode_prealloc_queue_reqs": 0,
            "decode_transfer_queue_reqs": 0,
            "decode_retracted_queue_reqs": 0,
            "kv_transfer_speed_gb_s": 0.0,
            "kv_transfer_latency_ms": 0.0,
        }
    if every or "queues" in include:  # no grammar queue, no pausing, never a retraction (see the scheduler)
        load["queues"] = {"waiting": load["num_waiting_reqs"], "grammar": 0, "paused": 0, "retracted": 0}
    return load


def loads_json(engine: Engine, include: set[str] | None, version: str, accelerator: str | None) -> dict[str, Any]:
    """The JSON body: when, which server, and the ranks' figures."""
    return {
        "timestamp": datetime.now(UTC).isoformat(),
        "version": version,
        "accelerator": accelerator,
        "num_accelerators": 1,
        "loads": [rank_loads(engine, include)],
    }


def loads_prometheus(engine: Engine, include: set[str] | None) -> str:
    """The ``format=prometheus`` body: one gauge per numeric figure, ``sglang_<key>`` (sections: ``sglang_<section
    prefix>_<key>``), labelled with the DP rank."""
    load = rank_loads(engine, include)
    rank = load.pop("dp_rank")
    samples: dict[str, float] = {}
    for key, value in load.items():
        if isinstance(value, dict):
            prefix = _SECTION_PREFIXES.get(key, key)
            for sub, sub_value in value.items():
                if isinstance(sub_value, int | float) and not isinstance(sub_value, bool):
                    samples[f"sglang_{prefix}_{sub}"] = sub_value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            samples[f"sglang_{key}"] = value
    lines = []
    for name, value in samples.items():
        lines += [f"# TYPE {name} gauge", f'{name}{{dp_rank="{rank}"}} {value}']
    return "\n".join(lines) + "\n"
