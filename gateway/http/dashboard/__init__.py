"""The account dashboard at /dashboard: server-rendered pages of an account's keys, usage and
spend, signed in with a management key (docs/dashboard.md is the pages' contract)."""

from gateway.http.dashboard.handler import Dashboard

__all__ = ["Dashboard"]
