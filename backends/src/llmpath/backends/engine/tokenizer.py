"""Tokenizers: a byte-level tokenizer that needs no download, and a Hugging Face ``tokenizer.json`` wrapper.

Both render chat messages with a chat template and decode incrementally for streaming (a partial UTF-8
sequence is held back until it is complete, as SGLang's detokenizer does).
"""

from __future__ import annotations

import codecs
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from llmpath.backends.chat_template import CHATML_TEMPLATE, jinja_template, named_template, render_chatml, token_text


class IncrementalDecoder(Protocol):
    def push(self, token_id: int) -> str:
        """Feed one output token; return the text it completes (possibly empty)."""
        ...

    def flush(self) -> str:
        """The text still held back (at the end of the output)."""
        ...


class Tokenizer(Protocol):
    """What the engine needs from a tokenizer."""

    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    #: Token ids the sampler may produce (others are padding rows of the embedding or unprintable bytes).
    sampleable_ids: Sequence[int]

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def decoder(self, skip_special_tokens: bool = True) -> IncrementalDecoder: ...

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are tokens 0-255; four special tokens follow; the rest of the vocabulary is padding.

    With random weights any byte could come out, so only printable ASCII, newline and the end tokens are sampled:
    the random model's output is readable, valid UTF-8 text."""

    SPECIALS = ("<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>")

    def __init__(self) -> None:
        self.special_ids = {tok: 256 + i for i, tok in enumerate(self.SPECIALS)}
        self.special_by_id = {v: k for k, v in self.special_ids.items()}
        self.bos_token_id: int | None = self.special_ids["<|begin_of_text|>"]
        self.eos_token_ids: tuple[int, ...] = (self.special_ids["<|end_of_text|>"], self.special_ids["<|im_end|>"])
        self.sampleable_ids: Sequence[int] = [10, *range(32, 127), *self.eos_token_ids]
        self._split = re.compile("(" + "|".join(re.escape(s) for s in self.SPECIALS) + ")")

    def encode(self, text: str) -> list[int]:
        ids: list[int] = [self.bos_token_id] if self.bos_token_id is not None else []
        for part in self._split.split(text):
            if not part:
                continue
            special = self.special_ids.get(part)
            if special is not None:
                ids.append(special)
            else:
                ids.extend(part.encode("utf-8"))
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        dec = self.decoder(skip_special_tokens)
        return "".join(dec.push(i) for i in ids) + dec.flush()

    def decoder(self, skip_special_tokens: bool = True) -> _ByteDecoder:
        return _ByteDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return render_chatml(messages)

    def write_hf_files(self, directory: Path) -> Path:
        """Write this tokenizer as a Hugging Face ``tokenizer.json`` (byte-level BPE without merges: the same ids)
        plus ``tokenizer_config.json`` with the ChatML template, so tools that load a worker's tokenizer by path
        (sglang-router does) find it locally."""
        directory.mkdir(parents=True, exist_ok=True)
        byte_chars = _gpt2_bytes_to_unicode()
        bos = self.SPECIALS[0]
        added = [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                  "special": True} for t, i in self.special_ids.items()]  # fmt: skip
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        spec: dict[str, Any] = {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": {
                "type": "TemplateProcessing",
                "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {bos: {"id": bos, "ids": [self.special_ids[bos]], "tokens": [bos]}},
            },
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": {byte_chars[b]: b for b in range(256)},
                "merges": [],
            },  # fmt: skip
        }
        (directory / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
        config = {"bos_token": bos, "eos_token": self.SPECIALS[3], "chat_template": CHATML_TEMPLATE,
                  "model_max_length": 1 << 30, "tokenizer_class": "PreTrainedTokenizerFast"}  # fmt: skip
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
        return directory


def _gpt2_bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map used by byte-level BPE vocabularies."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


class _ByteDecoder:
    def __init__(self, tok: ByteTokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._skip = skip_special_tokens
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        if token_id < 256:
            return self._utf8.decode(bytes((token_id,)))
        pending = self._utf8.decode(b"", final=True)  # a special token ends any partial character
        self._utf8.reset()
        special = self._tok.special_by_id.get(token_id)
        if special is None or self._skip:
            return pending
        return pending + special

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (via the ``tokenizers`` package) with the chat template of
    ``tokenizer_config.json`` rendered by Jinja, as ``transformers`` does."""

    def __init__(self, model_dir: Path, vocab_size: int, eos_token_ids: tuple[int, ...]) -> None:
        try:
            from tokenizers import Tokenizer as _HFTok
        except ImportError:
            raise ValueError(
                "loading a checkpoint's tokenizer.json needs the 'tokenizers' package: pip install tokenizers"
            ) from None
        self._tok = _HFTok.from_file(str(model_dir / "tokenizer.json"))
        cfg_path = model_dir / "tokenizer_config.json"
        cfg: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        self._special_strings = {
            k: token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")
        }
        bos = self._special_strings["bos_token"]
        self.bos_token_id = self._tok.token_to_id(bos) if bos else None
        eos = self._special_strings["eos_token"]
        eos_id = self._tok.token_to_id(eos) if eos else None
        self.eos_token_ids = tuple(dict.fromkeys([*eos_token_ids, *([eos_id] if eos_id is not None else [])]))
        self.sampleable_ids: Sequence[int] = range(min(vocab_size, self._tok.get_vocab_size(with_added_tokens=True)))
        source = named_template(cfg.get("chat_template"))
        specials = {k: v for k, v in self._special_strings.items() if v is not None}
        self._render = jinja_template(source, **specials) if source else render_chatml

    def encode(self, text: str) -> list[int]:
        # Chat templates already contain the BOS text; add_special_tokens would double it, as in SGLang.
        ids: list[int] = self._tok.encode(text, add_special_tokens=True).ids
        if self.bos_token_id is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos_token_id:
            ids = ids[1:]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def decoder(self, skip_special_tokens: bool = True) -> _OffsetDecoder:
        return _OffsetDecoder(self, skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict[str, str]]) -> str:
        return self._render(messages)


class _OffsetDecoder:
    """SGLang/vLLM-style incremental detokenization: decode a window and emit what became stable."""

    def __init__(self, tok: HFTokenizer, skip_special_tokens: bool) -> None:
        self._tok = tok
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return full[len(prefix) :]

    def flush(self) -> str:
        prefix = self._tok.decode(self._ids[self._prefix_offset : self._read_offset], self._skip)
        full = self._tok.decode(self._ids[self._prefix_offset :], self._skip)
        return full[len(prefix) :]


def load_tokenizer(model_dir: Path | None, vocab_size: int, eos_token_ids: tuple[int, ...] = ()) -> Tokenizer:
    """The checkpoint's tokenizer when ``model_dir`` has a ``tokenizer.json``, else the byte tokenizer."""
    if model_dir is not None and (model_dir / "tokenizer.json").exists():
        return HFTokenizer(model_dir, vocab_size, eos_token_ids)
    tok = ByteTokenizer()
    if vocab_size < 256 + len(tok.SPECIALS):
        raise ValueError(
            f"the byte tokenizer needs a vocabulary of at least {256 + len(tok.SPECIALS)}, got {vocab_size}"
        )
    return tok
