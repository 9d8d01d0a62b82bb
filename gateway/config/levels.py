"""Log levels and formats: the values settings and the CLI accept."""

from __future__ import annotations

from gateway.errors import ConfigError

LEVELS = ("debug", "info", "warning", "error", "critical")
FORMATS = ("json", "text")


def check_level(value: str) -> str:
    level = value.strip().lower()
    if level not in LEVELS:
        raise ConfigError(f"log level must be one of {', '.join(LEVELS)}, got {value!r}")
    return level


def check_format(value: str) -> str:
    fmt = value.strip().lower()
    if fmt not in FORMATS:
        raise ConfigError(f"log format must be 'json' or 'text', got {value!r}")
    return fmt
