"""The compact collectors expose exactly what prometheus-client's Histogram and Counter expose."""

from __future__ import annotations

import re
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from llmpath.instrumentation import LATENCY_BUCKETS
from llmpath.instrumentation.compact import CompactFamilies

CREATED = re.compile(rb"(_created\{[^}]*\}) [0-9.e+]+")
EXEMPLAR_TS = re.compile(rb"(# \{[^}]*\} [0-9.e+-]+) [0-9.]+")


def _normalise(text: bytes) -> bytes:
    """Creation and exemplar timestamps differ between the two registries; everything else must not."""
    return EXEMPLAR_TS.sub(rb"\1 TS", CREATED.sub(rb"\1 TS", text))


def _observe(histogram, counter, *, compact: bool) -> None:
    values = [0.0, 0.0004, 0.005, 0.0051, 0.3, 2.5, 119.0, 500.0]
    for i, v in enumerate(values):
        child = histogram.labels("chat", "llama")
        exemplar = {"trace_id": f"{i:032x}"} if i % 3 == 0 else None
        if compact:
            child.add(v, (exemplar, time.time()) if exemplar else None)
        else:
            child.observe(v, exemplar)
    observe = "add" if compact else "observe"
    inc = "add" if compact else "inc"
    getattr(histogram.labels("docs", "llama"), observe)(0.02)
    getattr(counter.labels("chat", "llama", "200"), inc)(1)
    getattr(counter.labels("chat", "llama", "200"), inc)(2)
    getattr(counter.labels("chat", "llama", "429"), inc)(1)


@pytest.mark.parametrize("created", [True, False])
def test_exposition_matches_prometheus_client(created: bool, monkeypatch) -> None:
    import prometheus_client.metrics as pc_metrics

    monkeypatch.setattr(pc_metrics, "_use_created", created)
    theirs = CollectorRegistry()
    h = Histogram("llmpath_x_seconds", "X.", ["route", "model"], buckets=LATENCY_BUCKETS, registry=theirs)
    c = Counter("llmpath_y_total", "Y.", ["route", "model", "code"], registry=theirs)
    _observe(h, c, compact=False)
    ours = CollectorRegistry()
    fam = CompactFamilies(ours)
    with fam.batch():
        _observe(
            fam.histogram("llmpath_x_seconds", "X.", ["route", "model"], LATENCY_BUCKETS),
            fam.counter("llmpath_y_total", "Y.", ["route", "model", "code"]),
            compact=True,
        )
    assert _normalise(generate_latest(ours)) == _normalise(generate_latest(theirs))
    assert _normalise(generate_openmetrics(ours)) == _normalise(generate_openmetrics(theirs))
    assert (b"_created" in generate_latest(ours)) is created


def test_children_are_created_inside_a_batch_and_locked_calls_work_outside() -> None:
    fam = CompactFamilies(CollectorRegistry())
    h = fam.histogram("llmpath_z_seconds", "Z.", ["route"], LATENCY_BUCKETS)
    c = fam.counter("llmpath_w_total", "W.", ["route"])
    done = threading.Event()

    def work() -> None:
        with fam.batch():
            h.labels("new").add(0.1)  # creating a child must not need the batch lock
            c.labels("new").add(1)
        h.labels("new").observe(0.2)
        c.labels("new").inc(3)
        done.set()

    threading.Thread(target=work, daemon=True).start()
    assert done.wait(5), "deadlock"
    with pytest.raises(ValueError):
        c.labels("new").inc(-1)
    assert c.labels("new").value == 4
    assert h.labels("new").snapshot()[1] == pytest.approx(0.3)
