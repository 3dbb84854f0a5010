"""Model shapes: the built-in presets and the config of a local Llama-family checkpoint."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The shape of a Llama-style decoder (the names follow Hugging Face's ``LlamaConfig``)."""

    name: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    max_position_embeddings: int
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = False
    #: Biases on the q/k/v projections (Qwen2).
    qkv_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    #: A sliding-window model's attention window (Mistral's ``sliding_window``). The engine attends to the whole
    #: context, which equals the model's windowed attention only up to this many tokens: its context stops there.
    sliding_window: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def num_parameters(self) -> int:
        """Parameter count (embeddings and LM head included)."""
        h, i, kv = self.hidden_size, self.intermediate_size, self.num_key_value_heads * self.head_dim
        per_layer = h * h * 2 + h * kv * 2 + 3 * h * i + 2 * h + ((h + 2 * kv) if self.qkv_bias else 0)
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_hidden_layers * per_layer + h + head

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: Byte-level tokenizer vocabulary: 256 bytes, then special tokens, padded to a round size.
BYTE_VOCAB_SIZE = 512

PRESETS: dict[str, ModelConfig] = {
    # Unit tests: starts in about a second, prefills 200 tokens in a few milliseconds.
    "tiny": ModelConfig(
        name="llmpath-tiny",
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=176,
        max_position_embeddings=4096,
    ),
    # Demos and benchmarks: prefill of ~1k tokens takes a few hundred ms on 2 CPU cores.
    "small": ModelConfig(
        name="llmpath-small",
        vocab_size=BYTE_VOCAB_SIZE,
        hidden_size=512,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=1408,
        max_position_embeddings=8192,
    ),
    # The Llama-3-8B shape (GPU benchmarks only: ~16 GB of bf16 weights).
    "llama-8b": ModelConfig(
        name="llmpath-llama-8b-shape",
        vocab_size=128256,
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        intermediate_size=14336,
        max_position_embeddings=16384,
        rope_theta=500000.0,
    ),
}


#: Presets refused on CPU: their weights and KV pool take tens of GB (``--device cuda`` only).
GPU_ONLY_PRESETS = frozenset({"llama-8b"})


def preset(name: str) -> ModelConfig:
    """The preset called ``name``; a ``ValueError`` names the known ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}") from None


def config_from_hf(model_dir: Path) -> ModelConfig:
    """Read a Hugging Face Llama-family ``config.json``."""
    path = model_dir / "config.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{path}: not found (--model needs a Hugging Face checkpoint directory)") from None
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text (byte at offset {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a JSON object (a Hugging Face config.json is one)")
    archs = raw.get("architectures") or []
    if archs and not any(a.endswith(("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")) for a in archs):
        raise ValueError(f"{path}: architectures {archs} are not Llama-style (LlamaForCausalLM expected)")
    for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if key not in raw:
            raise ValueError(f"{path}: missing field {key!r}")
    if raw.get("head_dim") not in (None, raw["hidden_size"] // raw["num_attention_heads"]):
        raise ValueError(f"{path}: head_dim != hidden_size / num_attention_heads is not supported")
    # transformers 5 writes RoPE settings as rope_parameters {"rope_theta", "rope_type", ...}; older files have a
    # top-level rope_theta and rope_scaling.
    rope: dict[str, Any] = raw["rope_parameters"] if isinstance(raw.get("rope_parameters"), dict) else {}
    if raw.get("rope_scaling") or rope.get("rope_type", "default") != "default":
        raise ValueError(f"{path}: rope_scaling is not supported by the embedded engine")
    qwen2 = raw.get("model_type") == "qwen2" or any(a.endswith("Qwen2ForCausalLM") for a in archs)
    for flag in ("attention_bias", "mlp_bias", "use_sliding_window"):
        if raw.get(flag):
            raise ValueError(f"{path}: {flag} is not supported by the embedded engine")
    mistral = raw.get("model_type") == "mistral" or any(a.endswith("MistralForCausalLM") for a in archs)
    window = raw.get("sliding_window") if mistral else None  # Qwen2's applies only with use_sliding_window (refused)
    if window is not None and (not isinstance(window, int) or window < 1):
        raise ValueError(f"{path}: sliding_window must be a positive integer or null, got {window!r}")
    context = raw.get("max_position_embeddings", 4096)
    eos = raw.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else ((eos,) if isinstance(eos, int) else ())
    return ModelConfig(
        name=model_dir.name,
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads") or raw["num_attention_heads"],
        intermediate_size=raw["intermediate_size"],
        max_position_embeddings=context if window is None else min(context, window),
        rope_theta=float(raw.get("rope_theta") or rope.get("rope_theta") or 10000.0),
        rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        qkv_bias=qwen2,
        bos_token_id=raw.get("bos_token_id"),
        eos_token_ids=eos_ids,
        sliding_window=window,
    )


def with_context(config: ModelConfig, context_length: int | None) -> ModelConfig:
    """The config with ``max_position_embeddings`` overridden (``--context-length``); not beyond a sliding-window
    model's window, past which full attention would no longer compute the model's own."""
    if context_length is None:
        return config
    window = config.sliding_window
    if window is not None and context_length > window:
        raise ValueError(
            f"--context-length {context_length} is beyond the model's sliding window ({window} tokens): the embedded "
            "engine attends to the whole context, which matches the model only within its window"
        )
    return replace(config, max_position_embeddings=context_length)
