"""`llmpath engine`: presets listing and flag errors (file/flag, reason, exit code ≠ 0)."""

from __future__ import annotations

import json
import subprocess

import pytest


def run(llmpath_bin: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([llmpath_bin, "engine", *args], capture_output=True, text=True, timeout=60)


def test_presets_lists_the_shapes(llmpath_bin: str) -> None:
    out = run(llmpath_bin, "presets")
    assert out.returncode == 0
    lines = {line.split()[0]: line for line in out.stdout.splitlines()}
    assert set(lines) == {"tiny", "small", "llama-8b"}
    assert "hidden 4096, 32 layers, 32 heads / 8 KV, vocab 128256" in lines["llama-8b"]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--preset", "huge"], "unknown preset 'huge'; known presets: tiny, small, llama-8b"),
        (["--device", "tpu"], "--device must be cpu or cuda"),
        (["--schedule-policy", "random"], "--schedule-policy must be fcfs or lpm"),
        (["--max-running", "0"], "--max-running must be at least 1"),
        (["--chunked-prefill-size", "0"], "--chunked-prefill-size must be -1 (off) or at least 1"),
        (["--bucket-time-to-first-token", "tse 1 x"], "bucket rule 'tse 1 x': values must be numbers"),
        # these started an engine (70000 on port 4464, '' on every interface) or crashed in torch (a traceback)
        (["--context-length", "0"], "--context-length must be at least 1"),
        (["--context-length", "-1"], "--context-length must be at least 1"),
        (["--port", "70000"], "--port must be 0-65535, got 70000"),
        (["--port", "-5"], "--port must be 0-65535, got -5"),
        (["--host", ""], "--host: empty: give an address"),
        (["--host", "bad host!"], "--host: 'bad host!' is neither an IP address"),
    ],
)
def test_bad_flags_exit_2_with_the_reason(llmpath_bin: str, flags: list[str], message: str) -> None:
    out = run(llmpath_bin, "serve", "--port", "1", *flags)
    assert out.returncode == 2
    assert message in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("device", [[], ["--device", "cpu"]])
def test_gpu_only_preset_is_refused_on_cpu_in_one_line(llmpath_bin: str, device: list[str]) -> None:
    out = run(llmpath_bin, "serve", "--port", "1", "--preset", "llama-8b", *device)
    assert out.returncode == 2
    assert out.stderr == (
        "llmpath engine serve: --preset llama-8b is GPU only (the Llama-3-8B shape: tens of GB of weights and KV "
        "cache); use --device cuda, or --preset tiny or small on CPU\n"
    )
    assert out.stdout == ""


def test_a_checkpoint_the_engine_cannot_run_is_refused_in_one_line(llmpath_bin: str, tmp_path) -> None:
    shape = {"vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = {"architectures": ["LlamaForCausalLM"], **shape, "intermediate_size": 176, "rope_scaling": {"factor": 8}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    out = run(llmpath_bin, "serve", "--port", "1", "--model", str(tmp_path))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith("llmpath engine serve: ")
    assert "rope_scaling is not supported by the embedded engine" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[1, 2]", "not a JSON object (a Hugging Face config.json is one)"),  # was AttributeError, a traceback
        (b'{"vocab_size": "\xff"}', "not UTF-8 text (byte at offset 16)"),  # was the bare codec message
        (None, "cannot read: Is a directory"),  # config.json a folder: was a traceback
    ],
)
def test_a_config_json_that_is_no_config_is_named(
    llmpath_bin: str, tmp_path, content: bytes | None, reason: str
) -> None:
    if content is None:
        (tmp_path / "config.json").mkdir()
    else:
        (tmp_path / "config.json").write_bytes(content)
    out = run(llmpath_bin, "serve", "--port", "1", "--model", str(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr == f"llmpath engine serve: {tmp_path / 'config.json'}: {reason}\n"
