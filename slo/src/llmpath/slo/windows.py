"""Alert window catalogs (Sloth's ``AlertWindows`` format): which windows and burn factors each period uses."""

from __future__ import annotations

import functools
import importlib.resources
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import yaml

from llmpath.slo.errors import Issue, IssueLog, SpecError
from llmpath.slo.gofmt import duration_hours, format_duration, go_duration, parse_duration
from llmpath.slo.model import BurnWindow

API_VERSION = "sloth.slok.dev/v1"
KIND = "AlertWindows"
_TIERS = (("page", "quick"), ("page", "slow"), ("ticket", "quick"), ("ticket", "slow"))


@dataclass(frozen=True, slots=True)
class Window:
    """One window pair: ``budget_percent`` of the period's budget consumed in ``long_ms``."""

    budget_percent: float
    short_ms: int
    long_ms: int


@dataclass(frozen=True, slots=True)
class AlertWindows:
    """The four window pairs of one SLO period."""

    period_ms: int
    page_quick: Window
    page_slow: Window
    ticket_quick: Window
    ticket_slow: Window
    source: str

    @property
    def period(self) -> str:
        return format_duration(self.period_ms)

    def factor(self, window: Window) -> float:
        """Burn-rate factor, computed exactly as Sloth does (same float)."""
        hours_required = window.budget_percent * duration_hours(self.period_ms) / 100
        return hours_required / duration_hours(window.long_ms)

    def burn_windows(self, severity: str) -> tuple[BurnWindow, BurnWindow]:
        """The (quick, slow) pairs of ``page`` or ``ticket``."""
        return _burn_windows(self, severity)

    def alert_windows_ms(self) -> list[int]:
        """Unique alert windows, ascending (the SLI recording windows, before the period)."""
        out = {w for pair in self.pairs() for w in (pair.short_ms, pair.long_ms)}
        return sorted(out)

    def pairs(self) -> tuple[Window, Window, Window, Window]:
        return (self.page_quick, self.page_slow, self.ticket_quick, self.ticket_slow)


@functools.lru_cache(maxsize=256)
def _burn_windows(windows: AlertWindows, severity: str) -> tuple[BurnWindow, BurnWindow]:
    pair = (
        (windows.page_quick, windows.page_slow) if severity == "page" else (windows.ticket_quick, windows.ticket_slow)
    )
    return tuple(  # type: ignore[return-value]
        BurnWindow(format_duration(w.short_ms), format_duration(w.long_ms), windows.factor(w), w.budget_percent)
        for w in pair
    )


def _parse(data: object, source: str, log: IssueLog) -> AlertWindows | None:
    def err(msg: str, field: str | None = None) -> None:
        log.error(msg, file=source, field=field)

    if not isinstance(data, Mapping):
        err("an AlertWindows document must be a mapping")
        return None
    if data.get("apiVersion") != API_VERSION or data.get("kind") != KIND:
        err(f"invalid spec version: expected apiVersion {API_VERSION!r} and kind {KIND!r}")
        return None
    spec = data.get("spec")
    if not isinstance(spec, Mapping):
        err("spec is required", "spec")
        return None
    try:
        period = parse_duration(str(spec.get("sloPeriod", "")))
    except ValueError as exc:
        err(str(exc), "spec.sloPeriod")
        return None
    if period <= 0:
        err("the SLO period must be positive", "spec.sloPeriod")
        return None
    windows: list[Window] = []
    for severity, speed in _TIERS:
        field = f"spec.{severity}.{speed}"
        raw = spec.get(severity, {}).get(speed) if isinstance(spec.get(severity), Mapping) else None
        if not isinstance(raw, Mapping):
            err("window is required", field)
            return None
        budget = raw.get("errorBudgetPercent")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 < budget <= 100:
            err(f"errorBudgetPercent must be a number in (0, 100], got {budget!r}", f"{field}.errorBudgetPercent")
            return None
        try:
            short = parse_duration(str(raw.get("shortWindow", "")))
            long = parse_duration(str(raw.get("longWindow", "")))
        except ValueError as exc:
            err(str(exc), field)
            return None
        if not 0 < short < long:
            err(
                f"shortWindow ({format_duration(short)}) must be positive and shorter than "
                f"longWindow ({format_duration(long)})",
                field,
            )
            return None
        if long >= period:
            err(
                f"longWindow ({format_duration(long)}) must be shorter than the SLO period ({format_duration(period)})",
                f"{field}.longWindow",
            )
            return None
        windows.append(Window(float(budget), short, long))
    page_quick, page_slow, ticket_quick, ticket_slow = windows  # in _TIERS order
    return AlertWindows(period, page_quick, page_slow, ticket_quick, ticket_slow, source=source)


