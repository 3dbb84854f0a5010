"""Property tests (hypothesis): the usage-ledger line against ``json``'s encoding of ``to_dict()``, the compact
collectors against prometheus-client's ``Histogram`` and ``Counter``."""

from __future__ import annotations

import json
import math
from typing import Any
from unittest.mock import patch

from hypothesis import example, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from llmpath.instrumentation import compact
from llmpath.instrumentation.compact import CompactFamilies
from llmpath.instrumentation.text import encodable
from llmpath.instrumentation.usage import StageTiming, UsageRecord, extra_json, stages_json

#: Any code point, control characters, non-BMP and unpaired surrogates included.
TEXT = st.text(st.characters(codec=None, categories=None), max_size=12)
#: Label text as the API stores it: ``encodable`` replaces unpaired surrogates.
LABEL = TEXT.map(encodable)
#: The ledger's times and durations: finite (the API drops NaN and infinite stage durations), tiny to huge.
SECONDS = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.floats(-1e4, 1e4))
#: The keys ``json`` writes (as strings), and tuples it refuses.
KEY = st.one_of(TEXT, st.integers(), st.floats(), st.booleans(), st.none(), st.tuples(st.integers()))
LEAF = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), TEXT, st.complex_numbers())
EXTRA_VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.tuples(inner, inner),
        st.dictionaries(KEY, inner, max_size=3),
    ),
    max_leaves=8,
)
STAGES = st.lists(st.builds(StageTiming, LABEL, SECONDS, SECONDS, LABEL), max_size=3)


def _reject_constant(name: str) -> None:
    raise AssertionError(f"{name} in a ledger line: not JSON")


def _micro(value: float | None) -> float | None:
    return None if value is None else float(f"{value:.6f}")


def _json_key(key: Any) -> str:
    """A dict key as ``json`` writes it; a key it cannot write as its ``str``."""
    if isinstance(key, str):
        return key
    if key is None or isinstance(key, bool):
        return json.dumps(key)
    if isinstance(key, float) and not math.isfinite(key):
        return {math.inf: "Infinity", -math.inf: "-Infinity"}.get(key, "NaN")
    return repr(key) if isinstance(key, int | float) else str(key)


