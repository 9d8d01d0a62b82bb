"""An ASGI gateway that enforces rate limits, budgets and credits for LLM inference APIs."""

from gateway.middleware import GatewayMiddleware
from gateway.settings import Settings

__all__ = ["GatewayMiddleware", "Settings"]
