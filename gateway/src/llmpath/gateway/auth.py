"""Stage ``auth``: ``Authorization: Bearer <key>`` → tenant.

Keys are stored only as sha256 digests. A presented key is hashed and compared against every stored digest
with :func:`hmac.compare_digest`, so the time taken does not depend on which key (if any) matched or on how
many leading bytes agree. Keys are never logged or echoed.

``Basic`` (the key as password) is for browsers reading the debug pages, and only for reading: a browser sends the
credentials it cached to any page's cross-site form or ``fetch``, so a ``POST`` taking them would let any web page
an admin visits flush the prompt cache, reload the configuration or spend a tenant's tokens (cross-site request
forgery). Requests that change something need ``Bearer``, which browsers never add by themselves.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass

from llmpath.gateway.config import ApiKeyConfig, RateConfig, TokenRateConfig

ANONYMOUS = "anonymous"
#: The methods a browser's cached Basic credentials are accepted on: reading, never changing anything.
BASIC_AUTH_METHODS = frozenset({"GET", "HEAD"})


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: the tenant the key maps to, and whether it may use admin endpoints."""

    tenant: str
    admin: bool = False
    rate: RateConfig | None = None
    tokens: TokenRateConfig | None = None


class KeyStore:
    """Hashed API keys; ``authenticate`` maps an Authorization header to a :class:`Principal` or None."""

    __slots__ = ("_entries", "insecure")

    def __init__(self, keys: tuple[ApiKeyConfig, ...], *, insecure_no_auth: bool = False) -> None:
        self._entries = tuple(
            (bytes.fromhex(k.sha256), Principal(tenant=k.tenant, admin=k.admin, rate=k.rate, tokens=k.tokens))
            for k in keys
        )
        self.insecure = insecure_no_auth

    def __len__(self) -> int:
        return len(self._entries)

    def authenticate(self, authorization: str | None, *, basic: bool = True) -> Principal | None:
        """The principal for an ``Authorization`` header value (``Bearer`` or, for browsers and when ``basic``,
        ``Basic``)."""
        if self.insecure:
            return Principal(tenant=ANONYMOUS, admin=True)
        key = _extract_key(authorization, basic=basic)
        if key is None:
            return None
        digest = hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()
        found: Principal | None = None
        for stored, principal in self._entries:  # always scan all: no early exit on a match
            if hmac.compare_digest(stored, digest) and found is None:
                found = principal
        return found


def _extract_key(authorization: str | None, *, basic: bool) -> str | None:
    if not authorization:
        return None
    scheme, _, value = authorization.strip().partition(" ")
    value = value.strip()
    if not value:
        return None
    scheme = scheme.lower()
    if scheme == "bearer":
        return value
    if scheme == "basic" and basic:  # browsers (the waterfall page): any user name, the key as password
        try:
            decoded = base64.b64decode(value, validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            return None
        _, sep, password = decoded.partition(":")
        return password if sep and password else None
    return None
