"""The transformer against an independent eager reference, prefix reuse exactness, batching, checkpoints.

CI runs this on CPU in float32. On a GPU machine the same checks run with ``LLMPATH_TEST_DEVICE=cuda`` and
``LLMPATH_TEST_DTYPE=bfloat16`` (or ``float32``); the reference stays float32 on CPU, and half precision is
compared with a tolerance relative to the logits' scale.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import CausalBias

from llmpath.backends.engine.kv_pool import TokenSlotPool
from llmpath.backends.engine.model import (
    DecoderLayer,
    ForwardBatch,
    LlamaModel,
    SeqInput,
    _suffix_causal_mask,
    load_safetensors,
    save_safetensors,
)
from llmpath.backends.engine.presets import PRESETS, config_from_hf, with_context

DEVICE = torch.device(os.environ.get("LLMPATH_TEST_DEVICE", "cpu"))
DTYPE: torch.dtype = getattr(torch, os.environ.get("LLMPATH_TEST_DTYPE", "float32"))


@pytest.fixture(scope="module")
def model() -> LlamaModel:
    m = LlamaModel(PRESETS["tiny"])
    m.init_random(seed=7)
    m.prepare(DEVICE, DTYPE)
    return m


def new_pool(m: LlamaModel, slots: int = 512) -> TokenSlotPool:
    c = m.config
    return TokenSlotPool(slots, c.num_hidden_layers, c.num_key_value_heads, c.head_dim, dtype=DTYPE, device=DEVICE)


def batch_of(*seqs: SeqInput) -> ForwardBatch:
    return ForwardBatch(seqs, DEVICE, DTYPE)


def assert_logits_close(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32: within 1e-4; half precision: within 3 % of the reference logits' largest magnitude."""
    got = got.float().cpu()
    atol = 1e-4 if DTYPE is torch.float32 else 0.03 * float(want.abs().max())
    assert torch.allclose(got, want, atol=atol), f"max |diff| {float((got - want).abs().max()):.3g} > {atol:.3g}"


