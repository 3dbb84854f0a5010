"""`llmpath gateway`: the reference gateway (serve, check a config, hash an API key)."""

from __future__ import annotations

import os
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer

from llmpath.cli.log_level import LogLevel

app = typer.Typer(
    help="The reference gateway: seven instrumented stages in front of SGLang-compatible engines.",
    no_args_is_help=True,
)


class BackendKind(StrEnum):
    sglang = "sglang"
    openai = "openai"


class Policy(StrEnum):
    prefix = "prefix"
    round_robin = "round_robin"
    least_load = "least_load"


class LogFormatChoice(StrEnum):
    text = "text"
    json = "json"


def _overrides(
    host: str | None,
    port: int | None,
    backends: list[str],
    backend_kind: BackendKind | None,
    policy: Policy | None,
    api_keys: list[str],
    admin_keys: list[str],
    insecure_no_auth: bool,
) -> dict[str, Any]:
    from llmpath.gateway.config import hash_key

    overrides: dict[str, Any] = {}
    listen = {k: v for k, v in (("host", host), ("port", port)) if v is not None}
    if listen:
        overrides["listen"] = listen
    if backends:
        kind = (backend_kind or BackendKind.sglang).value
        overrides["backends"] = [{"url": url, "kind": kind} for url in backends]
    if policy is not None:
        overrides["routing"] = {"policy": policy.value}
    for flag, given in (("--api-key", api_keys), ("--admin-key", admin_keys)):
        for key in given:
            if not key or key != key.strip():
                # Clients send `Authorization: Bearer KEY`, and the gateway strips the value: no request could use it.
                typer.echo(f"error: {flag}: an empty key, or one with spaces around it, that no request can send",
                           err=True)  # fmt: skip
                raise typer.Exit(2)
    keys: list[dict[str, Any]] = [{"sha256": hash_key(k), "tenant": "default"} for k in api_keys]
    keys += [{"sha256": hash_key(k), "tenant": "admin", "admin": True} for k in admin_keys]
    if keys:
        overrides["api_keys"] = keys  # replaces the file's keys: the command line wins
    if insecure_no_auth:
        overrides["insecure_no_auth"] = True
    return overrides


def _load(config: Path | None, overrides: dict[str, Any]) -> Any:
    """The configuration as ``serve`` would run it; exit code 2 with every problem, or with what ``serve`` refuses
    (no API keys, no backends)."""
    from llmpath.gateway.config import ConfigError, load_config

    try:
        cfg = load_config(config, overrides)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    refusals = _refusals(cfg)
    if refusals:
        where = f"{config}: " if config is not None else ""
        for reason in refusals:
            typer.echo(f"error: {where}{reason}", err=True)
        raise typer.Exit(2)
    return cfg


def _refusals(cfg: Any) -> list[str]:
    """Why ``serve`` would not start with ``cfg`` (the file with the command line's and environment's keys and
    backends)."""
    refusals = []
    if not cfg.api_keys and not cfg.insecure_no_auth:
        refusals.append(
            "no API keys configured: add `api_keys` to the config, pass --api-key KEY "
            "(or LLMPATH_GATEWAY_API_KEYS), or pass --insecure-no-auth to serve without authentication"
        )
    if not cfg.backends:
        refusals.append("no backends: add `backends` to the config or pass --backend URL")
    for i, backend in enumerate(cfg.backends):
        if backend.api_key_env is not None and not os.environ.get(backend.api_key_env):
            refusals.append(
                f"backends[{i}].api_key_env: the environment variable {backend.api_key_env} is not set (or empty): "
                f"the backend {backend.display_name} would get no key"
            )
    return refusals


#: The options that ``serve`` and ``check-config`` share (``check-config`` checks what ``serve`` would run).
_BACKEND_HELP = "Backend URL (repeatable); replaces the config's backends."
_API_KEY_HELP = (
    "API key for tenant 'default' (repeatable; replaces the config's keys). Prefer the environment variable: "
    "arguments are visible to other users of the machine."
)
_ADMIN_KEY_HELP = "Admin key (tenant 'admin'): /debug/requests and the prompt-cache flush."
_NO_AUTH_HELP = "Serve without API keys (every caller is an anonymous admin)."


