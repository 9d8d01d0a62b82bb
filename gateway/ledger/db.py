"""The ledger's PostgreSQL: connections (psycopg 3, async), migrations, the export insert.

Every psycopg failure becomes LedgerUnavailable here, with psycopg's own reason but never
the URL (which may carry a password).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import psycopg

from gateway.errors import LedgerUnavailable
from gateway.ledger.schema import CREATE_VERSIONS, LOCK_ID, MIGRATIONS
from gateway.store.ledger import LedgerEntry, stream_order

CONNECT_TIMEOUT_SECONDS = 5
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

_INSERT = """
INSERT INTO ledger_entries (request_id, account_id, key_id, route, model, prompt_tokens,
    cached_tokens, completion_tokens, cost_micro, status, admitted_at, settled_at,
    stream_ms, stream_seq)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (request_id) DO NOTHING"""


def from_us(microseconds: int) -> datetime:
    """Redis time (microseconds) as an exact timestamp (no float on the way)."""
    return EPOCH + timedelta(microseconds=microseconds)


def _clean(text: str) -> str:
    # PostgreSQL text cannot hold NUL; a route or model is client text.
    return text.replace("\x00", "\ufffd")


def _row(entry: LedgerEntry) -> tuple[object, ...]:
    ms, seq = stream_order(entry.stream_id)
    return (_clean(entry.request_id), _clean(entry.account_id), _clean(entry.key_id),
            _clean(entry.route), _clean(entry.model), entry.prompt_tokens,
            entry.cached_tokens, entry.completion_tokens, entry.cost_micro, entry.status,
            None if entry.admitted_us is None else from_us(entry.admitted_us),
            from_us(entry.settled_us), ms, seq)


def _secrets(url: str) -> list[str]:
    """What of `url` must never be shown: the URL itself, its password as written and
    decoded, and any password option of its query. libpq quotes the raw text of a URL it
    cannot parse (a '%' in a password, an unclosed '[')."""
    found = [url]
    rest = url.partition("://")[2]
    userinfo = rest.rpartition("@")[0] if "@" in rest else ""
    password = userinfo.partition(":")[2]
    found += [password, unquote(password)]
    for name, _, value in (item.partition("=") for item in url.partition("?")[2].split("&")):
        if "password" in name.lower() or "passfile" in name.lower():
            found += [value, unquote(value)]
    # Longest first, so a password inside the URL goes with the URL; very short strings
    # would blank out ordinary words (such a password is no secret anyway).
    return sorted({f for f in found if len(f) >= 3}, key=len, reverse=True)


def unavailable(exc: psycopg.Error, url: str) -> LedgerUnavailable:
    text = str(exc).strip()
    reason = text.splitlines()[0] if text else type(exc).__name__
    for secret in _secrets(url):
        reason = reason.replace(secret, "***")
    return LedgerUnavailable(f"PostgreSQL: {reason}")


@contextlib.asynccontextmanager
async def connection(url: str) -> AsyncIterator[psycopg.AsyncConnection[tuple[object, ...]]]:
    """One connection, closed after; a failure to connect or of a statement inside is
    LedgerUnavailable."""
    try:
        conn = await psycopg.AsyncConnection.connect(url, connect_timeout=CONNECT_TIMEOUT_SECONDS)
    except psycopg.Error as exc:
        raise unavailable(exc, url) from None
    try:
        yield conn
    except psycopg.Error as exc:
        raise unavailable(exc, url) from None
    finally:
        with contextlib.suppress(psycopg.Error, OSError):
            await conn.close()


async def migrate(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> list[int]:
    """Applies the migrations not yet applied; returns their versions."""
    applied: list[int] = []
    for migration in MIGRATIONS:
        async with conn.transaction():
            # The lock first: even CREATE TABLE IF NOT EXISTS races with itself.
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_ID,))
            await conn.execute(CREATE_VERSIONS)
            cur = await conn.execute(
                "SELECT 1 FROM ledger_schema_migrations WHERE version = %s",
                (migration.version,))
            if await cur.fetchone() is not None:
                continue
            await conn.execute(migration.sql.encode())
            await conn.execute(
                "INSERT INTO ledger_schema_migrations (version, name) VALUES (%s, %s)",
                (migration.version, migration.name))
            applied.append(migration.version)
    return applied


async def schema_version(conn: psycopg.AsyncConnection[tuple[object, ...]]) -> int:
    cur = await conn.execute("SELECT to_regclass('ledger_schema_migrations') IS NOT NULL")
    row = await cur.fetchone()
    if row is None or not row[0]:
        return 0
    cur = await conn.execute("SELECT coalesce(max(version), 0) FROM ledger_schema_migrations")
    row = await cur.fetchone()
    return int(str(row[0])) if row else 0


async def insert(conn: psycopg.AsyncConnection[tuple[object, ...]],
                 entries: Sequence[LedgerEntry]) -> int:
    """Inserts in one transaction; returns the rows new to the table (a replayed entry,
    already stored, is skipped by ON CONFLICT). Commits before returning."""
    async with conn.transaction(), conn.cursor() as cur:
        await cur.executemany(_INSERT, [_row(e) for e in entries], returning=False)
        new = cur.rowcount
    return max(new, 0)
