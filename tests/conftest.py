"""Shared fixtures: a private redis-server per test session, and both stores.

Tests never touch a Redis they did not start: `redis_url` is a unix socket in a temporary
directory, flushed before each test that uses it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import uvicorn
from prometheus_client import CollectorRegistry

from gateway.config.settings import Settings
from gateway.http.admin import KeySpec, create_key, resolve_account
from gateway.http.middleware import GatewayMiddleware
from gateway.obs.metrics import Metrics
from gateway.store import Store, connect
from gateway.store.embedded import embedded_store
from gateway.types import ASGIApp, Scope

if TYPE_CHECKING:
    from gateway.ledger.exporter import Exporter

METRICS_TOKEN = "metrics-token-for-tests"
METRICS_AUTH = {"Authorization": f"Bearer {METRICS_TOKEN}"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A redis-server process of our own on a unix socket (and a loopback port)."""

    def __init__(self, directory: Path, appendonly: bool = False) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("redis-server is not installed (apt-get install redis-server)")
        self.directory = directory
        self.socket = directory / "redis.sock"
        self.port = free_port()
        self.args = [binary, "--port", str(self.port), "--bind", "127.0.0.1",
                     "--unixsocket", str(self.socket), "--unixsocketperm", "700",
                     "--save", "", "--appendonly", "yes" if appendonly else "no",
                     "--dir", str(directory), "--daemonize", "no", "--loglevel", "warning"]
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    def start(self) -> None:
        self.process = subprocess.Popen(self.args, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    subprocess.run(["redis-cli", "-s", str(redis_server.socket), "FLUSHALL"], check=True,
                   stdout=subprocess.DEVNULL)
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A private 3-master Redis Cluster (tests/cluster.py), started once when first used."""
    from tests.cluster import RedisCluster

    cluster = RedisCluster(tmp_path_factory.mktemp("cluster"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster: Any) -> str:
    redis_cluster.flush()
    return str(redis_cluster.url)


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """Throwaway certificates (tests/tls.py)."""
    from tests.tls import Certificates

    return Certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="session")
def tls_redis(tmp_path_factory: pytest.TempPathFactory, certs: Any) -> Iterator[Any]:
    """A redis-server that speaks only TLS, started once when first used."""
    from tests.tls import TLSRedis

    server = TLSRedis(tmp_path_factory.mktemp("tls-redis"), certs, auth_clients=False)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def tls_cluster(tmp_path_factory: pytest.TempPathFactory, certs: Any) -> Iterator[Any]:
    """A 3-master TLS Redis Cluster, started once when first used."""
    from tests.tls import TLSCluster

    cluster = TLSCluster(tmp_path_factory.mktemp("tls-cluster"), certs)
    yield cluster
    cluster.stop()


@pytest.fixture(params=["redis", "embedded"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def store(store_kind: str, request: pytest.FixtureRequest) -> AsyncIterator[Store]:
    """The same tests run against a real redis-server and against the embedded store."""
    if store_kind in ("redis", "cluster"):
        url = request.getfixturevalue("redis_url" if store_kind == "redis" else "cluster_url")
        backend = connect(url, timeout_seconds=5.0)
    else:
        backend = embedded_store()
    yield backend
    await backend.close()


@pytest.fixture
def settings() -> Settings:
    # Tests create plan keys over the management API too; the default refusal has its own test.
    return Settings(api_plan_keys=True, metrics_token=METRICS_TOKEN)


@pytest.fixture
def metrics() -> Metrics:
    return Metrics.create(CollectorRegistry())


# What the gateway passes admission for keys that follow their plan (store-level tests).
PLAN_LIMITS = Settings().plan_limits


async def new_key(store: Store, settings: Settings, account: str | None = None,
                  **spec: Any) -> tuple[str, str, str]:
    """Creates a key; returns (secret, key id, account id)."""
    account_id = await resolve_account(store, account)
    spec.setdefault("name", "test-key")
    if "credit" not in spec:
        spec.setdefault("plan", "standard")
    record, secret = await create_key(store, settings, account_id, KeySpec(**spec))
    return secret, record.id, account_id


def client_for(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://gw",
                             timeout=30)


def gateway(app: ASGIApp, store: Store, settings: Settings,
            metrics: Metrics) -> GatewayMiddleware:
    return GatewayMiddleware(app, settings=settings, store=store, metrics=metrics)


@contextlib.asynccontextmanager
async def serving(app: ASGIApp, root_path: str = "") -> AsyncIterator[str]:
    """Runs `app` on a real uvicorn server on loopback in this event loop."""
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                            lifespan="off", root_path=root_path)
    server = uvicorn.Server(config)
    task = asyncio.ensure_future(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


async def stream_then_leave(session: Any, url: str, body: dict[str, Any],
                            headers: dict[str, str], events: int) -> int:
    """Reads `events` SSE events of a streamed completion, then drops the connection the way
    a client pressing Ctrl-C does; returns how many events arrived."""
    async with session.post(url, json=body, headers=headers) as response:
        received = b""
        while received.count(b"\n\n") < events:
            received += await response.content.readany()
        response.close()
    return received.count(b"\n\n")


def sent_body(body: dict[str, Any]) -> bytes:
    """The bytes httpx sends for `json=body`: the gateway bounds the prompt by them."""
    return httpx.Request("POST", "http://gw", json=body).content


def prompt_bound_of(body: dict[str, Any]) -> int:
    """The prompt tokens the gateway reserves for `body` (see gateway/bounds.py)."""
    from gateway.core.bounds import prompt_bound

    return prompt_bound(sent_body(body), Settings().media_part_tokens)


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


def post_scope(path: str, secret: str, body: bytes) -> Scope:
    """The ASGI scope of `POST path` with a JSON body and a consumption key, for tests that
    drive the gateway's receive and send themselves."""
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "POST", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "client": ("127.0.0.1", 1),
            "server": ("gw", 80),
            "headers": [(b"authorization", f"Bearer {secret}".encode()),
                        (b"content-type", b"application/json"),
                        (b"content-length", str(len(body)).encode())]}


os.environ.pop("GATEWAY_REDIS_URL", None)
os.environ.pop("GATEWAY_CONFIG", None)
os.environ.pop("GATEWAY_POSTGRES_URL", None)  # a ledger only where a test gives one


@pytest.fixture(autouse=True)
def _stdlib_access_log() -> Iterator[None]:
    """create_app() (gateway serve's worker factory) installs the batched access writer for
    its process; a test that calls it must not leave it to the tests after it."""
    yield
    from gateway.obs import access_log

    access_log.flush()
    access_log._writer = None


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[Any]:
    """A private PostgreSQL (tests/postgres.py) on a free loopback port, started once when
    first used; a test that stops or kills it gets it started again by `postgres_url`."""
    from tests.postgres import PostgresServer, find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL's initdb is not installed (apt-get install postgresql; "
                    ".ci/run does)")
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: Any, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh, empty database of its own for each test, dropped after it."""
    from tests.postgres import database_name

    postgres_server.ensure_running()
    name = database_name(request.node.name)
    yield postgres_server.create_database(name)
    if postgres_server.running:
        postgres_server.drop_database(name)


@pytest.fixture
async def exporters() -> AsyncIterator[list[Exporter]]:
    """Ledger exporters a test makes, closed after it (each holds a PostgreSQL connection)."""
    made: list[Exporter] = []
    yield made
    for exporter in made:
        await exporter.close()
