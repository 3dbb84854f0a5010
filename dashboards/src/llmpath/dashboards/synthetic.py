"""Synthetic Prometheus series for every catalog metric, and a promtool check that queries return data.

Used by the tests to prove that every dashboard and runbook query returns samples when the gateway and the engines
export their metrics (without running them): ``promtool test rules`` evaluates each query over the series.
"""

from __future__ import annotations

import itertools
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path

import yaml

from llmpath.instrumentation import catalog

# Label values for synthetic series: every stage, token type and stage group, the status codes the reference gateway
# answers on its completion endpoints (queries select 4xx and 5xx codes by value) …
_VALUES: dict[str, tuple[str, ...]] = {
    "stage": catalog.STAGES.names_with_unattributed,
    "type": catalog.TOKEN_TYPES,
    "group": tuple(g.name for g in catalog.STAGE_GROUPS),
    "code": ("200", "400", "401", "404", "408", "413", "422", "429", "499", "500", "502", "503", "504"),
    "route": ("chat", "rag"),
    "backend": ("http://127.0.0.1:30001", "http://127.0.0.1:30002"),
    "result": ("hit", "miss"),
    "reason": ("prefix", "least_load"),
}
_SGLANG_STAGE = ("prefill_forward", "chunked_prefill", "request_process")
SCRAPE_INTERVAL = "15s"
SAMPLES = 80  # 20 minutes of samples at 15 s
EVAL_TIME = "15m"


def _label_sets(spec: catalog.MetricSpec) -> Iterable[dict[str, str]]:
    values: list[tuple[str, ...]] = []
    for label in spec.labels:
        if spec.name.startswith("sglang:") and label == "stage":
            values.append(_SGLANG_STAGE)
        else:
            values.append(_VALUES.get(label, ("x",)))
    for combo in itertools.product(*values):
        yield dict(zip(spec.labels, combo, strict=True))


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    body = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {"series": f"{name}{{{body}}}", "values": values}


def synthetic_series() -> list[dict[str, str]]:
    """promtool input series for every llmpath and SGLang metric of the catalog (SGLang in its ``sglang_`` spelling,
    as sglang-router's /engine_metrics writes it, with an ``instance`` for per-backend panels)."""
    out: list[dict[str, str]] = []
    for spec in (*catalog.METRICS, *catalog.SGLANG_METRICS):
        name = spec.name.replace("sglang:", "sglang_", 1)
        for i, labels in enumerate(_label_sets(spec)):
            if spec.name.startswith("sglang:"):
                labels = {**labels, "instance": f"127.0.0.1:3000{i % 2}"}
            if spec.kind == "counter":
                out.append(_series(name, labels, f"0+{i + 1}x{SAMPLES}"))
            elif spec.kind == "gauge":
                out.append(_series(name, labels, f"{(i % 3 + 1) / 4}x{SAMPLES}"))
            else:
                buckets = catalog.LATENCY_BUCKETS
                for j, le in enumerate(buckets):
                    per_step = max(1, j * 2)
                    out.append(_series(f"{name}_bucket", {**labels, "le": repr(le)}, f"0+{per_step}x{SAMPLES}"))
                total = (len(buckets) - 1) * 2 + 5
                out.append(_series(f"{name}_bucket", {**labels, "le": "+Inf"}, f"0+{total}x{SAMPLES}"))
                out.append(_series(f"{name}_count", labels, f"0+{total}x{SAMPLES}"))
                out.append(_series(f"{name}_sum", labels, f"0+{total / 10}x{SAMPLES}"))
    return out


def promtool_returns_data(
    promtool: str, tmp: Path, exprs: Sequence[str], rule_files: Sequence[Path] = (), empty: Sequence[str] = ()
) -> subprocess.CompletedProcess[str]:
    """Run ``promtool test rules`` asserting that each of ``exprs`` returns at least one sample and each of ``empty``
    (queries that are empty while every metric has data, such as ``absent(…)``) returns none."""
    test = {
        "rule_files": [str(p) for p in rule_files],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": SCRAPE_INTERVAL,
                "input_series": synthetic_series(),
                "promql_expr_test": [
                    *(
                        {"expr": f"clamp_max(count({e}), 1)", "eval_time": EVAL_TIME, "exp_samples": [{"value": 1}]}
                        for e in exprs
                    ),
                    *({"expr": e, "eval_time": EVAL_TIME, "exp_samples": []} for e in empty),
                ],
            }
        ],
    }
    path = tmp / "returns_data.test.yml"
    path.write_text(yaml.safe_dump(test, sort_keys=False))
    return subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=120)
