"""`llmpath demo`: run the whole loop on the embedded default."""

from __future__ import annotations

from pathlib import Path

import typer


def demo(
    once: bool = typer.Option(False, "--once", help="Exit after the report instead of serving until Ctrl-C."),
    duration: float = typer.Option(90.0, "--duration", min=5, help="Longest time to drive the workload (seconds)."),
    workdir: Path = typer.Option(Path("build"), "--workdir", help="Where rules, dashboards, runbooks, logs go."),
    preset: str = typer.Option("small", "--preset", help="Engine preset (small, or tiny for a quick look)."),
    conversations: int = typer.Option(36, min=1, help="Conversations in the workload (2-4 turns each)."),
    concurrency: int = typer.Option(4, min=1, help="Conversations in flight at once."),
) -> None:
    """Start two embedded engines, the gateway and Prometheus on loopback, drive a shared-prefix workload,
    and print per-stage timings, cache hit rates, tokens and SLO status."""
    from llmpath.backends.engine.presets import preset as engine_preset
    from llmpath.demo.run import DemoOptions, run_demo
    from llmpath.demo.supervisor import ChildDied, Interrupted, ProcessFailed

    try:  # before anything starts (the engines said it only after starting up)
        engine_preset(preset)
    except ValueError as exc:
        typer.echo(f"error: --preset: {exc}", err=True)
        raise typer.Exit(2) from None
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a file there or in its path, no permission
        typer.echo(f"error: --workdir {workdir}: cannot create the folder: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    opts = DemoOptions(
        workdir=workdir,
        duration_s=duration,
        once=once,
        preset=preset,
        conversations=conversations,
        concurrency=concurrency,
    )
    try:
        run_demo(opts)
    except Interrupted as exc:  # every child is stopped by now
        typer.echo(f"interrupted ({exc}): stopped the demo's processes; logs in {workdir / 'logs'}", err=True)
        raise typer.Exit(128 + exc.signum) from None
    except (ProcessFailed, ChildDied) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except (OSError, RuntimeError) as exc:  # a read-only or full work folder, a failing compile step
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