def _as_json(value: Any) -> Any:
    """What a JSON reader gets back for an ``extra`` value: non-finite numbers are null, tuples lists, keys and
    values JSON cannot hold their ``str``."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_json_key(k): _as_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_as_json(v) for v in value]
    if value is None or isinstance(value, bool | int | str):
        return value
    return str(value)


RECORDS = st.builds(
    UsageRecord,
    request_id=LABEL,
    trace_id=st.none() | LABEL,
    time=SECONDS,
    tenant=st.none() | LABEL,
    route=LABEL,
    model=LABEL,
    input_tokens=st.integers(0, 2**63),
    cached_tokens=st.integers(0, 2**63),
    output_tokens=st.integers(0, 2**63),
    stages=STAGES,
    ttft_s=st.none() | SECONDS,
    duration_s=SECONDS,
    status_code=st.integers(100, 599),
    unattributed_s=st.none() | SECONDS,
    tpot_s=st.none() | SECONDS,
    error=st.none() | LABEL,
    extra=st.dictionaries(st.text(max_size=5), EXTRA_VALUE, max_size=3),
)


#: Found by this test: a ``%`` in a stage's name or source was read as a conversion of the line's template.
PERCENT_STAGES = [StageTiming("%", 0.0, 0.0, "%s"), StageTiming("100%d", 1.0, 2.0, "gateway")]


@settings(max_examples=300, deadline=None)
@given(record=RECORDS)
@example(record=UsageRecord("r", None, 0.0, None, "route", "m", 0, 0, 0, PERCENT_STAGES, None, 0.5, 200))
@example(record=UsageRecord("r", None, 0.0, None, "route", "m", 0, 0, 0, [], None, 0.5, 200, extra={"k": {(0,): 1}}))
def test_usage_line_is_strict_json_of_to_dict(record: UsageRecord) -> None:
    line = record.json_line()
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    parsed = json.loads(line.decode("utf-8", "strict"), parse_constant=_reject_constant)
    assert record.to_json() == line[:-1].decode()
    expected = record.to_dict()
    for name in ("time", "ttft_s", "duration_s", "unattributed_s", "tpot_s"):
        expected[name] = _micro(expected[name])
    expected["stages"] = [
        {**s, "start_s": _micro(s["start_s"]), "duration_s": _micro(s["duration_s"])} for s in expected["stages"]
    ]
    expected["extra"] = _as_json(expected["extra"])
    assert parsed == expected and list(parsed) == list(expected)
    assert json.loads(stages_json(record.stages)) == expected["stages"]
    assert UsageRecord.from_dict(parsed) == UsageRecord.from_dict(expected)
    assert UsageRecord.from_dict(parsed).json_line() == line


@settings(max_examples=300, deadline=None)
@given(extra=st.dictionaries(st.text(max_size=5), EXTRA_VALUE, max_size=3))
@example(extra={"": {(0,): None}})  # found by this test: a tuple key raised TypeError and the record was lost
@example(extra={"\ud800": ["\udfff", float("nan")]})
def test_extra_is_strict_ascii_json(extra: dict[str, Any]) -> None:
    """``annotate_request`` does not clean text: ``extra`` is written as ASCII JSON, so any string (an unpaired
    surrogate too) is encodable."""
    text = extra_json(extra)
    assert text.isascii()
    assert json.loads(text, parse_constant=_reject_constant) == _as_json(extra)


#: Bounds and observations share round values, so that some observations fall on a bound.
ROUND = st.sampled_from([-1.0, 0.0, 0.5, 1.0, 2.5])
BOUNDS = st.lists(st.one_of(ROUND, st.floats(-1e6, 1e6)), min_size=1, max_size=6, unique=True).map(sorted)
LABEL_VALUES = st.text(st.sampled_from('ab"\\\n\u00e9\U0001f600 '), max_size=3)
OBSERVATION = st.tuples(
    st.integers(0, 2),  # which series
    st.one_of(ROUND, st.floats(-1e6, 1e6), st.floats()),
    st.booleans(),  # with an exemplar
)


@settings(max_examples=150, deadline=None)
@given(
    bounds=BOUNDS,
    labels=st.lists(LABEL_VALUES, min_size=3, max_size=3),
    observations=st.lists(OBSERVATION, max_size=12),
    increments=st.lists(st.tuples(st.integers(0, 2), st.floats(0, 1e9)), max_size=6),
)
# Found by this test: with a negative first bound the compact histogram left out _count (Histogram leaves out only
# _sum), and a NaN went to the first bucket (Histogram counts it in no bucket).
@example(bounds=[-1.0], labels=["", "", ""], observations=[(0, 0.0, False)], increments=[])
@example(bounds=[1.0], labels=["", "", ""], observations=[(0, math.nan, True), (0, 0.5, False)], increments=[])
def test_compact_exposition_equals_prometheus_client(
    bounds: list[float],
    labels: list[str],
    observations: list[tuple[int, float, bool]],
    increments: list[tuple[int, float]],
) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    families = CompactFamilies(ours)
    with patch("time.time", return_value=1.0), patch.object(compact, "time", return_value=1.0):
        compact_histogram = families.histogram("x_seconds", "X.", ["route"], bounds)
        compact_counter = families.counter("y_total", "Y.", ["route"])
        histogram = Histogram("x_seconds", "X.", ["route"], buckets=bounds, registry=theirs)
        counter = Counter("y_total", "Y.", ["route"], registry=theirs)
        for i, value, tagged in observations:
            exemplar = {"trace_id": f"{i:032x}"} if tagged else None
            compact_histogram.labels(labels[i]).observe(value, exemplar)
            histogram.labels(labels[i]).observe(value, exemplar)
        for i, amount in increments:
            compact_counter.labels(labels[i]).inc(amount)
            counter.labels(labels[i]).inc(amount)
    assert generate_latest(ours) == generate_latest(theirs)
    assert generate_openmetrics(ours) == generate_openmetrics(theirs)
