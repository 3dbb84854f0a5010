"""P5: compile 1,000 SLOs in at most 1 s, and compare the rules per SLO with Sloth's.

Builds two specs of N SLOs each in a temporary folder — Sloth's ``prometheus/v1`` (events SLI, page and ticket
alerts, like Sloth's getting-started example) and ``llmpath/v1`` (per-route latency SLIs with the count-based
period rule and an absent alert) — then times loading and compiling (rules generation and YAML rendering, no disk
writes) several times and prints medians of wall and CPU time (the CPU figure is less sensitive to other work on a
shared machine), their ratio to the 1 s budget, and the rules generated per SLO next to Sloth's (8 SLI +
7 metadata + 2 alert rules with the default 30-day windows).

    .venv/bin/python bench/slo_compile.py [--slos 1000] [--repeat 5] [--check]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import yaml

from llmpath.slo import CompileOptions, compile_slos, load_specs

#: Seconds for 1,000 SLOs (issue target); with --slos N the budget scales to N / 1000 of it.
BUDGET_S = 1.0
SLOTH_RULES_PER_SLO = {"sli": 8, "meta": 7, "alert": 2}


def sloth_spec(n: int) -> str:
    lines = ['version: "prometheus/v1"', "service: bench", "labels:", "  owner: bench-team", "slos:"]
    for i in range(n):
        lines += [
            f"  - name: requests-availability-{i}",
            "    objective: 99.9",
            "    sli:",
            "      events:",
            f'        error_query: sum(rate(http_requests_total{{job="svc-{i}",code=~"(5..|429)"}}[{{{{.window}}}}]))',
            f'        total_query: sum(rate(http_requests_total{{job="svc-{i}"}}[{{{{.window}}}}]))',
            "    alerting:",
            f"      name: Svc{i}HighErrorRate",
            "      page_alert:",
            "        labels: {severity: critical}",
            "      ticket_alert:",
            "        labels: {severity: warning}",
        ]
    return "\n".join(lines) + "\n"


def llmpath_spec(n: int) -> str:
    lines = ["version: llmpath/v1", "service: bench", "slos:"]
    for i in range(n):
        lines += [
            f"  - name: ttft-{i}",
            "    objective: 95",
            "    stage: prefill",
            "    group_by: [route]",
            "    period_rule: ratio_of_counts",
            "    sli:",
            "      latency:",
            "        histogram: llmpath_time_to_first_token_seconds",
            "        threshold: 0.5",
            f"        selector: {{model: model-{i}}}",
            "    alerting:",
            f"      name: TTFT{i}Burn",
            "      absent_alert: {severity: ticket}",
        ]
    return "\n".join(lines) + "\n"


def rules_per_slo(files: dict[str, str]) -> dict[str, float]:
    """Average rules per SLO by kind (SLI recordings, metadata recordings, alerts)."""
    counts: Counter[str] = Counter()
    slos: set[str] = set()
    for text in files.values():
        for group in yaml.safe_load(text)["groups"]:
            kind = "sli" if "-sli-" in group["name"] else "meta" if "-meta-" in group["name"] else "alert"
            counts[kind] += len(group["rules"])
            slos.add(group["name"].split("-recordings-")[-1].split("-alerts-")[-1])
    return {k: counts[k] / len(slos) for k in ("sli", "meta", "alert")}


def measure(path: Path, repeat: int) -> tuple[list[float], list[float], list[float], dict[str, str], int]:
    """Per run: wall seconds of load and of compile, and CPU seconds of both (less sensitive to other load)."""
    loads, compiles, cpus = [], [], []
    files: dict[str, str] = {}
    n = 0
    for _ in range(repeat):
        c0 = time.process_time()
        t0 = time.perf_counter()
        docs = load_specs([path])
        t1 = time.perf_counter()
        result = compile_slos(docs, CompileOptions())
        t2 = time.perf_counter()
        cpus.append(time.process_time() - c0)
        loads.append(t1 - t0)
        compiles.append(t2 - t1)
        files, n = result.files, len(result.slos)
    return loads, compiles, cpus, files, n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slos", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--check", action="store_true", help="exit 1 when a median total exceeds the budget")
    args = parser.parse_args()
    if args.slos < 1 or args.repeat < 1:
        parser.error("--slos and --repeat must be at least 1")
    budget = BUDGET_S * args.slos / 1000
    load_before = os.getloadavg()
    print(f"P5 SLO compile: {args.slos} SLOs per spec, median of {args.repeat} runs, "
          f"budget {budget:g} s (1 s per 1,000 SLOs)")  # fmt: skip
    print(f"machine: {os.cpu_count()} CPUs, load average {load_before[0]:.2f} (1 min) before the runs")
    header = (
        f"{'spec':<16}{'SLOs':>6}{'load ms':>10}{'compile ms':>12}{'total ms':>10}{'/budget':>9}"
        f"{'CPU ms':>9}{'/budget':>9}   rules per SLO"
    )
    print(header)
    over = False
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in (("prometheus/v1", sloth_spec(args.slos)), ("llmpath/v1", llmpath_spec(args.slos))):
            path = Path(tmp) / f"{name.replace('/', '-')}.yaml"
            path.write_text(text)
            loads, compiles, cpus, files, n = measure(path, args.repeat)
            total = statistics.median([a + b for a, b in zip(loads, compiles, strict=True)])
            cpu = statistics.median(cpus)
            over |= total > budget
            per = rules_per_slo(files)
            ours = f"{per['sli']:g} SLI + {per['meta']:g} metadata + {per['alert']:g} alert = {sum(per.values()):g}"
            print(
                f"{name:<16}{n:>6}{statistics.median(loads) * 1000:>10.0f}{statistics.median(compiles) * 1000:>12.0f}"
                f"{total * 1000:>10.0f}{total / budget:>8.2f}x{cpu * 1000:>9.0f}{cpu / budget:>8.2f}x   {ours}"
            )
    sloth = SLOTH_RULES_PER_SLO
    print(
        f"{'Sloth v0.16':<16}{'':>6}{'':>10}{'':>12}{'':>10}{'':>9}{'':>9}{'':>9}   "
        f"{sloth['sli']} SLI + {sloth['meta']} metadata + {sloth['alert']} alert = {sum(sloth.values())}"
    )
    print(
        "llmpath/v1 adds 2 SLI rules (error and total event rates for the count-based period SLI) and the absent "
        f"alert; load average after: {os.getloadavg()[0]:.2f}"
    )
    return 1 if args.check and over else 0


if __name__ == "__main__":
    sys.exit(main())
