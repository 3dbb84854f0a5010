"""The subset of Go ``text/template`` that SLI queries use: ``{{.window}}`` (and other keys of the data map),
string literals such as ``{{"{{.window}}"}}``, comments and ``{{-``/``-}}`` trimming, with ``missingkey=error``."""

from __future__ import annotations

import re
from collections.abc import Mapping

_ACTION = re.compile(r'\{\{(-\s)?((?:"(?:[^"\\]|\\.)*"|`[^`]*`|(?!\}\})[^"`])*?)(\s-)?\}\}', re.DOTALL)
_KEY = re.compile(r"^\s*\.([A-Za-z_][A-Za-z0-9_]*)\s*$")
_STRING = re.compile(r'^\s*"((?:[^"\\]|\\.)*)"\s*$', re.DOTALL)
_RAW_STRING = re.compile(r"^\s*`([^`]*)`\s*$", re.DOTALL)
_COMMENT = re.compile(r"^\s*/\*.*\*/\s*$", re.DOTALL)
#: Sloth's check that a query uses the window variable.
WINDOW_VAR = re.compile(r"\{\{ *\.window *\}\}")


class TemplateError(ValueError):
    """A template that cannot be rendered (unsupported action or missing key)."""


def _unquote(body: str) -> str:
    out = []
    i = 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            out.append({"n": "\n", "t": "\t", '"': '"', "\\": "\\"}.get(nxt, "\\" + nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def render(template: str, data: Mapping[str, str]) -> str:
    """Render ``template`` with ``data`` (e.g. ``{"window": "5m"}``); :class:`TemplateError` on unsupported input."""
    if "{{" not in template:
        return template
    plain_vars = template.count("{{.window}}") + template.count("{{ .window }}")
    if "window" in data and template.count("{{") == plain_vars:  # the common case: only {{.window}} actions
        return template.replace("{{.window}}", data["window"]).replace("{{ .window }}", data["window"])
    out: list[str] = []
    pos = 0
    for m in _ACTION.finditer(template):
        text = template[pos : m.start()]
        _check_unclosed(text)
        if m.group(1):
            text = text.rstrip(" \t\r\n")
        out.append(text)
        body = m.group(2)
        if key := _KEY.match(body):
            name = key.group(1)
            if name not in data:
                raise TemplateError(f'map has no entry for key "{name}" in {m.group(0)!r}')
            out.append(data[name])
        elif s := _STRING.match(body):
            out.append(_unquote(s.group(1)))
        elif r := _RAW_STRING.match(body):
            out.append(r.group(1))
        elif not _COMMENT.match(body):
            raise TemplateError(f"unsupported template action {m.group(0)!r} (only {{{{.window}}}} is available)")
        pos = m.end()
        if m.group(3):
            rest = template[pos:]
            pos += len(rest) - len(rest.lstrip(" \t\r\n"))
    _check_unclosed(template[pos:])
    out.append(template[pos:])
    return "".join(out)


def _check_unclosed(text: str) -> None:
    if "{{" in text:
        raise TemplateError(f"unclosed action in {text[text.index('{{') :][:40]!r}")


def render_window(template: str, window: str) -> str:
    """Render an SLI query template for one window."""
    return render(template, {"window": window})
