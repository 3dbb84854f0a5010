"""OpenAI response bodies and SSE chunks for chat and text completions, built from backend events.

Streamed chunks differ only in their text, so each response pre-renders the JSON around it once and a chunk costs
one ``orjson.dumps`` of the text.
"""

from __future__ import annotations

from typing import Any

import orjson

from llmpath.backends.base import Usage

SSE_DONE = b"data: [DONE]\n\n"


def _dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)  # compact UTF-8, like json.dumps(separators=(",", ":"), ensure_ascii=False)


def sse(obj: Any) -> bytes:
    """One SSE event carrying ``obj`` as JSON."""
    return b"data: " + _dumps(obj) + b"\n\n"


#: The field of a chat message or delta that carries a reasoning model's thinking, whatever the backend called it
#: (DeepSeek's and SGLang's name, which LiteLLM also gives vLLM's ``reasoning``).
REASONING_FIELD = "reasoning_content"
_REASONING_KEY = b'"' + REASONING_FIELD.encode() + b'":'


def usage_dict(usage: Usage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }
    if usage.reasoning_tokens:
        out["completion_tokens_details"] = {"reasoning_tokens": usage.reasoning_tokens}
    return out


def openai_finish_reason(reason: str) -> str:
    """Backend finish reasons (``stop``/``length``) as OpenAI's; anything else is ``stop``."""
    return "length" if reason == "length" else "stop"


class ResponseFormat:
    """Builds the bodies of one response: ``chat`` (chat.completion) or ``text`` (text_completion)."""

    __slots__ = ("_chunk_head", "_chunk_object", "created", "id", "kind", "model")

    def __init__(self, kind: str, id: str, created: int, model: str) -> None:
        self.kind = kind  # "chat" | "text"
        self.id = id
        self.created = created
        self.model = model
        self._chunk_object = "chat.completion.chunk" if kind == "chat" else "text_completion"
        head = {"id": id, "object": self._chunk_object, "created": created, "model": model}
        # '{"id":…,"model":…' + ',"choices":[{"index":0,' — the part every chunk shares.
        self._chunk_head = b"data: " + _dumps(head)[:-1] + b',"choices":[{"index":0,'

    def chunk(self, text: str, *, first: bool = False, finish_reason: str | None = None, reasoning: str = "") -> bytes:
        """A streamed chunk with new ``text`` (the first chat chunk also carries the assistant role) and, from a
        reasoning model, new ``reasoning`` (chat only: text completions have no field for it)."""
        if self.kind == "chat":
            if first:
                delta = b'{"role":"assistant","content":' + _dumps(text)
            elif text:
                delta = b'{"content":' + _dumps(text)
            else:
                delta = b"{"
            if reasoning:
                delta += (b"," if len(delta) > 1 else b"") + _REASONING_KEY + _dumps(reasoning)
            body = b'"delta":' + delta + b"}"
        else:
            body = b'"text":' + _dumps(text)
        reason = _dumps(finish_reason)
        return self._chunk_head + body + b',"logprobs":null,"finish_reason":' + reason + b"}]}\n\n"

    def usage_chunk(self, usage: Usage) -> bytes:
        """The final chunk with empty ``choices`` and ``usage`` (``stream_options.include_usage``)."""
        return sse(
            {
                "id": self.id,
                "object": self._chunk_object,
                "created": self.created,
                "model": self.model,
                "choices": [],
                "usage": usage_dict(usage),
            }
        )

    def full(self, text: str, finish_reason: str, usage: Usage, reasoning: str = "") -> dict[str, Any]:
        """The non-streamed response body (a chat message has ``reasoning_content`` when the model reasoned)."""
        if self.kind == "chat":
            message = {"role": "assistant", "content": text}
            if reasoning:
                message[REASONING_FIELD] = reasoning
            choice: dict[str, Any] = {
                "index": 0,
                "message": message,
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
