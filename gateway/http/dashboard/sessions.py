"""Dashboard sessions as the browser sees them: a random 32-byte token in an HttpOnly,
SameSite=Strict cookie (Secure over https); Redis keeps only its SHA-256 (store/sessions.py).
State changes need the session's CSRF token, and a foreign Origin is refused."""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
from dataclasses import dataclass

from gateway.http.auth import header
from gateway.store.sessions import DashSession, DashSessions
from gateway.types import Scope

COOKIE = "gw_dash"
SESSION_SECONDS = 8 * 3600
TOKEN_BYTES = 32
MAX_COOKIE_HEADER = 8192


@dataclass(frozen=True, slots=True)
class Signed:
    token_hash: str
    session: DashSession


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return secrets.token_urlsafe(TOKEN_BYTES)


def cookie_token(scope: Scope, cookie: str = COOKIE) -> str | None:
    """The session cookie's token, if the request carries one that could be ours."""
    for name, value in scope["headers"]:
        if name != b"cookie" or len(value) > MAX_COOKIE_HEADER:
            continue
        text: str = value.decode("latin-1")
        for part in text.split(";"):
            key, _, token = part.strip().partition("=")
            if key == cookie and 20 <= len(token) <= 64 and token.replace(
                    "-", "").replace("_", "").isalnum():
                return token
    return None


def cookie_path(scope: Scope, under: str = "/dashboard") -> str:
    return f"{scope.get('root_path') or ''}{under}"


def set_cookie(scope: Scope, token: str, cookie: str = COOKIE,
               under: str = "/dashboard") -> tuple[bytes, bytes]:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    return (b"set-cookie", (f"{cookie}={token}; HttpOnly; SameSite=Strict; "
                            f"Path={cookie_path(scope, under)}; Max-Age={SESSION_SECONDS}"
                            f"{secure}").encode())


def clear_cookie(scope: Scope, cookie: str = COOKIE,
                 under: str = "/dashboard") -> tuple[bytes, bytes]:
    secure = "; Secure" if scope.get("scheme") == "https" else ""
    return (b"set-cookie", (f"{cookie}=; HttpOnly; SameSite=Strict; "
                            f"Path={cookie_path(scope, under)}; Max-Age=0{secure}").encode())


async def current(sessions: DashSessions, scope: Scope) -> Signed | None:
    token = cookie_token(scope)
    if token is None:
        return None
    digest = token_hash(token)
    session = await sessions.get(digest)
    return None if session is None else Signed(digest, session)


def csrf_ok(session: DashSession, given: str | None) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), session.csrf.encode())


def same_origin(scope: Scope) -> bool:
    """False for a request a page of another origin made: its Origin names another host,
    or the browser says (Sec-Fetch-Site) it came from another site; an Origin of "null"
    passes only with Sec-Fetch-Site: same-origin. Requests without either header (curl,
    older clients) pass: the CSRF token still guards them."""
    site = header(scope["headers"], b"sec-fetch-site")
    if site is not None and site not in (b"same-origin", b"none"):
        return False
    origin = header(scope["headers"], b"origin")
    if origin is None:
        return True
    if origin == b"null":
        # What a browser sends from a page whose Referrer-Policy is no-referrer (ours are):
        # then only its own Sec-Fetch-Site can tell where the form came from.
        return site == b"same-origin"
    host = header(scope["headers"], b"host")
    if host is None:
        return False
    scheme, sep, rest = origin.decode("latin-1").partition("://")
    if not sep or scheme not in ("http", "https") or "/" in rest:
        return False
    if scope.get("scheme") == "https" and scheme != "https":
        return False
    # The scheme may differ from ours behind a proxy that ends TLS; the host may not.
    return hmac.compare_digest(rest.lower().encode(), host.decode("latin-1").lower().encode())


def signin_address(scope: Scope) -> str:
    """Whose sign-in attempts these are: the client's IPv4 address, or its IPv6 /64 (one
    host is given a whole /64, so counting single IPv6 addresses would hand out attempts by
    the billion). Whatever a trusted proxy's X-Forwarded-For said that is no address is one
    shared "invalid" counter, never a Redis key of its choosing."""
    client = scope.get("client")
    if not client:
        return "unknown"
    try:
        address = ipaddress.ip_address(str(client[0]))
    except ValueError:
        return "invalid"
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)
