"""The waterfall page (``/debug/requests``): the last N requests, one row each, one coloured bar per stage on a
shared time axis, with TTFT, tokens and the routing decision. Fed by the instrumentation's usage records.

Server-rendered HTML with inline CSS (no scripts, no CDN); the same data as JSON at ``/debug/requests.json``.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections import deque
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from jinja2 import Environment

from llmpath.instrumentation.catalog import STAGES, UNATTRIBUTED
from llmpath.instrumentation.usage import UsageRecord

#: One colour per catalog stage (colour-blind-friendly Okabe-Ito order, then extras).
STAGE_COLOURS: dict[str, str] = {
    "auth": "#0072B2",
    "validate": "#56B4E9",
    "route": "#009E73",
    "assemble": "#F0E442",
    "cache_lookup": "#CC79A7",
    "schedule": "#E69F00",
    "prefill": "#D55E00",
    "decode": "#999999",
    UNATTRIBUTED: "#000000",
}


def stage_colour(name: str) -> str:
    colour = STAGE_COLOURS.get(name)
    if colour is None:  # a custom stage: a stable colour from its name
        colour = f"hsl({zlib.crc32(name.encode()) % 360}, 55%, 50%)"
    return colour


class WaterfallStore:
    """The last ``capacity`` usage records; use it as a usage sink (thread-safe)."""

    def __init__(self, capacity: int = 200) -> None:
        self._records: deque[UsageRecord] = deque(maxlen=capacity)
        self._lock = threading.Lock()

    def __call__(self, record: UsageRecord) -> None:
        self.add(record)

    def add(self, record: UsageRecord) -> None:
        with self._lock:
            self._records.append(record)

    def recent(self, limit: int | None = None, *, wanted: str | None = None) -> list[UsageRecord]:
        """Newest first; with ``wanted``, only the records with that request id or trace id."""
        with self._lock:
            records = list(self._records)
        records.reverse()
        if wanted is not None:
            records = [r for r in records if wanted in (r.request_id, r.trace_id)]
        return records[:limit] if limit else records


#: The page's response headers: never cached (it shows tenants and request ids), and, should any text ever reach it
#: unescaped, no script, plugin, form, base URL or framing page that could use it (its only resource is inline CSS).
PAGE_HEADERS = {
    "cache-control": "no-store",
    "content-security-policy": (
        "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
}


def to_json(records: Iterable[UsageRecord]) -> dict[str, Any]:
    """The JSON document of ``/debug/requests.json``."""
    return {
        "stages": [{"name": n, "colour": stage_colour(n)} for n in STAGES.names],
        "requests": [r.to_dict() for r in records],
    }


_PAGE = Environment(autoescape=True, trim_blocks=True, lstrip_blocks=True).from_string(
    """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>llmpath gateway — recent requests</title>