def reference_logits(model: LlamaModel, ids: list[int]) -> torch.Tensor:
    """A plain eager float32 forward on CPU (no KV pool, explicit GQA repeat and softmax) of the model's weights,
    giving every position's logits."""
    m = LlamaModel(model.config)
    m.load_state_dict({k: v.float().cpu() for k, v in model.state_dict().items()})
    c = m.config
    n, h, kv, d = len(ids), c.num_attention_heads, c.num_key_value_heads, c.head_dim
    inv = 1.0 / (c.rope_theta ** (torch.arange(0, d, 2).float() / d))
    ang = torch.outer(torch.arange(n).float(), inv)
    cos, sin = torch.cat((ang, ang), -1).cos(), torch.cat((ang, ang), -1).sin()

    def rope(x: torch.Tensor) -> torch.Tensor:  # [n, heads, d]
        rot = torch.cat((-x[..., d // 2 :], x[..., : d // 2]), -1)
        return x * cos[:, None] + rot * sin[:, None]

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return w * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps))

    with torch.no_grad():
        x = m.embed_tokens.weight[torch.tensor(ids)]
        for layer in m.layers:
            assert isinstance(layer, DecoderLayer)
            a = layer.self_attn
            hx = rms(x, layer.input_layernorm.weight)
            q = rope((hx @ a.q_proj.weight.T).view(n, h, d))
            k = rope((hx @ a.k_proj.weight.T).view(n, kv, d)).repeat_interleave(h // kv, dim=1)
            v = (hx @ a.v_proj.weight.T).view(n, kv, d).repeat_interleave(h // kv, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q, k) / d**0.5
            scores = scores.masked_fill(torch.triu(torch.ones(n, n, dtype=torch.bool), 1), float("-inf"))
            out = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).reshape(n, h * d)
            x = x + out @ a.o_proj.weight.T
            hx = rms(x, layer.post_attention_layernorm.weight)
            mlp = layer.mlp
            x = x + (F.silu(hx @ mlp.gate_proj.weight.T) * (hx @ mlp.up_proj.weight.T)) @ mlp.down_proj.weight.T
        return rms(x, m.norm.weight) @ m.lm_head.weight.T


def ids_of(n: int, seed: int = 0) -> list[int]:
    return torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_prefill_matches_the_eager_reference(model: LlamaModel) -> None:
    ids = ids_of(40)
    pool = new_pool(model)
    got = model(batch_of(SeqInput(ids, 0, pool.alloc(40))), pool)
    want = reference_logits(model, ids)[-1]
    assert_logits_close(got[0], want)


def test_suffix_prefill_on_cached_prefix_equals_full_prefill(model: LlamaModel) -> None:
    ids = ids_of(64, seed=1)
    pool = new_pool(model)
    prefix = pool.alloc(48)
    model(batch_of(SeqInput(ids[:48], 0, prefix)), pool)  # fills the prefix KV
    slots = torch.cat((prefix, pool.alloc(16)))  # the suffix gets slots elsewhere in the pool
    warm = model(batch_of(SeqInput(ids[48:], 48, slots)), pool)
    assert_logits_close(warm[0], reference_logits(model, ids)[-1])


def test_decode_steps_match_the_reference_at_each_position(model: LlamaModel) -> None:
    ids = ids_of(20, seed=2)
    pool = new_pool(model)
    slots = pool.alloc(12)
    model(batch_of(SeqInput(ids[:12], 0, slots)), pool)
    ref = reference_logits(model, ids)
    for i in range(12, 20):
        slots = torch.cat((slots, pool.alloc(1)))
        out = model(batch_of(SeqInput([ids[i]], i, slots)), pool)
        assert_logits_close(out[0], ref[i])


def test_ragged_batch_equals_separate_forwards(model: LlamaModel) -> None:
    pool = new_pool(model)
    a, b = ids_of(30, seed=3), ids_of(9, seed=4)
    pa = pool.alloc(20)
    model(batch_of(SeqInput(a[:20], 0, pa)), pool)
    sa, sb = torch.cat((pa, pool.alloc(10))), pool.alloc(9)
    batched = model(batch_of(SeqInput(a[20:], 20, sa), SeqInput(b, 0, sb)), pool)
    assert_logits_close(batched[0], reference_logits(model, a)[-1])
    assert_logits_close(batched[1], reference_logits(model, b)[-1])


def test_mixed_batch_of_decodes_and_a_chunk_equals_the_reference(model: LlamaModel) -> None:
    """Decoding sequences around a prefill chunk (attention in two calls: the decodes, then the chunk)."""
    pool = new_pool(model)
    a, b, c = ids_of(25, seed=5), ids_of(60, seed=6), ids_of(23, seed=7)
    sa, sb, sc = pool.alloc(24), pool.alloc(30), pool.alloc(22)
    for ids, slots in ((a[:24], sa), (b[:30], sb), (c[:22], sc)):
        model(batch_of(SeqInput(ids, 0, slots)), pool)
    sa, sb, sc = torch.cat((sa, pool.alloc(1))), torch.cat((sb, pool.alloc(20))), torch.cat((sc, pool.alloc(1)))
    batch = batch_of(SeqInput([a[24]], 24, sa), SeqInput(b[30:50], 30, sb), SeqInput([c[22]], 22, sc))
    assert [layout.num_seqs for layout in batch.layouts] == [2, 1]
    out = model(batch, pool)
    for got, ids in zip(out, (a, b[:50], c), strict=True):
        assert_logits_close(got, reference_logits(model, ids)[-1])


def test_decodes_of_very_different_contexts_get_separate_attention_calls(model: LlamaModel) -> None:
    pool = new_pool(model, slots=1024)
    long, short = ids_of(300, seed=11), ids_of(9, seed=12)
    sl, ss = pool.alloc(299), pool.alloc(8)
    model(batch_of(SeqInput(long[:299], 0, sl)), pool)
    model(batch_of(SeqInput(short[:8], 0, ss)), pool)
    sl, ss = torch.cat((sl, pool.alloc(1))), torch.cat((ss, pool.alloc(1)))
    batch = batch_of(SeqInput([short[8]], 8, ss), SeqInput([long[299]], 299, sl))
    assert [layout.num_seqs for layout in batch.layouts] == [1, 1]  # not the short one padded to 300 keys
    out = model(batch, pool)
    for got, ids in zip(out, (short, long), strict=True):
        assert_logits_close(got, reference_logits(model, ids)[-1])


def test_prefills_of_similar_size_share_an_attention_call_and_others_get_their_own(model: LlamaModel) -> None:
    pool = new_pool(model)
    a, b, c = ids_of(40, seed=8), ids_of(38, seed=9), ids_of(5, seed=10)
    batch = batch_of(SeqInput(c, 0, pool.alloc(5)), SeqInput(a, 0, pool.alloc(40)),
                          SeqInput(b, 0, pool.alloc(38)))  # fmt: skip
    assert [layout.num_seqs for layout in batch.layouts] == [2, 1]  # a and b padded together; c alone
    out = model(batch, pool)
    for got, ids in zip(out, (c, a, b), strict=True):
        assert_logits_close(got, reference_logits(model, ids)[-1])


def test_random_weights_are_deterministic() -> None:
    one, two = LlamaModel(PRESETS["tiny"]), LlamaModel(PRESETS["tiny"])
    one.init_random(0)
    two.init_random(0)
    assert all(torch.equal(p, q) for p, q in zip(one.parameters(), two.parameters(), strict=True))


def test_checkpoint_round_trip(model: LlamaModel, tmp_path: Path) -> None:
    save_safetensors(model, tmp_path)
    cfg = config_from_hf(tmp_path)
    assert replace(cfg, name=model.config.name) == model.config
    loaded = LlamaModel(cfg)
    load_safetensors(loaded, tmp_path)
    pairs = zip(model.parameters(), loaded.parameters(), strict=True)
    assert all(torch.equal(p.detach().cpu().to(q.dtype), q) for p, q in pairs)


def test_checkpoint_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config.json: not found"):
        config_from_hf(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"], "vocab_size": 10}')
    with pytest.raises(ValueError, match="not Llama-style"):
        config_from_hf(tmp_path)
    small = LlamaModel(replace(PRESETS["tiny"], hidden_size=32))
    save_safetensors(small, tmp_path)
    with pytest.raises(ValueError, match="shape"):
        load_safetensors(LlamaModel(PRESETS["tiny"]), tmp_path)


@pytest.mark.parametrize(
    "extra",
    [
        {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0}},  # transformers 5
        {"attention_bias": True},
        {"use_sliding_window": True},
    ],
)
def test_checkpoint_configs_the_engine_cannot_compute_are_refused(tmp_path: Path, extra: dict) -> None:
    model = LlamaModel(PRESETS["tiny"])
    save_safetensors(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, **extra}))
    with pytest.raises(ValueError, match="not supported by the embedded engine"):
        config_from_hf(tmp_path)


