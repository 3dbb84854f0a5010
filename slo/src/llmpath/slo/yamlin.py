"""Reading spec files: Sloth's multi-document split, YAML with line numbers, Go-style scalar strings."""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import yaml

from llmpath.slo.gofmt import go_float

_BaseLoader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class LineDict(dict):
    """A mapping loaded from YAML that remembers where each key was (1-based line and column)."""

    __slots__ = ("key_pos", "pos")

    def __init__(self) -> None:
        super().__init__()
        self.key_pos: dict[Any, tuple[int, int]] = {}
        self.pos: tuple[int, int] | None = None


class LineList(list):
    """A sequence loaded from YAML that remembers where each item starts."""

    __slots__ = ("item_pos", "pos")

    def __init__(self) -> None:
        super().__init__()
        self.item_pos: list[tuple[int, int]] = []
        self.pos: tuple[int, int] | None = None


@dataclass(frozen=True, slots=True)
class DuplicateKey:
    """A key given twice in one mapping: where it is again, where it was first, and the mapping's path."""

    key: str
    line: int
    column: int
    first_line: int
    path: tuple[object, ...]


class _Loader(_BaseLoader):
    line_offset = 0
    #: (key, (line, column), first (line, column), the mapping it is in), resolved to paths after loading.
    duplicates: list[tuple[str, tuple[int, int], tuple[int, int], LineDict]]


def _pos(loader: _Loader, node: yaml.Node) -> tuple[int, int]:
    return node.start_mark.line + 1 + loader.line_offset, node.start_mark.column + 1


def _construct_mapping(loader: _Loader, node: yaml.MappingNode) -> LineDict:
    loader.flatten_mapping(node)
    out = LineDict()
    out.pos = _pos(loader, node)
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        if not isinstance(key, str):
            key = str(key) if not isinstance(key, bool) else str(key).lower()
        if key in out:
            loader.duplicates.append((key, _pos(loader, key_node), out.key_pos[key], out))
        out[key] = loader.construct_object(value_node, deep=True)
        out.key_pos[key] = _pos(loader, key_node)
    return out


def _construct_sequence(loader: _Loader, node: yaml.SequenceNode) -> LineList:
    out = LineList()
    out.pos = _pos(loader, node)
    for item in node.value:
        out.append(loader.construct_object(item, deep=True))
        out.item_pos.append(_pos(loader, item))
    return out


def _construct_timestamp_as_text(loader: _Loader, node: yaml.ScalarNode) -> str:
    return loader.construct_scalar(node)


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_mapping)
_Loader.add_constructor("tag:yaml.org,2002:seq", _construct_sequence)
_Loader.add_constructor("tag:yaml.org,2002:timestamp", _construct_timestamp_as_text)


class YAMLSyntaxError(ValueError):
    """A YAML syntax error with its 1-based line and column."""

    def __init__(self, message: str, line: int | None, column: int | None) -> None:
        super().__init__(message)
        self.line = line
        self.column = column


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One YAML document of a spec file, as split by Sloth (comment lines removed, split on ``^---``)."""

    text: str
    index: int
    first_line: int  # 1-based line of the document's first line in the file


_SEPARATOR = re.compile(r"^---")
_COMMENT_LINE = re.compile(r"^#.*$")


def split_documents(text: str) -> list[RawDocument]:
    """Sloth's ``SplitYAML``: drop whole-line comments, split on lines starting with ``---``, skip empty parts."""
    docs: list[RawDocument] = []
    current: list[str] = []
    start = 1
    for lineno, line in enumerate(text.splitlines(), start=1):
        if _COMMENT_LINE.match(line):
            line = ""
        if _SEPARATOR.match(line):
            _flush(docs, current, start)
            current = [line[3:]]
            start = lineno
            continue
        current.append(line)
    _flush(docs, current, start)
    return docs


def _flush(docs: list[RawDocument], lines: list[str], start: int) -> None:
    body = "\n".join(lines)
    if body.strip():
        docs.append(RawDocument(body + "\n", len(docs), start))


def load_yaml(doc: RawDocument) -> tuple[Any, list[DuplicateKey]]:
    """Parse one document into :class:`LineDict`/:class:`LineList` trees; returns (data, duplicate keys)."""
    loader = _Loader(doc.text)
    loader.line_offset = doc.first_line - 1
    loader.duplicates = []
    try:
        data = loader.get_single_data()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + doc.first_line if mark else None
        column = mark.column + 1 if mark else None
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.context_mark and exc.problem:
            started = exc.context_mark
            problem += (
                f" ({exc.context} that starts at line {started.line + doc.first_line}, column {started.column + 1})"
            )
        raise YAMLSyntaxError(f"YAML syntax error: {problem}", line, column) from None
    except yaml.YAMLError as exc:
        raise YAMLSyntaxError(f"YAML error: {exc}", None, None) from None
    finally:
        loader.dispose()
    paths = _mapping_paths(data)
    duplicates = [
        DuplicateKey(key, line, column, first[0], (*paths.get(id(mapping), ()), key))
        for key, (line, column), first, mapping in loader.duplicates
    ]
    return data, duplicates


def _mapping_paths(node: object, path: tuple[object, ...] = ()) -> dict[int, tuple[object, ...]]:
    """The path of every mapping in a loaded document, by ``id``."""
    out: dict[int, tuple[object, ...]] = {}
    if isinstance(node, dict):
        out[id(node)] = path
        for key, value in node.items():
            out.update(_mapping_paths(value, (*path, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.update(_mapping_paths(value, (*path, i)))
    return out


def go_string(value: object) -> str | None:
    """A YAML scalar as the string Sloth's Go decoder gives a ``string`` field (``true``, ``90``, ``0.2``).

    Returns ``None`` for mappings and sequences (not scalars).
    """
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _float32_text(value)
    if isinstance(value, (dt.date, dt.datetime)):
        return value.isoformat()
    return None


def _float32_text(value: float) -> str:
    """``strconv.FormatFloat(v, 'g', -1, 32)`` as used by sigs.k8s.io/yaml for floats in string fields."""
    if value != value or value in (float("inf"), float("-inf")):
        return go_float(value)
    f32 = struct.unpack("f", struct.pack("f", value))[0]
    for precision in range(1, 10):
        text = f"{f32:.{precision}g}"
        if struct.unpack("f", struct.pack("f", float(text)))[0] == f32:
            return go_float(float(text))
    return go_float(f32)


def position(node: object, path: tuple[object, ...]) -> tuple[int, int] | None:
    """Line and column of ``path`` (keys and list indexes) inside a loaded document, as deep as it exists."""
    best = getattr(node, "pos", None)
    for step in path:
        if isinstance(node, LineDict) and step in node:
            best = node.key_pos.get(step, best)
            node = node[step]
        elif isinstance(node, LineList) and isinstance(step, int) and 0 <= step < len(node):
            best = node.item_pos[step]
            node = node[step]
        else:
            break
    return best


def exists(node: object, path: tuple[object, ...]) -> bool:
    """Whether every step of ``path`` exists in a loaded document."""
    for step in path:
        in_dict = isinstance(node, dict) and step in node
        in_list = isinstance(node, list) and isinstance(step, int) and 0 <= step < len(node)
        if not (in_dict or in_list):
            return False
        node = node[step]  # type: ignore[index]
    return True


def iter_spec_files(path: Any) -> Iterator[Any]:
    """YAML files under a folder, sorted, skipping hidden entries."""
    for child in sorted(path.rglob("*")):
        rel = child.relative_to(path)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if child.is_file() and child.suffix in (".yaml", ".yml"):
            yield child