<style>
body{font:13px/1.4 system-ui,sans-serif;margin:16px;color:#222}
h1{font-size:18px;margin:0 0 4px}
.note{color:#666;margin:0 0 12px}
table{border-collapse:collapse;width:100%}
th,td{padding:3px 6px;border-bottom:1px solid #eee;text-align:left;vertical-align:middle;white-space:nowrap}
th{font-weight:600;background:#fafafa;position:sticky;top:0}
td.num{text-align:right;font-variant-numeric:tabular-nums}
td.lane{width:55%;min-width:320px}
.track{position:relative;height:16px;background:#f6f6f6}
.bar{position:absolute;top:2px;height:12px;min-width:2px;border-radius:1px;opacity:.9}
.ttft{position:absolute;top:0;height:16px;width:0;border-left:2px dashed #000}
.legend span{display:inline-block;margin-right:12px}
.legend i{display:inline-block;width:12px;height:12px;margin-right:4px;vertical-align:-2px;border-radius:2px}
.err{color:#b00}
.axis{display:flex;justify-content:space-between;color:#666;font-size:11px}
</style></head>
<body>
<h1>{% if wanted %}Request {{ wanted }}{% else %}Recent requests{% endif %}</h1>
<p class="note">{{ records|length }} request(s), newest first. Shared time axis: 0 – {{ "%.1f"|format(axis_ms) }} ms
({{ axis_label }}). Bars are the stages as they actually ran; the dashed line is the first token.
{% if axis == "request" %}<a href="?axis=ttft&limit={{ limit }}{{ id_query }}">zoom to TTFT</a>
{% else %}<a href="?axis=request&limit={{ limit }}{{ id_query }}">whole requests</a>{% endif %}
{% if wanted %}· <a href="?axis={{ axis }}&limit={{ limit }}">all recent requests</a>{% endif %}</p>
<p class="legend">{% for name, colour in legend %}
<span><i style="background:{{ colour }}"></i>{{ name }}</span>{% endfor %}</p>
<table>
<thead><tr><th>time</th><th>request</th><th>tenant</th><th>route</th><th>status</th><th>TTFT ms</th>
<th>total ms</th><th>tokens in / cached / out</th><th>routing</th>
<th class="lane"><div class="axis"><span>0</span><span>{{ "%.1f"|format(axis_ms / 2) }} ms</span>
<span>{{ "%.1f"|format(axis_ms) }} ms</span></div></th></tr></thead>
<tbody>
{% for row in rows %}
<tr class="request" data-request-id="{{ row.id }}">
<td>{{ row.when }}</td>
<td title="trace {{ row.trace_id or '-' }}">
<a href="?axis={{ axis }}&id={{ row.id|urlencode }}">{{ row.id[:12] }}</a></td>
<td>{{ row.tenant }}</td>
<td>{{ row.route }}</td><td class="{{ 'err' if row.status >= 400 or row.error else '' }}">{{ row.status }}
{% if row.error %} {{ row.error }}{% endif %}</td>
<td class="num">{{ row.ttft }}</td><td class="num">{{ row.total }}</td>
<td class="num">{{ row.tokens }}</td><td>{{ row.routing }}</td>
<td class="lane"><div class="track">
{% for bar in row.bars %}<div class="bar" data-stage="{{ bar.name }}" data-source="{{ bar.source }}"
 style="left:{{ bar.left }}%;width:{{ bar.width }}%;background:{{ bar.colour }}"
 title="{{ bar.name }}: {{ bar.ms }} ms from +{{ bar.start_ms }} ms ({{ bar.source }} clock)"></div>
{% endfor %}{% if row.ttft_left is not none %}<div class="ttft" style="left:{{ row.ttft_left }}%"
 title="first token at {{ row.ttft }} ms"></div>{% endif %}
</div></td></tr>
{% else %}
<tr><td colspan="10">No requests yet.</td></tr>
{% endfor %}
</tbody></table>
</body></html>
"""
)


def render_html(
    records: list[UsageRecord], *, axis: str = "request", limit: int = 50, wanted: str | None = None
) -> str:
    """The waterfall page for ``records`` (newest first); ``wanted``: the request or trace id they were found by."""
    if axis == "ttft":
        span = max((r.ttft_s or r.duration_s for r in records), default=0.0)
        axis_label = "up to the slowest first token"
    else:
        axis = "request"
        span = max((r.duration_s for r in records), default=0.0)
        axis_label = "up to the slowest request"
    span = span or 1e-3
    rows = [_row(r, span) for r in records]
    legend = [(n, stage_colour(n)) for n in STAGES.names]
    return _PAGE.render(
        records=records,
        rows=rows,
        legend=legend,
        axis=axis,
        axis_ms=span * 1e3,
        axis_label=axis_label,
        limit=limit,
        wanted=wanted,
        id_query=f"&id={quote(wanted, safe='')}" if wanted else "",  # the zoom keeps to the request
    )


def _pct(value: float, span: float) -> float:
    return round(max(0.0, min(100.0, 100.0 * value / span)), 3)


def _row(r: UsageRecord, span: float) -> dict[str, Any]:
    bars = []
    for st in sorted(r.stages, key=lambda s: s.start_s):
        left = _pct(st.start_s, span)
        bars.append(
            {
                "name": st.name,
                "source": st.source,
                "left": left,
                "width": min(_pct(st.duration_s, span), round(100.0 - left, 3)),
                "colour": stage_colour(st.name),
                "ms": f"{st.duration_s * 1e3:.2f}",
                "start_ms": f"{st.start_s * 1e3:.2f}",
            }
        )
    extra = r.extra or {}
    routing = "-"
    if extra.get("backend"):
        routing = f"{extra['backend']} ({extra.get('routing_reason', '?')}"
        if extra.get("matched_prefix_tokens"):
            routing += f", {extra['matched_prefix_tokens']} prefix tok"
        if extra.get("retries"):
            routing += f", {extra['retries']} retr."
        routing += ")"
    return {
        "id": r.request_id,
        "trace_id": r.trace_id,
        "when": time.strftime("%H:%M:%S", time.localtime(r.time)),
        "tenant": r.tenant or "-",
        "route": r.route,
        "status": r.status_code,
        "error": r.error,
        "ttft": f"{r.ttft_s * 1e3:.1f}" if r.ttft_s is not None else "-",
        "ttft_left": _pct(r.ttft_s, span) if r.ttft_s is not None else None,
        "total": f"{r.duration_s * 1e3:.1f}",
        "tokens": f"{r.input_tokens} / {r.cached_tokens} / {r.output_tokens}",
        "routing": routing,
        "bars": bars,
    }
