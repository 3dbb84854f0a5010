"""Label matchers for test fixtures: evaluate matchers and find label values that satisfy them."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

# The regex parser (Python 3.11+ keeps it in re._parser; sre_parse is a deprecated alias).
from re import _constants as sre_c  # type: ignore[attr-defined]
from re import _parser as sre_parse  # type: ignore[attr-defined]

_CANDIDATES = ("ok", "200", "500", "x", "0", "1", "a", "other", "none", "value")


@dataclass(frozen=True, slots=True)
class Matcher:
    """One label matcher; ``op`` is ``=``, ``!=``, ``=~`` or ``!~`` (regexes are fully anchored, as in PromQL)."""

    name: str
    op: str
    value: str

    def matches(self, labels: dict[str, str]) -> bool:
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        try:
            hit = re.fullmatch(self.value, actual, re.DOTALL) is not None
        except re.error:
            return False
        return hit if self.op == "=~" else not hit


def matches_all(labels: dict[str, str], matchers: Iterable[Matcher]) -> bool:
    return all(m.matches(labels) for m in matchers)


def regex_example(pattern: str) -> str | None:
    """A short string fully matching ``pattern``, or ``None`` when the pattern is beyond this simple generator."""
    try:
        parsed = sre_parse.parse(pattern)
        text = _gen(list(parsed))
    except (re.error, _Unsupported, RecursionError, TypeError, ValueError):
        return None
    return text if re.fullmatch(pattern, text, re.DOTALL) else None


class _Unsupported(Exception):
    pass


def _char_in(items: list) -> str:
    negate = False
    allowed: list[str] = []
    banned: set[str] = set()
    for op, arg in items:
        if op is sre_c.NEGATE:
            negate = True
        elif op is sre_c.LITERAL:
            if negate:
                banned.add(chr(arg))
            else:
                allowed.append(chr(arg))
        elif op is sre_c.RANGE:
            if negate:
                banned.update(chr(c) for c in range(arg[0], arg[1] + 1))
            else:
                allowed.append(chr(arg[0]))
        elif op is sre_c.CATEGORY:
            sample = {"CATEGORY_DIGIT": "0", "CATEGORY_WORD": "a", "CATEGORY_SPACE": " "}.get(str(arg).split(".")[-1])
            if sample is None:
                raise _Unsupported
            if negate:
                banned.add(sample)
            else:
                allowed.append(sample)
        else:
            raise _Unsupported
    if negate:
        for ch in "axz0_-":
            if ch not in banned:
                return ch
        raise _Unsupported
    if not allowed:
        raise _Unsupported
    return allowed[0]


def _gen(items: list) -> str:
    out = []
    for op, arg in items:
        if op is sre_c.LITERAL:
            out.append(chr(arg))
        elif op is sre_c.NOT_LITERAL:
            out.append("a" if chr(arg) != "a" else "b")
        elif op is sre_c.ANY:
            out.append("0")
        elif op is sre_c.IN:
            out.append(_char_in(list(arg)))
        elif op is sre_c.BRANCH:
            out.append(_gen(list(arg[1][0])))
        elif op is sre_c.SUBPATTERN:
            out.append(_gen(list(arg[-1])))
        elif op in (sre_c.MAX_REPEAT, sre_c.MIN_REPEAT):
            low, _high, item = arg
            out.append(_gen(list(item)) * low)
        elif op is sre_c.AT:
            continue
        else:
            raise _Unsupported
    return "".join(out)


def _candidates_for(name: str, matchers: list[Matcher]) -> list[str]:
    out: list[str] = []
    for m in matchers:
        if m.name != name:
            continue
        if m.op == "=":
            out.append(m.value)
        elif m.op == "=~" and (example := regex_example(m.value)) is not None:
            out.append(example)
    return [*out, *_CANDIDATES, ""]


def satisfy(
    must: list[Matcher], must_not: Matcher | None = None, base: dict[str, str] | None = None
) -> dict[str, str] | None:
    """Labels matching every matcher in ``must`` and failing ``must_not`` (``None`` if none found).

    ``base`` labels are kept unless a matcher needs another value for them.
    """
    labels = dict(base or {})
    constraints = [*must, *([_negate(must_not)] if must_not else [])]
    for name in dict.fromkeys(m.name for m in constraints):
        own = [m for m in constraints if m.name == name]
        if all(m.matches(labels) for m in own):
            continue
        for value in _candidates_for(name, own):
            trial = {**labels, name: value} if value else {k: v for k, v in labels.items() if k != name}
            if all(m.matches(trial) for m in own):
                labels = trial
                break
        else:
            return None
    if not matches_all(labels, must) or (must_not is not None and must_not.matches(labels)):
        return None
    return labels


def _negate(m: Matcher) -> Matcher:
    return Matcher(m.name, {"=": "!=", "!=": "=", "=~": "!~", "!~": "=~"}[m.op], m.value)
