"""One webhook call: a POST of the event's body with its id and signature, over the
gateway's own HTTP/1.1 client (a keep-alive pool per webhook origin), within a timeout.

A URL's credentials become a Basic Authorization header and its query stays in the request
target; neither ever appears in an error message (they name the webhook by its number).

Only the status counts: at most MAX_ANSWER bytes of the answer's body are read (a receiver
answering every POST with 400 MB once took a sender to 1.5 GB); the rest is dropped with
its connection."""

from __future__ import annotations

import base64
import contextlib
from urllib.parse import unquote, urlsplit

from gateway.alerts.signing import EVENT_ID_HEADER, EVENT_TYPE_HEADER, SIGNATURE_HEADER, sign
from gateway.config.alerts import Webhook
from gateway.config.limits import Deadlines
from gateway.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse

# Body bytes of an answer read: enough for a short "ok" or JSON reply to end on the wire, so
# its keep-alive connection serves the next post; a longer body is not worth reading.
MAX_ANSWER = 4096
# Posts to one webhook at once (each webhook has its own, so a slow one holds back no other);
# as many keep-alive connections are kept for the next ones.
POSTS_PER_WEBHOOK = 8


class DeliveryFailed(Exception):
    """The webhook did not answer 2xx in time; the message names no URL or secret."""


class _Target:
    def __init__(self, webhook: Webhook, timeout: float) -> None:
        parts = urlsplit(webhook.url)
        host = parts.hostname or ""
        authority = f"[{host}]" if ":" in host else host
        if parts.port is not None:
            authority = f"{authority}:{parts.port}"
        deadlines = Deadlines(connect=timeout, first_byte=timeout, idle=timeout,
                              total=timeout)
        self.client = UpstreamClient(f"{parts.scheme}://{authority}", deadlines=deadlines,
                                     max_idle=POSTS_PER_WEBHOOK)
        self.path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self.headers: list[tuple[bytes, bytes]] = [
            (b"content-type", b"application/json"), (b"user-agent", b"llm-gateway-alerts")]
        if parts.username is not None:
            user = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            self.headers.append((b"authorization",
                                 b"Basic " + base64.b64encode(user.encode())))


class Poster:
    """POSTs events to webhooks; `post` raises DeliveryFailed unless the answer is 2xx."""

    def __init__(self, webhooks: tuple[Webhook, ...], timeout: float) -> None:
        self._targets = [_Target(w, timeout) for w in webhooks]
        self._webhooks = webhooks
        self.answer_bytes = 0  # answer body bytes taken from the wire, ever (for tests)

    async def post(self, index: int, event_id: str, event_type: str, body: bytes) -> int:
        target = self._targets[index]
        headers = [*target.headers,
                   (EVENT_ID_HEADER.encode(), event_id.encode()),
                   (EVENT_TYPE_HEADER.encode(), event_type.encode()),
                   (SIGNATURE_HEADER.encode(),
                    sign(self._webhooks[index].secret, body).encode())]
        try:
            response = await target.client.request("POST", target.path, headers, body)
        except UpstreamError as exc:
            raise DeliveryFailed(f"webhook {index + 1}: {_reason(exc)}") from None
        except (OSError, ValueError) as exc:
            raise DeliveryFailed(f"webhook {index + 1}: {type(exc).__name__}") from None
        async with response:  # leaving it closes the connection unless the body ended
            self.answer_bytes += await _skim(response)
        if not 200 <= response.status < 300:
            raise DeliveryFailed(f"webhook {index + 1} answered {response.status}")
        return response.status

    async def close(self) -> None:
        for target in self._targets:
            with contextlib.suppress(Exception):
                await target.client.close()


async def _skim(response: UpstreamResponse) -> int:
    """Reads at most about MAX_ANSWER bytes of the body; returns how many it took. A body
    that breaks off after the head changes nothing: the status was already given."""
    ready = response.ready()
    if ready is not None:
        return len(ready)
    taken = 0
    with contextlib.suppress(UpstreamError, OSError):
        async for piece in response.chunks():
            taken += len(piece)
            if taken >= MAX_ANSWER:
                break
    return taken


def _reason(exc: UpstreamError) -> str:
    """The client's message without the origin it names (it could carry a hostname the
    operator considers secret only with a path, but the path and query never appear)."""
    text = str(exc)
    return "timed out" if "timed out" in text else "no answer (connection failed or closed)"
