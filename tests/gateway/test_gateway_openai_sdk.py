"""The official OpenAI Python SDK against the gateway over real HTTP, in front of a real tiny engine: what a client
written for OpenAI sends (SDK defaults, null fields, a conversation sent back with ``model_dump()``) is served, and
every refusal arrives as the SDK exception and ``code``/``param`` an OpenAI client handles."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import openai
import pytest
from openai.types.chat import ChatCompletionContentPartParam, ChatCompletionMessageParam

pytestmark = pytest.mark.slow

#: The engine's context; the gateway's own prompt limit is above it, so each of the two refusals can be reached.
ENGINE_CONTEXT = 512
GATEWAY_PROMPT_LIMIT = 1000


@pytest.fixture(scope="module")
def gw(stack, keys):
    (engine,) = stack.start_engines(1, "--context-length", str(ENGINE_CONTEXT))
    config = {
        "backends": [{"url": engine.url, "name": engine.name}],
        "health": {"interval_s": 1, "timeout_s": 1},
        "tokenizer": {"chars_per_token": 1},
        "routes": [{"name": "tiny"}, {"name": "team/assistant", "model": "tiny"}],
        "api_keys": keys.config(),
        "limits": {"max_tokens": 64, "default_max_tokens": 4, "max_prompt_tokens": GATEWAY_PROMPT_LIMIT},
    }
    return stack.start_gateway("gateway", config)


@pytest.fixture(scope="module")
def sdk(gw, keys) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gw.url}/v1", api_key=keys.user, max_retries=0, timeout=30) as client:
        yield client


def user(text: str = "hello there") -> list[ChatCompletionMessageParam]:
    return [{"role": "user", "content": text}]


def test_chat_streamed_and_not_give_the_same_answer_and_usage(sdk: openai.OpenAI) -> None:
    whole = sdk.chat.completions.create(model="tiny", messages=user(), max_tokens=6, temperature=0)
    chunks = list(
        sdk.chat.completions.create(
            model="tiny", messages=user(), max_tokens=6, temperature=0, stream=True,
            stream_options={"include_usage": True, "include_obfuscation": False},
        )
    )  # fmt: skip
    assert whole.object == "chat.completion" and whole.choices[0].message.role == "assistant"
    assert whole.usage is not None and whole.usage.completion_tokens == 6
    details = whole.usage.prompt_tokens_details
    assert details is not None and details.cached_tokens is not None and details.cached_tokens >= 0
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 6


def test_text_completion(sdk: openai.OpenAI) -> None:
    done = sdk.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, best_of=1, logprobs=None)
    assert done.object == "text_completion" and done.usage is not None and done.usage.completion_tokens == 3
    assert isinstance(done.choices[0].text, str) and done.choices[0].finish_reason == "length"


def test_a_conversation_sent_back_through_model_dump(sdk: openai.OpenAI) -> None:
    first = sdk.chat.completions.create(model="tiny", messages=user(), temperature=0)
    answer = first.choices[0].message.model_dump()
    assert {"refusal", "tool_calls", "function_call", "audio", "annotations"} <= answer.keys()  # sent as nulls
    # the plain dict model_dump() gives (nulls and response-only fields included), as clients send it back
    second = sdk.chat.completions.create(model="tiny", messages=[*user(), answer, *user("and then?")])  # type: ignore[list-item]
    assert first.usage is not None and second.usage is not None
    assert second.usage.prompt_tokens > first.usage.prompt_tokens


def test_null_and_no_op_values_of_unsupported_features_are_accepted(sdk: openai.OpenAI) -> None:
    """What SDKs and frameworks send when a feature is not used: accepted, and the answer is an ordinary one."""
    # tools=None and parallel_tool_calls=None are outside the SDK's types, but frameworks send them
    done = sdk.chat.completions.create(  # type: ignore[call-overload]
        model="tiny", messages=user(), temperature=0, top_p=0,
        logprobs=False, top_logprobs=None, logit_bias={}, response_format={"type": "text"},
        service_tier="auto", reasoning_effort=None, tools=None, tool_choice="none", parallel_tool_calls=None,
        prompt_cache_key="conversation-42", safety_identifier="user-hash-1", user="u-1", store=False,
    )  # fmt: skip
    assert done.choices[0].message.content is not None and done.choices[0].logprobs is None
    assert done.usage is not None and done.usage.completion_tokens == 4  # limits.default_max_tokens


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        (
            {"tools": [{"type": "function", "function": {"name": "lookup", "parameters": {"type": "object"}}}]},
            "tools",
            "unsupported_parameter",
        ),
        ({"logprobs": True, "top_logprobs": 2}, "logprobs", "unsupported_value"),
        ({"response_format": {"type": "json_object"}}, "response_format", "unsupported_value"),
        ({"reasoning_effort": "low"}, "reasoning_effort", "unsupported_parameter"),
        ({"n": 2}, "n", "invalid_value"),
        ({"max_tokens": 4, "max_completion_tokens": 4}, "max_tokens", "invalid_value"),
        ({"max_tokens": 65}, "max_tokens", "limit_exceeded"),
    ],
)
def test_unsupported_features_raise_the_sdk_error_naming_the_param(
    sdk: openai.OpenAI, extra: dict[str, Any], param: str, code: str
) -> None:
    with pytest.raises(openai.APIStatusError) as info:
        sdk.chat.completions.create(model="tiny", messages=user(), **extra)
    assert (info.value.param, info.value.code, info.value.type) == (param, code, "invalid_request_error")
    expected = openai.UnprocessableEntityError if code == "limit_exceeded" else openai.BadRequestError
    assert type(info.value) is expected


def test_an_image_part_is_refused_by_its_path(sdk: openai.OpenAI) -> None:
    parts: list[ChatCompletionContentPartParam] = [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:,"}},
    ]
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=[{"role": "user", "content": parts}])
    assert (info.value.param, info.value.code) == ("messages[0].content[1].type", "unsupported_value")


@pytest.mark.parametrize("stream", [False, True])
def test_a_prompt_longer_than_the_engines_context_is_context_length_exceeded(sdk: openai.OpenAI, stream: bool) -> None:
    """Within the gateway's limit, beyond the engine's: the engine's refusal keeps OpenAI's code and param."""
    long = "word " * 120  # ≈ 600 tokens: over the engine's 512, under the gateway's 1000
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=user(long), stream=stream)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    assert f"context length ({ENGINE_CONTEXT} tokens)" in info.value.message
    with pytest.raises(openai.BadRequestError) as info:
        sdk.completions.create(model="tiny", prompt=long, stream=stream)
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "prompt")


def test_a_prompt_over_the_gateways_limit_is_context_length_exceeded(sdk: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        sdk.chat.completions.create(model="tiny", messages=user("x" * (GATEWAY_PROMPT_LIMIT + 100)))
    assert (info.value.code, info.value.param) == ("context_length_exceeded", "messages")
    assert f"limit of {GATEWAY_PROMPT_LIMIT}" in info.value.message
    assert "x" * 20 not in info.value.message  # no prompt text in errors


def test_models_list_and_retrieve(sdk: openai.OpenAI, gw, keys) -> None:
    assert [m.id for m in sdk.models.list()] == ["tiny", "team/assistant"]
    assert sdk.models.retrieve("team/assistant").id == "team/assistant"  # a name with a slash
    with pytest.raises(openai.NotFoundError) as info:
        sdk.models.retrieve("nope")
    assert info.value.code == "model_not_found"
    with (
        openai.OpenAI(base_url=f"{gw.url}/v1", api_key="sk-wrong", max_retries=0) as stranger,
        pytest.raises(openai.AuthenticationError),
    ):
        stranger.models.retrieve("tiny")
