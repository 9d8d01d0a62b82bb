"""The ledger's tables, as numbered migrations applied once each, in order.

A migration is never edited once released: a change is a new one. `gateway ledger migrate`
applies the missing ones in one transaction each, under an advisory lock, so replicas that
start together cannot apply one twice.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    sql: str


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "ledger entries", """
CREATE TABLE ledger_entries (
    request_id        text PRIMARY KEY,   -- the gateway's own reservation id: unique
    account_id        text NOT NULL,
    key_id            text NOT NULL,
    route             text NOT NULL,
    model             text NOT NULL,      -- as the upstream reported serving it, else asked
    prompt_tokens     bigint NOT NULL,
    cached_tokens     bigint NOT NULL,
    completion_tokens bigint NOT NULL,
    cost_micro        bigint NOT NULL,    -- integer micro-USD, as Redis counted it
    status            integer NOT NULL,   -- the upstream's HTTP status; 0: no answer
    admitted_at       timestamptz,        -- Redis time; NULL from versions before it
    settled_at        timestamptz NOT NULL,
    stream_ms         bigint NOT NULL,    -- the Redis stream id, <ms>-<seq>: reconcile
    stream_seq        bigint NOT NULL,    -- ignores entries appended after its snapshot
    exported_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX ledger_entries_account_settled ON ledger_entries (account_id, settled_at);
CREATE INDEX ledger_entries_key ON ledger_entries (account_id, key_id);
"""),
)

LOCK_ID = 0x6C6564676572  # "ledger": pg_advisory_xact_lock's key for migrations

CREATE_VERSIONS = """
CREATE TABLE IF NOT EXISTS ledger_schema_migrations (
    version    integer PRIMARY KEY,
    name       text NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)"""
