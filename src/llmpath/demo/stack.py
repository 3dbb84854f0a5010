"""The whole llmpath loop on loopback: embedded engines, the gateway, Prometheus (and Alertmanager), artefacts.

``start_stack`` is used by ``llmpath demo`` and by the end-to-end test; every process is owned by one
:class:`~llmpath.demo.supervisor.Supervisor`, so leaving the ``with`` block stops them all by PID.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from llmpath.demo.prometheus import (
    AlertmanagerServer,
    PrometheusServer,
    ScrapeTarget,
    alertmanager_config,
    find_alertmanager,
    find_prometheus,
    prometheus_config,
    start_alertmanager,
    start_prometheus,
)
from llmpath.demo.routes import DEMO_DOCS_DIR, DEMO_ROUTES, DEMO_TENANTS
from llmpath.demo.supervisor import Supervisor, free_port
from llmpath.demo.workload import Tenant


@dataclass
class StackConfig:
    """What to start. Defaults are the demo's: two ``small`` engines behind the prefix-routing gateway."""

    workdir: Path
    engines: int = 2
    preset: str = "small"
    engine_threads: int = 1
    engine_args: tuple[str, ...] = ()
    fault_injection: bool = False
    policy: str = "prefix"
    #: Extra gateway config sections merged over the demo's (e.g. ``{"limits": {"max_concurrency": 2}}``).
    gateway_overrides: Mapping[str, Any] = field(default_factory=dict)
    prometheus: bool = True
    scrape_interval: str = "2s"
    evaluation_interval: str = "2s"
    #: SLO spec(s) to compile; the packaged default when empty.
    slo_specs: tuple[Path, ...] = ()
    #: Sloth AlertWindows file for a custom (short) SLO period, and that period.
    windows_file: Path | None = None
    period: str | None = None
    #: Alertmanager receivers: name (page/ticket) → webhook URL; no Alertmanager when empty.
    alert_receivers: Mapping[str, str] = field(default_factory=dict)
    #: Called with a short line before each step (progress reporting).
    on_step: Callable[[str], None] = lambda _msg: None

    def __post_init__(self) -> None:
        # Absolute: the gateway resolves relative paths in its config file against the file's folder (the workdir).
        self.workdir = Path(self.workdir).resolve()


@dataclass
class Artifacts:
    rules_dir: Path
    dashboards_dir: Path
    runbooks_dir: Path

    @property
    def rule_files(self) -> list[Path]:
        return sorted(self.rules_dir.glob("*.y*ml"))


@dataclass
class Stack:
    supervisor: Supervisor
    engine_urls: list[str]
    gateway_url: str
    tenants: list[Tenant]
    admin_key: str
    ledger_path: Path
    artifacts: Artifacts
    prometheus: PrometheusServer | None = None
    alertmanager: AlertmanagerServer | None = None
    skipped: list[str] = field(default_factory=list)


def llmpath_command() -> list[str]:
    """How to run the ``llmpath`` CLI of this interpreter's environment."""
    exe = Path(sys.executable).with_name("llmpath")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "llmpath.cli"]


def build_artifacts(cfg: StackConfig) -> Artifacts:
    """Compile the SLO rules, dashboards and runbooks into ``workdir`` (with the public CLI, as a user would)."""
    art = Artifacts(cfg.workdir / "rules", cfg.workdir / "dashboards", cfg.workdir / "runbooks")
    specs = [str(p) for p in cfg.slo_specs]
    slo_opts: list[str] = []
    if cfg.windows_file is not None:
        slo_opts += ["--windows", str(cfg.windows_file)]
    if cfg.period is not None:
        slo_opts += ["--period", cfg.period]
    if not specs:
        from llmpath.slo import default_spec_path

        specs = [str(default_spec_path())]
    slo_flags = [f for s in specs for f in ("--slo", s)]
    runbook_url = f"file://{art.runbooks_dir.resolve()}"
    commands = [
        ["slo", "compile", *specs, "-o", str(art.rules_dir), *slo_opts, "--runbook-base-url", runbook_url],
        ["dashboards", "build", *slo_flags, "-o", str(art.dashboards_dir), *slo_opts],
        ["runbooks", "build", *slo_flags, "-o", str(art.runbooks_dir), *slo_opts],
    ]
    for args in commands:
        proc = subprocess.run([*llmpath_command(), *args], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"llmpath {' '.join(args[:2])} failed:\n{proc.stderr or proc.stdout}")
    return art


