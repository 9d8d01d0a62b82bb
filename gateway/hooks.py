"""What the server tells an app about one request's connection (scope["extensions"]), so
that the app need not start a task per request to watch it."""

from __future__ import annotations

from collections.abc import Callable

HOOKS = "gateway.connection"  # the scope["extensions"] key of a request's RequestHooks


class RequestHooks:
    """`lost` once the client is gone, `on_lost` called right then (the proxy hangs the
    abandoning of its upstream exchange there), and `abort()` to end a response whose body
    was cut short by closing the connection, so the client sees it incomplete."""

    __slots__ = ("_abort", "lost", "on_lost")

    def __init__(self, abort: Callable[[], None]) -> None:
        self._abort = abort
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

    def abort(self) -> None:
        self._abort()
