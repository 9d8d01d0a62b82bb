"""Settings: a TOML file (GATEWAY_CONFIG) plus GATEWAY_* environment variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from gateway.config.admission import AdmissionArgs
from gateway.config.alerts import AlertSettings, alerts_from_config
from gateway.config.ledger import LedgerSettings, ledger_from_config
from gateway.config.levels import check_format, check_level
from gateway.config.limits import Deadlines, RunningUsage, ServerLimits
from gateway.config.plans import DEFAULT_PLANS, PLAN_FIELDS, Plan, plans_from_config
from gateway.config.routes import DEFAULT_PUBLIC_PATHS, Kind, Route, default_routes
from gateway.config.units import (
    DEFAULT_REQUEST_PRICE,
    MAX_OUTPUT_TOKENS,
    check_choice,
    check_flag,
    check_known,
    check_port,
    check_positive,
    check_rate,
    check_seconds,
    check_table,
    check_text,
    check_token,
    usd_to_micro,
)
from gateway.errors import ConfigError


@dataclass(frozen=True, slots=True)
class Price:
    """USD per million tokens, held as micro-USD per million tokens (exact integers).
    Cached prompt tokens cost `cached_input` when set, else the input price."""

    input: int
    output: int
    cached_input: int | None = None

    def cost_micro(self, prompt_tokens: int, completion_tokens: int,
                   cached_tokens: int = 0) -> int:
        cached = min(cached_tokens, prompt_tokens) if self.cached_input is not None else 0
        total = ((prompt_tokens - cached) * self.input + completion_tokens * self.output
                 + cached * (self.cached_input or 0))
        # Ceiling: a fraction of a micro-dollar is billed, never given away.
        return -(-total // 1_000_000)

    def prompt_micro(self, prompt_tokens: int) -> int:
        return -(-(prompt_tokens * self.input) // 1_000_000)


def highest(prices: list[Price]) -> Price:
    """A price at least as high as each of `prices` on every kind of token."""
    # No cached price: cached tokens then cost the highest input price, the most of all.
    return Price(max(p.input for p in prices), max(p.output for p in prices))


_MODEL_FIELDS = frozenset({"input", "output", "cached_input", "max_output_tokens"})
# Every key gateway.toml may hold, by table (the configuration reference is the README's).
_TOP_LEVEL = frozenset({
    "redis_url", "fail_mode", "plans", "credit", "pricing", "routes", "upstream",
    "max_output_tokens", "default_max_tokens", "max_body_bytes", "media_part_tokens",
    "on_insufficient", "public_paths", "redis_timeout", "upstream_connect_timeout",
    "upstream_first_byte_timeout", "upstream_idle_timeout", "upstream_total_timeout",
    "max_header_bytes", "header_timeout", "body_timeout", "max_connections",
    "keep_alive_timeout", "shutdown_timeout", "auth_cache_seconds", "api_plan_keys",
    "max_keys_per_account", "metrics_host", "metrics_port", "metrics_token", "log_level",
    "log_format", "admin_token_file", "ledger", "concurrency_lease", "alerts"})
_PLAN_FIELDS = PLAN_FIELDS
_PRICING_FIELDS = frozenset({"default", "models", "per_request", "unknown_models"})


def _price(raw: Any, what: str) -> Price:
    if not isinstance(raw, Mapping) or "input" not in raw or "output" not in raw:
        raise ConfigError(f"{what} needs input and output prices (USD per million tokens)")
    cached = raw.get("cached_input")
    return Price(usd_to_micro(raw["input"], f"{what}.input"),
                 usd_to_micro(raw["output"], f"{what}.output"),
                 None if cached is None else usd_to_micro(cached, f"{what}.cached_input"))


def routes_with_prices(routes: dict[str, Route], per_request: int) -> dict[str, Route]:
    """Audio routes carry no token usage: they cost `per_request` unless a route says."""
    return {path: replace(route, request_micro=per_request) if route.kind is Kind.AUDIO
            else route for path, route in routes.items()}


_ROUTE_FIELDS = frozenset({"kind", "request_usd", "websocket"})


def routes_from_config(table: Mapping[str, Any], per_request: int) -> dict[str, Route]:
    """The default routes, with `[routes."/path"]` tables added or overriding them."""
    routes = routes_with_prices(default_routes(), per_request)
    kinds = ", ".join(k.value for k in Kind)
    for path, raw in table.items():
        what = f"routes.{path!r}"
        if not path.startswith("/") or not isinstance(raw, Mapping):
            raise ConfigError(f"[{what}] must be a table named by a path starting with /")
        unknown = set(raw) - _ROUTE_FIELDS
        if unknown:
            raise ConfigError(f"{what} has unknown field(s) {', '.join(sorted(unknown))}; "
                              f"valid: {', '.join(sorted(_ROUTE_FIELDS))}")
        base = routes.get(path)
        try:
            kind = Kind(raw.get("kind", base.kind if base else None))
        except ValueError:
            raise ConfigError(f"{what}.kind must be one of {kinds}, "
                              f"got {raw.get('kind')!r}") from None
        price = (usd_to_micro(raw["request_usd"], f"{what}.request_usd")
                 if "request_usd" in raw else per_request if kind is Kind.AUDIO else 0)
        routes[path] = Route(path, kind, price,
                             check_flag(raw.get("websocket", False), f"{what}.websocket"))
    return routes


def _admin_token(env: Mapping[str, str], data: Mapping[str, Any]) -> str | None:
    """GATEWAY_ADMIN_TOKEN, else the contents of admin_token_file (a mounted secret)."""
    token = env.get("GATEWAY_ADMIN_TOKEN")
    where = "GATEWAY_ADMIN_TOKEN"
    path = data.get("admin_token_file")
    if not token and path is not None:
        if not isinstance(path, str) or not path:
            raise ConfigError("admin_token_file must be the path of a file")
        try:
            with open(path, encoding="utf-8") as handle:
                token = handle.read().strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(f"cannot read admin_token_file {path}: {reason}") from None
        where = f"the token in admin_token_file {path}"
    return check_token(token, where)


def _lease(value: object) -> float:
    """A slot's lease: long enough that renewing it (every third) costs nothing, short
    enough that a dead replica's slots come back soon."""
    seconds = check_seconds(value, "concurrency_lease", zero_allowed=False)
    if not 1 <= seconds <= 3600:
        raise ConfigError(f"concurrency_lease must be from 1 to 3600 seconds, got {value!r}")
    return seconds


