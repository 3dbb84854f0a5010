"""Label text UTF-8 cannot encode: a JSON body's ``"\\ud800"`` escape decodes (in FastAPI, as in ``json.loads``) to an
unpaired surrogate. Passed on as a model, tenant or route, it must not lose the request's usage record, break every
later ``/metrics`` scrape, or make a span unexportable: it is recorded with U+FFFD in its place."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from llmpath.instrumentation import (
    JsonlUsageSink,
    SqliteUsageSink,
    fail_request,
    model_call_span,
    record_usage,
    set_request_labels,
    stage,
)

from .conftest import Harness

#: What the client sent, as JSON escapes (a lone high and a lone low surrogate).
BODY = b'{"model": "m\\ud800", "tenant": "t\\udfff", "route": "r\\ud83d", "error": "E\\udc00"}'


def app_passing_client_text() -> FastAPI:
    app = FastAPI()

    @app.post("/chat")
    async def chat(body: dict[str, Any]) -> dict[str, bool]:
        assert "\ud800" in body["model"]  # the framework decoded the escape to a lone surrogate
        set_request_labels(route=body["route"], tenant=body["tenant"])
        with stage("route", requested_model=body["model"], tags=[body["tenant"]]):
            pass
        with model_call_span(body["model"], attributes={"app.model": body["model"]}) as call:
            call.set_response(response_id=body["route"], response_model=body["model"])
            call.set_finish_reasons([body["error"]])
            call.set_usage(input_tokens=3, output_tokens=1)
            call.set_attribute("app.tenant", body["tenant"])
        record_usage(input_tokens=3, cached_tokens=0, output_tokens=1, model=body["model"])
        fail_request(502, body["error"])  # as after a stream's 200: overridden by the 200 sent next, not its error
        return {"ok": True}

    return app


def strings_in(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list | tuple):
        return [s for v in value for s in strings_in(v)]
    return []


async def test_unpaired_surrogates_are_recorded_replaced(make_harness: Callable[..., Harness], tmp_path: Path) -> None:
    jsonl, db = JsonlUsageSink(tmp_path / "usage.jsonl"), SqliteUsageSink(tmp_path / "usage.db")
    h = make_harness(app=app_passing_client_text(), usage_sink=[jsonl, db])
    async with h.client() as c:
        response = await c.post("/chat", content=BODY, headers={"content-type": "application/json"})
        assert response.status_code == 200
        scrapes = [
            await c.get("/metrics", headers={"accept": accept}) for accept in ("*/*", "application/openmetrics-text")
        ]
    jsonl.close()
    db.close()

    assert [s.status_code for s in scrapes] == [200, 200]
    for scrape in scrapes:
        assert 'llmpath_tokens_total{model="m\ufffd",route="r\ufffd",tenant="t\ufffd",type="input"} 3.0' in scrape.text
    assert h.value("llmpath_requests_total", route="r\ufffd", model="m\ufffd", code="200") == 1

    line = (tmp_path / "usage.jsonl").read_bytes().decode("utf-8")  # strict: the ledger is valid UTF-8
    record = json.loads(line)
    assert (record["model"], record["tenant"], record["route"], record["error"]) == (
        "m\ufffd",
        "t\ufffd",
        "r\ufffd",
        "E\ufffd",
    )
    with sqlite3.connect(tmp_path / "usage.db") as conn:
        assert conn.execute("SELECT model, tenant, route FROM usage").fetchall() == [("m\ufffd", "t\ufffd", "r\ufffd")]

    spans = h.spans()
    assert {"chat m\ufffd", "llmpath.route"} <= {s.name for s in spans}
    texts = [t for s in spans for t in (s.name, *(x for v in (s.attributes or {}).values() for x in strings_in(v)))]
    "".join(texts).encode("utf-8")  # raises on an unpaired surrogate, as an OTLP exporter's protobuf encoding would
    attributes = {k: v for s in spans for k, v in (s.attributes or {}).items()}
    assert attributes["requested_model"] == attributes["app.model"] == attributes["gen_ai.response.model"] == "m\ufffd"
    assert attributes["app.tenant"] == "t\ufffd"
    assert attributes["tags"] == ("t\ufffd",) and attributes["gen_ai.response.finish_reasons"] == ("E\ufffd",)
