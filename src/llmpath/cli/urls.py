"""Checks of the URLs given on the command line, so that a typo is refused up front instead of ending up in every
generated link (or in an exporter that fails at its first export)."""

from __future__ import annotations

from urllib.parse import urlsplit

import typer


def http_url_problem(url: str) -> str | None:
    """Why ``url`` is not an absolute http(s) URL with a host and without query or fragment (links are made by
    appending paths to it); ``None`` if it is."""
    if not url or any(c.isspace() or ord(c) < 32 for c in url):
        return "must be an absolute http(s) URL without spaces"
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018  # raises on a port that is not a number
    except ValueError as exc:
        return f"is not a valid URL ({exc})"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an absolute http(s) URL with a host (e.g. https://grafana.example.com)"
    if parts.query or parts.fragment:
        return "must have no query or fragment (links are made by appending paths to it)"
    return None


def check_http_url(url: str | None, option: str) -> None:
    """A usage error naming ``option`` (exit status 2) unless ``url`` is ``None`` or passes :func:`http_url_problem`."""
    if url is not None and (problem := http_url_problem(url)) is not None:
        raise typer.BadParameter(f"{url!r} {problem}", param_hint=option)


def check_base_url_or_path(url: str | None, option: str) -> None:
    """Like :func:`check_http_url`, but a relative path (``runbooks/generated``: no scheme, no host) and a local
    folder's ``file:///`` URL (the demo's runbooks) pass too."""
    if url is None or (url and not any(c.isspace() for c in url) and _is_path_or_file_url(url)):
        return
    check_http_url(url, option)


def _is_path_or_file_url(url: str) -> bool:
    parts = urlsplit(url)
    if parts.scheme == "file":
        return parts.path.startswith("/") and parts.netloc in ("", "localhost")
    return not parts.scheme and not parts.netloc
