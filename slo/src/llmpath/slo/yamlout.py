"""A YAML emitter that writes rule files the way Sloth's Go yaml.v2 does.

It covers what rule files need (block mappings, sequences, string scalars) and follows libyaml's emitter:
scalar style selection (plain, single-quoted, double-quoted, literal), yaml.v2's quoting of strings that would
resolve to another type (``"99.9"``, ``"true"``), folding of long plain and quoted scalars past column 80, and
block-scalar indentation and chomping hints. Map key order is the caller's (see :func:`gofmt.go_sorted`).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

BEST_WIDTH = 80
INDENT = 2

# yaml.v2 resolve(): strings that would load back as another type must be quoted.
_NON_STR_WORDS = frozenset(
    (
        *("y", "Y", "yes", "Yes", "YES", "n", "N", "no", "No", "NO", "on", "On", "ON", "off", "Off", "OFF"),
        *("true", "True", "TRUE", "false", "False", "FALSE", "null", "Null", "NULL", "~", "<<"),
        "=",  # not special to yaml.v2, but PyYAML reads a bare "=" as the YAML 1.1 value tag: quote it
        *(".inf", ".Inf", ".INF", "+.inf", "+.Inf", "+.INF", "-.inf", "-.Inf", "-.INF", ".nan", ".NaN", ".NAN"),
    )
)
_FLOAT_RE = re.compile(r"^[-+]?(\.[0-9]+|[0-9]+(\.[0-9]*)?)([eE][-+]?[0-9]+)?$")
_INT_RE = re.compile(r"^[-+]?(0[xX][0-9a-fA-F]+|0[oO]?[0-7]+|0[bB][01]+|[0-9]+)$")
_BASE60_RE = re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$")
_TIMESTAMP_RE = re.compile(r"^\d{4}-\d\d?-\d\d?([Tt ]|$)")
_FLOW_FIRST = frozenset("#,[]{}&*!|>'\"%@`")
_SIMPLE_PLAIN = re.compile(r"^[A-Za-z0-9_/.()=+][A-Za-z0-9_/.()=+\-]*$")
_ODD_BREAKS = ("\r", "\x85", "\u2028", "\u2029")


def _resolves_to_non_string(s: str) -> bool:
    if s == "" or s in _NON_STR_WORDS:
        return True
    first = s[0]
    if first in "+-0123456789.":
        plain = s.replace("_", "")
        if _INT_RE.fullmatch(plain) or _FLOAT_RE.fullmatch(plain) or _BASE60_RE.fullmatch(s):
            return True
        if _TIMESTAMP_RE.match(s):
            return True
    return False


def _printable(ch: str) -> bool:
    code = ord(ch)
    return (
        code == 0x0A
        or 0x20 <= code <= 0x7E
        or code == 0x85
        or 0xA0 <= code <= 0xD7FF
        or 0xE000 <= code <= 0xFFFD
        or 0x10000 <= code <= 0x10FFFF
    ) and code != 0xFEFF


class _Analysis:
    __slots__ = ("block_allowed", "block_plain", "multiline", "single_allowed")

    def __init__(self, value: str) -> None:
        if value == "":
            self.multiline = False
            self.block_plain = True
            self.single_allowed = True
            self.block_allowed = False
            return
        block_ind = line_breaks = special = tabs = False
        leading_space = leading_break = trailing_space = trailing_break = False
        break_space = space_break = False
        prev_space = prev_break = False
        if value.startswith(("---", "...")):
            block_ind = True
        preceded_ws = True
        n = len(value)
        for i, ch in enumerate(value):
            followed_ws = i + 1 >= n or value[i + 1] in " \t\n"
            # Block-context indicators only: rule files never use flow style.
            if i == 0:
                if ch in _FLOW_FIRST or (ch in "?:-" and followed_ws):
                    block_ind = True
            elif (ch == ":" and followed_ws) or (ch == "#" and preceded_ws):
                block_ind = True
            if ch == "\t":
                tabs = True
            elif not _printable(ch):
                special = True
            if ch == " ":
                if i == 0:
                    leading_space = True
                if i == n - 1:
                    trailing_space = True
                if prev_break:
                    break_space = True
                prev_space, prev_break = True, False
            elif ch == "\n":
                line_breaks = True
                if i == 0:
                    leading_break = True
                if i == n - 1:
                    trailing_break = True
                if prev_space:
                    space_break = True
                prev_space, prev_break = False, True
            else:
                prev_space = prev_break = False
            preceded_ws = ch in " \t\n"
        self.multiline = line_breaks
        block_plain = single = block = True
        if leading_space or leading_break or trailing_space or trailing_break:
            block_plain = False
        if trailing_space:
            block = False
        if break_space:
            block_plain = single = False
        if space_break or tabs or special:
            block_plain = single = False
        if space_break or special:
            block = False
        if line_breaks:
            block_plain = False
        if block_ind:
            block_plain = False
        self.block_plain = block_plain
        self.single_allowed = single
        self.block_allowed = block


class _Writer:
    """Accumulates output and tracks the column like libyaml's emitter."""

    __slots__ = ("column", "parts")

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.column = 0

    def write(self, text: str) -> None:
        self.parts.append(text)
        nl = text.rfind("\n")
        self.column = len(text) - nl - 1 if nl >= 0 else self.column + len(text)

    def newline(self, indent: int) -> None:
        # libyaml's write_indent: no extra break when a block scalar already ended the line.
        at_line_start = bool(self.parts) and self.parts[-1].endswith("\n")
        self.parts.append(("" if at_line_start else "\n") + " " * indent)
        self.column = indent


