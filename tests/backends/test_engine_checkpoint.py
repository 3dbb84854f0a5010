"""``--model PATH``: a local Llama safetensors checkpoint and its tokenizer.json."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from llmpath.backends.engine.model import LlamaModel, save_safetensors
from llmpath.backends.engine.presets import PRESETS
from llmpath.backends.engine.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["hello world", "<|im_start|>user\nnaïve 日本<|im_end|>\n", " leading space", "a\n\nb"]


def test_exported_tokenizer_json_is_the_byte_tokenizer(tmp_path: Path) -> None:
    byte = ByteTokenizer()
    hf = load_tokenizer(byte.write_hf_files(tmp_path), vocab_size=512)
    assert isinstance(hf, HFTokenizer)
    for text in TEXTS:
        ids = byte.encode(text)
        assert hf.encode(text) == ids
        assert hf.decode(ids) == byte.decode(ids)
    msgs = [{"role": "user", "content": "hi"}]
    assert hf.apply_chat_template(msgs) == byte.apply_chat_template(msgs)
    dec = hf.decoder()
    assert [dec.push(i) for i in byte.encode("é日")[1:]] == ["", "é", "", "", "日"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny preset's seed-0 weights saved as a Hugging Face Llama checkpoint."""
    path = tmp_path_factory.mktemp("ckpt")
    model = LlamaModel(PRESETS["tiny"])
    model.init_random(0)
    save_safetensors(model, path)
    return path


@pytest.mark.slow
def test_engine_serves_a_local_checkpoint(engine_factory, engine, checkpoint: Path) -> None:
    served = engine_factory("--model", str(checkpoint), name="ckpt")
    info = httpx.get(f"{served.url}/model_info").json()
    assert info["model_path"] == str(checkpoint) and info["architectures"] == ["LlamaForCausalLM"]
    params = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
    body = {"text": "Same weights, same text.", "sampling_params": params}
    ours = httpx.post(f"{served.url}/generate", json=body).json()
    preset = httpx.post(f"{engine.url}/generate", json=body).json()
    assert ours["output_ids"] == preset["output_ids"] and ours["text"] == preset["text"]


@pytest.mark.slow
def test_checkpoint_with_tokenizer_json_and_bad_paths(engine_factory, checkpoint: Path, tmp_path: Path) -> None:
    ByteTokenizer().write_hf_files(checkpoint)
    served = engine_factory("--model", str(checkpoint), name="ckpt-tok")
    assert httpx.get(f"{served.url}/model_info").json()["tokenizer_path"] == str(checkpoint)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "ignore_eos": True}
    assert httpx.post(f"{served.url}/v1/chat/completions", json=chat).json()["usage"]["prompt_tokens"] == 22
    with pytest.raises(RuntimeError, match=r"--model .*missing: not a directory"):
        engine_factory("--model", str(tmp_path / "missing"), name="bad")
