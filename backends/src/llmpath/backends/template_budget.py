"""A render budget for sandboxed Jinja templates: a template cannot hang a render or exhaust memory.

Jinja's :class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` keeps templates away from Python's internals and
from mutating their inputs, but bounds only the length of one ``range()``:
``{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}`` runs for hours,
``{{ 'x' * 10**9 }}`` takes gigabytes and ``{{ 2 ** 1000000000 }}`` minutes of CPU. :class:`BudgetedSandbox` is
that sandbox with a budget for each render (:meth:`BudgetedTemplate.render`, or :func:`render_within` with more):

* :data:`MAX_STEPS` steps (1,000,000). A loop item (filtered out or not), a ``range()`` item (counted when the range
  is made), an operator (``+``, ``*``, ``**``, ``%``) and a filter take one step, a lookup (``a.b``, ``a[b]``)
  :data:`LOOKUP_STEPS` (4) and a call (a method, a macro, a global, a recursive ``loop()``) :data:`CALL_STEPS`
  (20): about what each costs, so that a render that uses up its steps stops within about half a second.
* :data:`MAX_CHARS` characters (32,000,000): the output, and every string, list or captured block the template
  makes on the way (the results of ``+``, ``*``, ``%``, ``~``, of calls and of filters; ``{% set %}`` blocks, a
  macro's output), counted as they are made (a list counts its items).
* An operation whose result would not fit in what is left is refused before it runs: string and list repetition
  and concatenation (``'x' * n``, ``[x] * n``, ``a + b``), ``%`` and ``str.format`` (their widths, precisions and
  fields), the ``str`` methods ``ljust``, ``rjust``, ``center``, ``zfill``, ``expandtabs``, ``replace`` and
  ``join``, the filters ``center``, ``indent``, ``wordwrap``, ``replace``, ``join``, ``format``, ``batch`` and
  ``slice``, and ``lipsum()``; so is a product or power of integers over :data:`MAX_INT_BITS` bits (65,536). (Jinja's
  ``**`` is left-associative: ``9**9**9`` is ``(9**9)**9``, a 257-bit number.)

Going over raises :class:`RenderBudgetExceeded`, whose message names the limit and never the template's data.
Every valid template renders what it rendered before. The defaults are far above what a prompt template needs (a
few thousand steps, about the length of its inputs); a render whose inputs are long (a conversation, retrieved
documents) gets :data:`STEPS_PER_ITEM` more steps per item and :data:`CHARS_PER_CHAR` more characters per character
of them (:meth:`RenderLimits.plus`), so that the budget grows with the request, not with the template.

Not measured: what one step costs beyond its kind (comparing or searching long strings, ``==`` and ``in``, is one
step whatever their length) and the text of containers nested through literals (``[a, a]`` nested thirty deep
prints 2**30 copies of ``a``). Only :meth:`BudgetedTemplate.render` runs within a budget, not ``generate()`` or
``stream()``.
"""

from __future__ import annotations

import functools
import re
import string
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from jinja2 import Template, nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context, LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range

#: Steps a render may take: a loop item, a ``range()`` item, an operator and a filter take one, a lookup
#: :data:`LOOKUP_STEPS` and a call :data:`CALL_STEPS`.
MAX_STEPS = 1_000_000
LOOKUP_STEPS = 4
CALL_STEPS = 20
#: Characters a render may make: its output and the strings, lists and captured blocks it builds.
MAX_CHARS = 32_000_000
#: The largest integer a product or a power may make, in bits (Python prints at most 4,300 digits, about 14,300 bits).
MAX_INT_BITS = 65_536
#: What :meth:`RenderLimits.plus` adds for each item (a message, a document) and each character a render is given.
STEPS_PER_ITEM = 1_000
CHARS_PER_CHAR = 8


class RenderBudgetExceeded(SecurityError):
    """A render went over its budget; the message names the limit (never the template's data)."""


