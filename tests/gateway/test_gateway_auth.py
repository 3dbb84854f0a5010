"""API keys: hashed storage, Bearer and Basic, constant-time comparison over every stored key."""

from __future__ import annotations

import base64
import hmac

import pytest

from llmpath.gateway.auth import ANONYMOUS, KeyStore
from llmpath.gateway.config import ApiKeyConfig, RateConfig, hash_key

KEYS = (
    ApiKeyConfig(sha256=hash_key("sk-acme"), tenant="acme"),
    ApiKeyConfig(sha256=hash_key("sk-admin"), tenant="ops", admin=True, rate=RateConfig(requests_per_second=2)),
)


def test_bearer_maps_to_tenant() -> None:
    store = KeyStore(KEYS)
    principal = store.authenticate("Bearer sk-acme")
    assert principal is not None and (principal.tenant, principal.admin) == ("acme", False)
    admin = store.authenticate("bearer   sk-admin ")
    assert admin is not None and admin.admin and admin.rate == RateConfig(requests_per_second=2)


@pytest.mark.parametrize(
    "header", [None, "", "Bearer", "Bearer ", "Bearer sk-acmE", "Token sk-acme", "sk-acme", "Bearer sk-acme-x"]
)
def test_rejects_missing_malformed_and_unknown(header: str | None) -> None:
    assert KeyStore(KEYS).authenticate(header) is None


def test_basic_auth_for_browsers() -> None:
    store = KeyStore(KEYS)
    encoded = base64.b64encode(b"anyone:sk-admin").decode()
    principal = store.authenticate(f"Basic {encoded}")
    assert principal is not None and principal.tenant == "ops"
    assert store.authenticate("Basic !!!") is None
    assert store.authenticate("Basic " + base64.b64encode(b"no-colon").decode()) is None


def test_compares_against_every_key_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    store = KeyStore(KEYS)
    assert store.authenticate("Bearer sk-acme") is not None  # matches the first key ...
    assert len(calls) == 2  # ... and still compares against the second
    assert all(len(a) == len(b) == 32 for a, b in calls)  # digests, never the raw key


def test_insecure_mode_is_anonymous_admin() -> None:
    principal = KeyStore((), insecure_no_auth=True).authenticate(None)
    assert principal is not None and principal.tenant == ANONYMOUS and principal.admin