def test_cached_prefix_suffix_mask_is_flash_attentions_lower_right_causal_bias_on_cuda() -> None:
    """On CUDA in half precision the suffix mask is PyTorch's lower-right causal bias (flash attention takes it);
    it selects exactly what the boolean mask used on CPU and in float32 selects."""
    cpu_mask = _suffix_causal_mask(5, 12, torch.device("cpu"), torch.float32)
    assert isinstance(cpu_mask, torch.Tensor)
    assert cpu_mask[0].tolist() == [True] * 8 + [False] * 4  # the first new token: 7 cached tokens and itself
    assert cpu_mask[4].all()
    for dtype in (torch.bfloat16, torch.float16):
        bias = _suffix_causal_mask(5, 12, torch.device("cuda"), dtype)
        assert isinstance(bias, CausalBias)
        assert torch.equal(bias._materialize(torch.device("cpu")), cpu_mask)


def test_a_sliding_window_model_serves_only_within_its_window(tmp_path: Path) -> None:
    """Mistral's ``sliding_window``: full attention equals windowed attention up to the window, so the context stops
    there; Qwen2's ``sliding_window`` applies only with ``use_sliding_window`` (refused above) and changes nothing."""
    model = LlamaModel(PRESETS["tiny"])
    save_safetensors(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    mistral = {**config, "architectures": ["MistralForCausalLM"], "model_type": "mistral", "sliding_window": 1024}
    (tmp_path / "config.json").write_text(json.dumps(mistral))
    cfg = config_from_hf(tmp_path)
    assert (cfg.max_position_embeddings, cfg.sliding_window) == (1024, 1024)
    assert with_context(cfg, 512).max_position_embeddings == 512
    with pytest.raises(ValueError, match=r"--context-length 2048 is beyond the model's sliding window \(1024"):
        with_context(cfg, 2048)
    (tmp_path / "config.json").write_text(json.dumps({**mistral, "sliding_window": None}))
    assert config_from_hf(tmp_path).max_position_embeddings == config["max_position_embeddings"]
    qwen = {**config, "architectures": ["Qwen2ForCausalLM"], "sliding_window": 1024, "use_sliding_window": False}
    (tmp_path / "config.json").write_text(json.dumps(qwen))
    assert config_from_hf(tmp_path).sliding_window is None
