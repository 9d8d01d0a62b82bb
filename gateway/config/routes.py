"""Which paths are inference, and how each kind of route is metered.

A route's kind decides where the completion bound sits in the request, how many sequences
it generates, and how usage is read back from the answer. Operators may add routes (and
per-request prices for routes whose answers carry no token usage) in `[routes]`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import cast

from gateway.types import Scope


class Kind(StrEnum):
    CHAT = "chat"  # OpenAI chat completions
    COMPLETIONS = "completions"  # OpenAI legacy completions (prompt lists)
    EMBEDDINGS = "embeddings"  # embeddings, pooling, classification: the input only
    RESPONSES = "responses"  # OpenAI Responses API
    MESSAGES = "messages"  # Anthropic Messages API, as vLLM and llama.cpp serve it
    RERANK = "rerank"  # rerank and score: the input only, no generation
    AUDIO = "audio"  # transcription, translation, speech: priced per request
    INVOCATIONS = "invocations"  # SageMaker-style: the body's shape names the kind


GENERATING = frozenset({Kind.CHAT, Kind.COMPLETIONS, Kind.RESPONSES, Kind.MESSAGES})
# The members as plain module attributes: the hot path compares against them, and an
# Enum class attribute costs a metaclass __getattr__ call each time.
CHAT, COMPLETIONS, AUDIO, INVOCATIONS = Kind.CHAT, Kind.COMPLETIONS, Kind.AUDIO, Kind.INVOCATIONS
RESPONSES = Kind.RESPONSES
WITH_CHOICES = frozenset({CHAT, COMPLETIONS})

# Fields that bound what one sequence may generate, in the upstreams' own precedence
# (vLLM and SGLang: `max_completion_tokens or max_tokens`; llama.cpp adds `n_predict`).
# llama.cpp serves the Responses API by copying the whole body into a chat request, so its
# chat fields bound a response too; its Messages API copies `max_tokens` alone.
BOUND_FIELDS: dict[Kind, tuple[str, ...]] = {
    Kind.CHAT: ("max_completion_tokens", "max_tokens", "n_predict"),
    Kind.COMPLETIONS: ("max_tokens", "max_completion_tokens", "n_predict"),
    Kind.RESPONSES: ("max_output_tokens", "max_completion_tokens", "max_tokens", "n_predict"),
    Kind.MESSAGES: ("max_tokens",),
}
# The field every upstream reads: always in the forwarded body (a bound written only in a
# field some upstream ignores, such as llama.cpp's `n_predict` on vLLM, would not bind it).
BOUND_FIELD_ADDED: dict[Kind, str] = {
    Kind.CHAT: "max_tokens", Kind.COMPLETIONS: "max_tokens",
    Kind.RESPONSES: "max_output_tokens", Kind.MESSAGES: "max_tokens",
}


@dataclass(frozen=True, slots=True)
class Route:
    path: str
    kind: Kind
    request_micro: int = 0  # a price per request (micro-USD), for answers without usage
    websocket: bool = False  # may a WebSocket reach the app on this path (middleware shape)

    @property
    def generates(self) -> bool:
        return self.kind in GENERATING


DEFAULT_ROUTES: dict[str, Kind] = {
    "/v1/chat/completions": Kind.CHAT,
    "/v1/completions": Kind.COMPLETIONS,
    "/v1/embeddings": Kind.EMBEDDINGS,
    "/v1/responses": Kind.RESPONSES,
    "/v1/messages": Kind.MESSAGES,
    "/v1/rerank": Kind.RERANK,
    "/v2/rerank": Kind.RERANK,
    "/rerank": Kind.RERANK,
    "/v1/score": Kind.RERANK,
    "/score": Kind.RERANK,
    "/pooling": Kind.EMBEDDINGS,
    "/classify": Kind.EMBEDDINGS,
    "/v1/audio/transcriptions": Kind.AUDIO,
    "/v1/audio/translations": Kind.AUDIO,
    "/v1/audio/speech": Kind.AUDIO,
    "/invocations": Kind.INVOCATIONS,
}

# Answered by the gateway itself, or harmless, in the middleware shape: no key needed.
DEFAULT_PUBLIC_PATHS = ("/health",)


def default_routes() -> dict[str, Route]:
    return {path: Route(path, kind) for path, kind in DEFAULT_ROUTES.items()}


def invocation_kind(payload: dict[str, object]) -> Kind:
    """What a SageMaker-style `/invocations` body asks for, the way vLLM dispatches it."""
    if "messages" in payload:
        return Kind.CHAT
    if "prompt" in payload:
        return Kind.COMPLETIONS
    return Kind.EMBEDDINGS


class PublicPaths:
    """Paths that need no key: exact ones, or prefixes written with a trailing `*`."""

    __slots__ = ("_exact", "_prefixes")

    def __init__(self, entries: tuple[str, ...]) -> None:
        self._exact = frozenset(e for e in entries if not e.endswith("*"))
        self._prefixes = tuple(e[:-1] for e in entries if e.endswith("*"))

    def __contains__(self, path: str) -> bool:
        return path in self._exact or (bool(self._prefixes) and path.startswith(self._prefixes))


def route_path(scope: Scope) -> str:
    """The path an app under this scope routes on: `path` without the `root_path` it is
    mounted at (uvicorn's --root-path, Starlette's Mount, FastAPI(root_path=...) all put the
    prefix in both), the way Starlette's own router reads it. Matching the full path would
    let `/prefix/v1/chat/completions` reach the app's chat route unmetered."""
    path = cast(str, scope["path"])
    root = scope.get("root_path")
    if not root or not isinstance(root, str) or not path.startswith(root):
        return path
    rest = path[len(root):]
    return rest if not rest or rest.startswith("/") else path  # "/apiv1" is not under "/api"
