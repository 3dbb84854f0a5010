"""The subset of Go ``text/template`` that SLI queries use: ``{{.window}}`` (and other keys of the data map),
string literals such as ``{{"{{.window}}"}}``, comments and ``{{-``/``-}}`` trimming, with ``missingkey=error``."""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

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


# --------------------------------------------------------------------------------------------
# Alert label and annotation values: Prometheus parses each one as a Go template (with its own functions and the
# variables $labels, $value, $externalLabels and $externalURL); one that does not parse fails the whole rule file.
# --------------------------------------------------------------------------------------------

#: text/template's built-in functions and those Prometheus 2.42 adds (``template.go``'s ``FuncMap``).
PROMETHEUS_TEMPLATE_FUNCS = frozenset(
    [
        "and",
        "call",
        "html",
        "index",
        "slice",
        "js",
        "len",
        "not",
        "or",
        "print",
        "printf",
        "println",
        "urlquery",
        "eq",
        "ge",
        "gt",
        "le",
        "lt",
        "ne",
        "query",
        "first",
        "label",
        "value",
        "strvalue",
        "args",
        "reReplaceAll",
        "safeHtml",
        "match",
        "title",
        "toUpper",
        "toLower",
        "graphLink",
        "tableLink",
        "sortByLabel",
        "humanize",
        "humanize1024",
        "humanizeDuration",
        "humanizePercentage",
        "humanizeTimestamp",
        "toTime",
        "pathPrefix",
        "externalURL",
        "parseDuration",
        "stripPort",
        "stripDomain",
    ]
)
_PROMETHEUS_VARS = frozenset({"$", "$labels", "$value", "$externalLabels", "$externalURL"})
_TOKEN = re.compile(
    r"""\s+|(?P<str>"(?:[^"\\\n]|\\.)*"|`[^`]*`|'(?:[^'\\\n]|\\.)+')|(?P<var>\$[A-Za-z0-9_]*)"""
    r"""|(?P<field>(?:\.[A-Za-z0-9_]*)+)|(?P<num>[-+]?[0-9][0-9A-Za-z_.+-]*)|(?P<ident>[A-Za-z_][A-Za-z0-9_]*)"""
    r"""|(?P<op>:=|=|\||\(|\)|,)"""
)
_KEYWORDS = frozenset({"if", "range", "with", "define", "block", "else", "end", "template", "break", "continue"})


def _actions(text: str) -> Iterator[str]:
    """The bodies of ``{{ … }}`` actions (trim markers removed); ``TemplateError`` for one that does not end."""
    pos = 0
    while (start := text.find("{{", pos)) >= 0:
        i = start + 2
        if text.startswith("- ", i):
            i += 2
        body_start = i
        while True:
            if text.startswith("/*", i) and i == body_start:  # a comment must follow {{ (or {{- ) directly
                end = text.find("*/", i + 2)
                if end < 0:
                    raise TemplateError("unclosed comment")
                i = end + 2
                continue
            if i >= len(text):
                raise TemplateError("unclosed action")
            ch = text[i]
            if ch in "\"'`":
                m = re.compile(r"`[^`]*`" if ch == "`" else ch + r"(?:[^" + ch + r"\\\n]|\\.)*" + ch).match(text, i)
                if m is None:
                    raise TemplateError("unterminated quoted string")
                i = m.end()
                continue
            if text.startswith("}}", i):
                body = text[body_start:i]
                yield body[:-2] if body.endswith(" -") else body
                pos = i + 2
                break
            i += 1


def prometheus_template_error(text: str) -> str | None:
    """Why Prometheus would refuse ``text`` as an alert label or annotation template, or ``None``.

    A parse check of Go's ``text/template`` with Prometheus' functions and variables: unclosed actions, strings
    and comments, unbalanced ``if``/``range``/``with``/``define``/``block`` … ``end``, ``break`` outside
    ``range``, unknown functions and variables, empty commands and parentheses. Values without ``{{`` are plain
    text."""
    if "{{" not in text:
        return None
    blocks: list[str] = []
    declared = set(_PROMETHEUS_VARS)
    try:
        for body in _actions(text):
            if body.startswith("/*"):
                continue
            _check_action(body, blocks, declared)
    except TemplateError as exc:
        return str(exc)
    if blocks:
        return "unexpected EOF (an {{" + blocks[-1].split()[0] + "}} has no {{end}})"
    return None


def _check_action(body: str, blocks: list[str], declared: set[str]) -> None:
    tokens: list[tuple[str, str]] = []
    pos = 0
    while pos < len(body):
        m = _TOKEN.match(body, pos)
        if m is None:
            raise TemplateError(f"unexpected {body[pos]!r} in command")
        pos = m.end()
        if m.lastgroup:
            tokens.append((m.lastgroup, m.group(m.lastgroup)))
    if not tokens:
        raise TemplateError("missing value for command")
    kind, word = tokens[0]
    if kind == "ident" and word in _KEYWORDS:
        tokens = tokens[1:]
        if word in ("if", "range", "with", "define", "block"):
            blocks.append(word)
        elif word == "end":
            if not blocks:
                raise TemplateError("unexpected {{end}}")
            blocks.pop()
            return
        elif word == "else":
            if not blocks or blocks[-1] not in ("if", "range", "with"):
                raise TemplateError("expected end; found {{else}}" if blocks else "unexpected {{else}}")
            if tokens and tokens[0] == ("ident", "if"):  # Go 1.19's text/template has no `else with`
                tokens = tokens[1:]
            else:
                blocks[-1] += " else"  # a second {{else}} is an error
        elif word in ("break", "continue"):
            if "range" not in blocks:
                raise TemplateError(f"{{{{{word}}}}} outside {{{{range}}}}")
            return
        if not tokens and word not in ("else",):
            raise TemplateError(f"missing value for {word}")
    _check_pipeline(tokens, declared)


def _check_pipeline(tokens: list[tuple[str, str]], declared: set[str]) -> None:
    # Declarations: `$x :=` or `$i, $v :=` at the start of the pipeline.
    for n in (1, 3):
        if len(tokens) > n and tokens[n] in (("op", ":="), ("op", "=")) and all(t[0] == "var" for t in tokens[0:n:2]):
            if tokens[n][1] == ":=":  # Prometheus 2.42 does not check that an assigned (=) variable exists
                declared.update(t[1] for t in tokens[0:n:2])
            tokens = tokens[n + 1 :]
            break
    depth = 0
    expect_value = True  # at the start of a command: `|`, `(` or a value must follow
    for kind, word in tokens:
        if kind == "op" and word == "(":
            depth += 1
            expect_value = True
        elif kind == "op" and word == ")":
            if depth == 0:
                raise TemplateError('unexpected ")" in command')
            if expect_value:
                raise TemplateError("missing value for parenthesized pipeline")
            depth -= 1
        elif kind == "op" and word == "|":
            if expect_value:
                raise TemplateError('unexpected "|" in command')
            expect_value = True
        else:
            expect_value = False
            if kind == "ident" and word not in ("true", "false", "nil") and word not in PROMETHEUS_TEMPLATE_FUNCS:
                raise TemplateError(f'function "{word}" not defined')
            if kind == "var" and word.split(".")[0] not in declared:
                raise TemplateError(f'undefined variable "{word}"')
    if depth:
        raise TemplateError("unclosed left paren")
    if expect_value and tokens:
        raise TemplateError("missing value for command")
