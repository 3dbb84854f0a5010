"""Python ports of the Go plugins Sloth's golden tests use (loaded with ``--plugins tests/slo/sloth_plugins.py``).

- SLI ``integration_test`` (test/integration/prometheus/plugins/sli/plugin1) and ``getting_started_availability``
  (examples/plugins/getting-started/availability): build a raw error-ratio query from ``job`` and ``filter``,
  requiring the ``owner`` and ``tier`` service labels.
- SLO ``integration-tests/plugin1``: merges ``config.labels`` into the ``sloth_slo_info`` rule.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

_FILTER = re.compile(r'([^=]+="[^=,"]+",)+')


def _availability_plugin(metric: str):
    def plugin(meta: Mapping[str, str], labels: Mapping[str, str], options: Mapping[str, str]) -> str:
        if "job" not in options:
            raise ValueError("job options is required")
        for key in ("owner", "tier"):
            if not labels.get(key):
                raise ValueError(f'invalid labels: "{key}" label is required')
        flt = options.get("filter", "")
        if flt:
            flt = flt.strip("{}").strip(",") + ","
            if not _FILTER.search(flt):
                raise ValueError(f"invalid prometheus filter: {flt}")
        job = options["job"]
        return (
            f'\nsum(rate({metric}{{ {flt}job="{job}",code=~"(5..|429)" }}[{{{{.window}}}}]))\n'
            f'/\nsum(rate({metric}{{ {flt}job="{job}" }}[{{{{.window}}}}]))'
        )

    return plugin


def _info_labels_plugin(config: Any):
    labels = dict((config or {}).get("labels") or {})

    def process(request, result) -> None:
        for rule in result.meta.rules:
            if rule.record == "sloth_slo_info":
                rule.labels = {**rule.labels, **labels}
                break

    return process


SLI_PLUGINS = {
    "integration_test": _availability_plugin("integration_test"),
    "getting_started_availability": _availability_plugin("http_request_duration_seconds_count"),
}
SLO_PLUGINS = {"integration-tests/plugin1": _info_labels_plugin}
