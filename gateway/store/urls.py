"""What a Redis URL names: one server, a Redis Cluster or a Sentinel-managed primary, with
its credentials and TLS settings. Every mistake is a ConfigError that names the part.

    redis://[user:password@]host[:port][/db]         one server
    rediss://...                                     one server over TLS
    unix://[user:password@]/path/to.sock[?db=N]      one server over a unix socket
    redis+cluster://[user:password@]host:port[,host:port...]     a Redis Cluster
    rediss+cluster://...                             a Redis Cluster over TLS
    redis+sentinel://[user:password@]host:port[,host:port...]/service[/db]
    rediss+sentinel://...                            Sentinel-managed primary over TLS

Query options: ssl_ca_certs, ssl_certfile, ssl_keyfile, ssl_cert_reqs (none | optional |
required), ssl_check_hostname (true | false); sentinel_password and sentinel_username for
Sentinels that ask for their own credentials; db for unix sockets.
"""

from __future__ import annotations

import os
import ssl
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, unquote

from gateway.errors import ConfigError

Address = tuple[str, int]

_SCHEMES = {
    "redis": ("node", False), "rediss": ("node", True), "unix": ("unix", False),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
}
_TLS_OPTIONS = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs",
                "ssl_check_hostname")
_OPTIONS = (*_TLS_OPTIONS, "sentinel_password", "sentinel_username", "db")
_CERT_REQS = {"none": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL,
              "required": ssl.CERT_REQUIRED}


@dataclass(frozen=True)
class Credentials:
    """How one connection introduces itself: AUTH, SELECT and the TLS context."""

    username: str | None = None
    password: str | None = None
    db: int = 0
    tls: ssl.SSLContext | None = field(default=None, compare=False)


@dataclass(frozen=True)
class RedisTarget:
    """A parsed Redis URL."""

    kind: str  # node | unix | cluster | sentinel
    addresses: tuple[Address, ...]
    credentials: Credentials
    path: str | None = None  # unix sockets
    service: str | None = None  # the Sentinel service (master) name
    sentinel_credentials: Credentials = Credentials()


def parse_redis_url(url: str) -> RedisTarget:
    """The target `url` names; ConfigError naming what is wrong (never the password)."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SCHEMES:
        raise ConfigError("invalid Redis URL: the scheme must be one of "
                          + ", ".join(f"{s}://" for s in _SCHEMES))
    kind, tls = _SCHEMES[scheme.lower()]
    # The query goes first: its values (certificate paths) may contain slashes.
    rest, _, query = rest.partition("?")
    options = _options(query)
    if not tls and any(name in options for name in _TLS_OPTIONS):
        raise ConfigError(f"invalid Redis URL: TLS options need a rediss scheme, not {scheme}")
    context = _tls_context(options) if tls else None
    if kind == "unix":
        userinfo, _, path = _split_userinfo(rest)
        if not path.startswith("/"):
            raise ConfigError("invalid Redis URL: unix:// needs an absolute socket path")
        credentials = _credentials(userinfo, _db(options.get("db", "0")), context)
        return RedisTarget("unix", (), credentials, path=unquote(path))
    netloc, _, path = rest.partition("/")
    userinfo, _, hosts = _split_userinfo(netloc)
    addresses = tuple(_address(item, kind == "node") for item in hosts.split(","))
    if kind == "node" and len(addresses) != 1:
        raise ConfigError("invalid Redis URL: redis:// names one host; "
                          "use redis+cluster:// or redis+sentinel:// for several")
    if "db" in options:
        raise ConfigError("invalid Redis URL: the db goes in the path (redis://host/2)")
    sentinel = Credentials(options.get("sentinel_username"), options.get("sentinel_password"),
                           0, context)
    if kind == "sentinel":
        service, _, db = path.partition("/")
        if not service:
            raise ConfigError("invalid Redis URL: redis+sentinel:// needs the service name "
                              "as its path (redis+sentinel://host:26379/mymaster)")
        return RedisTarget("sentinel", addresses, _credentials(userinfo, _db(db or "0"),
                                                               context),
                           service=unquote(service), sentinel_credentials=sentinel)
    if any(name.startswith("sentinel_") for name in options):
        raise ConfigError("invalid Redis URL: sentinel_* options are for redis+sentinel://")
    db_number = _db(path or "0")
    if kind == "cluster" and db_number != 0:
        raise ConfigError("invalid Redis URL: a Redis Cluster has only database 0")
    return RedisTarget(kind, addresses, _credentials(userinfo, db_number, context))


def _options(query: str) -> dict[str, str]:
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(options) - set(_OPTIONS))
    if any(name.startswith("socket_") for name in unknown):
        raise ConfigError("invalid Redis URL: timeouts are not URL options here; set "
                          "redis_timeout in the config (or GATEWAY_REDIS_TIMEOUT)")
    if unknown:
        raise ConfigError(f"invalid Redis URL: unknown option {unknown[0]!r}; valid: "
                          + ", ".join(_OPTIONS))
    return options


def _split_userinfo(netloc: str) -> tuple[str, str, str]:
    userinfo, at, rest = netloc.rpartition("@")
    return (userinfo, at, rest) if at else ("", "", netloc)


def _credentials(userinfo: str, db: int, tls: ssl.SSLContext | None) -> Credentials:
    if not userinfo:
        return Credentials(None, None, db, tls)
    user, colon, password = userinfo.partition(":")
    if not colon:  # redis://secret@host: a password alone, as redis-cli reads it
        return Credentials(None, unquote(user), db, tls)
    return Credentials(unquote(user) or None, unquote(password), db, tls)


def _address(item: str, default_port: bool) -> Address:
    item = item.strip()
    if item.startswith("["):  # [::1]:6379
        host, _, port = item[1:].partition("]")
        port = port.removeprefix(":")
    else:
        host, colon, port = item.rpartition(":")
        if not colon and default_port:
            host, port = item, "6379"
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ConfigError(f"invalid Redis URL: {item!r} is not host:port")
    return host, int(port)


def _db(text: str) -> int:
    if not text.isdigit() or int(text) > 10_000:
        raise ConfigError(f"invalid Redis URL: database {text!r} is not a number")
    return int(text)


def _tls_context(options: dict[str, str]) -> ssl.SSLContext:
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        value = options.get(name)
        if value is not None and not os.path.isfile(value):
            raise ConfigError(f"invalid Redis URL: {name} file {value!r} does not exist")
    reqs = options.get("ssl_cert_reqs", "required").lower()
    if reqs not in _CERT_REQS:
        raise ConfigError("invalid Redis URL: ssl_cert_reqs must be none, optional or required")
    check = options.get("ssl_check_hostname", "true" if reqs == "required" else "false")
    if check.lower() not in ("true", "false"):
        raise ConfigError("invalid Redis URL: ssl_check_hostname must be true or false")
    context = ssl.create_default_context(cafile=options.get("ssl_ca_certs"))
    context.check_hostname = check.lower() == "true"
    context.verify_mode = _CERT_REQS[reqs]
    if "ssl_certfile" in options:
        try:
            context.load_cert_chain(options["ssl_certfile"], options.get("ssl_keyfile"))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"invalid Redis URL: cannot load ssl_certfile: {exc}") from None
    elif "ssl_keyfile" in options:
        raise ConfigError("invalid Redis URL: ssl_keyfile needs ssl_certfile")
    return context
