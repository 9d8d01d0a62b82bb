"""The private PostgreSQL of tests/postgres.py and the fixtures of tests/conftest.py: a server
of our own (never the machine's), a fresh database per test, and stop, kill and restart that
lose nothing committed."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.postgres import PostgresServer, database_name, find_bindir

pytestmark = pytest.mark.skipif(find_bindir() is None,
                                reason="PostgreSQL's initdb is not installed "
                                       "(apt-get install postgresql)")


@pytest.fixture
def own_server() -> Iterator[PostgresServer]:
    """A server of this test's own, as a fault test that kills it wants (the session's one
    is shared)."""
    server = PostgresServer()
    server.start()
    yield server
    server.close()


def scalar(url: str, sql: str) -> Any:
    with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
        row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


def test_the_server_is_ours_on_loopback(postgres_server: PostgresServer) -> None:
    assert postgres_server.port != 5432
    assert postgres_server.url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/postgres"
    data = Path(scalar(postgres_server.url, "SHOW data_directory"))
    assert data == postgres_server.data and postgres_server.directory in data.parents
    assert scalar(postgres_server.url, "SHOW listen_addresses") == "127.0.0.1"
    sockets = Path(scalar(postgres_server.url, "SHOW unix_socket_directories"))
    assert postgres_server.directory in sockets.parents
    assert scalar(postgres_server.url, "SHOW server_encoding") == "UTF8"
    assert scalar(postgres_server.url, "SHOW lc_collate") == "C"
    assert scalar(postgres_server.url, "SHOW fsync") == "off"  # not durable: fast
    # Started once for the session, in well under the time a test may take.
    assert postgres_server.startup_seconds is not None and postgres_server.startup_seconds < 10


def test_each_test_gets_a_fresh_empty_database(postgres_server: PostgresServer,
                                               postgres_url: str) -> None:
    name = postgres_url.rsplit("/", 1)[1]
    assert name.startswith("t") and "fresh_empty" in name
    assert scalar(postgres_url, "SELECT current_database()") == name
    tables = "SELECT count(*) FROM pg_tables WHERE schemaname NOT IN ('pg_catalog', " \
             "'information_schema')"
    assert scalar(postgres_url, tables) == 0
    with psycopg.connect(postgres_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE spend (request_id text PRIMARY KEY)")
    other = postgres_server.create_database(database_name("other"))
    assert scalar(other, tables) == 0  # what one test writes, another never sees
    postgres_server.drop_database(other.rsplit("/", 1)[1])


def test_database_names_are_unique_and_plain() -> None:
    names = {database_name("test_x[param-1]") for _ in range(3)}
    assert len(names) == 3
    for name in names:
        assert name.replace("_", "").isalnum() and len(name) <= 63
    assert len(database_name("x" * 200)) == 63


async def test_async_connections_work(postgres_url: str) -> None:
    async with await psycopg.AsyncConnection.connect(postgres_url) as conn:
        cursor = await conn.execute("SELECT 41 + 1")
        assert await cursor.fetchone() == (42,)


def committed_rows(server: PostgresServer) -> list[tuple[Any, ...]]:
    return server.query("SELECT n FROM t ORDER BY n")


def test_stop_kill_and_restart_keep_what_was_committed(own_server: PostgresServer) -> None:
    own_server.query("CREATE TABLE t (n int)")
    own_server.query("INSERT INTO t VALUES (1)")

    own_server.stop()
    assert not own_server.running
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(own_server.url, connect_timeout=2).close()
    own_server.start()
    assert committed_rows(own_server) == [(1,)]

    own_server.query("INSERT INTO t VALUES (2)")
    pid = own_server.process.pid if own_server.process else None
    own_server.kill()  # SIGKILL: no shutdown checkpoint, the next start recovers
    assert not own_server.running
    own_server.start()
    assert own_server.process is not None and own_server.process.pid != pid
    assert committed_rows(own_server) == [(1,), (2,)]
    assert "not properly shut down" in own_server.log_tail(20000)

    own_server.query("INSERT INTO t VALUES (3)")
    own_server.restart()
    assert committed_rows(own_server) == [(1,), (2,), (3,)]
    own_server.stop("immediate")
    own_server.start()
    assert committed_rows(own_server) == [(1,), (2,), (3,)]


def test_a_durable_server_keeps_fsync_on() -> None:
    server = PostgresServer(durable=True)
    try:
        server.start()
        assert server.query("SHOW fsync") == [("on",)]
        assert server.query("SHOW full_page_writes") == [("on",)]
    finally:
        server.close()


def test_a_connection_open_across_a_kill_sees_it_fail(own_server: PostgresServer) -> None:
    conn = psycopg.connect(own_server.url, autocommit=True)
    try:
        own_server.kill()
        with pytest.raises(psycopg.OperationalError):
            conn.execute("SELECT 1")
    finally:
        conn.close()
    own_server.start()
    assert own_server.query("SELECT 1") == [(1,)]


def test_postgres_url_starts_a_killed_session_server_again(
        postgres_server: PostgresServer, request: pytest.FixtureRequest) -> None:
    postgres_server.kill()
    url = request.getfixturevalue("postgres_url")
    assert postgres_server.running
    assert scalar(url, "SELECT 1") == 1
