"""Sampling parameters (SGLang's names, defaults and checks) and the sampler."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

#: Below this temperature sampling is greedy (SGLang's ``_SAMPLING_EPS``).
GREEDY_EPS = 1e-6
#: The largest float32: a larger temperature divides logits by ``inf`` (blocked ids' ``-inf / inf`` is NaN).
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


class InvalidSamplingParams(ValueError):
    """A sampling parameter is out of range or unsupported (HTTP 400)."""


@dataclass(slots=True)
class SamplingParams:
    """``sampling_params`` of SGLang's ``/generate`` (the subset the engine implements; the rest is refused)."""

    max_new_tokens: int | None = 128
    min_new_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    sampling_seed: int | None = None
    n: int = 1

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS or self.top_k == 1

    def verify(self, vocab_size: int) -> None:
        """Raise :class:`InvalidSamplingParams` with SGLang's wording for out-of-range values."""
        checks: list[tuple[bool, str]] = [
            (self.temperature >= 0.0, f"temperature must be non-negative, got {self.temperature}."),
            (0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}."),
            (0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}."),
            (self.top_k >= 1 or self.top_k == -1, f"top_k must be -1 (disable), or at least 1, got {self.top_k}."),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}.",
            ),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}.",
            ),
            (
                0.0 <= self.repetition_penalty <= 2.0,
                f"repetition_penalty must be in [0, 2], got {self.repetition_penalty}.",
            ),
            (self.min_new_tokens >= 0, f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}."),
            (self.n == 1, f"n must be 1 for this engine, got {self.n}."),
        ]
        if self.max_new_tokens is not None:
            checks.append((self.max_new_tokens >= 0, f"max_new_tokens must be at least 0, got {self.max_new_tokens}."))
            checks.append(
                (
                    self.min_new_tokens <= self.max_new_tokens,
                    f"min_new_tokens must be in [0, max_new_tokens({self.max_new_tokens})], got {self.min_new_tokens}.",
                )
            )
        if self.sampling_seed is not None:  # torch's generator takes a 64-bit seed, signed or not
            seed = self.sampling_seed
            checks.append((-(2**63) <= seed < 2**64, f"sampling_seed must be in [-2**63, 2**64), got {seed}."))
        for tid in self.stop_token_ids:
            checks.append((0 <= tid < vocab_size, f"stop_token_ids: {tid} is outside the vocabulary."))
        for ok, message in checks:
            if not ok:
                raise InvalidSamplingParams(message)
        if any(not math.isfinite(x) for x in (self.temperature, self.top_p, self.min_p)):
            raise InvalidSamplingParams("sampling parameters must be finite numbers.")


#: Accepted ``sampling_params`` keys of features this engine does not have: refused unless null.
_UNSUPPORTED = ("json_schema", "regex", "ebnf", "structural_tag", "stop_regex", "logit_bias", "custom_params")
_IGNORED = ("spaces_between_special_tokens", "stream_interval")


def parse_sampling_params(raw: Mapping[str, Any] | None) -> SamplingParams:
    """Build :class:`SamplingParams` from a JSON object, rejecting wrong types and unsupported constraints."""
    params = SamplingParams()
    if raw is None:
        return params
    if not isinstance(raw, Mapping):
        raise InvalidSamplingParams("sampling_params must be an object.")
    for key, value in raw.items():
        if value is None or key in _IGNORED:
            continue
        if key in _UNSUPPORTED:
            raise InvalidSamplingParams(f"{key} (constrained decoding) is not supported by this engine.")
        if key not in SamplingParams.__dataclass_fields__:
            raise InvalidSamplingParams(f"unknown sampling parameter {key!r}.")
        setattr(params, key, _coerce(key, value))
    return params


def _coerce(key: str, value: Any) -> Any:
    default = getattr(SamplingParams(), key)
    if key == "stop":
        if isinstance(value, str):
            return [value] if value else []
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return [s for s in value if s]
        raise InvalidSamplingParams("stop must be a string or a list of strings.")
    if key == "stop_token_ids":
        if isinstance(value, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in value):
            return value
        raise InvalidSamplingParams("stop_token_ids must be a list of integers.")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise InvalidSamplingParams(f"{key} must be a boolean.")
    if isinstance(default, int) or key in ("max_new_tokens", "sampling_seed"):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidSamplingParams(f"{key} must be an integer.")
    if isinstance(value, int | float) and not isinstance(value, bool):
        with contextlib.suppress(OverflowError):  # an integer past a float's range
            return float(value)
    raise InvalidSamplingParams(f"{key} must be a number.")


class Sampler:
    """Samples one token per row of a logits batch, each row with its own parameters and generator."""

    def __init__(self, sampleable_ids: Sequence[int], vocab_size: int, seed: int) -> None:
        self.blocked = torch.ones(vocab_size, dtype=torch.bool)
        self.blocked[list(sampleable_ids)] = False
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def sample(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        histories: Sequence[Sequence[int]],
        banned: Sequence[Sequence[int]],
        generators: Sequence[torch.Generator | None],
    ) -> list[int]:
        """``logits``: ``[rows, vocab]`` float32; ``histories``: output ids so far (for penalties); ``banned``:
        ids masked for this step (EOS before ``min_new_tokens``)."""
        logits = logits.cpu()
        logits[:, self.blocked[: logits.shape[1]]] = float("-inf")
        out: list[int] = []
        for row, p, hist, ban, gen in zip(logits, params, histories, banned, generators, strict=True):
            if ban:
                row[list(ban)] = float("-inf")
            if hist and (p.frequency_penalty or p.presence_penalty or p.repetition_penalty != 1.0):
                _apply_penalties(row, p, hist)
            if p.greedy:
                out.append(int(row.argmax()))
                continue
            row = row / min(p.temperature, _FLOAT32_MAX)
            if p.repetition_penalty == 0.0 and hist:  # repeated positive logits are inf: softmax would be all NaN
                row = row.nan_to_num(nan=float("-inf"), posinf=_FLOAT32_MAX, neginf=float("-inf"))
            if p.top_k > 0:
                kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
                row = row.masked_fill(row < kth, float("-inf"))
            probs = torch.softmax(row, dim=-1)
            if p.top_p < 1.0:
                sorted_p, idx = probs.sort(descending=True)
                drop = sorted_p.cumsum(0) - sorted_p > p.top_p
                probs[idx[drop]] = 0.0
            if p.min_p > 0.0:
                probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
            out.append(int(torch.multinomial(probs, 1, generator=gen or self.generator)))
        return out


def _apply_penalties(row: torch.Tensor, p: SamplingParams, history: Sequence[int]) -> None:
    ids, counts = torch.tensor(list(history), dtype=torch.int64).unique(return_counts=True)
    if p.repetition_penalty != 1.0:
        vals = row[ids]
        row[ids] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    row[ids] -= p.frequency_penalty * counts.float() + p.presence_penalty
