"""Property tests (hypothesis): a latency SLI's ``le`` regex matches every spelling clients write for its bound,
and no spelling of any other bound."""

from __future__ import annotations

import re

from hypothesis import assume, given, settings
from hypothesis import strategies as st
from prometheus_client.utils import floatToGoString

from llmpath.slo.gofmt import go_float, go_float_fixed
from llmpath.slo.rules import le_regex

#: Bucket bounds (seconds) from 1e-9 to 1e15, and round ones that collide with spellings of others.
BOUNDS = st.one_of(
    st.floats(1e-9, 1e15),
    st.sampled_from([0.0, 1e-05, 5e-05, 0.0001, 0.5, 1.0, 2.5, 10.0, 100.0, 1e5, 1e6, 1.5e6]),
    st.integers(0, 10**6).map(float),
)


def spellings(bound: float) -> set[str]:
    """``le`` as prometheus-client (Python), client_golang (``%g``-like) and Prometheus 3 / OpenMetrics write it."""
    go = go_float(bound)
    return {floatToGoString(bound), go, go if "." in go or "e" in go else f"{go}.0"}


def extensions(bound: float) -> list[float]:
    """Bounds whose decimal spelling starts with ``bound``'s (``0.5`` → ``0.51``, ``1`` → ``10``, ``1.5``)."""
    fixed = go_float_fixed(bound)
    return [float(fixed + tail) for tail in (["1", "05"] if "." in fixed else ["0", "1", ".5"])]


@settings(max_examples=500, deadline=None)
@given(bound=BOUNDS, data=st.data())
def test_le_regex_matches_the_bound_and_nothing_else(bound: float, data: st.DataObject) -> None:
    other = data.draw(st.one_of(BOUNDS, st.sampled_from(extensions(bound))))
    pattern = re.compile(le_regex(bound))  # PromQL anchors =~ at both ends: fullmatch
    for text in spellings(bound):
        assert pattern.fullmatch(text), (bound, text)
    assume(other != bound)
    for text in spellings(other):
        assert not pattern.fullmatch(text), (bound, other, text)
