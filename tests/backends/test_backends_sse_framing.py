"""The SSE reader (``llmpath.backends._http.sse_json``) against arbitrary TCP boundaries: whatever reads a stream
arrives in, it yields the same events as the whole body; an event arriving in many small reads costs linear time."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmpath.backends._http import MAX_EVENT_BYTES, sse_json
from llmpath.backends.base import BackendProtocolError


class _Content:
    def __init__(self, reads: list[bytes]) -> None:
        self.reads = reads

    async def iter_any(self) -> AsyncIterator[bytes]:
        for read in self.reads:
            yield read


class _Response:
    """What ``sse_json`` reads of an aiohttp response: ``content.iter_any()``, here in the given reads."""

    def __init__(self, reads: list[bytes]) -> None:
        self.content = _Content(reads)


async def events_of(reads: list[bytes]) -> list[dict[str, Any]]:
    return [obj async for obj in sse_json(_Response(reads))]  # type: ignore[arg-type]


def split(body: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(body)) for c in cuts})
    return [body[a:b] for a, b in zip([0, *points], [*points, len(body)], strict=True) if b > a]


values = st.text(max_size=12) | st.integers(-(2**53), 2**53)  # integers a JSON parser keeps exact
objects = st.lists(
    st.dictionaries(st.sampled_from(["text", "n", "x"]), values, min_size=1),
    min_size=1,
    max_size=5,
)


@settings(max_examples=300, deadline=None)
@given(
    objs=objects,
    crlf=st.booleans(),
    bom=st.booleans(),
    comments=st.booleans(),
    multiline=st.booleans(),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=120),
)
async def test_any_split_of_a_stream_yields_its_events(objs, crlf, bom, comments, multiline, cuts) -> None:
    """LF or CRLF line ends, a byte order mark, comments and other fields, multi-line ``data:``: the same events
    whatever the reads' boundaries (a CR and its LF in different reads included)."""
    blocks = []
    for obj in objs:
        data = json.dumps(obj, indent=1 if multiline else None).replace("\n", "\ndata: ")
        fields = ": ping\nevent: message\nid: 7\n" if comments else ""
        blocks.append(f"{fields}data: {data}\n\n")
    body = "".join(blocks) + "data: [DONE]\n\n" + 'data: {"after": "done"}\n\n'
    if crlf:
        body = body.replace("\n", "\r\n")
    raw = (b"\xef\xbb\xbf" if bom else b"") + body.encode()
    assert await events_of(split(raw, cuts)) == objs


@pytest.mark.parametrize("crlf", [False, True])
@pytest.mark.parametrize("bom", [False, True])
async def test_a_stream_read_byte_by_byte_yields_its_events(crlf: bool, bom: bool) -> None:
    """Every boundary at once: one byte per read (a read that is only a CR, or only part of a BOM, included)."""
    body = 'data: {"a": 1}\n\n: ping\n\ndata: {"b": 2}\n\ndata: [DONE]\n\n'
    raw = (b"\xef\xbb\xbf" if bom else b"") + (body.replace("\n", "\r\n") if crlf else body).encode()
    assert await events_of([raw[i : i + 1] for i in range(len(raw))]) == [{"a": 1}, {"b": 2}]


async def test_an_event_in_many_small_reads_costs_linear_time() -> None:
    """A 2 MiB event in 512-byte reads (a slow link, or a backend trickling it): the reader blocked the event loop
    — every request of the gateway — for seconds (a copy and a scan of the whole event so far on every read)."""
    event = b'data: {"text": "' + b"x" * (2 << 20) + b'"}\n\n'
    reads = [event[i : i + 512] for i in range(0, len(event), 512)] + [b"data: [DONE]\n\n"]
    started = time.process_time()
    [obj] = await events_of(reads)
    assert len(obj["text"]) == 2 << 20
    assert time.process_time() - started < 1.0


async def test_an_oversized_event_in_small_reads_is_still_refused() -> None:
    reads = [b"data: "] + [b"x" * 4096] * (MAX_EVENT_BYTES // 4096 + 2)
    with pytest.raises(BackendProtocolError, match="larger than"):
        await events_of(reads)
