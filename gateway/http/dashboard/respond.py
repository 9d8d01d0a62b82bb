"""What every dashboard answer carries: the security headers, and the stylesheet shipped
inside the package (gateway/http/dashboard/static/, package data: no CDN, no download)."""

from __future__ import annotations

from importlib import resources

from gateway.types import Headers, Send

CSP = (b"default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
       b"frame-ancestors 'none'; base-uri 'none'")
SECURITY_HEADERS: Headers = [
    (b"content-security-policy", CSP),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]
HTML = (b"content-type", b"text/html; charset=utf-8")


def stylesheet() -> bytes:
    return static("dashboard.css")


def static(name: str) -> bytes:
    """A file shipped in the package's static/ (no CDN, nothing fetched at run time)."""
    return resources.files("gateway.http.dashboard").joinpath(f"static/{name}").read_bytes()


async def send_bytes(send: Send, status: int, body: bytes, content_type: tuple[bytes, bytes],
                     headers: Headers | None = None) -> None:
    all_headers = [content_type, (b"content-length", str(len(body)).encode()),
                   *SECURITY_HEADERS, *(headers or [])]
    await send({"type": "http.response.start", "status": status, "headers": all_headers})
    await send({"type": "http.response.body", "body": body})


async def send_html(send: Send, status: int, html: str,
                    headers: Headers | None = None) -> None:
    await send_bytes(send, status, html.encode(), HTML, headers)


async def redirect(send: Send, location: str, headers: Headers | None = None) -> None:
    """303 See Other: after a POST the browser GETs `location` (a path of ours)."""
    await send_bytes(send, 303, b"", HTML,
                     [(b"location", location.encode()), *(headers or [])])
