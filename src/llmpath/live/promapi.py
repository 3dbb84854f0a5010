"""A small client for the Prometheus HTTP API: the instant queries, alerts, rules and targets that
``llmpath slo status`` and the demo read."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import httpx


class PrometheusError(RuntimeError):
    """Prometheus could not be read, or did not answer as its HTTP API does; the message says what, where, why
    (and never carries a credential)."""


#: Query parameters that carry a credential (``?access_token=``, ``?api_key=``, a presigned URL's ``X-Amz-Signature``).
_SECRET_PARAM = re.compile(r"token|key|secret|pass|auth|sig|credential", re.IGNORECASE)


def redact(url: str) -> str:
    """``url`` with its secrets masked, for messages: the secret of its userinfo (``https://user:***@host``; a
    userinfo without ``:`` may be a token: ``https://***@host``) and, after the host, the values of query parameters
    named like a credential (``?access_token=***``). Everything up to the last ``@`` counts as userinfo, so an
    unencoded ``/``, ``?`` or ``@`` in a password is masked too (an ``@`` in a query masks more than it needs)."""
    scheme, sep, rest = url.partition("://")
    userinfo, at, host = rest.rpartition("@")
    if sep and at:
        user, colon, _ = userinfo.partition(":")
        head = f"{scheme}://{user + ':' if colon and '/' not in user and '?' not in user else ''}***@"
    else:
        head, host = "", url
    host, question, query = host.partition("?")
    if question:
        params = (p.partition("=") for p in query.split("&"))
        query = "&".join(f"{k}{eq}***" if eq and _SECRET_PARAM.search(k) else f"{k}{eq}{v}" for k, eq, v in params)
    return head + host + question + query


class PrometheusClient:
    """The few Prometheus HTTP API calls llmpath needs (instant queries, alerts, rules, targets).

    ``base_url`` may carry a path prefix (``http://proxy/prometheus``) and basic-auth credentials
    (``https://user:password@host``); ``token`` is sent as a bearer token. Every request times out after
    ``timeout`` seconds. Failures raise :class:`PrometheusError`; warnings Prometheus returns with an answer
    (partial data, …) collect in :attr:`warnings`."""

    def __init__(self, base_url: str, timeout: float = 10.0, token: str | None = None) -> None:
        self.base_url = redact(base_url.rstrip("/"))
        self.timeout = timeout
        self.warnings: list[str] = []
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        after_userinfo = base_url.rpartition("@")[2]
        if "?" in after_userinfo or "#" in after_userinfo:  # httpx would drop it, and the path with it
            raise PrometheusError(
                f"{self.base_url} has a query or fragment: give the Prometheus base URL alone (a token with "
                "--bearer-token-file or LLMPATH_PROMETHEUS_TOKEN)"
            )
        try:
            self._http = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout, headers=headers)
        except (httpx.InvalidURL, TypeError, ValueError) as exc:
            raise PrometheusError(f"{self.base_url} is not a valid URL: {exc}") from None

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> PrometheusClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _get(self, path: str, **params: Any) -> Any:
        where = f"{self.base_url}{path}"
        try:
            resp = self._http.get(path, params=params)
        except httpx.TimeoutException:
            raise PrometheusError(f"timeout: no answer within {self.timeout:g}s from {where}") from None
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise PrometheusError(f"{type(exc).__name__}: {redact(str(exc)) or 'request failed'} ({where})") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            kind = resp.headers.get("content-type", "no content type")
            raise PrometheusError(f"{where}: HTTP {resp.status_code}, not a Prometheus API response ({kind})")
        if body["status"] != "success":
            raise PrometheusError(f"{where}: HTTP {resp.status_code}, {body.get('errorType')}: {body.get('error')}")
        self.warnings += [str(w) for w in body.get("warnings") or []]
        data = body.get("data")
        if not isinstance(data, dict):
            raise PrometheusError(f"{where}: HTTP {resp.status_code}, a success without data")
        return data

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """Instant query; returns the result vector (``[{"metric": {...}, "value": [ts, "v"]}, ...]``)."""
        params: dict[str, Any] = {"query": expr}
        if at is not None:
            params["time"] = at
        data = self._get("/api/v1/query", **params)
        result = data.get("result")
        if data.get("resultType") == "scalar":
            result = [{"metric": {}, "value": result}]
        if not isinstance(result, list) or not all(_is_sample(r) for r in result):
            raise PrometheusError(f"{self.base_url}/api/v1/query: {expr}: a result that is not an instant vector")
        return result

    def query_value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending and firing)."""
        alerts = self._get("/api/v1/alerts").get("alerts")
        if not isinstance(alerts, list) or not all(
            isinstance(a, dict) and isinstance(a.get("labels"), dict) for a in alerts
        ):
            raise PrometheusError(f"{self.base_url}/api/v1/alerts: an answer without a list of labelled alerts")
        return alerts

    def rule_groups(self) -> list[dict[str, Any]]:
        groups = self._get("/api/v1/rules").get("groups")
        if not isinstance(groups, list) or not all(
            isinstance(g, dict) and isinstance(g.get("rules", []), list) for g in groups
        ):
            raise PrometheusError(f"{self.base_url}/api/v1/rules: an answer without a list of rule groups")
        return groups

    def targets_up(self) -> dict[str, bool]:
        """scrapeUrl → whether the last scrape succeeded."""
        active = self._get("/api/v1/targets")["activeTargets"]
        return {t["scrapeUrl"]: t["health"] == "up" for t in active}

    def wait_for_evaluation(self, since: float, timeout: float = 60.0) -> None:
        """Wait until every target has been scraped after ``since`` (epoch seconds), then until every rule group has
        been evaluated after those scrapes: recording rules and alerts then account for everything up to ``since``."""
        scraped_by: float | None = None

        def lagging() -> list[str]:
            nonlocal scraped_by
            if scraped_by is None:
                targets = self._get("/api/v1/targets")["activeTargets"]
                scraped = {t["scrapeUrl"]: _epoch(t["lastScrape"]) for t in targets}
                behind = [url for url, at in scraped.items() if at <= since]
                if not scraped or behind:
                    return behind or ["(no targets)"]
                scraped_by = max(scraped.values())
            return [g["name"] for g in self.rule_groups() if _epoch(g["lastEvaluation"]) <= scraped_by]

        _poll(lagging, timeout, 0.25, "Prometheus did not scrape and evaluate again")

    def wait_for_scrapes(self, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully at least once."""

        def down() -> list[str]:
            up = self.targets_up()
            return [url for url, ok in up.items() if not ok] if up else ["(no targets)"]

        _poll(down, timeout, 0.5, "Prometheus targets not all up")


def _is_sample(result: object) -> bool:
    """Whether ``result`` is an instant-vector sample: ``{"metric": {...}, "value": [ts, "number"]}``."""
    if not isinstance(result, dict) or not isinstance(result.get("metric"), dict):
        return False
    value = result.get("value")
    if not isinstance(value, list) or len(value) != 2 or not isinstance(value[1], str):
        return False
    try:
        float(value[1])
    except ValueError:
        return False
    return True


def _poll(pending: Callable[[], list[str]], timeout: float, interval: float, what: str) -> None:
    """Call ``pending`` every ``interval`` seconds until it returns nothing; ``TimeoutError`` naming what it last
    returned after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while left := pending():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} within {timeout}s: {', '.join(left)}")
        time.sleep(interval)


def _epoch(rfc3339: str) -> float:
    """Epoch seconds of a Prometheus API timestamp (``0001-01-01T00:00:00Z`` for never: far in the past)."""
    return datetime.fromisoformat(rfc3339).timestamp()
