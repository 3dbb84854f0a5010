"""Go-compatible formatting: floats (``%g``), Prometheus durations, quoted label values and yaml.v2 key order.

Sloth is written in Go; byte-identical expressions need Go's number and duration spellings, which differ from
Python's (``6`` vs ``6.0``, ``1e+06`` vs ``1000000.0``, ``4w`` for 28 days).
"""

from __future__ import annotations

import functools
import math
import re
from decimal import Decimal

MS_PER = {"y": 365 * 86_400_000, "w": 7 * 86_400_000, "d": 86_400_000, "h": 3_600_000, "m": 60_000, "s": 1000, "ms": 1}
_DURATION_RE = re.compile(
    r"^(?:(\d+)y)?(?:(\d+)w)?(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?(?:(\d+)ms)?$",
)
_DURATION_UNITS = ("y", "w", "d", "h", "m", "s", "ms")
#: Prometheus keeps durations as Go's int64 nanoseconds; longer ones fail to load ("duration out of range").
_MAX_DURATION_MS = (2**63 - 1) // 1_000_000


def _digits(value: float) -> tuple[str, int]:
    """Shortest round-trip decimal digits of ``value`` (no sign) and the decimal point position."""
    _sign, digits, exponent = Decimal(repr(abs(value))).as_tuple()
    text = "".join(map(str, digits)).rstrip("0") or "0"
    point = len(digits) + int(exponent)
    if text == "0":
        point = 1
    return text, point


@functools.lru_cache(maxsize=16384)
def go_float(value: float) -> str:
    """Format like Go's ``%g`` / ``%v`` (shortest digits; exponent form below 1e-4 and from 1e6 up)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    neg = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return neg + "0"
    digits, point = _digits(value)
    exp = point - 1
    if exp < -4 or exp >= 6:
        return neg + _exp_form(digits, exp)
    return neg + _fixed_form(digits, point)


def _exp_form(digits: str, exp: int) -> str:
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    sign = "-" if exp < 0 else "+"
    return f"{mantissa}e{sign}{abs(exp):02d}"


def _fixed_form(digits: str, point: int) -> str:
    if point <= 0:
        return "0." + "0" * (-point) + digits
    if point >= len(digits):
        return digits + "0" * (point - len(digits))
    return digits[:point] + "." + digits[point:]


@functools.lru_cache(maxsize=16384)
def go_float_fixed(value: float) -> str:
    """Format like Go's ``strconv.FormatFloat(v, 'f', -1, 64)`` (shortest digits, never an exponent)."""
    if math.isnan(value) or math.isinf(value):
        return go_float(value)
    neg = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return neg + "0"
    digits, point = _digits(value)
    return neg + _fixed_form(digits, point)


def parse_duration(text: str) -> int:
    """Parse a Prometheus duration (``1h30m``, ``5m``, ``4w``, ``100ms``) to milliseconds; ``ValueError`` if invalid."""
    if not isinstance(text, str) or not text:
        raise ValueError("empty duration string")
    if text == "0":
        return 0
    m = _DURATION_RE.fullmatch(text)
    if m is None or not any(m.groups()):
        raise ValueError(f"not a valid duration string: {text!r} (use Prometheus units, e.g. 30s, 5m, 1h30m, 28d, 4w)")
    total = 0
    for unit, group in zip(_DURATION_UNITS, m.groups(), strict=True):
        if group is not None:
            total += int(group) * MS_PER[unit]
    if total > _MAX_DURATION_MS:
        raise ValueError(f"duration out of range: {text!r} (Prometheus durations end at 292y)")
    return total


@functools.lru_cache(maxsize=16384)
def format_duration(ms: int) -> str:
    """Prometheus' ``model.Duration.String()``: ``30d``, ``4w`` (28d), ``1w`` (7d), ``1h30m``, ``0s``."""
    if ms == 0:
        return "0s"
    out = []
    for unit, exact in (
        ("y", True),
        ("w", True),
        ("d", False),
        ("h", False),
        ("m", False),
        ("s", False),
        ("ms", False),
    ):
        mult = MS_PER[unit]
        if exact and ms % mult:
            continue
        if (count := ms // mult) > 0:
            out.append(f"{count}{unit}")
            ms -= count * mult
    return "".join(out)


def go_duration(ms: int) -> str:
    """Go's ``time.Duration.String()`` for whole milliseconds, e.g. ``168h0m0s`` (used in Sloth's messages)."""
    if ms == 0:
        return "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    secs = f"{seconds}.{millis:03d}".rstrip("0").rstrip(".") if millis else str(seconds)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s" if seconds else f"{millis}ms"


def duration_hours(ms: int) -> float:
    """Go's ``time.Duration.Hours()``: whole hours plus the remainder as a fraction (same float as Go)."""
    ns = ms * 1_000_000
    hour_ns = 3_600_000_000_000
    return float(ns // hour_ns) + float(ns % hour_ns) / (60 * 60 * 1e9)


@functools.lru_cache(maxsize=16384)
def go_quote(value: str) -> str:
    """Go's ``%q`` for a label value: double quotes with Go escapes (valid PromQL string syntax)."""
    out = ['"']
    for ch in value:
        code = ord(ch)
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        elif not ch.isprintable() and code > 0x7F:
            out.append(f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def prom_filter(labels: dict[str, str]) -> str:
    """``model.LabelSet.String()``: ``{a="x", b="y"}`` with keys sorted (Sloth's ``LabelsToPromFilter``)."""
    return "{" + ", ".join(f"{k}={go_quote(labels[k])}" for k in sorted(labels)) + "}"


def _go_key_less(a: str, b: str) -> bool:
    """yaml.v2's ``keyList.Less`` for string keys: letters after non-letters, digit runs compared as numbers."""
    for i in range(min(len(a), len(b))):
        ca, cb = a[i], b[i]
        if ca == cb:
            continue
        al, bl = ca.isalpha(), cb.isalpha()
        if al and bl:
            return ca < cb
        if al or bl:
            return bl
        an = bn = 0
        if ca == "0" or cb == "0":
            j = i - 1
            while j >= 0 and a[j].isdigit():
                if a[j] != "0":
                    an = bn = 1
                    break
                j -= 1
        ai = i
        while ai < len(a) and a[ai].isdigit():
            an = an * 10 + int(a[ai])
            ai += 1
        bi = i
        while bi < len(b) and b[bi].isdigit():
            bn = bn * 10 + int(b[bi])
            bi += 1
        if an != bn:
            return an < bn
        if ai != bi:
            return ai < bi
        return ca < cb
    return len(a) < len(b)


def _go_key_cmp(a: str, b: str) -> int:
    if _go_key_less(a, b):
        return -1
    if _go_key_less(b, a):
        return 1
    return 0


@functools.lru_cache(maxsize=4096)
def _sorted_keys(keys: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(sorted(keys, key=functools.cmp_to_key(_go_key_cmp)))


def go_sorted(mapping: dict[str, str]) -> dict[str, str]:
    """A copy of ``mapping`` with keys in yaml.v2's marshalling order."""
    return {k: mapping[k] for k in _sorted_keys(tuple(sorted(mapping)))}