@dataclass(frozen=True, slots=True)
class Settings:
    redis_url: str | None = None
    fail_mode: str = "closed"
    max_body_bytes: int = 10 * 1024 * 1024
    max_output_tokens: int = 1024  # a sequence's bound when the request names none, and its cap
    model_max_output: dict[str, int] = field(default_factory=dict)
    on_insufficient: str = "clamp"  # or "reject": refuse what the budget cannot pay in full
    unknown_models: str = "highest"  # or "reject": 400 for a model pricing does not name
    media_part_tokens: int = 4096  # the prompt bound of one image, audio or video part
    routes: dict[str, Route] = field(default_factory=lambda: routes_with_prices(
        default_routes(), DEFAULT_REQUEST_PRICE))
    public_paths: tuple[str, ...] = DEFAULT_PUBLIC_PATHS
    # [upstream] continuous_usage, timings_per_token
    running_usage: RunningUsage = field(default_factory=RunningUsage)
    plans: dict[str, Plan] = field(default_factory=lambda: dict(DEFAULT_PLANS))
    credit_rpm: int = 60
    credit_tpm: int = 3333
    default_price: Price = Price(500_000, 1_500_000)
    model_prices: dict[str, Price] = field(default_factory=dict)
    auth_cache_seconds: float = 5.0
    api_plan_keys: bool = False  # may management keys create plan (subscription) keys?
    max_keys_per_account: int = 100  # over HTTP and the CLI alike
    redis_timeout_seconds: float = 0.25
    # gateway serve's deadlines for the upstream (seconds; total None: none)
    upstream_deadlines: Deadlines = field(default_factory=Deadlines)
    # gateway serve's bounds on each client connection (gateway/server_protocol.py)
    server_limits: ServerLimits = field(default_factory=ServerLimits)
    keep_alive_timeout: float = 5.0
    shutdown_timeout: float = 30.0  # SIGTERM: how long requests in flight may finish
    # /metrics: its own listener in gateway serve (port 0: none), and on the main port only
    # with this bearer token (spend per plan is revenue: never public)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 9464
    metrics_token: str | None = None
    log_level: str = "info"
    log_format: str = "json"
    # [upstream] url and api_key (GATEWAY_UPSTREAM, GATEWAY_UPSTREAM_API_KEY): where
    # `gateway serve` forwards, and the key it sends instead of the client's
    upstream_url: str | None = None
    upstream_api_key: str | None = field(default=None, repr=False)
    # The operator API (/admin/*) answers only with this bearer token; None: it is 404.
    admin_token: str | None = field(default=None, repr=False)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)  # [ledger]
    # A request's slot (max_concurrent) is leased for this long, renewed while it lives: a
    # process that dies holds its slots no longer than this.
    concurrency_lease: float = 30.0
    alerts: AlertSettings = field(default_factory=AlertSettings)  # [alerts], webhooks
    highest_price: Price = field(init=False, repr=False, compare=False)
    # What admission needs to know of the plans (gateway/config/admission.py).
    admission: AdmissionArgs = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "highest_price",
                           highest([self.default_price, *self.model_prices.values()]))
        object.__setattr__(self, "admission", AdmissionArgs(
            self.plans.values(), self.credit_rpm, self.credit_tpm, self.concurrency_lease))

    @property
    def plan_limits(self) -> tuple[str | int, ...]:
        """Admission's arguments for a request whose model no plan limits."""
        return self.admission.base

    def limits_for(self, plan: str, rpm: int | None, tpm: int | None) -> tuple[int, int]:
        """A key's effective (rpm, tpm): its own override where it has one, else its plan's
        (the [credit] limits for a credit key, plan ""); 0 for a plan this config lacks."""
        if rpm is not None and tpm is not None:
            return rpm, tpm
        if plan:
            found = self.plans.get(plan)
            base = (found.rpm, found.tpm) if found else (0, 0)
        else:
            base = (self.credit_rpm, self.credit_tpm)
        return (base[0] if rpm is None else rpm), (base[1] if tpm is None else tpm)

    def models_for(self, plan: str, own: tuple[str, ...] | None) -> tuple[str, ...]:
        """A key's allowed models: its own where it has them, else its plan's; () any."""
        if own is not None:
            return own
        found = self.plans.get(plan) if plan else None
        return found.models if found else ()

    def concurrency_for(self, plan: str, own: int | None) -> int | None:
        """A key's in-flight limit: its own where it has one, else its plan's; None: none."""
        if own is not None:
            return own
        found = self.plans.get(plan) if plan else None
        return found.max_concurrent if found else None

    def price_for(self, model: object) -> Price:
        """The price of what was served: the model the upstream reports (the default price
        for one pricing does not name)."""
        if isinstance(model, str):
            return self.model_prices.get(model, self.default_price)
        return self.default_price

    def reservation_price(self, model: str | None) -> Price:
        """The price reserved at admission: the named model's, or the highest configured
        when the request names none or an unknown one (the upstream then picks)."""
        if model is not None:
            price = self.model_prices.get(model)
            if price is not None:
                return price
        return self.highest_price

    def max_output_for(self, model: str | None) -> int:
        if model is None:
            return self.max_output_tokens
        return self.model_max_output.get(model, self.max_output_tokens)

    @classmethod
    def load(cls, config_path: str | None = None, env: Mapping[str, str] | None = None,
             redis_url: str | None = None) -> Settings:
        env = os.environ if env is None else env
        path = config_path or env.get("GATEWAY_CONFIG") or None
        data: dict[str, Any] = {}
        if path:
            try:
                with open(path, "rb") as handle:
                    data = tomllib.load(handle)
            except OSError as exc:
                raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
            except tomllib.TOMLDecodeError as exc:
                raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
            except UnicodeDecodeError:
                raise ConfigError(f"config file {path} is not UTF-8 text (TOML)") from None
        url = redis_url or env.get("GATEWAY_REDIS_URL") or check_text(
            data.get("redis_url"), "redis_url")
        return cls.from_mapping(data, redis_url=url, env=env)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], redis_url: str | None = None,
                     env: Mapping[str, str] | None = None) -> Settings:
        env = env or {}
        check_known(data, _TOP_LEVEL, "the config file's top level")
        fail_mode = env.get("GATEWAY_FAIL_MODE") or data.get("fail_mode", "closed")
        if fail_mode not in ("closed", "open"):
            raise ConfigError(f"fail_mode must be 'closed' or 'open', got {fail_mode!r}")
        plans = plans_from_config(check_table(data.get("plans"), "plans"))
        credit = check_table(data.get("credit"), "credit")
        check_known(credit, ("rpm", "tpm"), "[credit]")
        pricing = check_table(data.get("pricing"), "pricing")
        check_known(pricing, _PRICING_FIELDS, "[pricing]")
        default_price = (_price(pricing["default"], "pricing.default") if "default" in pricing
                         else Price(500_000, 1_500_000))
        model_tables = check_table(pricing.get("models"), "pricing.models")
        models = {name: _price(raw, f"pricing.models.{name}")
                  for name, raw in model_tables.items()}
        model_max_output = {}
        for name, raw in model_tables.items():
            unknown = set(raw) - _MODEL_FIELDS
            if unknown:
                raise ConfigError(f"pricing.models.{name} has unknown field(s) "
                                  f"{', '.join(sorted(unknown))}; valid: "
                                  f"{', '.join(sorted(_MODEL_FIELDS))}")
            if "max_output_tokens" in raw:
                model_max_output[name] = check_positive(
                    raw["max_output_tokens"], f"pricing.models.{name}.max_output_tokens",
                    MAX_OUTPUT_TOKENS)
        if "max_output_tokens" in data and "default_max_tokens" in data:
            raise ConfigError("set max_output_tokens only (default_max_tokens is its old name)")
        max_output = check_positive(
            data.get("max_output_tokens", data.get("default_max_tokens", 1024)),
            "max_output_tokens" if "default_max_tokens" not in data else "default_max_tokens",
            MAX_OUTPUT_TOKENS)
        max_body = check_positive(data.get("max_body_bytes", 10 * 1024 * 1024), "max_body_bytes",
                             2**40)
        media_tokens = check_positive(data.get("media_part_tokens", 4096), "media_part_tokens",
                                 MAX_OUTPUT_TOKENS)
        unknown_models = check_choice(pricing.get("unknown_models", "highest"),
                                 "pricing.unknown_models", ("highest", "reject"))
        on_insufficient = check_choice(env.get("GATEWAY_ON_INSUFFICIENT")
                                  or data.get("on_insufficient", "clamp"),
                                  "on_insufficient", ("clamp", "reject"))
        per_request = usd_to_micro(pricing.get("per_request", "0.006"), "pricing.per_request")
        routes = routes_from_config(check_table(data.get("routes"), "routes"), per_request)
        upstream = check_table(data.get("upstream"), "upstream")
        unknown = set(upstream) - {"url", "api_key", "continuous_usage", "timings_per_token"}
        if unknown:
            raise ConfigError(f"[upstream] has unknown field(s) {', '.join(sorted(unknown))}; "
                              f"valid: url, api_key, continuous_usage, timings_per_token")
        running = RunningUsage(
            check_flag(upstream.get("continuous_usage", False), "upstream.continuous_usage"),
            check_flag(upstream.get("timings_per_token", False), "upstream.timings_per_token"))
        public = data.get("public_paths", list(DEFAULT_PUBLIC_PATHS))
        if not isinstance(public, list) or not all(isinstance(p, str) and p.startswith("/")
                                                   for p in public):
            raise ConfigError(f"public_paths must be a list of paths starting with /, "
                              f"got {public!r}")
        timeout = check_seconds(env.get("GATEWAY_REDIS_TIMEOUT") or data.get("redis_timeout", 0.25),
                           "redis_timeout", zero_allowed=False)
        def deadline(name: str, default: float) -> float:
            return check_seconds(env.get(f"GATEWAY_{name.upper()}") or data.get(name, default),
                                 name, zero_allowed=False)

        total = check_seconds(env.get("GATEWAY_UPSTREAM_TOTAL_TIMEOUT")
                         or data.get("upstream_total_timeout", 0), "upstream_total_timeout",
                         zero_allowed=True)
        deadlines = Deadlines(deadline("upstream_connect_timeout", 5.0),
                              deadline("upstream_first_byte_timeout", 300.0),
                              deadline("upstream_idle_timeout", 60.0), total or None)
        limits = ServerLimits(
            check_positive(data.get("max_header_bytes", 64 * 1024), "max_header_bytes", 2**24),
            deadline("header_timeout", 10.0), deadline("body_timeout", 30.0),
            check_positive(data.get("max_connections", 10_000), "max_connections", 10_000_000))
        log_level = check_level(str(env.get("GATEWAY_LOG_LEVEL") or data.get("log_level", "info")))
        log_format = check_format(
            str(env.get("GATEWAY_LOG_FORMAT") or data.get("log_format", "json")))
        return cls(
            redis_url=redis_url,
            fail_mode=fail_mode,
            max_body_bytes=max_body,
            max_output_tokens=max_output,
            model_max_output=model_max_output,
            on_insufficient=on_insufficient,
            unknown_models=unknown_models,
            media_part_tokens=media_tokens,
            routes=routes,
            public_paths=tuple(public),
            running_usage=running,
            plans=plans,
            credit_rpm=check_rate(credit.get("rpm", 60), "credit.rpm"),
            credit_tpm=check_rate(credit.get("tpm", 3333), "credit.tpm"),
            default_price=default_price,
            model_prices=models,
            auth_cache_seconds=check_seconds(data.get("auth_cache_seconds", 5.0),
                                        "auth_cache_seconds", zero_allowed=True),
            api_plan_keys=check_flag(data.get("api_plan_keys", False), "api_plan_keys"),
            max_keys_per_account=check_positive(data.get("max_keys_per_account", 100),
                                           "max_keys_per_account", 10_000_000),
            redis_timeout_seconds=timeout,
            upstream_deadlines=deadlines,
            server_limits=limits,
            keep_alive_timeout=deadline("keep_alive_timeout", 5.0),
            shutdown_timeout=deadline("shutdown_timeout", 30.0),
            metrics_host=str(env.get("GATEWAY_METRICS_HOST") or data.get("metrics_host",
                                                                          "127.0.0.1")),
            metrics_port=check_port(env.get("GATEWAY_METRICS_PORT")
                                      or data.get("metrics_port", 9464)),
            metrics_token=check_token(env.get("GATEWAY_METRICS_TOKEN")
                                      or data.get("metrics_token")),
            log_level=log_level,
            log_format=log_format,
            upstream_url=check_text(env.get("GATEWAY_UPSTREAM") or upstream.get("url"),
                               "upstream.url"),
            upstream_api_key=check_text(env.get("GATEWAY_UPSTREAM_API_KEY")
                                   or upstream.get("api_key"), "upstream.api_key"),
            admin_token=_admin_token(env, data),
            ledger=ledger_from_config(data.get("ledger"), env),
            concurrency_lease=_lease(data.get("concurrency_lease", 30.0)),
            alerts=alerts_from_config(data.get("alerts")),
        )
