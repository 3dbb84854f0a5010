"""Byte tokenizer, incremental decoding, chat templates, sampling parameters and the sampler."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llmpath.backends.chat_template import load_chat_template, render_chatml
from llmpath.backends.engine.sampling import InvalidSamplingParams, Sampler, SamplingParams, parse_sampling_params
from llmpath.backends.engine.tokenizer import ByteTokenizer


def test_byte_tokenizer_round_trips_text_and_special_tokens() -> None:
    tok = ByteTokenizer()
    text = "<|im_start|>user\nnaïve 日本<|im_end|>\n"
    ids = tok.encode(text)
    assert ids[0] == tok.bos_token_id and ids[1] == 258 and 259 in ids
    assert len(ids) == 1 + 2 + len("user\nnaïve 日本".encode()) + 1
    assert tok.decode(ids, skip_special_tokens=False) == "<|begin_of_text|>" + text
    assert tok.decode(ids) == "user\nnaïve 日本\n"


def test_incremental_decoder_holds_back_partial_utf8() -> None:
    dec = ByteTokenizer().decoder()
    assert [dec.push(b) for b in "é日".encode()] == ["", "é", "", "", "日"]


def test_chat_template_is_chatml_and_matches_the_backend_default() -> None:
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = ByteTokenizer().apply_chat_template(msgs)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert load_chat_template(None)(msgs) == text == render_chatml(msgs)


def test_jinja_chat_template_from_a_tokenizer_config(tmp_path: Path) -> None:
    cfg = {
        "bos_token": {"content": "<s>"},
        "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    render = load_chat_template(str(tmp_path))
    assert render([{"role": "user", "content": "Hi"}]) == "<s>[user] Hi\n[assistant] "
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no chat_template"):
        load_chat_template(str(tmp_path / "tokenizer_config.json"))


# What Hub templates use beyond plain Jinja: loop controls, {% generation %} blocks, strftime_now() and tojson.
HUB_FEATURES = (
    "{{ bos_token }}Today is {{ strftime_now('%Y') }}.\n"
    "{% for m in messages %}{% if m['role'] == 'skip' %}{% continue %}{% endif %}"
    "{% if m['role'] == 'stop' %}{% break %}{% endif %}"
    "[{{ m['role'] }}] {% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}{% endgeneration %}"
    "{% else %}{{ m['content'] }}{% endif %} {{ m | tojson }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant] {% endif %}"
)


def test_jinja_templates_render_as_transformers_renders_them() -> None:
    """A checkpoint's template gives the text transformers' apply_chat_template gives (the caches see that text)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [
        {"role": "user", "content": "naïve <b>&'quotes'</b>"},
        {"role": "skip", "content": "left out"},
        {"role": "assistant", "content": "日本"},
        {"role": "stop", "content": "ends the loop"},
        {"role": "user", "content": "never rendered"},
    ]
    ours = load_chat_template(HUB_FEATURES)
    theirs = render_jinja_template([messages], chat_template=HUB_FEATURES, add_generation_prompt=True)[0][0]
    assert ours(messages) == theirs
    assert "\"naïve <b>&'quotes'</b>\"" in theirs and "never rendered" not in theirs


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"temperature": -1}, "temperature must be non-negative"),
        ({"top_p": 0}, "top_p must be in (0, 1]"),
        ({"top_k": 0}, "top_k must be -1"),
        ({"min_p": 2}, "min_p must be in [0, 1]"),
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0"),
        ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens must be in [0, max_new_tokens(2)]"),
        ({"frequency_penalty": 3}, "frequency_penalty must be in [-2, 2]"),
        ({"n": 2}, "n must be 1"),
    ],
)
def test_out_of_range_sampling_params_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        parse_sampling_params(raw).verify(vocab_size=512)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"max_new_tokens": "many"}, "max_new_tokens must be an integer"),
        ({"stop": 3}, "stop must be a string or a list of strings"),
        ({"regex": "a+"}, "regex (constrained decoding) is not supported"),
        ({"bogus": 1}, "unknown sampling parameter 'bogus'"),
    ],
)
def test_malformed_sampling_params_are_refused(raw: dict, message: str) -> None:
    with pytest.raises(InvalidSamplingParams) as info:
        parse_sampling_params(raw)
    assert message in str(info.value)


def test_null_and_router_defaults_are_accepted() -> None:
    params = parse_sampling_params({"max_new_tokens": 4, "temperature": None, "stop": "", "stream_interval": 1})
    assert params.max_new_tokens == 4 and params.temperature == 1.0 and params.stop == []


def test_sampler_greedy_top_k_and_blocked_ids() -> None:
    sampler = Sampler(sampleable_ids=range(4), vocab_size=6, seed=0)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 9.0, 9.0]] * 3)
    greedy = SamplingParams(temperature=0.0)
    top1 = SamplingParams(temperature=1.0, top_k=1)
    out = sampler.sample(logits.clone(), [greedy, top1, greedy], [[], [], []], [[], [], [2]], [None, None, None])
    assert out == [2, 2, 3]  # 4 and 5 are never sampled; the banned id 2 is skipped


def test_sampler_seeded_generators_are_reproducible() -> None:
    sampler = Sampler(range(8), 8, seed=0)
    logits = torch.zeros(1, 8)
    p = SamplingParams(temperature=1.0)
    draws = [
        [sampler.sample(logits.clone(), [p], [[]], [[]], [g])[0] for _ in range(10)]
        for g in (torch.Generator().manual_seed(5), torch.Generator().manual_seed(5))
    ]
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


def test_repetition_penalties_lower_repeated_tokens() -> None:
    sampler = Sampler(range(3), 3, seed=0)
    p = SamplingParams(temperature=0.0, frequency_penalty=2.0)
    logits = torch.tensor([[1.0, 0.5, 0.0]])
    assert sampler.sample(logits.clone(), [p], [[0]], [[]], [None]) == [1]
    assert sampler.sample(logits.clone(), [SamplingParams(temperature=0.0)], [[0]], [[]], [None]) == [0]


@pytest.mark.parametrize(
    "params",
    [SamplingParams(temperature=1e39), SamplingParams(temperature=1e308), SamplingParams(repetition_penalty=0.0)],
    ids=["temperature-over-float32", "temperature-1e308", "repetition-penalty-0"],
)
def test_accepted_params_never_make_sampling_raise(params: SamplingParams) -> None:
    """Values ``verify`` accepts must sample: a temperature above float32's range made blocked ids' ``-inf / inf`` NaN,
    and a repetition penalty of 0 made repeated positive logits ``inf`` — the step raised and failed every request in
    flight, not only the one that asked for them."""
    params.verify(vocab_size=6)
    sampler = Sampler(sampleable_ids=range(4), vocab_size=6, seed=0)
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0, 9.0, 9.0]])
    draws = {sampler.sample(logits.clone(), [params], [[1, 2]], [[]], [None])[0] for _ in range(40)}
    assert draws and draws <= {0, 1, 2, 3}  # only sampleable ids
    if params.repetition_penalty == 0.0:
        assert draws == {1, 2}  # the repeated tokens with positive logits, infinitely favoured


def test_an_integer_past_floats_range_is_refused_not_an_overflow() -> None:
    """A JSON integer too large for a float (``1e400`` written out) was an ``OverflowError``: a 500 on /generate."""
    with pytest.raises(InvalidSamplingParams, match="temperature must be a number"):
        parse_sampling_params({"temperature": 10**400})
