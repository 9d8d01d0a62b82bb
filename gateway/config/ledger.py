"""[ledger]: where the durable spend ledger lives (PostgreSQL) and how much Redis may hold.

The ledger is on when a PostgreSQL URL is configured (`GATEWAY_POSTGRES_URL` or `[ledger]
postgres_url`): every replica then appends one entry per settled request to its account's
stream, `gateway ledger export` copies them into PostgreSQL, and `/api/spend` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from gateway.config.units import check_known, check_positive, check_table, check_text
from gateway.errors import ConfigError

# Entries one account's stream may hold while the exporter is away (~250 bytes each): at
# 100 000 that is about 25 MB of Redis per account before the oldest are dropped.
DEFAULT_STREAM_CAP = 100_000
_FIELDS = ("postgres_url", "max_stream_entries")


@dataclass(frozen=True, slots=True)
class LedgerSettings:
    postgres_url: str | None = field(default=None, repr=False)  # may carry a password
    max_stream_entries: int = DEFAULT_STREAM_CAP

    @property
    def stream_cap(self) -> int:
        """settle.lua's cap: 0 (no ledger entries) unless a database is configured."""
        return self.max_stream_entries if self.postgres_url else 0


def check_postgres_url(url: str) -> str:
    if not url.startswith(("postgresql://", "postgres://")):
        raise ConfigError("the ledger's PostgreSQL URL must start with postgresql:// "
                          "(GATEWAY_POSTGRES_URL, [ledger] postgres_url or --postgres)")
    return url


def ledger_from_config(data: object, env: Mapping[str, str]) -> LedgerSettings:
    table = check_table(data, "ledger")
    check_known(table, _FIELDS, "[ledger]")
    url = check_text(env.get("GATEWAY_POSTGRES_URL") or table.get("postgres_url"),
                     "ledger.postgres_url")
    return LedgerSettings(
        check_postgres_url(url) if url else None,
        check_positive(table.get("max_stream_entries", DEFAULT_STREAM_CAP),
                       "ledger.max_stream_entries", 100_000_000))
