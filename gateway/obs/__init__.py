"""Observability: request records and logs, the access log, Prometheus metrics."""
