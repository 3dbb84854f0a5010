"""The compact collectors expose exactly what prometheus-client's Histogram and Counter expose."""

from __future__ import annotations

import re
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics

from llmpath.instrumentation import LATENCY_BUCKETS
from llmpath.instrumentation.compact import FOLD_EVERY, CompactFamilies

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


def _deferring(registry: CollectorRegistry) -> tuple[CompactFamilies, list[int]]:
    """Families whose deferred items are ``(route, seconds)`` observations; the sizes of the folds are recorded."""
    folds: list[int] = []
    h_box: list = []

    def fold(items: list) -> None:
        folds.append(len(items))
        for route, seconds in items:
            h_box[0].labels(route).add(seconds)

    fam = CompactFamilies(registry, fold=fold)
    h_box.append(fam.histogram("llmpath_d_seconds", "D.", ["route"], LATENCY_BUCKETS))
    return fam, folds


def test_deferred_observations_are_folded_in_batches_and_before_every_collection() -> None:
    registry = CollectorRegistry()
    fam, folds = _deferring(registry)
    for _ in range(FOLD_EVERY * 2 + 5):
        fam.defer(("chat", 0.02))
    assert folds == [FOLD_EVERY, FOLD_EVERY]  # folded as the queue filled, the last 5 still queued
    count = registry.get_sample_value("llmpath_d_seconds_count", {"route": "chat"})
    assert count == FOLD_EVERY * 2 + 5  # the scrape folded the rest first
    assert folds == [FOLD_EVERY, FOLD_EVERY, 5]
    assert b'llmpath_d_seconds_count{route="chat"} 69.0' in generate_latest(registry)
    assert folds == [FOLD_EVERY, FOLD_EVERY, 5]  # nothing queued: no fold


def test_deferred_observations_from_many_threads_are_all_counted() -> None:
    registry = CollectorRegistry()
    fam, _ = _deferring(registry)
    per_thread, threads = 1000, 4
    stop = threading.Event()

    def scrape() -> None:
        while not stop.is_set():
            generate_latest(registry)

    def work() -> None:
        for _ in range(per_thread):
            fam.defer(("chat", 0.5))

    scraper = threading.Thread(target=scrape)
    scraper.start()
    workers = [threading.Thread(target=work) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    stop.set()
    scraper.join()
    assert registry.get_sample_value("llmpath_d_seconds_count", {"route": "chat"}) == per_thread * threads
    assert registry.get_sample_value("llmpath_d_seconds_sum", {"route": "chat"}) == per_thread * threads * 0.5


def test_a_failing_fold_is_logged_and_the_scrape_goes_on(caplog) -> None:
    registry = CollectorRegistry()
    fam, _ = _deferring(registry)
    fam.defer(("chat", 0.1))
    fam.defer(("chat", "not a number"))  # the fold raises on it
    with caplog.at_level("ERROR", logger="llmpath.instrumentation"):
        text = generate_latest(registry)
    assert "folding deferred metric observations failed" in caplog.text
    assert b"llmpath_d_seconds_count" in text  # the scrape went on
    fam.defer(("chat", 0.2))  # the failed batch is dropped, not folded again
    assert registry.get_sample_value("llmpath_d_seconds_sum", {"route": "chat"}) == pytest.approx(0.3)


def test_deferring_needs_a_fold() -> None:
    with pytest.raises(TypeError, match="fold="):
        CompactFamilies(CollectorRegistry()).defer(("chat", 0.1))
