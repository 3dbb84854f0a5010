"""A YAML emitter that writes rule files the way Sloth's Go yaml.v2 does.

It covers what rule files need (block mappings, sequences, string scalars) and follows libyaml's emitter:
scalar style selection (plain, single-quoted, double-quoted, literal), yaml.v2's quoting of strings that would
resolve to another type (``"99.9"``, ``"true"``), folding of long plain and quoted scalars past column 80, and
block-scalar indentation and chomping hints. Map key order is the caller's (see :func:`gofmt.go_sorted`).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping, Sequence

import yaml

BEST_WIDTH = 80
_STR_TAG = "tag:yaml.org,2002:str"
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
_ODD_BREAK = re.compile("[\r\x85\u2028\u2029]")


_PYYAML = yaml.resolver.Resolver()


def _resolves_to_non_string(s: str) -> bool:
    """Whether a plain scalar would load as something other than this string: yaml.v2's rules, plus YAML 1.1
    forms PyYAML resolves (such as ``0b_``) so the files read back the same in Python tools too."""
    if s == "" or s in _NON_STR_WORDS:
        return True
    if s[0] in "+-0123456789.<=~yYnNtTfFoO" and _PYYAML.resolve(yaml.ScalarNode, s, (True, False)) != _STR_TAG:
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


_ASCII_TEXT = re.compile(r"[\x20-\x7e\n]*")
_COLON_INDICATOR = re.compile(r":(?=[ \t\n]|\Z)")


@functools.lru_cache(maxsize=65536)
def _analyze(value: str) -> tuple[bool, bool, bool, bool]:
    """libyaml's ``analyze_scalar`` for block context: (multiline, plain allowed, single-quoted allowed, literal
    allowed). Printable ASCII takes a regex fast path; other text the character loop."""
    if value == "":
        return False, True, True, False
    if _ASCII_TEXT.fullmatch(value):
        first = value[0]
        followed_ws = len(value) == 1 or value[1] in " \t\n"
        block_ind = (
            value.startswith(("---", "..."))
            or first in _FLOW_FIRST
            or (first in "?:-" and followed_ws)
            or _COLON_INDICATOR.search(value, 1) is not None
            or " #" in value
            or "\n#" in value
        )
        line_breaks = "\n" in value
        leading = first in " \n"
        trailing_space = value[-1] == " "
        trailing = trailing_space or value[-1] == "\n"
        break_space = "\n " in value
        space_break = " \n" in value
        block_plain = not (leading or trailing or break_space or space_break or line_breaks or block_ind)
        single = not (break_space or space_break)
        block = not (trailing_space or space_break)
        return line_breaks, block_plain, single, block
    return _analyze_chars(value)


def _analyze_chars(value: str) -> tuple[bool, bool, bool, bool]:
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
    block_plain = not (
        leading_space
        or leading_break
        or trailing_space
        or trailing_break
        or break_space
        or space_break
        or tabs
        or special
        or line_breaks
        or block_ind
    )
    single = not (break_space or space_break or tabs or special)
    block = not (trailing_space or space_break or special)
    return line_breaks, block_plain, single, block


def _plain(value: str, column: int, indent: int, allow_breaks: bool) -> str:
    """A plain scalar starting at ``column``, folded at spaces past column 80 (libyaml's write_plain)."""
    if not allow_breaks or column + len(value) <= BEST_WIDTH + 1 or " " not in value:
        return value
    out: list[str] = []
    start = 0
    spaces = False
    col = column
    n = len(value)
    for i, ch in enumerate(value):
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
    out.append(value[start:])
    return "".join(out)


def _single(value: str, column: int, indent: int, allow_breaks: bool) -> str:
    out = ["'"]
    col = column + 1
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
    return "".join(out)


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


def _double(value: str, column: int, indent: int, allow_breaks: bool) -> str:
    out = ['"']
    col = column + 1
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
    return "".join(out)


def _literal(value: str, indent: int) -> str:
    """A literal block scalar: header with indentation/chomping hints, then the lines at ``indent``."""
    header = "|"
    if value[0] in " \n":
        header += str(INDENT)
    if value[-1] != "\n":
        header += "-"
    elif len(value) == 1 or value[-2] == "\n":
        header += "+"
    pad = " " * indent
    return header + "\n" + "\n".join((pad + line) if line else "" for line in value.split("\n"))


@functools.lru_cache(maxsize=65536)
def _style(value: str, key: bool) -> str:
    """yaml.v2's style for a Go string: requested style (literal if multiline, double if it would resolve to
    another type, else plain), then libyaml's fallbacks when the analysis forbids it."""
    if not key and _SIMPLE_PLAIN.fullmatch(value) and not _resolves_to_non_string(value):
        return "plain"
    has_odd_break = _ODD_BREAK.search(value) is not None
    if "\n" in value and not key and not has_odd_break:
        style = "literal"
    elif _resolves_to_non_string(value):
        style = "double"
    else:
        style = "plain"
    multiline, block_plain, single_allowed, block_allowed = _analyze(value)
    if key and multiline:
        style = "double"
    if style == "plain" and (not block_plain or (value == "" and key)):
        style = "single"
    if style == "single" and not single_allowed:
        style = "double"
    if style == "literal" and (not block_allowed or key):
        style = "double"
    if has_odd_break:
        style = "double"
    return style


@functools.lru_cache(maxsize=131072)
def _scalar(value: str, column: int, indent: int, key: bool = False) -> str:
    """A string scalar written as yaml.v2 would at ``column`` (``indent``: continuation/block indent). The text
    never ends with a line break: the caller ends lines."""
    style = _style(value, key)
    if style == "plain":
        return _plain(value, column, indent, not key)
    if style == "single":
        return _single(value, column, indent, not key)
    if style == "double":
        return _double(value, column, indent, not key)
    text = _literal(value, indent)
    return text[:-1] if text.endswith("\n") else text


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    raise TypeError(f"the rule-file emitter writes strings only, got {type(value).__name__}: {value!r}")


def _mapping_lines(out: list[str], mapping: Mapping[str, object], indent: int, lead: str | None = None) -> None:
    """Block mapping entries at ``indent``; ``lead`` replaces the first entry's indentation (``"- "`` items)."""
    pad = " " * indent
    for key, value in mapping.items():
        start = lead if lead is not None else pad
        lead = None
        head = start + _scalar(key if type(key) is str else _text(key), len(start), indent, True) + ":"
        if type(value) is str:
            out.append(head + " " + _scalar(value, len(head) + 1, indent + INDENT))
        elif isinstance(value, Mapping):
            if value:
                out.append(head)
                items = tuple(value.items())
                if all(type(k) is str and type(v) is str for k, v in items):
                    out.extend(_flat_mapping_lines(items, indent + INDENT))  # labels/annotations repeat a lot
                else:
                    _mapping_lines(out, value, indent + INDENT)
            else:
                out.append(head + " {}")
        elif isinstance(value, Sequence) and not isinstance(value, str):
            if value:
                out.append(head)
                _sequence_lines(out, value, indent)  # yaml.v2: sequences in mappings are not indented
            else:
                out.append(head + " []")
        else:
            out.append(head + " " + _scalar(_text(value), len(head) + 1, indent + INDENT))


@functools.lru_cache(maxsize=16384)
def _flat_mapping_lines(items: tuple[tuple[str, str], ...], indent: int) -> tuple[str, ...]:
    out: list[str] = []
    _mapping_lines(out, dict(items), indent)
    return tuple(out)


def _sequence_lines(out: list[str], items: Sequence[object], indent: int) -> None:
    lead = " " * indent + "- "
    for item in items:
        if isinstance(item, Mapping) and item:
            _mapping_lines(out, item, indent + INDENT, lead)
        else:
            out.append(lead + _scalar(_text(item), len(lead), indent + INDENT))


def dump(document: Mapping[str, object]) -> str:
    """Serialise a document (nested dicts/lists of strings) as yaml.v2 would, ending with a newline."""
    out: list[str] = []
    _mapping_lines(out, document, 0)
    return "\n".join(out) + "\n"
