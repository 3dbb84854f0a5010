"""Chat templating for backends whose native API takes text (SGLang's ``/generate``).

The default is ChatML, the template of the embedded engine's byte tokenizer, so ``/generate`` with a rendered
conversation and the engine's own ``/v1/chat/completions`` see the same tokens (and share radix-cache prefixes).
For a real model, pass the model's Jinja template (or its ``tokenizer_config.json``) so the prompt matches what
SGLang's chat endpoint would build.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

Messages = Sequence[dict[str, str]]

#: ChatML as a Hugging Face Jinja chat template (what :func:`render_chatml` renders).
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def render_chatml(messages: Messages, add_generation_prompt: bool = True) -> str:
    """``<|im_start|>role\\ncontent<|im_end|>\\n`` per message, then the assistant header."""
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


class ChatTemplateRejected(ValueError):
    """The template called ``raise_exception(message)``: it refuses these messages (a role the model does not
    support, roles that do not alternate); the message is the template's own."""


def jinja_template(source: str, **special_tokens: str) -> Callable[[Messages], str]:
    """A renderer for a Hugging Face Jinja chat template (needs ``jinja2``), in Jinja's immutable sandbox with a
    render budget (:mod:`llmpath.backends.template_budget`, grown with the messages' number and length); the
    template's ``raise_exception`` raises :class:`ChatTemplateRejected`, a syntax error ``TemplateSyntaxError``, a
    render over its budget ``RenderBudgetExceeded``."""
    try:
        from llmpath.backends.template_budget import DEFAULT_LIMITS, BudgetedSandbox, render_within
    except ImportError:
        raise ValueError("a Jinja chat template needs the 'jinja2' package: pip install jinja2") from None

    def raise_exception(message: str) -> None:
        raise ChatTemplateRejected(str(message))

    # What transformers' apply_chat_template gives templates, so that a checkpoint's template renders the same text
    # (and so the same prefix for the caches): {% break %}/{% continue %}, {% generation %} blocks (training-mask
    # markers, rendered as their body), strftime_now(), and a tojson that keeps non-ASCII and HTML characters.
    env = BudgetedSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_blocks()]
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = _tojson
    template = env.from_string(source)

    def render(messages: Messages) -> str:
        messages = list(messages)
        chars = sum(len(v) for m in messages for v in m.values() if isinstance(v, str))
        limits = DEFAULT_LIMITS.plus(items=len(messages), chars=chars)
        return render_within(template, limits, messages=messages, add_generation_prompt=True, **special_tokens)

    return render


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
) -> str:
    """Hugging Face's ``tojson``: plain ``json.dumps`` (Jinja's own escapes ``<``, ``>``, ``&`` and ``'``)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _generation_blocks() -> type:
    """A Jinja extension for ``{% generation %}…{% endgeneration %}``: the body, rendered as is."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class GenerationBlocks(Extension):
        tags = {"generation"}

        def parse(self, parser: Any) -> nodes.Node:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Callable[[], str]) -> str:
            return caller()

    return GenerationBlocks


def load_chat_template(spec: str | Callable[[Messages], str] | None) -> Callable[[Messages], str]:
    """``None``/``"chatml"``: ChatML; a callable: used as is; a path to a ``tokenizer_config.json`` (or a directory
    holding one): its ``chat_template``; any other string: a Jinja template source."""
    if spec is None or spec == "chatml":
        return render_chatml
    if callable(spec):
        return spec
    path = Path(spec)
    if "{" not in spec and (path.is_dir() or path.suffix == ".json"):
        source, specials = read_tokenizer_config(path)
        return jinja_template(source, **specials)
    return jinja_template(spec)


def read_tokenizer_config(path: Path) -> tuple[str, dict[str, str]]:
    """The chat template of a ``tokenizer_config.json`` (``path`` is the file or its folder) and its special
    tokens (``bos_token``, ...); raises ``ValueError`` naming the file when it has none or cannot be read."""
    cfg_path = path / "tokenizer_config.json" if path.is_dir() else path
    try:
        cfg: Any = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{cfg_path}: cannot read a chat template: {exc}") from None
    source = named_template(cfg.get("chat_template")) if isinstance(cfg, dict) else None
    if source is None:
        raise ValueError(f"{cfg_path}: no chat_template in it")
    specials = {k: token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return source, {k: v for k, v in specials.items() if v is not None}


def named_template(source: object) -> str | None:
    """A ``chat_template`` value: a string, or a list of named templates (the ``default`` one is used)."""
    if isinstance(source, list):
        named = {t["name"]: t["template"] for t in source if isinstance(t, dict)}
        source = named.get("default", next(iter(named.values()), None))
    return source if isinstance(source, str) else None


def token_text(value: object) -> str | None:
    """The text of a special token in ``tokenizer_config.json`` (a string or an AddedToken object)."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None
