"""The gateway as ASGI: middleware, the exchange, settlement, auth, endpoints, management."""