def _write_plain(w: _Writer, value: str, indent: int, allow_breaks: bool) -> None:
    if not allow_breaks or w.column + len(value) <= BEST_WIDTH + 1 or " " not in value:
        w.write(value)
        return
    start = 0
    spaces = False
    i = 0
    n = len(value)
    col = w.column
    out: list[str] = []
    while i < n:
        ch = value[i]
        if ch == " ":
            if not spaces and col > BEST_WIDTH and (i + 1 >= n or value[i + 1] != " "):
                out.append(value[start:i])
                out.append("\n" + " " * indent)
                col = indent
                start = i + 1
            else:
                col += 1
            spaces = True
        else:
            col += 1
            spaces = False
        i += 1
    out.append(value[start:])
    w.write("".join(out))


def _write_single(w: _Writer, value: str, indent: int, allow_breaks: bool) -> None:
    out = ["'"]
    col = w.column + 1
    spaces = False
    n = len(value)
    for i, ch in enumerate(value):
        if ch == " ":
            if allow_breaks and not spaces and col > BEST_WIDTH and 0 < i < n - 1 and value[i + 1] != " ":
                out.append("\n" + " " * indent)
                col = indent
            else:
                out.append(" ")
                col += 1
            spaces = True
        else:
            if ch == "'":
                out.append("'")
                col += 1
            out.append(ch)
            col += 1
            spaces = False
    out.append("'")
    w.write("".join(out))


_ESCAPES = {
    "\x00": "0",
    "\x07": "a",
    "\x08": "b",
    "\t": "t",
    "\n": "n",
    "\x0b": "v",
    "\x0c": "f",
    "\r": "r",
    "\x1b": "e",
    '"': '"',
    "\\": "\\",
    "\x85": "N",
    "\xa0": "_",
    "\u2028": "L",
    "\u2029": "P",
}


def _write_double(w: _Writer, value: str, indent: int, allow_breaks: bool) -> None:
    out = ['"']
    col = w.column + 1
    spaces = False
    n = len(value)
    for i, ch in enumerate(value):
        if not _printable(ch) or ch == "\ufeff" or ch in '\n\r\x85\u2028\u2029"\\':
            esc = _ESCAPES.get(ch)
            if esc is None:
                code = ord(ch)
                esc = f"x{code:02X}" if code <= 0xFF else (f"u{code:04X}" if code <= 0xFFFF else f"U{code:08X}")
            out.append("\\" + esc)
            col += 1 + len(esc)
            spaces = False
        elif ch == " ":
            if allow_breaks and not spaces and col > BEST_WIDTH and 0 < i < n - 1:
                out.append("\n" + " " * indent)
                col = indent
                if value[i + 1] == " ":
                    out.append("\\")
                    col += 1
            else:
                out.append(" ")
                col += 1
            spaces = True
        else:
            out.append(ch)
            col += 1
            spaces = False
    out.append('"')
    w.write("".join(out))


