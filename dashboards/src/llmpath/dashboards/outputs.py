"""Writing generated files into an output folder, and ``--check``: is the folder up to date?"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Drift:
    """How an output folder differs from what the generator produces now."""

    missing: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    extra: list[str] = field(default_factory=list)  # generated files the generator no longer produces

    def __bool__(self) -> bool:
        return bool(self.missing or self.changed or self.extra)

    def describe(self, out: Path) -> list[str]:
        """One line per stale file, naming it and why."""
        return [
            *(f"{out / n}: missing" for n in self.missing),
            *(f"{out / n}: out of date" for n in self.changed),
            *(f"{out / n}: no longer generated (delete it or regenerate)" for n in self.extra),
        ]


def drift(out: Path, files: Mapping[str, str], is_generated: Callable[[Path], bool]) -> Drift:
    """Compare ``files`` (name → text) with ``out``; ``is_generated`` recognises our stale leftovers there."""
    result = Drift()
    for name, text in sorted(files.items()):
        path = out / name
        if not path.is_file():
            result.missing.append(name)
        elif path.read_text(encoding="utf-8") != text:
            result.changed.append(name)
    if out.is_dir():
        result.extra.extend(
            sorted(p.name for p in out.iterdir() if p.is_file() and p.name not in files and is_generated(p))
        )
    return result


def write(out: Path, files: Mapping[str, str], is_generated: Callable[[Path], bool]) -> Drift:
    """Bring ``out`` up to date: rewrite changed files atomically, remove stale generated ones; return the drift."""
    result = drift(out, files, is_generated)
    out.mkdir(parents=True, exist_ok=True)
    for name in (*result.missing, *result.changed):
        _write_atomic(out / name, files[name])
    for name in result.extra:
        (out / name).unlink()
    return result


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        Path(tmp).chmod(0o644)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