@dataclass(frozen=True, slots=True)
class RenderLimits:
    """How many steps and characters one render may take."""

    steps: int = MAX_STEPS
    chars: int = MAX_CHARS

    def plus(self, *, items: int = 0, chars: int = 0) -> RenderLimits:
        """These limits, grown for a render given ``items`` items (messages, documents) holding ``chars``
        characters."""
        return RenderLimits(self.steps + STEPS_PER_ITEM * items, self.chars + CHARS_PER_CHAR * chars)


DEFAULT_LIMITS = RenderLimits()


class _Budget:
    """What is left of one render's limits."""

    __slots__ = ("chars_left", "limits", "steps_left")

    def __init__(self, limits: RenderLimits) -> None:
        self.limits = limits
        self.steps_left = limits.steps
        self.chars_left = limits.chars

    def step(self, n: int = 1) -> None:
        self.steps_left -= n
        if self.steps_left < 0:
            raise self.no_steps_left()

    def no_steps_left(self) -> RenderBudgetExceeded:
        return RenderBudgetExceeded(
            f"template exceeded its render budget ({self.limits.steps:,} steps: loop iterations, range() items, "
            "lookups, operators, filters and calls)"
        )

    def check(self, size: int) -> None:
        """Refuse to make a value of ``size`` characters (or items) that would not fit."""
        if size > self.chars_left:
            raise _too_many_chars(self.limits.chars)

    def charge(self, value: Any) -> None:
        """Count the characters (or items) of a value the template made."""
        size = _size(value)
        if size:
            self.check(size)
            self.chars_left -= size


def _too_many_chars(limit: int) -> RenderBudgetExceeded:
    return RenderBudgetExceeded(
        f"template exceeded its render budget ({limit:,} characters of output and of the strings and lists it builds)"
    )


#: The budget of the render in progress (None outside :meth:`BudgetedTemplate.render`).
_ACTIVE: ContextVar[_Budget | None] = ContextVar("llmpath_template_budget", default=None)


def _check(size: int | None) -> None:
    """Refuse a value of ``size`` that would not fit in the current render's budget (outside a render, for
    example while Jinja folds constants at compile time: in :data:`MAX_CHARS`)."""
    if size is None:
        return
    budget = _ACTIVE.get()
    if budget is not None:
        budget.check(size)
    elif size > MAX_CHARS:
        raise _too_many_chars(MAX_CHARS)


_SIZED = (str, bytes, list, tuple, dict, set, frozenset)
_SIZED_TYPES = frozenset(_SIZED)
_UNSIZED_TYPES = frozenset({int, float, bool, type(None)})
_TEXT = (str, bytes)
_SEQUENCES = (str, bytes, list, tuple)


def _size(value: Any) -> int:
    """The characters of a string, the items of a container; 0 for anything else."""
    cls = type(value)
    if cls in _SIZED_TYPES:
        return len(value)
    return len(value) if cls not in _UNSIZED_TYPES and isinstance(value, _SIZED) else 0


def _int(value: Any) -> int:
    return value if isinstance(value, int) else 0


def _text_len(value: Any) -> int:
    return len(value) if isinstance(value, _TEXT) else 0


def _int_bits(value: int) -> int:
    return 0 if -1 <= value <= 1 else value.bit_length()


def render_within(template: Template, limits: RenderLimits, /, **variables: Any) -> str:
    """``template`` (of a :class:`BudgetedSandbox`) rendered within ``limits``."""
    if not isinstance(template.environment, BudgetedSandbox):
        raise TypeError("render_within needs a template of a BudgetedSandbox")
    token = _ACTIVE.set(_Budget(limits))
    try:
        return template.render(**variables)
    finally:
        _ACTIVE.reset(token)


