"""The only package that talks to Redis: key names, records, scripts, the multiplexed
connection, the hot path and administration, and one table from Redis replies to the
store's errors (replies.py)."""

from gateway.store.connect import connect
from gateway.store.names import RESERVATION_TTL_SECONDS, SUBSCRIPTION_DEFAULT_SECONDS, Names
from gateway.store.records import (
    Account,
    Ask,
    CreditEntry,
    Decision,
    KeyCounters,
    KeyRecord,
    KeyRef,
    KeyUsage,
    MgmtKey,
    MgmtRef,
    SpendDetail,
    Throttle,
    UsageSnapshot,
)
from gateway.store.scripts import lua_source
from gateway.store.store import Store

__all__ = ["RESERVATION_TTL_SECONDS", "SUBSCRIPTION_DEFAULT_SECONDS", "Account", "Ask",
           "CreditEntry", "Decision", "KeyCounters", "KeyRecord", "KeyRef", "KeyUsage",
           "MgmtKey", "MgmtRef", "Names", "SpendDetail", "Store", "Throttle", "UsageSnapshot",
           "connect", "lua_source"]
