"""Configuration: settings from TOML and GATEWAY_* environment, routes, limits."""
