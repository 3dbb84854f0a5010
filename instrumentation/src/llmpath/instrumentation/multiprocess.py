"""prometheus-client multiprocess mode for ``uvicorn --workers N`` and gunicorn (see docs/multiprocess.md).

Set ``PROMETHEUS_MULTIPROC_DIR`` to an empty directory before the server starts; every worker then writes its
metrics to memory-mapped files there and ``/metrics`` (served by llmpath) aggregates them on each scrape.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from llmpath.instrumentation.exposition import multiprocess_dir


def prepare_multiprocess_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """Create the multiprocess directory (or delete the ``*.db`` metric files left in it) and export
    ``PROMETHEUS_MULTIPROC_DIR``.

    Call it in the parent process before any worker starts (gunicorn's ``on_starting`` hook, or a launcher script
    before ``uvicorn --workers``); stale files from a previous run would otherwise be added to the new counts.
    Only prometheus-client's ``*.db`` files are removed — never the directory or anything else in it.
    """
    raw = os.fspath(path) if path is not None else (multiprocess_dir() or "")
    if not raw.strip():
        raise ValueError("pass a directory or set PROMETHEUS_MULTIPROC_DIR")
    target = Path(raw).resolve()
    if target == Path(target.anchor) or target == Path.home().resolve():
        raise ValueError(f"refusing to use {target} as the multiprocess directory")
    target.mkdir(parents=True, exist_ok=True)
    for stale in target.glob("*.db"):
        if stale.is_file():
            stale.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(target)
    _write_values_to_files()
    return target


def _write_values_to_files() -> None:
    """Make the metrics this process creates from now on write to the directory.

    prometheus-client picks how metrics keep their values when it is first imported: a process that imported it
    before the variable was set (this module does) and then serves itself (``uvicorn.run(..., workers=1)``)
    would otherwise keep them in memory, where the aggregating ``/metrics`` never looks."""
    from prometheus_client import values

    values.ValueClass = values.get_value_class()


def mark_process_dead(pid: int | None = None) -> None:
    """Drop a dead worker's ``live*`` gauge values (no-op outside multiprocess mode).

    llmpath calls it for the current worker on ASGI lifespan shutdown; gunicorn users also call it from the
    ``child_exit`` server hook (see :func:`gunicorn_child_exit`) so crashed workers are cleaned up.
    """
    if multiprocess_dir() is None:
        return
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(os.getpid() if pid is None else pid)


def gunicorn_child_exit(server: Any, worker: Any) -> None:
    """A ready-made gunicorn ``child_exit`` hook: ``child_exit = gunicorn_child_exit`` in gunicorn.conf.py."""
    mark_process_dead(worker.pid)


def gunicorn_on_starting(server: Any) -> None:
    """A ready-made gunicorn ``on_starting`` hook that empties ``PROMETHEUS_MULTIPROC_DIR`` before forking."""
    prepare_multiprocess_dir()
