"""``tokenizer.chat_template``: which values it takes, and the renderer the gateway (and its SGLang backends) use.

The value is ``chatml``, a Jinja chat template (text containing ``{{``, ``{%`` or ``{#``), or the path of a model's
``tokenizer_config.json`` or of its folder; anything else is an error (a misspelt ``chatML`` must not become a
template that renders every prompt as the word itself). The renderer is the backends'
:func:`~llmpath.backends.chat_template.jinja_template`, whose ``raise_exception(...)`` raises
:class:`ChatTemplateRejected`, so that a template refusing the client's messages (a 400) is told apart from a
broken one (a 500); it renders within a render budget (:mod:`llmpath.backends.template_budget`), so that a runaway
template fails instead of hanging the gateway.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from llmpath.backends.chat_template import (
    ChatTemplateRejected,
    Messages,
    jinja_template,
    read_tokenizer_config,
    render_chatml,
)
from llmpath.backends.template_budget import RenderBudgetExceeded

#: The built-in template names (the embedded engine's ChatML).
NAMES = ("chatml",)
_JINJA_MARKERS = ("{{", "{%", "{#")


def is_template_source(value: str) -> bool:
    """Whether ``value`` is a Jinja template's text rather than a name or a path."""
    return any(marker in value for marker in _JINJA_MARKERS)


def resolve(value: str, base: Path) -> str:
    """``value`` with a relative path made relative to ``base`` (the configuration file's folder)."""
    if value in NAMES or is_template_source(value) or Path(value).is_absolute():
        return value
    return str(base / value)


def load_renderer(spec: str, base: Path | None = None) -> Callable[[Messages], str]:
    """The renderer of a ``tokenizer.chat_template`` value (a relative path is relative to ``base``, else to the
    current folder); raises ``ValueError`` naming the problem (an unknown name, a missing or unreadable file, a
    Jinja syntax error)."""
    if spec in NAMES:
        return render_chatml
    specials: dict[str, str] = {}
    origin = ""
    if is_template_source(spec):
        source = spec
    else:
        path = Path(resolve(spec, base or Path()))
        source, specials = _read_tokenizer_config(spec, path)
        origin = f"{path}: chat_template: "
    from jinja2 import TemplateSyntaxError

    try:
        return jinja_template(source, **specials)
    except TemplateSyntaxError as exc:
        raise ValueError(f"{origin}Jinja syntax error at line {exc.lineno} of the template: {exc.message}") from None


def check_renders(render: Callable[[Messages], str]) -> str | None:
    """Why ``render`` cannot render one user message (the least any chat needs), or None when it can (a template
    over its render budget says which limit it went over)."""
    try:
        render([{"role": "user", "content": "example"}])
    except ChatTemplateRejected as exc:
        return f"the template refuses a single user message: {exc}"
    except RenderBudgetExceeded as exc:
        return f"the template fails to render a single user message: {exc}"
    except Exception as exc:  # any failure of a user-supplied template is a configuration problem
        return f"the template fails to render a single user message: {type(exc).__name__}: {exc}"
    return None


def _read_tokenizer_config(spec: str, path: Path) -> tuple[str, dict[str, str]]:
    if not path.exists():
        if "/" in spec or path.suffix:  # meant as a path
            raise ValueError(f"{path} does not exist (a relative path is relative to the configuration file)")
        hint = f"; did you mean {spec.lower()!r}?" if spec.lower() in NAMES else ""
        raise ValueError(
            f"unknown chat template {spec!r}{hint} (use {' or '.join(NAMES)}, a Jinja template: text with {{{{ or "
            f"{{%, or the path of a tokenizer_config.json or of its folder; {path} does not exist)"
        )
    cfg_path = path / "tokenizer_config.json" if path.is_dir() else path
    if cfg_path.suffix != ".json":
        raise ValueError(
            f"{cfg_path} is not a tokenizer_config.json (a .json file with a chat_template); to use a Jinja "
            "template file, put its text in the field"
        )
    return read_tokenizer_config(cfg_path)