def load_windows_file(path: Path, log: IssueLog) -> list[AlertWindows]:
    """Catalogs from a file or a folder of ``AlertWindows`` YAML files."""
    files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        log.error("no AlertWindows YAML files in this folder", file=str(path))
    out: list[AlertWindows] = []
    for file in files:
        try:
            text = file.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            log.error("the windows file is not a UTF-8 text file", file=str(file))
            continue
        except OSError as exc:
            log.error(f"cannot read the windows file: {exc.strerror or exc}", file=str(file))
            continue
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            log.error(
                f"YAML syntax error: {getattr(exc, 'problem', None) or exc}",
                file=str(file),
                line=mark.line + 1 if mark else None,
                column=mark.column + 1 if mark else None,
            )
            continue
        if (windows := _parse(data, str(file), log)) is not None:
            out.append(windows)
    return out


def _builtin() -> dict[int, AlertWindows]:
    log = IssueLog()
    out: dict[int, AlertWindows] = {}
    root = importlib.resources.files("llmpath.slo") / "windows"
    for name in ("google-30d.yaml", "google-28d.yaml", "7d.yaml"):
        text = (root / name).read_text(encoding="utf-8")
        windows = _parse(yaml.safe_load(text), f"<built-in {name}>", log)
        if windows is None:
            raise RuntimeError(f"invalid built-in windows catalog {name}: {log.errors}")
        out[windows.period_ms] = windows
    return out


BUILTIN_WINDOWS: Mapping[int, AlertWindows] = _builtin()


class WindowCatalog:
    """Window catalogs by period: the built-in 30d/28d/7d plus user files (a user file overrides its period)."""

    def __init__(self, extra: Iterable[AlertWindows] = ()) -> None:
        self._by_period: dict[int, AlertWindows] = dict(BUILTIN_WINDOWS)
        self.user: list[AlertWindows] = list(extra)
        seen: dict[int, str] = {}
        problems: list[Issue] = []
        for w in self.user:
            if w.period_ms in seen:
                problems.append(
                    Issue(f"the {w.period} SLO period is already defined in {seen[w.period_ms]}", file=w.source)
                )
            seen[w.period_ms] = w.source
            self._by_period[w.period_ms] = w
        if problems:
            raise SpecError(problems)

    @classmethod
    def from_paths(cls, paths: Iterable[Path]) -> WindowCatalog:
        log = IssueLog()
        windows: list[AlertWindows] = []
        for p in paths:
            if not p.exists():
                log.error("windows file not found", file=str(p))
                continue
            windows += load_windows_file(p, log)
        log.raise_if_errors()
        return cls(windows)

    def get(self, period_ms: int) -> AlertWindows | None:
        return self._by_period.get(period_ms)

    def unsupported_message(self, period_ms: int) -> str:
        known = ", ".join(format_duration(p) for p in sorted(self._by_period))
        return (
            f"the {go_duration(period_ms)} SLO period time window is not supported "
            f"(window catalogs exist for {known}; pass --windows FILE with an AlertWindows catalog for "
            f"{format_duration(period_ms)})"
        )
