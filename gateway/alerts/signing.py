"""X-Gateway-Signature: `sha256=` and the hex HMAC-SHA256 of the exact body bytes, keyed by
the webhook's secret. A receiver recomputes it over the raw body it read (before parsing)
and compares in constant time, as `verify` does."""

from __future__ import annotations

import hashlib
import hmac

SIGNATURE_HEADER = "x-gateway-signature"
EVENT_ID_HEADER = "x-gateway-event-id"
EVENT_TYPE_HEADER = "x-gateway-event-type"
PREFIX = "sha256="


def sign(secret: str, body: bytes) -> str:
    return PREFIX + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def verify(secret: str, body: bytes, header: str) -> bool:
    return hmac.compare_digest(sign(secret, body), header)
