"""`llmpath demo`: two embedded engines, the gateway and Prometheus on loopback, a workload and a report."""
