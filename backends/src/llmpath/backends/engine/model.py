"""A Llama-style decoder (RMSNorm, RoPE, grouped-query attention, SwiGLU) whose attention reads and writes the
token-slot KV pool, so a request's prefix KV can come from the radix cache and only its suffix is computed.

One forward runs a batch of sequences: projections and MLPs over all new tokens at once, attention for each
sequence over its own KV slots (similar sequences padded into one batched call: see :class:`ForwardBatch`).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import CausalBias, causal_lower_right

from llmpath.backends.engine.kv_pool import TokenSlotPool
from llmpath.backends.engine.presets import ModelConfig


@dataclass(slots=True)
class SeqInput:
    """One sequence of a forward batch: the new tokens, how many tokens precede them in the KV, and the KV slots
    of all ``prefix_len + len(new_ids)`` tokens (the new tokens' slots last)."""

    new_ids: Sequence[int]
    prefix_len: int
    slots: torch.Tensor


class AttentionLayout:
    """How a group of a batch's sequences is laid out for one attention call: one sequence over its KV slots, or
    several padded to the longest. ``token_index`` selects the group's tokens from the flattened batch (``None``:
    every token, in order)."""

    def __init__(
        self,
        seqs: Sequence[SeqInput],
        device: torch.device,
        dtype: torch.dtype,
        token_index: torch.Tensor | None = None,
    ) -> None:
        self.num_seqs = len(seqs)
        self.token_index = token_index
        q_lens = [len(s.new_ids) for s in seqs]
        kv_lens = [s.prefix_len + len(s.new_ids) for s in seqs]
        if self.num_seqs == 1:
            self.kv_slots = seqs[0].slots.to(device)
            q, kv, p = q_lens[0], kv_lens[0], seqs[0].prefix_len
            self.is_causal = p == 0 and q > 1
            self.mask = None
            if p > 0 and q > 1:  # the suffix attends to the whole cached prefix and causally to itself
                self.mask = _suffix_causal_mask(q, kv, device, dtype)
            return
        max_q, max_kv = max(q_lens), max(kv_lens)
        self.is_causal = False
        kv_index = torch.zeros((self.num_seqs, max_kv), dtype=torch.int64, device=device)  # slot 0 = padding
        for i, s in enumerate(seqs):
            kv_index[i, : kv_lens[i]] = s.slots
        self.kv_index = kv_index
        cols = torch.arange(max_kv, device=device).view(1, 1, max_kv)
        prefix = torch.tensor([s.prefix_len for s in seqs], device=device).view(-1, 1, 1)
        rows = torch.arange(max_q, device=device).view(1, max_q, 1) + prefix
        kv_len = torch.tensor(kv_lens, device=device).view(-1, 1, 1)
        self.mask = ((cols <= rows) & (cols < kv_len)).unsqueeze(1)  # [B, 1, max_q, max_kv]
        # Where each of the group's tokens goes in the padded [B, max_q] layout.
        flat = [i * max_q + j for i, q in enumerate(q_lens) for j in range(q)]
        self.pad_index = torch.tensor(flat, dtype=torch.int64, device=device)
        self.max_q = max_q


def _suffix_causal_mask(q: int, kv: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor | CausalBias:
    """The mask of ``q`` new tokens after ``kv - q`` cached ones: every cached token, and the new ones causally.

    On CUDA in half precision this is flash attention's own lower-right causal alignment, with no ``q × kv`` mask in
    memory; elsewhere (CPU, float32, where no flash kernel takes it) the boolean mask, built once per forward."""
    if device.type == "cuda" and dtype in (torch.float16, torch.bfloat16):
        return causal_lower_right(q, kv)
    rows = torch.arange(q, device=device).unsqueeze(1) + (kv - q)
    return torch.arange(kv, device=device).unsqueeze(0) <= rows


#: Sequences share one padded attention call while its padded size stays within this factor of their actual
#: query × key sizes; beyond it the next sequence starts another call.
PADDING_TOLERANCE = 1.25


class ForwardBatch:
    """Tensors derived once per forward from the sequences: flattened inputs and the attention layouts.

    Attention runs in groups of similar sequences, decoding ones (one new token) apart from prefilling ones, in as
    few padded calls as keep padding within :data:`PADDING_TOLERANCE`. Padded together, every sequence would be
    computed, and its keys gathered, at the longest one's size: a 50-token prompt next to a 1,500-token one made a
    prefill 1.6× slower, one 3,000-token context among fifteen 100-token ones a decode step 8.8× slower."""

    def __init__(self, seqs: Sequence[SeqInput], device: torch.device, dtype: torch.dtype) -> None:
        self.num_seqs = len(seqs)
        q_lens = [len(s.new_ids) for s in seqs]
        ids: list[int] = []
        pos: list[int] = []
        for s in seqs:
            ids.extend(s.new_ids)
            pos.extend(range(s.prefix_len, s.prefix_len + len(s.new_ids)))
        self.input_ids = torch.tensor(ids, dtype=torch.int64, device=device)
        self.positions = torch.tensor(pos, dtype=torch.int64, device=device)
        self.out_slots = torch.cat([s.slots[s.prefix_len :] for s in seqs]).to(device)
        #: Index of each sequence's last new token in the flattened batch (for the LM head).
        self.last_token_index = torch.tensor(q_lens, device=device).cumsum(0) - 1
        kv_lens = [s.prefix_len + q for s, q in zip(seqs, q_lens, strict=True)]
        by_work = sorted(range(self.num_seqs), key=lambda i: -q_lens[i] * kv_lens[i])
        groups = _similar([i for i in by_work if q_lens[i] == 1], q_lens, kv_lens)
        groups += _similar([i for i in by_work if q_lens[i] > 1], q_lens, kv_lens)
        if len(groups) == 1:
            self.layouts = [AttentionLayout(seqs, device, dtype)]
            return
        starts = [0, *itertools.accumulate(q_lens)]
        self.layouts = []
        for group in groups:
            tokens = [t for i in group for t in range(starts[i], starts[i + 1])]
            index = torch.tensor(tokens, dtype=torch.int64, device=device)
            self.layouts.append(AttentionLayout([seqs[i] for i in group], device, dtype, index))


def _similar(order: list[int], q_lens: list[int], kv_lens: list[int]) -> list[list[int]]:
    """Consecutive runs of ``order`` whose padded attention (count × longest query × longest key) stays within
    :data:`PADDING_TOLERANCE` of the query × key work it holds."""
    groups: list[list[int]] = []
    current: list[int] = []
    work = max_q = max_kv = 0
    for i in order:
        q, kv = q_lens[i], kv_lens[i]
        padded = (len(current) + 1) * max(max_q, q) * max(max_kv, kv)
        if current and padded > PADDING_TOLERANCE * (work + q * kv):
            groups.append(current)
            current, work, max_q, max_kv = [], 0, 0, 0
        current.append(i)
        work += q * kv
        max_q, max_kv = max(max_q, q), max(max_kv, kv)
    if current:
        groups.append(current)
    return groups


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Rotary:
    """RoPE in Hugging Face Llama's rotate-half layout; cos/sin tables computed once up to the context length."""

    def __init__(self, head_dim: int, max_pos: int, theta: float, device: torch.device, dtype: torch.dtype) -> None:
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
        freqs = torch.outer(torch.arange(max_pos, dtype=torch.float32, device=device), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.cos = emb.cos().to(dtype)
        self.sin = emb.sin().to(dtype)

    def apply(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """``x``: ``[tokens, heads, head_dim]``."""
        cos = self.cos[positions].unsqueeze(1)
        sin = self.sin[positions].unsqueeze(1)
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        h, kv = cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(h, h, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(h, kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(h, h, bias=False)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, pool: TokenSlotPool, rope: Rotary) -> torch.Tensor:
        t = x.shape[0]
        q = rope.apply(self.q_proj(x).view(t, self.num_heads, self.head_dim), batch.positions)
        k = rope.apply(self.k_proj(x).view(t, self.num_kv_heads, self.head_dim), batch.positions)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        pool.write(self.layer_id, batch.out_slots, k, v)
        if len(batch.layouts) == 1:
            out = self._attend(q, batch.layouts[0], pool)
        else:
            out = torch.empty_like(q)
            for layout in batch.layouts:
                out[layout.token_index] = self._attend(q[layout.token_index], layout, pool)
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))

    def _attend(self, q: torch.Tensor, layout: AttentionLayout, pool: TokenSlotPool) -> torch.Tensor:
        """Attention of one layout's query tokens ``[tokens, heads, d]`` over their sequences' KV slots."""
        if layout.num_seqs == 1:
            keys, vals = pool.gather(self.layer_id, layout.kv_slots)  # [kv_heads, kv_len, d]
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1).unsqueeze(0), keys.unsqueeze(0), vals.unsqueeze(0),
                attn_mask=layout.mask, is_causal=layout.is_causal, enable_gqa=True,
            )  # fmt: skip
            return out.squeeze(0).transpose(0, 1)
        b = layout.num_seqs
        keys, vals = pool.gather(self.layer_id, layout.kv_index.view(-1))  # [kv_heads, B × max_kv, d]
        shape = (keys.shape[0], b, layout.kv_index.shape[1], keys.shape[2])
        keys, vals = keys.view(shape).transpose(0, 1), vals.view(shape).transpose(0, 1)  # [B, kv_heads, max_kv, d]
        q_pad = q.new_zeros((b * layout.max_q, self.num_heads, self.head_dim))
        q_pad[layout.pad_index] = q
        q_pad = q_pad.view(b, layout.max_q, self.num_heads, self.head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q_pad, keys, vals, attn_mask=layout.mask, enable_gqa=True)
        return out.transpose(1, 2).reshape(b * layout.max_q, self.num_heads, self.head_dim)[layout.pad_index]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer_id)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, batch: ForwardBatch, pool: TokenSlotPool, rope: Rotary) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), batch, pool, rope)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    """The decoder; parameter names match Hugging Face's ``LlamaForCausalLM`` state dict."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope: Rotary | None = None

    def init_random(self, seed: int) -> None:
        """Deterministic random weights (normal, std 0.02, as Llama's initializer_range), drawn on the parameters'
        device (CPU and CUDA draws differ; each is reproducible)."""
        with torch.no_grad():
            for name, p in self.named_parameters():
                if name.endswith("layernorm.weight") or name == "norm.weight":
                    p.fill_(1.0)
                    continue
                gen = torch.Generator(device=p.device).manual_seed(seed)
                seed += 1
                p.normal_(0.0, 0.02, generator=gen)
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def prepare(self, device: torch.device, dtype: torch.dtype) -> None:
        """Move to the device/dtype and build the RoPE tables."""
        self.to(device=device, dtype=dtype)
        cfg = self.config
        self.rope = Rotary(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, device, dtype)

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch, pool: TokenSlotPool) -> torch.Tensor:
        """Logits of each sequence's last new token: ``[num_seqs, vocab]`` (float32)."""
        assert self.rope is not None, "call prepare() first"
        x = self.embed_tokens(batch.input_ids)
        for layer in self.layers:
            x = layer(x, batch, pool, self.rope)
        last = self.norm(x[batch.last_token_index])
        return self.lm_head(last).float()


_HF_PREFIX = "model."


def load_safetensors(model: LlamaModel, model_dir: Path) -> None:
    """Load a Hugging Face Llama checkpoint (``*.safetensors``) into ``model``; names and shapes are checked."""
    from safetensors.torch import load_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{model_dir}: no *.safetensors files")
    expected = dict(model.named_parameters())
    loaded: set[str] = set()
    for path in files:
        for hf_name, tensor in load_file(str(path)).items():
            name = hf_name.removeprefix(_HF_PREFIX)
            if name.endswith("rotary_emb.inv_freq"):
                continue
            param = expected.get(name)
            if param is None:
                raise ValueError(f"{path.name}: unexpected tensor {hf_name!r}")
            if tuple(param.shape) != tuple(tensor.shape):
                raise ValueError(
                    f"{path.name}: {hf_name} has shape {tuple(tensor.shape)}, expected {tuple(param.shape)}"
                )
            with torch.no_grad():
                param.copy_(tensor.to(param.dtype))
            loaded.add(name)
    missing = set(expected) - loaded
    if "lm_head.weight" in missing and (model.config.tie_word_embeddings or "embed_tokens.weight" in loaded):
        missing.discard("lm_head.weight")
        model.lm_head.weight = model.embed_tokens.weight
    if missing:
        raise ValueError(f"{model_dir}: checkpoint lacks {sorted(missing)[:5]}{' …' if len(missing) > 5 else ''}")


def save_safetensors(model: LlamaModel, model_dir: Path) -> None:
    """Write ``model`` as a Hugging Face Llama checkpoint (``config.json`` + ``model.safetensors``)."""
    from safetensors.torch import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        (n if n == "lm_head.weight" else _HF_PREFIX + n): p.detach().contiguous().cpu()
        for n, p in model.named_parameters()
    }
    save_file(tensors, str(model_dir / "model.safetensors"))
    cfg = model.config
    hf = {
        "architectures": ["Qwen2ForCausalLM" if cfg.qkv_bias else "LlamaForCausalLM"],
        "model_type": "qwen2" if cfg.qkv_bias else "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "intermediate_size": cfg.intermediate_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float32",
    }
    (model_dir / "config.json").write_text(json.dumps(hf, indent=2))
