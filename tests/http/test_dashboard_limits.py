"""The dashboard's bounds on hostile traffic (docs/dashboard.md): signed-in requests per
account (PAGE_VIEWS a minute, all its sessions together), and the sign-in limit's client
address behind a reverse proxy (`gateway serve --forwarded-allow-ips`): a trusted proxy's
X-Forwarded-For names the client, anyone else's is ignored, so spoofing the header never
buys more attempts."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from gateway.config.settings import Settings
from gateway.http.dashboard.handler import PAGE_VIEWS, SIGNIN_ATTEMPTS
from gateway.obs.metrics import Metrics
from gateway.serve.cli import main
from gateway.store import Store
from tests.conftest import client_for, free_port
from tests.http.test_dashboard import CSP, account_with_mk, app, sign_in
from tests.processes import Process, gateway_serve, mock_upstream
from tests.redis_inspect import redis_of

WRONG_KEY = "mk_" + "b" * 40


@pytest.fixture(params=["redis", "cluster"])
def store_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


async def test_an_accounts_signed_in_requests_are_bounded_across_its_sessions(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    _, key_id, _, mk = await account_with_mk(store, settings, "pages")
    _, _, _, other_mk = await account_with_mk(store, settings, "elsewhere")
    gateway = app(store, settings, metrics)
    async with client_for(gateway) as first, client_for(gateway) as second, \
            client_for(gateway) as other:
        await sign_in(first, mk)  # its page view is the first of the account's
        await sign_in(second, mk)
        await sign_in(other, other_mk)
        statuses = [(await (first if i % 2 else second).get(
            "/dashboard" if i % 3 else f"/dashboard/keys/{key_id}")).status_code
            for i in range(PAGE_VIEWS - 2)]
        refused = await first.get("/dashboard")
        also = await second.get(f"/dashboard/keys/{key_id}")
        elsewhere = await other.get("/dashboard")
    assert statuses == [200] * (PAGE_VIEWS - 2)
    for answer in (refused, also):
        assert answer.status_code == 429 and 'id="error"' in answer.text
        assert 1 <= int(answer.headers["retry-after"]) <= 2  # one view's share of a minute
        assert answer.headers["content-security-policy"] == CSP
    assert elsewhere.status_code == 200  # another account has a budget of its own


@pytest.fixture
def upstream() -> Iterator[Process]:
    process = mock_upstream()
    yield process
    process.terminate()


def _served(upstream: Process, redis_url: str, *extra: str) -> Process:
    return gateway_serve(upstream.url, redis_url, *extra)[0]


def _attempts(url: str, forwarded_for: str | None, count: int) -> list[int]:
    headers = {} if forwarded_for is None else {"x-forwarded-for": forwarded_for}
    with httpx.Client(base_url=url, timeout=10) as client:
        return [client.post("/dashboard/signin", data={"key": WRONG_KEY},
                            headers=headers).status_code for _ in range(count)]


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_attempts(
        upstream: Process, redis_url: str) -> None:
    gateway = _served(upstream, redis_url, "--forwarded-allow-ips", "127.0.0.1")
    try:
        assert _attempts(gateway.url, "203.0.113.7", SIGNIN_ATTEMPTS + 1) == \
            [401] * SIGNIN_ATTEMPTS + [429]
        assert _attempts(gateway.url, "198.51.100.2", 1) == [401]  # someone else behind it
        assert _attempts(gateway.url, "203.0.113.7", 1) == [429]
    finally:
        gateway.terminate()


def test_a_forwarded_for_header_from_an_untrusted_peer_is_ignored(
        upstream: Process, redis_url: str) -> None:
    for extra in ((), ("--forwarded-allow-ips", "10.1.2.3,192.168.0.0/16")):
        gateway = _served(upstream, redis_url, *extra)
        try:
            spoofed = [_attempts(gateway.url, f"203.0.113.{i}", 1)[0]
                       for i in range(SIGNIN_ATTEMPTS + 1)]
            assert spoofed == [401] * SIGNIN_ATTEMPTS + [429], extra
        finally:
            gateway.terminate()
        redis_flush(redis_url)


def redis_flush(redis_url: str) -> None:
    """The next gateway's attempts start from none (the fixture flushed before the test)."""
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        client.flushall()
    finally:
        client.close()


@pytest.mark.parametrize(("value", "said"), [
    ("10.0.0.0/40", "'10.0.0.0/40' is not an IP address or network"),
    ("1.2.3.4/8", "'1.2.3.4/8' has host bits set"),  # 1.0.0.0/8 was meant? say so
    ("*,10.0.0.5", "'*' (any peer) stands alone"),
    ("10.0.0.5,", "'' is not an IP address or network"),
    ("proxy.internal", "'proxy.internal' is not an IP address or network"),
])
def test_a_bad_forwarded_allow_ips_is_a_clear_error(
        value: str, said: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["serve", "--upstream", "http://127.0.0.1:9", "--redis", "redis://127.0.0.1:9",
              "--forwarded-allow-ips", value])
    err = capsys.readouterr().err
    assert done.value.code == 2 and said in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_the_demo_believes_no_forwarded_header(tmp_path: Path) -> None:
    """`gateway demo` has no proxy in front of it: a client's X-Forwarded-For buys no
    attempts (uvicorn's default would believe one from loopback)."""
    port = free_port()
    log = (tmp_path / "demo.log").open("wb")
    demo = subprocess.Popen([sys.executable, "-m", "gateway", "demo", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            assert demo.poll() is None and time.monotonic() < deadline, "demo never answered"
            try:
                if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        spoofed = [_attempts(url, f"203.0.113.{i}", 1)[0] for i in range(SIGNIN_ATTEMPTS + 1)]
        assert spoofed == [401] * SIGNIN_ATTEMPTS + [429]
    finally:
        demo.terminate()
        demo.wait(timeout=30)
        log.close()


async def test_the_signin_limit_counts_an_ipv6_64_and_a_mapped_ipv4_as_one_client(
        store: Store, settings: Settings, metrics: Metrics) -> None:
    gateway = app(store, settings, metrics)

    async def attempt(address: str) -> int:
        transport = httpx.ASGITransport(app=gateway, client=(address, 1))
        async with httpx.AsyncClient(transport=transport, base_url="http://gw") as client:
            response = await client.post("/dashboard/signin", data={"key": WRONG_KEY})
            return response.status_code

    for family in (("2001:db8:1:2::1", "2001:db8:1:2:ffff::9"),  # one /64
                   ("10.3.3.3", "::ffff:10.3.3.3"),
                   ("garbage", "<script>")):  # what a trusted proxy claimed: no address
        statuses = [await attempt(family[i % 2]) for i in range(SIGNIN_ATTEMPTS + 1)]
        assert statuses == [401] * SIGNIN_ATTEMPTS + [429], family
    assert await attempt("2001:db8:1:3::1") == 401  # the next /64 is someone else
    names = {key async for key in redis_of(store).scan_iter(match="gw:dash-signin:*")}
    assert all(len(name) < 60 for name in names) and len(names) == 4, names
