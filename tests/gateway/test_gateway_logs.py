"""The access log's query mask: parameter names stay for on-call, values never reach the log, and a part that looks
like a token is masked whole."""

from __future__ import annotations

import pytest

from llmpath.gateway.logs import mask_query


@pytest.mark.parametrize(
    ("query", "logged"),
    [
        ("limit=50&axis=ttft", "limit=***&axis=***"),
        ("api_key=sk-live-abc123", "api_key=***"),
        ("sk-live-abc123", "***"),  # a bare key
        ("c2stc2VjcmV0LWtleQ==", "***"),  # a base64 token: its padding is no value
        ("a" * 33 + "=1", "***"),  # a name too long to be one
        ("x%0AFORGED=1", "x%0AFORGED=***"),  # still encoded: no line can be forged
        ("a=1&&b=2", "a=***&b=***"),
        ("=x", "=***"),
        ("", ""),
    ],
)
def test_mask_query(query: str, logged: str) -> None:
    assert mask_query(query) == logged