class BudgetedTemplate(Template):
    """A template whose :meth:`render` runs within :data:`DEFAULT_LIMITS` (or the render in progress)."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        if _ACTIVE.get() is not None:
            return super().render(*args, **kwargs)
        return render_within(self, DEFAULT_LIMITS, **dict(*args, **kwargs))


class _BudgetedCodeGenerator(CodeGenerator):
    """Jinja's code generator, routing each ``for`` loop's items and each ``~`` through the budget (Jinja allows no
    custom node types: the loop's iterable is marked, and wrapped when it is visited)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loop_iterables: set[int] = set()

    def visit(self, node: nodes.Node, *args: Any, **kwargs: Any) -> Any:
        if id(node) not in self._loop_iterables:
            return super().visit(node, *args, **kwargs)
        self.write("environment.counted(")
        super().visit(node, *args, **kwargs)
        self.write(")")
        return None

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        self._loop_iterables.add(id(node.iter))
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.charged(")
        super().visit_Concat(node, frame)
        self.write(")")


class _Counted:
    """An iterable whose items each take a step of ``budget``; sized when the iterable is."""

    __slots__ = ("_budget", "_items")

    def __init__(self, items: Iterable[Any], budget: _Budget) -> None:
        self._items = items
        self._budget = budget

    def __iter__(self) -> Iterator[Any]:
        budget = self._budget
        for item in self._items:
            budget.steps_left -= 1  # budget.step(), inline: the hottest path
            if budget.steps_left < 0:
                raise budget.no_steps_left()
            yield item

    def __len__(self) -> int:
        return len(self._items)  # type: ignore[arg-type]  # a TypeError for an unsized one, as len() gives


class _Filters(dict[str, Callable[..., Any]]):
    """An environment's filters, each one guarded by :func:`_guarded_filter` (also the ones added later)."""

    def __setitem__(self, name: str, func: Callable[..., Any]) -> None:
        super().__setitem__(name, _guarded_filter(name, func))


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox whose templates render within a budget (see the module's documentation)."""

    code_generator_class = _BudgetedCodeGenerator
    template_class = BudgetedTemplate
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        filters, self.filters = self.filters, _Filters()
        for name, func in filters.items():
            self.filters[name] = func
        self.globals["range"] = _budgeted_range
        lipsum = self.globals.get("lipsum")
        if callable(lipsum):
            self.globals["lipsum"] = _guarded(lipsum, _lipsum_size)

    def call(self, context: Context, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.step(CALL_STEPS)
            if type(obj) is LoopContext and args:  # a recursive loop: loop(children)
                args = (_Counted(args[0], budget), *args[1:])
        _check(_method_size(obj, args, kwargs))
        result = super().call(context, obj, *args, **kwargs)
        if budget is not None:
            budget.charge(result)
        return result

    def getattr(self, obj: Any, attribute: str) -> Any:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.steps_left -= LOOKUP_STEPS  # budget.step(), inline: a hot path
            if budget.steps_left < 0:
                raise budget.no_steps_left()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.steps_left -= LOOKUP_STEPS
            if budget.steps_left < 0:
                raise budget.no_steps_left()
        return super().getitem(obj, argument)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _ACTIVE.get()
        if budget is None:
            _check_binop(operator, left, right)
            return self.binop_table[operator](left, right)
        budget.step()
        if operator == "+" and type(left) is str and type(right) is str:  # the common case, kept short
            size = len(left) + len(right)
            if size > budget.chars_left:
                raise _too_many_chars(budget.limits.chars)
            budget.chars_left -= size
            return left + right
        _check_binop(operator, left, right)
        result = self.binop_table[operator](left, right)
        budget.charge(result)
        return result

    def counted(self, items: Iterable[Any]) -> Iterable[Any]:
        """A ``for`` loop's iterable, each item a step of the render's budget."""
        budget = _ACTIVE.get()
        return items if budget is None else _Counted(items, budget)

    def charged(self, value: Any) -> Any:
        """``value`` (a ``~`` concatenation), its characters charged to the render's budget."""
        budget = _ACTIVE.get()
        if budget is not None:
            budget.charge(value)
        return value

    def concat(self, parts: Iterable[str]) -> str:
        """Joins the output and captured blocks (Jinja's ``concat``), refusing them once they would not fit."""
        budget = _ACTIVE.get()
        if budget is None:
            return "".join(parts)
        pieces = []
        total = 0
        for piece in parts:
            total += len(piece)
            if total > budget.chars_left:
                raise _too_many_chars(budget.limits.chars)
            pieces.append(piece)
        budget.chars_left -= total
        return "".join(pieces)


def _budgeted_range(*args: int) -> range:
    """Jinja's ``range`` (at most 100,000 items), each item a step of the render's budget."""
    items = safe_range(*args)
    budget = _ACTIVE.get()
    if budget is not None:
        budget.step(len(items))
    return items


def _check_binop(operator: str, left: Any, right: Any) -> None:
    """Refuse a product or power of integers over :data:`MAX_INT_BITS` bits, and a repetition, concatenation or
    ``%`` formatting that would not fit in the budget, before it runs."""
    if operator in ("*", "**") and type(left) is int and type(right) is int:
        bits = _int_bits(left) + _int_bits(right) if operator == "*" else _int_bits(left) * max(right, 0)
        if bits > MAX_INT_BITS:
            raise RenderBudgetExceeded(f"template exceeded its render budget (a number over {MAX_INT_BITS:,} bits)")
    elif operator == "*":
        if isinstance(right, int) and isinstance(left, _SEQUENCES):
            _check(len(left) * max(right, 0))
        elif isinstance(left, int) and isinstance(right, _SEQUENCES):
            _check(len(right) * max(left, 0))
    elif operator == "+" and isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        _check(len(left) + len(right))
    elif operator == "%" and isinstance(left, _TEXT):
        _check(_estimate(_printf_size, left, right))


#: A ``%`` conversion: its mapping key, width and precision (``*``: taken from the arguments).
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?(.)", re.DOTALL)


def _printf_size(fmt: str | bytes, args: Any) -> int:
    """At most how long ``fmt % args`` is: the format, plus each conversion's width and precision and the longest
    argument."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    values = list(args.values()) if isinstance(args, Mapping) else list(args) if isinstance(args, tuple) else [args]
    widest = max((_int(v) for v in values), default=0)
    longest = max((_text_len(v) for v in values), default=0)
    size = len(text)
    for width, precision, kind in _PRINTF.findall(text):
        if kind != "%":
            size += sum(widest if n == "*" else int(n or 0) for n in (width, precision)) + longest
    return size


def _format_size(fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """At most how long ``fmt.format(*args, **kwargs)`` is (None for a malformed format: ``format`` says why)."""
    values = [*args, *kwargs.values()]
    widest = max((_int(v) for v in values), default=0)
    longest = max((_text_len(v) for v in values), default=0)
    size = len(fmt)
    try:
        for _, field, spec, _ in string.Formatter().parse(fmt):
            if field is not None:
                numbers = [widest] if spec and "{" in spec else [int(n) for n in re.findall(r"\d+", spec or "")]
                size += sum(numbers) + longest
    except ValueError:
        return None
    return size


def _replace_size(s: Any, old: Any, new: Any, count: Any = -1) -> int:
    if type(s) not in (str, bytes) or type(old) is not type(s) or type(new) is not type(s):
        return _text_len(s)
    n = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        n = min(n, count)
    return len(s) + n * max(len(new) - len(old), 0)


def _join_size(sep: Any, items: Any) -> int:
    if not isinstance(items, _SIZED):
        return 0  # an iterator: its result is charged once made
    return _text_len(sep) * max(len(items) - 1, 0) + sum(_text_len(x) for x in items)


def _expandtabs_size(s: str | bytes, tabsize: Any = 8) -> int:
    tabs = s.count("\t") if isinstance(s, str) else s.count(b"\t")
    return len(s) + tabs * _int(tabsize)


def _pad_size(s: Any, width: Any, *_: Any) -> int:
    return max(_text_len(s), _int(width))


#: The ``str`` (and ``bytes``) methods whose result may be far longer than their inputs: ``(s, *args) -> size``.
_METHOD_SIZES: dict[str, Callable[..., int | None]] = {
    "ljust": _pad_size,
    "rjust": _pad_size,
    "center": _pad_size,
    "zfill": _pad_size,
    "expandtabs": _expandtabs_size,
    "replace": _replace_size,
    "join": _join_size,
    "format": lambda s, *args, **kwargs: _format_size(s, args, kwargs),
    "format_map": lambda s, mapping: _format_size(s, (), mapping) if isinstance(mapping, Mapping) else None,
}


def _method_size(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> int | None:
    """At most how long a call of a ``str`` method in :data:`_METHOD_SIZES` makes its result (None for any other
    callable). The sandbox's ``format`` wraps the method (``__wrapped__``)."""
    method = getattr(obj, "__wrapped__", None) if type(obj) is types.FunctionType else obj
    if type(method) is not types.BuiltinMethodType or not isinstance(method.__self__, _TEXT):
        return None
    size = _METHOD_SIZES.get(method.__name__)
    return None if size is None else _estimate(size, method.__self__, *args, **kwargs)


def _estimate(size: Callable[..., int | None], *args: Any, **kwargs: Any) -> int | None:
    """``size(*args, **kwargs)``, or None when the arguments do not fit (the call itself then says why)."""
    try:
        return size(*args, **kwargs)
    except (TypeError, ValueError):
        return None


def _guarded(func: Callable[..., Any], size: Callable[..., int | None]) -> Callable[..., Any]:
    """``func``, refused when ``size`` (called with the same arguments) says its result would not fit."""

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        _check(_estimate(size, *args, **kwargs))
        return func(*args, **kwargs)

    return guarded


def _indent_size(s: Any, width: Any = 4, *_: Any, **__: Any) -> int:
    pad = len(width) if isinstance(width, str) else _int(width)
    return _text_len(s) + (s.count("\n") + 1 if isinstance(s, str) else 1) * pad


def _wordwrap_size(s: Any, width: Any = 79, _break: Any = True, wrapstring: Any = None, *_: Any, **__: Any) -> int:
    text = s if isinstance(s, str) else ""
    lines = len(text) // max(_int(width), 1) + text.count("\n") + 1
    return len(text) + lines * (_text_len(wrapstring) if wrapstring is not None else 1)


def _lipsum_size(n: Any = 5, html: Any = True, min: Any = 20, max: Any = 100) -> int:
    return _int(n) * _int(max) * 16  # words are at most 15 letters and a space


def _fill_size(value: Any, count: Any, fill_with: Any = None) -> int:
    return _size(value) + _int(count)


#: The filters whose result may be far longer than their inputs, with their documented signatures (the value
#: first): ``(value, *args) -> size``.
_FILTER_SIZES: dict[str, Callable[..., int | None]] = {
    "center": _pad_size,
    "indent": _indent_size,
    "wordwrap": _wordwrap_size,
    "replace": _replace_size,
    "join": lambda value, d="", attribute=None: _join_size(d, value),
    "format": lambda value, *args, **kwargs: _printf_size(value, kwargs or args) if isinstance(value, str) else 0,
    "batch": lambda value, linecount, fill_with=None: _fill_size(value, linecount if fill_with is not None else 0),
    "slice": _fill_size,  # it loops over its slices
}


def _guarded_filter(name: str, func: Callable[..., Any]) -> Callable[..., Any]:
    """``func``, the filter ``name``: refused before it runs when :data:`_FILTER_SIZES` says its result would not
    fit, its result charged to the budget. Jinja's marks (``pass_context`` ...) are kept."""
    size = _FILTER_SIZES.get(name)
    skip = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0  # the context Jinja passes first

    @functools.wraps(func)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        budget = _ACTIVE.get()
        if budget is not None:
            budget.step()
        if size is not None:
            _check(_estimate(size, *args[skip:], **kwargs))
        result = func(*args, **kwargs)
        if budget is not None:
            budget.charge(result)
        return result

    return guarded
