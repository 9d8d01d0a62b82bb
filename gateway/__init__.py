"""An ASGI gateway that enforces rate limits, budgets and credits for LLM inference APIs."""

from gateway.config.settings import Settings
from gateway.http.middleware import GatewayMiddleware

__all__ = ["GatewayMiddleware", "Settings"]
