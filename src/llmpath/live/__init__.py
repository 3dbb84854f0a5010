"""Talking to a live Prometheus: its HTTP API client, the data checks of ``llmpath slo validate --prometheus`` and the
SLO status of ``llmpath slo status`` (and the demo's report)."""
