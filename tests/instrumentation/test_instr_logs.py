"""Log correlation: ``RequestLogFilter`` puts the request's id and trace context on the records logged while it is
served, and ``-`` outside one."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest
from fastapi import FastAPI
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from llmpath.instrumentation import RequestLogFilter, stage

from .conftest import Harness

TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Capture(logging.Handler):
    """Keeps the records it handles, after its filters ran."""

    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []
        self.addFilter(RequestLogFilter())

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[Capture]:
    handler = Capture()
    logger = logging.getLogger("gateway.test")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)


def logging_app() -> FastAPI:
    app = FastAPI()
    log = logging.getLogger("gateway.test.child")  # propagates to the handler on its parent

    @app.get("/work")
    async def work() -> dict[str, bool]:
        with stage("route"):
            log.info("routing")
        log.info("answered", extra={"request_id": "set-by-the-caller"})
        return {"ok": True}

    return app


async def test_records_carry_the_request_id_and_the_current_span(
    make_harness: Callable[..., Harness], captured: Capture, fast_spans: bool
) -> None:
    harness = make_harness(app=logging_app(), fast_spans=fast_spans)
    async with harness.client() as client:
        resp = await client.get("/work", headers={"traceparent": TRACEPARENT})
    assert resp.status_code == 200
    routing, answered = captured.records
    stage_span = harness.span("llmpath.route")
    assert routing.request_id == resp.headers["x-request-id"]  # type: ignore[attr-defined]
    assert routing.trace_id == "0af7651916cd43dd8448eb211c80319c"  # type: ignore[attr-defined]
    assert routing.span_id == format(stage_span.context.span_id, "016x")  # type: ignore[attr-defined]
    # A value the caller set is kept; the others are still filled in (the SERVER span is current here).
    server_span = harness.span("GET /work")
    assert answered.request_id == "set-by-the-caller"  # type: ignore[attr-defined]
    assert answered.span_id == format(server_span.context.span_id, "016x")  # type: ignore[attr-defined]


async def test_an_unsampled_request_still_has_its_trace_id(
    make_harness: Callable[..., Harness], captured: Capture
) -> None:
    harness = make_harness(sampler=ALWAYS_OFF, app=logging_app())
    async with harness.client() as client:
        resp = await client.get("/work")
    routing = captured.records[0]
    assert routing.request_id == resp.headers["x-request-id"]  # type: ignore[attr-defined]
    [record] = harness.records
    assert routing.trace_id == record.trace_id and len(routing.trace_id) == 32  # type: ignore[attr-defined]
    assert routing.span_id == "-"  # type: ignore[attr-defined]  # its spans are not exported


def test_outside_a_request_every_field_is_a_dash(captured: Capture) -> None:
    logging.getLogger("gateway.test").warning("starting")
    [record] = captured.records
    assert (record.request_id, record.trace_id, record.span_id) == ("-", "-", "-")  # type: ignore[attr-defined]