@app.command()
def serve(
    config: Path | None = typer.Option(None, "--config", "-c", help="YAML configuration file (docs/gateway.md)."),
    host: str | None = typer.Option(None, help="Listen address (default: 127.0.0.1, or the config's)."),
    port: int | None = typer.Option(None, help="Listen port (default: 8000, or the config's)."),
    backend: list[str] = typer.Option([], "--backend", help=_BACKEND_HELP),
    backend_kind: BackendKind | None = typer.Option(None, help="Protocol of the --backend URLs (default: sglang)."),
    policy: Policy | None = typer.Option(None, help="Routing policy (default: prefix, or the config's)."),
    api_key: list[str] = typer.Option([], "--api-key", envvar="LLMPATH_GATEWAY_API_KEYS", help=_API_KEY_HELP),
    admin_key: list[str] = typer.Option([], "--admin-key", envvar="LLMPATH_GATEWAY_ADMIN_KEYS", help=_ADMIN_KEY_HELP),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=_NO_AUTH_HELP),
    log_level: LogLevel = typer.Option(LogLevel.info, case_sensitive=False, help="Log level."),
    access_log: bool = typer.Option(False, help="Log one line per request (method, path, status; no bodies)."),
    log_format: LogFormatChoice = typer.Option(
        LogFormatChoice.text,
        envvar="LLMPATH_GATEWAY_LOG_FORMAT",
        help="text, or json: one JSON object per line. Lines logged while serving a request carry its request_id "
        "and trace_id.",
    ),
) -> None:
    """Serve the OpenAI-compatible gateway. SIGHUP (or POST /admin/reload) applies a changed --config file: API keys,
    limits and routes."""
    import gc
    import logging.config

    overrides = _overrides(host, port, backend, backend_kind, policy, api_key, admin_key, insecure_no_auth)
    cfg = _load(config, overrides)
    if cfg.insecure_no_auth:
        typer.echo("warning: serving WITHOUT authentication (--insecure-no-auth)", err=True)

    import uvicorn

    from llmpath.gateway.app import create_app
    from llmpath.gateway.config import load_config
    from llmpath.gateway.logs import logging_config
    from llmpath.gateway.server import DrainingServer

    log_config = logging_config(log_level, log_format.value)
    logging.config.dictConfig(log_config)  # now, for what the gateway logs while it starts; uvicorn applies it again

    # SIGHUP and POST /admin/reload read the file again, with the same command-line overrides.
    reload_config = (lambda: load_config(config, overrides)) if config is not None else None
    application = create_app(cfg, reload_config=reload_config)
    # Everything built so far lives as long as the process: keep the collector from rescanning it (less GC work
    # per request).
    gc.collect()
    gc.freeze()
    server_config = uvicorn.Config(
        application,
        host=cfg.listen.host,
        port=cfg.listen.port,
        log_level=log_level.lower(),
        log_config=log_config,
        access_log=access_log,
        timeout_graceful_shutdown=cfg.listen.drain_s,
    )
    DrainingServer(server_config, application.state.gateway).run()


@app.command("check-config")
def check_config(
    config: Path = typer.Argument(..., help="YAML configuration file."),
    backend: list[str] = typer.Option([], "--backend", help=_BACKEND_HELP),
    backend_kind: BackendKind | None = typer.Option(None, help="Protocol of the --backend URLs (default: sglang)."),
    api_key: list[str] = typer.Option([], "--api-key", envvar="LLMPATH_GATEWAY_API_KEYS", help=_API_KEY_HELP),
    admin_key: list[str] = typer.Option([], "--admin-key", envvar="LLMPATH_GATEWAY_ADMIN_KEYS", help=_ADMIN_KEY_HELP),
    insecure_no_auth: bool = typer.Option(False, "--insecure-no-auth", help=_NO_AUTH_HELP),
) -> None:
    """Validate a configuration file as `serve` would run it (with the same --backend, key flags and environment)
    and summarise it; exit code 2 with every problem, or with what `serve` would refuse, otherwise."""
    overrides = _overrides(None, None, backend, backend_kind, None, api_key, admin_key, insecure_no_auth)
    cfg = _load(config, overrides)
    typer.echo(f"{config}: OK")
    typer.echo(f"  listen      {cfg.listen.host}:{cfg.listen.port}")
    typer.echo(f"  backends    {', '.join(f'{b.display_name} ({b.kind})' for b in cfg.backends)}")
    typer.echo(f"  routing     {cfg.routing.policy}")
    typer.echo(f"  routes      {', '.join(r.name for r in cfg.routes) or '(passthrough: any model)'}")
    typer.echo(f"  api keys    {len(cfg.api_keys)} ({sum(k.admin for k in cfg.api_keys)} admin)")
    typer.echo(f"  admission   {_admission_summary(cfg)}")
    typer.echo(f"  ledger      {cfg.usage.ledger or '(none)'}")
    typer.echo(f"  stages      {_stages_summary(cfg.stage_catalog)}")
    typer.echo(f"  shutdown    drains for {cfg.listen.drain_s:g} s")


def _stages_summary(path: Path | None) -> str:
    """The owning team of each stage, and where the catalog comes from."""
    from llmpath.instrumentation import STAGES, load_catalog

    stages = STAGES if path is None else load_catalog(path)  # the configuration's check has read it already
    owners = ", ".join(f"{s.name} → {s.owner}" for s in stages)
    return f"{owners} ({path or 'built-in catalog'})"


def _admission_summary(cfg: Any) -> str:
    """Concurrency, queue and the per-tenant limits (defaults, and how many keys override them)."""
    lim = cfg.limits
    rate = lim.tenant_rate
    tokens = lim.tenant_tokens
    parts = [
        f"{lim.max_concurrency} concurrent, queue {lim.max_queue} for {lim.timeouts.queue_s:g} s",
        f"per tenant {rate.requests_per_second:g} requests/s (burst {rate.capacity:g})"
        if rate.requests_per_second
        else "no request-rate limit",
        f"{tokens.tokens_per_minute:g} tokens/min (burst {tokens.capacity:g})"
        if tokens.tokens_per_minute
        else "no token budget",
    ]
    overrides = sum(k.rate is not None or k.tokens is not None for k in cfg.api_keys)
    if overrides:
        parts.append(f"{overrides} key(s) with their own limits")
    return "; ".join(parts)


@app.command("hash-key")
def hash_key_command(
    key: str | None = typer.Argument(None, help="The key; read from standard input when omitted (safer)."),
) -> None:
    """Print the sha256 of an API key, for `api_keys[].sha256` in the configuration."""
    from llmpath.gateway.config import hash_key

    if key is None:
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        typer.echo("error: empty key", err=True)
        raise typer.Exit(2)
    if key != key.strip():  # the gateway strips the Authorization header's value: no request could send this key
        typer.echo("error: the key has spaces around it, which no request can send", err=True)
        raise typer.Exit(2)
    typer.echo(hash_key(key))
