"""OpenAI response bodies and SSE chunks for chat and text completions, built from backend events."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from llmpath.backends.base import Usage

SSE_DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def sse(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


def usage_dict(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def openai_finish_reason(reason: str) -> str:
    """Backend finish reasons (``stop``/``length``) as OpenAI's; anything else is ``stop``."""
    return "length" if reason == "length" else "stop"


@dataclass(frozen=True, slots=True)
class ResponseFormat:
    """Builds the bodies of one response: ``chat`` (chat.completion) or ``text`` (text_completion)."""

    kind: str  # "chat" | "text"
    id: str
    created: int
    model: str

    def chunk(self, text: str, *, first: bool = False, finish_reason: str | None = None) -> bytes:
        """A streamed chunk with new ``text`` (the first chat chunk also carries the assistant role)."""
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text or first:
                delta["content"] = text
            choice: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return sse({"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": [choice]})

    def usage_chunk(self, usage: Usage) -> bytes:
        """The final chunk with empty ``choices`` and ``usage`` (``stream_options.include_usage``)."""
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return sse(
            {
                "id": self.id,
                "object": obj,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_dict(usage),
            }
        )

    def full(self, text: str, finish_reason: str, usage: Usage) -> dict[str, Any]:
        """The non-streamed response body."""
        if self.kind == "chat":
            choice: dict[str, Any] = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
            obj = "text_completion"
        return {
            "id": self.id,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "choices": [choice],
            "usage": usage_dict(usage),
        }
