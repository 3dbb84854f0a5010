"""The embedded engine computes the same Llama as Hugging Face ``transformers``.

The engine's weights are written as a Hugging Face checkpoint and loaded with ``LlamaForCausalLM.from_pretrained``;
logits after a full prefill, after a suffix prefill over cached prefix KV and after decode steps must equal the
reference's at the same positions, and the engine's greedy output must be the reference's argmax at every step.
This pins the checkpoint layout, the config's meaning (RoPE θ, GQA, tied embeddings, RMSNorm ε) and the attention
masks to the implementation real checkpoints are made for.

CI runs it on CPU in float32; ``LLMPATH_TEST_DEVICE=cuda`` runs the engine side on a GPU (float32, so the
comparison stays exact to 1e-4).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from llmpath.backends.engine.kv_pool import TokenSlotPool
from llmpath.backends.engine.model import ForwardBatch, LlamaModel, SeqInput, load_safetensors, save_safetensors
from llmpath.backends.engine.presets import PRESETS, ModelConfig, config_from_hf
from llmpath.backends.engine.runtime import Engine, EngineArgs
from llmpath.backends.engine.sampling import SamplingParams
from tests.backends.test_engine_model import ids_of

DEVICE = torch.device(os.environ.get("LLMPATH_TEST_DEVICE", "cpu"))
ATOL = 1e-4

CONFIGS = {
    "tiny": PRESETS["tiny"],
    # Full multi-head attention, tied embeddings, Llama-3's RoPE base and another ε.
    "tied-mha": replace(
        PRESETS["tiny"], num_key_value_heads=4, tie_word_embeddings=True, rope_theta=500000.0, rms_norm_eps=1e-6
    ),
}


def hf_reference(model: LlamaModel, directory: Path) -> transformers.LlamaForCausalLM:
    save_safetensors(model, directory)
    ref = transformers.LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32)
    return ref.eval()


def hf_logits(ref: transformers.LlamaForCausalLM, ids: list[int]) -> torch.Tensor:
    """Every position's logits of the reference: ``[len(ids), vocab]``."""
    with torch.inference_mode():
        return ref(input_ids=torch.tensor([ids])).logits[0].float()


def assert_close(got: torch.Tensor, want: torch.Tensor) -> None:
    got = got.float().cpu()
    assert torch.allclose(got, want, atol=ATOL), f"max |diff| {float((got - want).abs().max()):.3g}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_prefill_cached_suffix_and_decode_logits_equal_transformers(name: str, tmp_path: Path) -> None:
    cfg: ModelConfig = CONFIGS[name]
    model = LlamaModel(cfg)
    model.init_random(seed=11)
    model.prepare(torch.device("cpu"), torch.float32)
    ref = hf_reference(model, tmp_path)
    model.prepare(DEVICE, torch.float32)
    ids = ids_of(56, seed=3)
    want = hf_logits(ref, ids)
    pool = TokenSlotPool(256, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                         dtype=torch.float32, device=DEVICE)  # fmt: skip

    def forward(new: list[int], prefix_len: int, slots: torch.Tensor) -> torch.Tensor:
        return model(ForwardBatch([SeqInput(new, prefix_len, slots)], DEVICE, torch.float32), pool)[0]

    slots = pool.alloc(32)
    assert_close(forward(ids[:32], 0, slots), want[31])  # cold prefill
    slots = torch.cat((slots, pool.alloc(20)))
    assert_close(forward(ids[32:52], 32, slots), want[51])  # suffix over the cached prefix
    for i in range(52, 56):  # decode steps
        slots = torch.cat((slots, pool.alloc(1)))
        assert_close(forward([ids[i]], i, slots), want[i])


def greedy(engine: Engine, prompt: list[int], tokens: int) -> tuple[list[int], int]:
    """The greedy output and how many prompt tokens came from the radix cache."""
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[list[int], int]:
        ids, cached = [], 0
        async for out in engine.submit(prompt, params, stream=True):
            ids += out.new_ids
            cached = out.meta.get("cached_tokens", cached)
        return ids, cached

    return asyncio.run(run())


def test_engine_greedy_output_is_the_transformers_argmax(tmp_path: Path) -> None:
    """Through the whole engine (scheduler, radix cache, a second request reusing the first one's prefix): each
    greedy token is the reference's best sampleable token after the prompt and the tokens before it."""
    engine = Engine(EngineArgs(preset="tiny", device=DEVICE.type, dtype="float32", seed=5, enable_metrics=False))
    ref = hf_reference(engine.model, tmp_path)
    sampleable = sorted(engine.tokenizer.sampleable_ids)
    engine.start()
    try:
        first = ids_of(40, seed=1)
        for prompt, reused in ((first, 0), (first[:30] + ids_of(12, seed=2), 30)):
            output, cached = greedy(engine, prompt, 16)
            assert (len(output), cached) == (16, reused)
            logits = hf_logits(ref, prompt + output)[len(prompt) - 1 : -1][:, sampleable]
            chosen = logits[torch.arange(16), torch.tensor([sampleable.index(t) for t in output])]
            best = logits.max(dim=1).values
            assert torch.all(chosen >= best - ATOL), (output, [sampleable[i] for i in logits.argmax(1).tolist()])
    finally:
        engine.stop()


def _llama() -> transformers.PreTrainedModel:
    """Llama-3's RoPE base, which the engine must read from ``rope_parameters`` (transformers 5's layout)."""
    config = transformers.LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
    )  # fmt: skip
    return transformers.LlamaForCausalLM(config)


def _qwen2() -> transformers.PreTrainedModel:
    """Qwen2: biases on the q/k/v projections."""
    config = transformers.Qwen2Config(
        vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )  # fmt: skip
    return transformers.Qwen2ForCausalLM(config)


#: Checkpoints written by ``transformers`` itself, in its current config layout.
HF_WRITTEN = {"llama": _llama, "qwen2": _qwen2}


@pytest.mark.parametrize("name", sorted(HF_WRITTEN))
def test_checkpoints_written_by_transformers_load_with_their_logits(name: str, tmp_path: Path) -> None:
    """docs/backends.md: ``--model`` loads Llama/Mistral/Qwen2 checkpoints; the engine's full-prefill logits equal
    those of the ``transformers`` model that wrote the checkpoint."""
    torch.manual_seed(7)
    ref = HF_WRITTEN[name]().eval()
    for pname, p in ref.named_parameters():  # large enough that RoPE's base and the (zero-initialised) biases matter
        if "norm" not in pname:
            torch.nn.init.normal_(p, std=0.2)
    ref.save_pretrained(tmp_path)
    cfg = config_from_hf(tmp_path)
    model = LlamaModel(cfg)
    load_safetensors(model, tmp_path)
    model.prepare(DEVICE, torch.float32)
    ids = ids_of(40, seed=4)
    pool = TokenSlotPool(64, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim,
                         dtype=torch.float32, device=DEVICE)  # fmt: skip
    got = model(ForwardBatch([SeqInput(ids, 0, pool.alloc(len(ids)))], DEVICE, torch.float32), pool)[0]
    assert_close(got, hf_logits(ref, ids)[-1])
