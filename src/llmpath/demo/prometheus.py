"""A real Prometheus (and optionally Alertmanager) on loopback, configured for llmpath, plus a small query client."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from llmpath.demo.supervisor import ManagedProcess, Supervisor, free_port
from llmpath.live.promapi import PrometheusClient

ALERTMANAGER_BINARIES = ("prometheus-alertmanager", "alertmanager")


def find_prometheus() -> str | None:
    """Path of the ``prometheus`` binary (Debian package ``prometheus``), or None."""
    return shutil.which("prometheus")


def find_alertmanager() -> str | None:
    """Path of Alertmanager (Debian ships it as ``prometheus-alertmanager``), or None."""
    return next((p for b in ALERTMANAGER_BINARIES if (p := shutil.which(b))), None)


@dataclass(frozen=True)
class ScrapeTarget:
    job: str
    address: str  # host:port
    labels: Mapping[str, str] | None = None


def prometheus_config(
    targets: Sequence[ScrapeTarget],
    rule_files: Sequence[Path],
    *,
    scrape_interval: str = "5s",
    evaluation_interval: str = "5s",
    alertmanager: str | None = None,
) -> dict[str, Any]:
    """A prometheus.yml document scraping ``targets`` (grouped by job) and loading ``rule_files``."""
    jobs: dict[str, list[dict[str, Any]]] = {}
    for t in targets:
        group: dict[str, Any] = {"targets": [t.address]}
        if t.labels:
            group["labels"] = dict(t.labels)
        jobs.setdefault(t.job, []).append(group)
    config: dict[str, Any] = {
        "global": {"scrape_interval": scrape_interval, "evaluation_interval": evaluation_interval},
        "rule_files": [str(p) for p in rule_files],
        "scrape_configs": [{"job_name": job, "static_configs": groups} for job, groups in jobs.items()],
    }
    if alertmanager:
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [alertmanager]}]}]}
    return config


@dataclass
class PrometheusServer:
    """A Prometheus process started by a :class:`Supervisor`."""

    process: ManagedProcess
    url: str
    config_path: Path

    def client(self) -> PrometheusClient:
        return PrometheusClient(self.url)


def _start_daemon(
    supervisor: Supervisor,
    name: str,
    binary: str,
    config: Mapping[str, Any],
    config_path: Path,
    args: Callable[[str], list[str]],
    port: int | None,
) -> tuple[ManagedProcess, str]:
    """Write ``config`` as YAML to ``config_path`` and start ``binary`` on 127.0.0.1 (``args(address)``)."""
    config_path.parent.mkdir(parents=True, exist_ok=True)
    config_path.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    address = f"127.0.0.1:{port or free_port()}"
    proc = supervisor.spawn(name, [binary, *args(address)], ready_url=f"http://{address}/-/ready", timeout=60)
    return proc, f"http://{address}"


def start_prometheus(
    supervisor: Supervisor,
    workdir: Path,
    config: Mapping[str, Any],
    *,
    port: int | None = None,
    binary: str | None = None,
    retention: str = "1d",
) -> PrometheusServer:
    """Write ``config`` into ``workdir`` and start Prometheus on 127.0.0.1 (lifecycle API enabled for reloads)."""
    binary = binary or find_prometheus()
    if binary is None:
        raise FileNotFoundError("prometheus is not installed (Debian: apt-get install prometheus)")
    config_path = workdir / "prometheus.yml"
    proc, url = _start_daemon(
        supervisor,
        "prometheus",
        binary,
        config,
        config_path,
        lambda address: [
            f"--config.file={config_path}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--storage.tsdb.retention.time={retention}",
            f"--web.listen-address={address}",
            "--web.enable-lifecycle",
            "--enable-feature=exemplar-storage",
        ],
        port,
    )
    return PrometheusServer(proc, url, config_path)


def alertmanager_config(receivers: Mapping[str, str], *, route_label: str = "sloth_severity") -> dict[str, Any]:
    """Route alerts by ``route_label`` value (e.g. page/ticket) to webhook URLs; fast grouping for short tests."""
    names = list(receivers)
    return {
        "route": {
            "receiver": names[0],
            "group_by": ["alertname", route_label],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
            "routes": [{"receiver": n, "matchers": [f'{route_label}="{n}"']} for n in names],
        },
        "receivers": [
            {"name": n, "webhook_configs": [{"url": url, "send_resolved": True}]} for n, url in receivers.items()
        ],
    }


@dataclass
class AlertmanagerServer:
    process: ManagedProcess
    url: str

    @property
    def address(self) -> str:
        return self.url.removeprefix("http://")


def start_alertmanager(
    supervisor: Supervisor,
    workdir: Path,
    config: Mapping[str, Any],
    *,
    port: int | None = None,
    binary: str | None = None,
) -> AlertmanagerServer:
    """Start Alertmanager on 127.0.0.1 with clustering disabled."""
    binary = binary or find_alertmanager()
    if binary is None:
        raise FileNotFoundError("alertmanager is not installed (Debian: apt-get install prometheus-alertmanager)")
    config_path = workdir / "alertmanager.yml"
    proc, url = _start_daemon(
        supervisor,
        "alertmanager",
        binary,
        config,
        config_path,
        lambda address: [
            f"--config.file={config_path}",
            f"--storage.path={workdir / 'am-data'}",
            f"--web.listen-address={address}",
            "--cluster.listen-address=",
        ],
        port,
    )
    return AlertmanagerServer(proc, url)
