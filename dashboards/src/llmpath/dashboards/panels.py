"""Panel builders on top of grafanalib, and a grid packer that gives every panel a stable id.

Every panel is created from a *key* (e.g. ``"stage:prefill:latency"``); its id is ``catalog.stable_panel_id(key)``,
the same number the SLO compiler and the runbooks compute for deep links (``?viewPanel=<id>``).
Descriptions end with the metrics a panel reads, as on-call needs them when a panel looks wrong.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import attr
from grafanalib.core import GridPos, RowPanel, Stat, Table, TableSortByField, Target, TimeSeries

from llmpath.dashboards.checks import DEFAULT_GLOBALS, expand, selectors
from llmpath.instrumentation.catalog import stable_panel_id

#: Threshold steps, e.g. ``[{"color": "green", "value": None}, {"color": "red", "value": 0.05}]``.
Steps = list[dict[str, Any]]


def steps(*pairs: tuple[str, float | None]) -> Steps:
    """Threshold steps: ``steps(("green", None), ("red", 0.05))``."""
    return [{"color": color, "value": value} for color, value in pairs]


@dataclass(frozen=True, slots=True)
class Query:
    """One panel query: expression, legend, and whether it is an instant (table) query."""

    expr: str
    legend: str = ""
    instant: bool = False

    def target(self) -> Target:
        fmt = "table" if self.instant else "time_series"
        return Target(expr=self.expr, legendFormat=self.legend, instant=self.instant, format=fmt)


def _description(text: str, queries: Sequence[Query], variables: Mapping[str, str]) -> str:
    names: list[str] = []
    for q in queries:
        for s in selectors(expand(q.expr, {**DEFAULT_GLOBALS, **variables})):
            name = s.name or (s.name_matcher or ("", ""))[1]
            if name and name not in names:
                names.append(name)
    return f"{text.rstrip()}\n\nMetrics: {', '.join(f'`{n}`' for n in names)}." if names else text


@dataclass
class Board:
    """Collects panels for one dashboard and packs them onto Grafana's 24-column grid, rows in order.

    ``variables`` maps each template variable to a sample value (used to parse queries for descriptions).
    """

    variables: Mapping[str, str]
    #: Added to the description of a panel none of whose queries uses ``$model`` (on a dashboard that has it).
    no_model_note: str = ""
    panels: list[Any] = field(default_factory=list)
    _x: int = 0
    _y: int = 0
    _line_height: int = 0

    def row(self, key: str, title: str) -> None:
        """Start a new (expanded) row."""
        self._newline()
        self.panels.append(RowPanel(id=stable_panel_id(key), title=title, gridPos=GridPos(h=1, w=24, x=0, y=self._y)))
        self._y += 1

    def _newline(self) -> None:
        self._y += self._line_height
        self._x = 0
        self._line_height = 0

    def _place(self, panel: Any, w: int, h: int) -> None:
        if self._x + w > 24:
            self._newline()
        self.panels.append(attr.evolve(panel, gridPos=GridPos(h=h, w=w, x=self._x, y=self._y)))
        self._x += w
        self._line_height = max(self._line_height, h)

    def _common(self, key: str, title: str, description: str, queries: Sequence[Query]) -> dict[str, Any]:
        if self.no_model_note and not any("$model" in q.expr for q in queries):
            description = f"{description.rstrip()} {self.no_model_note}"
        return {
            "id": stable_panel_id(key),
            "title": title,
            "description": _description(description, queries, self.variables),
            "targets": [q.target() for q in queries],
        }

    def timeseries(
        self,
        key: str,
        title: str,
        description: str,
        unit: str,
        queries: Sequence[Query],
        *,
        w: int = 12,
        h: int = 8,
        stacked: bool = False,
        thresholds: Steps | None = None,
        threshold_style: str = "off",
        minimum: float | None = None,
        maximum: float | None = None,
        links: Sequence[Mapping[str, Any]] = (),
    ) -> None:
        """A time-series panel (legend as a table with mean/last/max)."""
        panel = TimeSeries(
            **self._common(key, title, description, queries),
            links=list(links),
            unit=unit,
            stacking={"mode": "normal", "group": "A"} if stacked else {"mode": "none", "group": "A"},
            fillOpacity=60 if stacked else 10,
            lineWidth=1 if stacked else 2,
            legendDisplayMode="table",
            legendPlacement="bottom",
            legendCalcs=["mean", "lastNotNull", "max"],
            tooltipMode="multi",
            tooltipSort="desc",
            thresholds=thresholds or steps(("green", None)),
            thresholdsStyleMode=threshold_style,
            valueMin=minimum,
            valueMax=maximum,
        )
        self._place(panel, w, h)

    def stat(
        self,
        key: str,
        title: str,
        description: str,
        unit: str,
        queries: Sequence[Query],
        *,
        w: int = 4,
        h: int = 4,
        thresholds: Steps | None = None,
        decimals: int | None = None,
        text_mode: str = "auto",
        graph: bool = True,
        no_value: str = "No traffic",
    ) -> None:
        """A single-value panel showing the last value (not grafanalib's default mean)."""
        panel = Stat(
            **self._common(key, title, description, queries),
            format=unit,
            reduceCalc="lastNotNull",
            thresholds=thresholds or steps(("green", None)),
            colorMode="value" if thresholds else "none",
            graphMode="area" if graph else "none",
            textMode=text_mode,
            decimals=decimals,
            noValue=no_value,
        )
        self._place(panel, w, h)

    def table(
        self,
        key: str,
        title: str,
        description: str,
        unit: str,
        queries: Sequence[Query],
        *,
        w: int = 12,
        h: int = 8,
        sort_by: str | None = None,
        hidden: Iterable[str] = ("Time",),
    ) -> None:
        """A table of instant-query results, sorted descending by ``sort_by``, ``hidden`` columns removed."""
        panel = Table(
            **self._common(key, title, description, queries),
            unit=unit,
            sortBy=[TableSortByField(displayName=sort_by, desc=True)] if sort_by else [],
            transformations=[
                {"id": "merge", "options": {}},
                {"id": "organize", "options": {"excludeByName": dict.fromkeys(hidden, True)}},
            ],
        )
        self._place(panel, w, h)
