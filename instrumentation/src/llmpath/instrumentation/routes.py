"""The route template of a request, with the prefixes of the Starlette ``Mount``s it went through (Starlette), or
the matched handler's ``path_template`` (Litestar).

A mounted app's router leaves only its own route in the ASGI scope (``/items/{id}`` for ``/api/items/7`` when the
app is mounted at ``/api``); the mounts it went through show only as the concrete ``root_path`` they added. The
prefix is turned back into the mounts' own templates (``/tenants/{tenant}``, not ``/tenants/acme``) by matching it
against the instrumented app's mounts, once per distinct prefix. Duck-typed: neither framework is imported.
"""

from __future__ import annotations

from typing import Any

#: Distinct concrete mount prefixes remembered (a mount template with parameters has one per value).
_MAX_PREFIXES = 1024
#: Mounts (and middleware wrappers) nested deeper than this are not looked up (an app mounted in itself would loop).
_MAX_DEPTH = 32
#: The segment standing for mounts whose templates cannot be found.
UNRESOLVED_MOUNT = "/{mount}"


class RouteTemplates:
    """Route templates of requests to one instrumented app (``app`` is where mount templates are looked up)."""

    def __init__(self) -> None:
        self.app: Any = None
        self._prefixes: dict[str, str] = {}

    def template(self, scope: dict[str, Any]) -> str | None:
        """The matched route's template, mount prefixes included; ``None`` if no route or mount matched."""
        route = scope.get("route")
        # Starlette's matched route, else Litestar's template of the matched handler.
        template: str | None = getattr(route, "path", None) or scope.get("path_template") or None
        app_root = scope.get("app_root_path")  # set by the first Mount the request went through
        if app_root is None:
            return template
        root: str = scope.get("root_path", "")
        if len(root) <= len(app_root) or not root.startswith(app_root):
            return template
        prefix = self._prefix(root[len(app_root) :])
        # A mounted app that matched no route of its own (static files, a plain ASGI app, its 404s) leaves no
        # route, or the Mount itself, whose path ends the prefix already: the request is the mount's.
        return prefix if template is None or _is_mount(route) else prefix + template

    def _prefix(self, concrete: str) -> str:
        found = self._prefixes.get(concrete)
        if found is None:
            found = mount_template(self.app, concrete)
            if len(self._prefixes) < _MAX_PREFIXES:
                self._prefixes[concrete] = found
        return found


def mount_template(app: Any, concrete: str) -> str:
    """The template of the mounts of ``app`` that the concrete prefix ``concrete`` went through. Mounts that cannot
    be found (an app that is no Starlette router, however deep in middleware) become one :data:`UNRESOLVED_MOUNT`
    segment: a bounded label, not one per parameter value."""
    templates: list[str] = []
    routes = _routes_of(app)
    remaining = concrete + "/"
    for _ in range(_MAX_DEPTH):
        if remaining == "/":
            return "".join(templates)
        for route in routes:
            regex = getattr(route, "path_regex", None)
            if regex is None or not _is_mount(route):
                continue
            match = regex.match(remaining)
            if match is not None:
                templates.append(route.path)
                remaining = "/" + match.groupdict().get("path", "")
                routes = getattr(route, "routes", None) or _routes_of(getattr(route, "app", None))
                break
        else:
            break
    return "".join(templates) + UNRESOLVED_MOUNT


def _routes_of(app: Any) -> list[Any]:
    """The routes of ``app``, looked for through the middleware wrapping it (each keeps the next app as ``.app``)."""
    for _ in range(_MAX_DEPTH):
        if app is None:
            break
        routes = getattr(app, "routes", None)
        if routes:
            return list(routes)
        app = getattr(app, "app", None)
    return []


def _is_mount(route: Any) -> bool:
    """A Starlette ``Mount`` (it has routes of its own and no endpoint), not a ``Route`` or ``WebSocketRoute``."""
    return hasattr(route, "routes") and not hasattr(route, "endpoint")
