"""``create_backend``: build a backend from its kind and URL (what configuration files name)."""

from __future__ import annotations

from typing import Any

from llmpath.backends.base import Backend

KINDS: tuple[str, ...] = ("sglang", "openai")


def create_backend(kind: str, url: str, *, name: str | None = None, **options: Any) -> Backend:
    """A backend of ``kind`` (``"sglang"`` — also the embedded engine — or ``"openai"``) at ``url``.

    ``options`` go to the backend's constructor (``connect_timeout``, ``read_timeout``, ``chat_template``,
    ``api_key``, ``model``, ``headers`` …); an unknown kind or option raises ``ValueError``.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"backend url must start with http:// or https://, got {url!r}")
    if kind == "sglang":
        from llmpath.backends.sglang import SGLangBackend as cls
    elif kind == "openai":
        from llmpath.backends.openai import OpenAIBackend as cls  # type: ignore[assignment]
    else:
        raise ValueError(f"unknown backend kind {kind!r}; known kinds: {', '.join(KINDS)}")
    try:
        return cls(url, name=name, **options)
    except TypeError as exc:
        raise ValueError(f"{kind} backend: {exc}") from None
