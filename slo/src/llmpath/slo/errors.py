"""Spec problems: every message names the file, the SLO and the field, with the line when known."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace


@dataclass(frozen=True, slots=True)
class Issue:
    """One problem found in a spec (``severity`` is ``"error"`` or ``"warning"``)."""

    message: str
    file: str | None = None
    slo: str | None = None
    field: str | None = None
    line: int | None = None
    column: int | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = self.file or "<input>"
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        parts = [where]
        if self.slo:
            parts.append(f"SLO {self.slo!r}")
        if self.field:
            parts.append(self.field)
        prefix = "warning: " if self.severity == "warning" else ""
        return f"{prefix}{': '.join(parts)}: {self.message}"

    def as_error(self) -> Issue:
        """The same issue as an error (``--strict`` turns warnings into errors)."""
        return replace(self, severity="error")


class SpecError(ValueError):
    """Invalid SLO input: one or more :class:`Issue` (all problems found, not just the first).

    ``warnings`` are the warnings found along the way (empty when ``--strict`` made them part of ``issues``).
    """

    def __init__(self, issues: Iterable[Issue], warnings: Iterable[Issue] = ()) -> None:
        self.issues: tuple[Issue, ...] = tuple(issues)
        self.warnings: tuple[Issue, ...] = tuple(warnings)
        super().__init__("\n".join(str(i) for i in self.issues) or "invalid SLO spec")


class IssueLog:
    """Collects errors and warnings while loading or compiling; an issue found again (e.g. a document-level
    problem seen from each of its SLOs) is kept once."""

    def __init__(self) -> None:
        self.errors: list[Issue] = []
        self.warnings: list[Issue] = []
        self._seen: set[Issue] = set()

    def add(self, issue: Issue) -> None:
        if issue in self._seen:
            return
        self._seen.add(issue)
        (self.warnings if issue.severity == "warning" else self.errors).append(issue)

    def error(self, message: str, **where: object) -> None:
        self.add(Issue(message, **where))  # type: ignore[arg-type]

    def warn(self, message: str, **where: object) -> None:
        self.add(Issue(message, severity="warning", **where))  # type: ignore[arg-type]

    def raise_if_errors(self, strict: bool = False) -> None:
        """Raise :class:`SpecError` for the errors (and, when ``strict``, the warnings too)."""
        problems = list(self.errors)
        if strict:
            problems += [w.as_error() for w in self.warnings]
        if problems:
            raise SpecError(problems, warnings=() if strict else self.warnings)