def gateway_config(
    cfg: StackConfig, engine_urls: list[str], port: int, tenants: list[Tenant], admin_key: str, ledger: Path
) -> dict[str, Any]:
    """The demo gateway's YAML config: routes with long system prompts, one key per tenant, prefix routing."""
    from llmpath.gateway.config import hash_key

    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": port},
        "backends": [{"url": url, "name": f"engine-{i}"} for i, url in enumerate(engine_urls)],
        "routing": {"policy": cfg.policy},
        "health": {"interval_s": 2.0},
        "routes": [route.config(DEMO_DOCS_DIR) for route in DEMO_ROUTES],
        "api_keys": [{"sha256": hash_key(t.api_key), "tenant": t.name} for t in tenants]
        + [{"sha256": hash_key(admin_key), "tenant": "ops", "admin": True}],
        # The embedded engine's tokenizer is byte-level: one token per UTF-8 byte.
        "tokenizer": {"chars_per_token": 1.0},
        "usage": {"ledger": str(ledger)},
    }
    for section, value in cfg.gateway_overrides.items():
        config[section] = {**config.get(section, {}), **value} if isinstance(value, dict) else value
    return config


@contextmanager
def start_stack(cfg: StackConfig) -> Iterator[Stack]:
    """Start engines, gateway and (when installed) Prometheus/Alertmanager; stop them all on exit."""
    cfg.workdir.mkdir(parents=True, exist_ok=True)
    cfg.on_step("compiling SLO rules, dashboards and runbooks")
    artifacts = build_artifacts(cfg)
    tenants = [Tenant(name, secrets.token_urlsafe(18)) for name in DEMO_TENANTS]
    admin_key = secrets.token_urlsafe(18)
    ledger = cfg.workdir / "usage.jsonl"
    ledger.unlink(missing_ok=True)
    cli = llmpath_command()
    with Supervisor(cfg.workdir / "logs") as sup:
        sup.watch()
        engine_urls = []
        for i in range(cfg.engines):
            cfg.on_step(f"starting engine-{i} ({cfg.preset} preset)")
            port = free_port()
            args = [*cli, "engine", "serve", "--host", "127.0.0.1", "--port", str(port), "--preset", cfg.preset]
            args += ["--threads", str(cfg.engine_threads), *cfg.engine_args]
            if cfg.fault_injection:
                args.append("--enable-fault-injection")
            sup.spawn(f"engine-{i}", args, ready_url=f"http://127.0.0.1:{port}/health", timeout=180)
            engine_urls.append(f"http://127.0.0.1:{port}")

        cfg.on_step("starting the gateway")
        gw_port = free_port()
        config_path = cfg.workdir / "gateway.yaml"
        config_path.write_text(
            yaml.safe_dump(gateway_config(cfg, engine_urls, gw_port, tenants, admin_key, ledger), sort_keys=False)
        )
        gateway_url = f"http://127.0.0.1:{gw_port}"
        sup.spawn(
            "gateway", [*cli, "gateway", "serve", "--config", str(config_path)], ready_url=f"{gateway_url}/readyz"
        )

        stack = Stack(sup, engine_urls, gateway_url, tenants, admin_key, ledger, artifacts)
        _start_monitoring(cfg, stack)
        yield stack


def _start_monitoring(cfg: StackConfig, stack: Stack) -> None:
    if not cfg.prometheus:
        stack.skipped.append("Prometheus (disabled)")
        return
    if find_prometheus() is None:
        stack.skipped.append("Prometheus (not installed: apt-get install prometheus) — no SLO status")
        return
    if cfg.alert_receivers:
        if find_alertmanager() is None:
            stack.skipped.append("Alertmanager (not installed: apt-get install prometheus-alertmanager)")
        else:
            cfg.on_step("starting Alertmanager")
            stack.alertmanager = start_alertmanager(
                stack.supervisor, cfg.workdir / "alertmanager", alertmanager_config(cfg.alert_receivers)
            )
    cfg.on_step("starting Prometheus")
    # A previous run's samples would count in this run's SLIs and budgets: start with empty storage.
    shutil.rmtree(cfg.workdir / "prometheus" / "data", ignore_errors=True)
    prom_port = free_port()
    targets = [
        ScrapeTarget("prometheus", f"127.0.0.1:{prom_port}"),  # its own rule-evaluation and scrape health
        ScrapeTarget("llmpath-gateway", stack.gateway_url.removeprefix("http://")),
    ]
    targets += [
        ScrapeTarget("sglang", url.removeprefix("http://"), {"engine": f"engine-{i}"})
        for i, url in enumerate(stack.engine_urls)
    ]
    config = prometheus_config(
        targets,
        stack.artifacts.rule_files,
        scrape_interval=cfg.scrape_interval,
        evaluation_interval=cfg.evaluation_interval,
        alertmanager=stack.alertmanager.address if stack.alertmanager else None,
    )
    stack.prometheus = start_prometheus(stack.supervisor, cfg.workdir / "prometheus", config, port=prom_port)
    cfg.on_step("waiting for Prometheus's first scrape of every target")
    with stack.prometheus.client() as client:
        client.wait_for_scrapes()  # counters seen before the load starts: rates cover all of it
