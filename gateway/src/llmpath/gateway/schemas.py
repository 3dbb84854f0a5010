"""OpenAI-compatible request and response models (the subset the gateway serves), validated with pydantic.

Requests are strict like OpenAI's API: unknown fields are rejected, nothing is coerced, and fields the gateway
cannot honour (tools, n > 1, logprobs, ...) are rejected with a 400 naming them rather than silently ignored. Those
fields are accepted only with the values that ask for nothing (``logprobs: false``, ``tools: null``,
``response_format: {"type": "text"}``: what SDKs and frameworks send by default).
"""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    GetJsonSchemaHandler,
    field_validator,
    model_validator,
)
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

Role = Literal["system", "developer", "user", "assistant", "tool"]


def _json_integer(value: Any) -> Any:
    """JSON Schema's ``integer`` includes integral numbers written as floats (``5.0``); bools are not numbers."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


#: An integer as JSON Schema defines it (strict otherwise: no strings, no bools).
JsonInt = Annotated[int, BeforeValidator(_json_integer)]
#: Upper bound of token counts and ``top_k``: what backends take as a C ``int`` (larger is a 400, not a 500 when
#: the backend request cannot be encoded or the backend rejects it).
MAX_INT32 = 2**31 - 1
#: What ``top_p: 0`` is sent to backends as: SGLang and vLLM take top_p in (0, 1]; this keeps the top token only.
MIN_TOP_P = 1e-6


#: The pydantic error type of a refusal that carries its own OpenAI ``param`` (relative to the error's location)
#: and ``code`` in its context (see :func:`refused`).
REFUSED = "llmpath_refused"


def refused(param: str, message: str, code: str) -> PydanticCustomError:
    """A validation error answered as a 400 with this ``code``, naming ``param`` under the error's location."""
    return PydanticCustomError(REFUSED, "{message}", {"message": message, "param": param, "code": code})


def _same(value: Any, accepted: Any) -> bool:
    # Type-exact: 0 is not false and 1 is not true, as in the strict models.
    return type(value) is type(accepted) and value == accepted