def _write_literal(w: _Writer, value: str, indent: int) -> None:
    header = "|"
    if value[0] in " \n":
        header += str(INDENT)
    if value[-1] != "\n":
        header += "-"
    elif len(value) == 1 or value[-2] == "\n":
        header += "+"
    pad = " " * indent
    body = "\n".join((pad + line) if line else "" for line in value.split("\n"))
    w.write(header + "\n" + body)


def _write_scalar(w: _Writer, value: str, indent: int, *, key: bool = False) -> None:
    """Write a string scalar the way yaml.v2 marshals a Go string (``indent``: continuation indent)."""
    if not key and _SIMPLE_PLAIN.fullmatch(value) and not _resolves_to_non_string(value):
        _write_plain(w, value, indent, True)
        return
    has_odd_break = any(b in value for b in _ODD_BREAKS)
    if "\n" in value and not key and not has_odd_break:
        style = "literal"
    elif _resolves_to_non_string(value):
        style = "double"
    else:
        style = "plain"
    a = _Analysis(value)
    if key and a.multiline:
        style = "double"
    if style == "plain" and (not a.block_plain or (value == "" and key)):
        style = "single"
    if style == "single" and not a.single_allowed:
        style = "double"
    if style == "literal" and (not a.block_allowed or key):
        style = "double"
    if has_odd_break and style != "double":
        style = "double"
    if style == "plain":
        _write_plain(w, value, indent, not key)
    elif style == "single":
        _write_single(w, value, indent, not key)
    elif style == "double":
        _write_double(w, value, indent, not key)
    else:
        _write_literal(w, value, indent)


def _emit_value(w: _Writer, value: object, indent: int) -> None:
    """Write ``value`` after a ``key:`` at mapping indent ``indent``."""
    if isinstance(value, Mapping):
        if not value:
            w.write(" {}")
            return
        _emit_mapping(w, value, indent + INDENT, inline_first=False)
    elif isinstance(value, Sequence) and not isinstance(value, str):
        if not value:
            w.write(" []")
            return
        _emit_sequence(w, value, indent)
    else:
        w.write(" ")
        _write_scalar(w, _scalar_text(value), indent + INDENT)


def _scalar_text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"the rule-file emitter writes strings only, got {type(value).__name__}: {value!r}")


def _emit_mapping(w: _Writer, mapping: Mapping[str, object], indent: int, *, inline_first: bool) -> None:
    first = True
    for key, value in mapping.items():
        if not (first and inline_first):
            w.newline(indent)
        first = False
        _write_scalar(w, key, indent, key=True)
        w.write(":")
        _emit_value(w, value, indent)


def _emit_sequence(w: _Writer, items: Sequence[object], indent: int) -> None:
    # yaml.v2 writes block sequences inside mappings without extra indentation ("key:\n- item").
    for item in items:
        w.newline(indent)
        w.write("-")
        if isinstance(item, Mapping) and item:
            w.write(" ")
            _emit_mapping(w, item, indent + INDENT, inline_first=True)
        else:
            w.write(" ")
            _write_scalar(w, _scalar_text(item), indent + INDENT)


def dump(document: Mapping[str, object]) -> str:
    """Serialise a document (nested dicts/lists of strings) as yaml.v2 would, ending with a newline."""
    w = _Writer()
    _emit_mapping(w, document, 0, inline_first=True)
    if not w.parts[-1].endswith("\n"):  # a block scalar may already have ended the line
        w.write("\n")
    return "".join(w.parts)
