"""Applying a changed configuration file to a running gateway (``SIGHUP`` or ``POST /admin/reload``).

API keys, limits and routes change in place, without dropping a stream: requests already admitted finish under
the configuration they started with. Every other section (listen address, backends, routing, prompt cache,
tokenizer, health checks, usage ledger, debug, ``insecure_no_auth``), and the backend clients' connect and read
timeouts, are compared and reported as needing a restart, and left as they are. A configuration that does not
load, or that the running gateway cannot apply, changes nothing.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from dataclasses import dataclass

from llmpath.gateway.assembly import AssemblyError
from llmpath.gateway.auth import KeyStore
from llmpath.gateway.config import ConfigError, GatewayConfig
from llmpath.gateway.service import Gateway, build_routes

log = logging.getLogger("llmpath.gateway")

#: Sections a reload applies; a change anywhere else needs a restart.
LIVE_SECTIONS = ("api_keys", "limits", "routes")
#: ``limits.timeouts`` fields the backend clients were built with (applied at the next restart).
_CLIENT_TIMEOUTS = ("connect_s", "read_s")


class ReloadError(Exception):
    """The new configuration was not applied (the message names the file or section and the reason)."""


@dataclass(frozen=True)
class ConfigChange:
    """What a reload changed, and which changed sections only take effect after a restart."""

    applied: tuple[str, ...]
    restart_required: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"applied": list(self.applied), "restart_required": list(self.restart_required)}


def apply_config(gateway: Gateway, new: GatewayConfig) -> ConfigChange:
    """Apply ``new``'s live sections to ``gateway`` (all or nothing); raises :class:`ReloadError`."""
    old = gateway.config
    changed = [name for name in GatewayConfig.model_fields if getattr(old, name) != getattr(new, name)]
    live = [name for name in changed if name in LIVE_SECTIONS]
    restart = [name for name in changed if name not in LIVE_SECTIONS]
    # The backend clients were built with the connect and read timeouts: those two wait for a restart.
    old_t, new_t = old.limits.timeouts, new.limits.timeouts
    kept = {f: getattr(old_t, f) for f in _CLIENT_TIMEOUTS if getattr(old_t, f) != getattr(new_t, f)}
    if kept:
        restart += [f"limits.timeouts.{f}" for f in kept]
        new = new.model_copy(
            update={"limits": new.limits.model_copy(update={"timeouts": new_t.model_copy(update=kept)})}
        )
        if new.limits == old.limits:
            live.remove("limits")
    if "api_keys" in live and not new.api_keys and not old.insecure_no_auth:
        raise ReloadError("api_keys: the new configuration has no API keys; every request would be refused")
    routes = None
    if "routes" in live:
        running = {b.display_name for b in old.backends}
        for i, route in enumerate(new.routes):
            unknown = sorted(set(route.backends) - running)
            if unknown:
                raise ReloadError(
                    f"routes[{i}].backends: {', '.join(unknown)} not among the running backends "
                    f"({', '.join(sorted(running))}); backends change only with a restart"
                )
        try:
            routes = build_routes(new.routes, gateway.render_chat)  # the running chat template
        except AssemblyError as exc:
            raise ReloadError(str(exc)) from None
    if "api_keys" in live:
        gateway.keys = KeyStore(new.api_keys, insecure_no_auth=old.insecure_no_auth)
    if "limits" in live:
        lim = new.limits
        gateway.admission.resize(lim.max_concurrency, lim.max_queue, lim.timeouts.queue_s)
    if "limits" in live or "api_keys" in live:  # a key's own rate may have changed too
        gateway.rates.reconfigure(new.limits.tenant_rate)
        gateway.tokens.reconfigure(new.limits.tenant_tokens)
    if routes is not None:
        gateway.routes = routes
    gateway.config = old.model_copy(update={name: getattr(new, name) for name in live})
    return ConfigChange(tuple(live), tuple(restart))


class ConfigReloader:
    """Loads the configuration again (``load``: the file plus the command line's overrides) and applies it,
    counting the outcome in ``on_result(success)`` (the reload metrics)."""

    def __init__(
        self,
        gateway: Gateway,
        load: Callable[[], GatewayConfig] | None,
        on_result: Callable[[bool], None] | None = None,
    ) -> None:
        self.gateway = gateway
        self.load = load
        self.on_result = on_result

    def reload(self, trigger: str) -> ConfigChange:
        """Reload now (``trigger`` is logged: ``SIGHUP`` or the endpoint); raises :class:`ReloadError`."""
        if self.load is None:  # no reload was attempted: not counted (no later reload could clear the alert)
            reason = "the gateway was started without --config: there is no file to reload"
            log.warning("configuration reload (%s) refused: %s", trigger, reason)
            raise ReloadError(reason)
        try:
            try:
                config = self.load()
            except ConfigError:
                raise
            except Exception as exc:  # a file no check foresaw: still refused, logged and counted (never a 500)
                # Its class and frames only: the message of an unforeseen error may quote the file (credentials).
                where = "".join(traceback.format_tb(exc.__traceback__))
                log.error("configuration reload (%s): loading failed (%s):\n%s", trigger, type(exc).__name__, where)
                raise ConfigError(f"the configuration could not be loaded ({type(exc).__name__})") from None
            change = apply_config(self.gateway, config)
        except (ConfigError, ReloadError) as exc:
            log.error("configuration reload (%s) failed, nothing changed: %s", trigger, exc)
            self._count(False)
            raise ReloadError(str(exc)) from None
        self._count(True)
        log.info(
            "configuration reloaded (%s): applied %s%s",
            trigger,
            ", ".join(change.applied) or "nothing (no live section changed)",
            f"; restart to apply {', '.join(change.restart_required)}" if change.restart_required else "",
        )
        return change

    def _count(self, success: bool) -> None:
        if self.on_result is not None:
            self.on_result(success)
