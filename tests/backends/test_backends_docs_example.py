"""docs/backends.md's interface example runs as written against a real embedded engine."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from llmpath.backends import Done, FirstToken, Scheduled, TokenDelta

pytestmark = pytest.mark.slow

DOC = Path(__file__).resolve().parents[2] / "docs" / "backends.md"
DOC_URL = "http://127.0.0.1:30000"
#: The example's loop body: where the test collects the events the example iterates over.
LOOP_BODY = "    ...  # Scheduled → FirstToken → TokenDelta* → Done\n"


def interface_example() -> str:
    (block,) = [b for b in re.findall(r"^```python\n(.*?)^```", DOC.read_text(), re.S | re.M) if "create_backend(" in b]
    assert DOC_URL in block and LOOP_BODY in block, "docs/backends.md's example changed: update this test"
    return block


async def test_interface_example_streams_events_from_an_engine(engine) -> None:
    code = interface_example().replace(DOC_URL, engine.url).replace(LOOP_BODY, "    events.append(event)\n")
    namespace: dict[str, object] = {}
    exec(  # noqa: S102 - the documentation's own code, run as an async function
        compile("async def example(events):\n" + textwrap.indent(code, "    "), str(DOC), "exec"), namespace
    )
    events: list[object] = []
    await namespace["example"](events)  # type: ignore[operator]

    kinds = [type(e) for e in events]
    assert kinds[:2] == [Scheduled, FirstToken]
    assert kinds[-1] is Done and TokenDelta in kinds
    done = events[-1]
    assert isinstance(done, Done)
    assert done.usage.completion_tokens == sum(e.num_tokens for e in events if isinstance(e, TokenDelta))
    assert 1 <= done.usage.completion_tokens <= 128  # the example's max_tokens
    assert done.finish_reason in ("stop", "length")
