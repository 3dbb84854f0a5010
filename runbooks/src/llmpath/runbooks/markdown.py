"""Values from specs and catalogs as literal Markdown text: they must not break a table or turn into markup."""

from __future__ import annotations

import re

#: Characters that Markdown (CommonMark, GitHub tables, GitHub's ``$`` math) may read as syntax.
_SPECIAL = re.compile(r"([\\`*_\[\]<>|~&#$])")


def text(value: object) -> str:
    """``value`` as literal inline Markdown, safe in a table cell: whitespace runs (newlines included) become one
    space and every character Markdown could read as syntax is backslash-escaped (``a|b`` → ``a\\|b``)."""
    return _SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def code(value: str) -> str:
    """``value`` as an inline code span, also when it holds backticks (PromQL raw strings): the fence is one
    backtick longer than the longest run inside, padded with spaces where the value starts or ends with one."""
    runs = [len(run) for run in re.findall(r"`+", value)]
    fence = "`" * (max(runs, default=0) + 1)
    pad = " " if value.startswith("`") or value.endswith("`") else ""
    return f"{fence}{pad}{value}{pad}{fence}"


def number(value: float) -> str:
    """A spec's number as written, without float noise: ``99.99999`` (``%g`` rounds it to ``100``), ``0.1`` for
    ``100 - 99.9``."""
    return f"{value:.10g}"