class _Request(BaseModel):
    # Strict like OpenAI: no coercion ("5" is not 5, 0 is not false); ints are accepted for floats.
    model_config = ConfigDict(extra="forbid", strict=True)

    #: OpenAI fields the gateway does not implement → the values that ask for nothing (accepted and dropped). Any
    #: other value is a 400: ``unsupported_parameter`` when only null is accepted, else ``unsupported_value``.
    UNSUPPORTED: ClassVar[dict[str, tuple[Any, ...]]] = {}

    @classmethod
    def __get_pydantic_json_schema__(cls, core_schema: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """The schema documents the unsupported fields with the values accepted (the validator drops them)."""
        schema = handler(core_schema)
        target = handler.resolve_ref_schema(schema)
        properties = target.setdefault("properties", {})
        for name, accepted in cls.UNSUPPORTED.items():
            properties[name] = {
                "enum": [None, *accepted],
                "description": "Not supported by this gateway: accepted only with the values that ask for nothing.",
            }
        return schema

    @model_validator(mode="before")
    @classmethod
    def _drop_no_op_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not cls.UNSUPPORTED.keys() & data.keys():
            return data
        data = dict(data)
        for name, accepted in cls.UNSUPPORTED.items():
            if name not in data:
                continue
            value = data.pop(name)
            if value is None or any(_same(value, a) for a in accepted):
                continue
            if not accepted:
                raise refused(name, f"Unsupported parameter: '{name}' is not supported by this gateway.",
                              "unsupported_parameter")  # fmt: skip
            shown = " or ".join(json.dumps(a) for a in (None, *accepted))
            raise refused(name, f"Unsupported value: '{name}' is not supported by this gateway; it is accepted "
                          f"only as {shown}.", "unsupported_value")  # fmt: skip
        return data


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessageIn(_Request):
    role: Role
    content: str | list[TextPart] | None = None
    name: str | None = Field(default=None, max_length=256)
    tool_call_id: str | None = None
    #: An earlier answer's thinking, sent back with it (the gateway answers with ``reasoning_content``; vLLM names it
    #: ``reasoning``): accepted and not passed on, as reasoning models' chat templates drop earlier turns' thinking.
    reasoning_content: str | None = None
    reasoning: str | None = None

    #: The OpenAI SDK sends an earlier answer back with these as null (``message.model_dump()``).
    UNSUPPORTED = {"refusal": (), "tool_calls": ([],), "function_call": (), "audio": (), "annotations": ([],)}

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        # Named here: the union's own error would report the first branch that failed ("a valid string").
        if isinstance(value, list):
            for i, part in enumerate(value):
                if isinstance(part, dict) and isinstance(part.get("type"), str) and part["type"] != "text":
                    raise refused(f"[{i}].type", "Unsupported value: only text content parts are supported by "
                                  "this gateway (no images, audio or files).", "unsupported_value")  # fmt: skip
        return value

    def text(self) -> str:
        """The message content as one string (text parts joined)."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Request):
    include_usage: bool = False
    #: Accepted (OpenAI's SDKs may send it); chunks never carry OpenAI's obfuscation padding.
    include_obfuscation: bool | None = None


class _Sampling(_Request):
    """Sampling fields shared by chat and text completions."""

    model: str = Field(min_length=1, max_length=256)
    max_tokens: Annotated[JsonInt, Field(ge=1, le=MAX_INT32)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    #: 0 is accepted as OpenAI does (the most likely token only); backends get :data:`MIN_TOP_P` for it.
    top_p: Annotated[float, Field(ge=0, le=1)] | None = None
    #: SGLang extension: top-k sampling (-1 = off).
    top_k: Annotated[JsonInt, Field(ge=-1, le=MAX_INT32)] | None = None
    n: Annotated[JsonInt, Field(ge=1, le=1)] | None = Field(default=None, description="Only n=1 is supported.")
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=64)] | None = None
    seed: Annotated[JsonInt, Field(ge=-(2**63), lt=2**63)] | None = None
    presence_penalty: Annotated[float, Field(ge=0, le=0)] | None = Field(
        default=None, description="Only 0 is supported."
    )
    frequency_penalty: Annotated[float, Field(ge=0, le=0)] | None = Field(
        default=None, description="Only 0 is supported."
    )
    user: str | None = Field(default=None, max_length=256)
    #: SGLang extension: keep generating past the end-of-sequence token.
    ignore_eos: bool | None = None

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def wants_stream(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    """``POST /v1/chat/completions``."""

    messages: Annotated[list[ChatMessageIn], Field(min_length=1)]
    max_completion_tokens: Annotated[JsonInt, Field(ge=1, le=MAX_INT32)] | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    #: Accepted and not used: routing follows the prompt's own prefix, and end users are never logged.
    prompt_cache_key: str | None = Field(default=None, max_length=256)
    safety_identifier: str | None = Field(default=None, max_length=256)

    UNSUPPORTED = {
        "logprobs": (False,),
        "top_logprobs": (0,),
        "logit_bias": ({},),
        "response_format": ({"type": "text"},),
        "tools": (),
        "tool_choice": ("none", "auto"),
        "parallel_tool_calls": (),
        "functions": (),
        "function_call": ("none", "auto"),
        "modalities": (["text"],),
        "audio": (),
        "prediction": (),
        "web_search_options": (),
        "reasoning_effort": (),
        "verbosity": (),
        "service_tier": ("auto", "default"),
    }

    @model_validator(mode="after")
    def _one_max_tokens(self) -> ChatCompletionRequest:
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise refused("max_tokens", "Give either max_tokens or max_completion_tokens, not both.", "invalid_value")
        return self

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_Sampling):
    """``POST /v1/completions`` (one text prompt)."""

    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)]
    echo: Literal[False] | None = Field(default=None, description="echo is not supported.")
    suffix: None = Field(default=None, description="suffix is not supported.")

    UNSUPPORTED = {"logprobs": (), "best_of": (1,), "logit_bias": ({},)}

    @field_validator("echo", mode="before")
    @classmethod
    def _echo_is_a_bool(cls, value: Any) -> Any:
        if value is not None and not isinstance(value, bool):  # Literal[False] alone would accept 0
            raise ValueError("Input should be false")
        return value

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


# ------------------------------------------------------------------------------------------------
# Responses (documented in the OpenAPI schema; the handlers build plain dicts of the same shape).
# ------------------------------------------------------------------------------------------------


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageOut


class CompletionChoice(BaseModel):
    index: int
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageOut


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the given error statuses (always JSON, whatever the success type)."""
    ref = {"$ref": "#/components/schemas/ErrorResponse"}
    return {
        code: {"description": _ERROR_DESCRIPTIONS[code], "content": {"application/json": {"schema": ref}}}
        for code in codes
    }


_ERROR_DESCRIPTIONS = {
    400: "Malformed JSON, a request that does not follow the schema, an unsupported feature, or a prompt longer "
    "than the context (code context_length_exceeded); error.param names the field.",
    401: "Missing or invalid API key.",
    403: "The key may not use this endpoint.",
    404: "Unknown model (route).",
    408: "The request body did not arrive within limits.timeouts.body_s.",
    413: "Request body larger than limits.max_body_bytes.",
    422: "A configured limit is exceeded (error.param names the field).",
    429: "Admission queue full, queue timeout or tenant rate limit (see Retry-After).",
    502: "The backend failed.",
    503: "No healthy backend.",
    504: "The backend timed out.",
}

#: One event of a streamed completion (OpenAPI 3.1: the per-event schema of ``text/event-stream``).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "A JSON chunk (chat.completion.chunk or text_completion; with "
            "stream_options.include_usage a last chunk with empty choices and the usage), an error object, "
            "or the final [DONE].",
        },
        "event": {"type": "string"},
    },
}
