"""OpenAI chunks and bodies from pre-rendered templates, and prompt-cache keys extended by a reply."""

from __future__ import annotations

import json

from llmpath.backends.base import Usage
from llmpath.gateway.openai_format import SSE_DONE, ResponseFormat
from llmpath.gateway.prompt_cache import CacheMode, PromptCache
from llmpath.gateway.routing import PrefixIndex, Tokenization


def parse(event: bytes) -> dict:
    assert event.startswith(b"data: ") and event.endswith(b"\n\n")
    return json.loads(event[6:-2])


def test_chat_chunks_are_openai_chunks() -> None:
    fmt = ResponseFormat("chat", "chatcmpl-1", 123, 'mo"del')
    first = parse(fmt.chunk('he said "hi" ✓', first=True))
    assert first == {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": 'mo"del',
        "choices": [
            {
                "index": 0,
                "delta": {"role": "assistant", "content": 'he said "hi" ✓'},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert parse(fmt.chunk("x"))["choices"][0]["delta"] == {"content": "x"}
    last = parse(fmt.chunk("", finish_reason="length"))["choices"][0]
    assert last["delta"] == {} and last["finish_reason"] == "length"
    usage = parse(fmt.usage_chunk(Usage(10, 3, 8)))
    assert usage["choices"] == [] and usage["usage"]["prompt_tokens_details"] == {"cached_tokens": 8}
    assert usage["usage"]["total_tokens"] == 13
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_text_chunks_and_full_bodies() -> None:
    fmt = ResponseFormat("text", "cmpl-1", 1, "m")
    chunk = parse(fmt.chunk("abc", finish_reason="stop"))
    assert chunk["object"] == "text_completion" and chunk["choices"][0]["text"] == "abc"
    body = fmt.full("abc", "stop", Usage(5, 1, 0))
    assert body["choices"][0]["text"] == "abc" and body["usage"]["completion_tokens"] == 1
    chat = ResponseFormat("chat", "c", 1, "m").full("hi", "length", Usage(5, 1, 2))
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "hi"}


def test_extended_key_equals_a_full_key() -> None:
    cache = PromptCache(PrefixIndex(max_blocks_per_backend=1000, ttl_s=60), Tokenization(16, 1))
    prompt = "P" * 70
    key = cache.key(prompt, tenant="t", route="r", model="m", mode=CacheMode.TENANT)
    longer = prompt + "reply" * 20
    extended = cache.extend(key, longer)
    assert extended.hashes == cache.key(longer, tenant="t", route="r", model="m", mode=CacheMode.TENANT).hashes
    assert extended.hashes[: len(key.hashes)] == key.hashes and len(extended.hashes) == len(longer) // 16
    other = cache.extend(key, "Q" * 40)  # not a continuation: hashed from scratch
    assert other.hashes == cache.key("Q" * 40, tenant="t", route="r", model="m", mode=CacheMode.TENANT).hashes
