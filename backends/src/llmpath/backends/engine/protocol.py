"""Request bodies of the engine's HTTP API (SGLang 0.5.x field names), validated with pydantic.

Unknown fields are ignored and ``null`` means "default", because sglang-router re-serializes bodies with extra
keys such as ``"model": null``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from llmpath.backends.engine.sampling import SamplingParams, parse_sampling_params


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class GenerateRequest(_Lenient):
    """``POST /generate``."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    input_embeds: Any = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool | None = False
    rid: str | list[str] | None = None
    extra_key: str | None = None
    cache_salt: str | None = None
    log_metrics: bool | None = True
    return_logprob: bool | list[bool] | None = False
    received_time: float | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text for p in self.content)


class StreamOptions(_Lenient):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False


class _OpenAICommon(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    n: int | None = 1
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool | None = False
    min_tokens: int | None = None
    skip_special_tokens: bool | None = True
    no_stop_trim: bool | None = False
    logprobs: bool | int | None = None
    rid: str | None = None
    extra_key: str | None = None
    cache_salt: str | None = None
    user: str | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, v: bool | int | None) -> bool | int | None:
        if v:
            raise ValueError("logprobs are not supported by this engine")
        return v

    def sampling(self, max_tokens: int | None) -> SamplingParams:
        """SGLang sampling params; ``max_tokens=None`` means up to the context length (SGLang's default)."""
        raw = {
            "max_new_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "n": self.n,
            "sampling_seed": self.seed,
            "ignore_eos": self.ignore_eos,
            "min_new_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "no_stop_trim": self.no_stop_trim,
        }
        params = parse_sampling_params(raw)
        if max_tokens is None:
            params.max_new_tokens = None
        return params


class ChatCompletionRequest(_OpenAICommon):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, v: dict[str, Any] | None) -> dict[str, Any] | None:
        if v and v.get("type") not in (None, "text"):
            raise ValueError("only response_format type 'text' is supported by this engine")
        return v


class CompletionRequest(_OpenAICommon):
    """``POST /v1/completions``."""

    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    suffix: str | None = None


def validation_message(exc: ValidationError) -> tuple[str, str | None]:
    """A one-line message and the offending parameter of a pydantic error."""
    err = exc.errors()[0]
    loc = ".".join(str(p) for p in err.get("loc", ()) if not isinstance(p, int)) or None
    msg = err.get("msg", "invalid request").removeprefix("Value error, ")
    return (f"{loc}: {msg}" if loc else msg), loc
