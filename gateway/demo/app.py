"""`gateway demo`: the embedded store, a built-in mock upstream, and ready-made keys."""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.core.keys import hash_secret, new_management_secret
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.admin import KeySpec, create_key
from gateway.http.middleware import GatewayMiddleware
from gateway.store.embedded import embedded_store
from gateway.types import Receive, Scope, Send

DEMO_ACCOUNT = "demo"
# Tiny on purpose: the tour reaches every refusal in a handful of requests.
DEMO_CREDITS_MICRO = 100  # $0.0001 of prepaid credits: a few mock answers
DEMO_RATE_RPM = 3
DEMO_BUDGET_USD = "0.0001"
TOUR_REQUESTS = 6


def demo_keys(settings: Settings) -> tuple[KeySpec, ...]:
    plan = next(iter(settings.plans))  # the config's first plan (built-in: standard)
    return (
        KeySpec(name="demo-rate", plan=plan, rpm=DEMO_RATE_RPM),
        KeySpec(name="demo-budget", plan=plan, budget_usd=DEMO_BUDGET_USD,
                budget_duration="1d"),
        KeySpec(name="demo-credit", credit=True),
    )


class DemoApp:
    def __init__(self, host: str, port: int, settings: Settings | None = None) -> None:
        self.settings = settings or Settings.load()
        self.store = embedded_store()
        self.gateway = GatewayMiddleware(MockUpstream(chunk_delay=0.05), settings=self.settings,
                                         store=self.store)
        self.base = f"http://{host}:{port}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self._seed()
                await send({"type": "lifespan.startup.complete"})
                message = await receive()
            await self.gateway.aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
        await self.gateway(scope, receive, send)

    async def _seed(self) -> None:
        account_id = (await self.store.create_account(DEMO_ACCOUNT)).id  # a fresh store
        await self.store.add_credits(account_id, DEMO_CREDITS_MICRO, "demo", "cli")
        mgmt_secret = new_management_secret()
        await self.store.create_mgmt_key(account_id, hash_secret(mgmt_secret))
        secrets = {}
        for spec in demo_keys(self.settings):
            _, secrets[spec.name] = await create_key(self.store, self.settings, account_id,
                                                     spec)
        print(tour(self.base, secrets, mgmt_secret), flush=True)


def tour(base: str, secrets: dict[str, str], mgmt_secret: str) -> str:
    """What `gateway demo` prints: its keys, and shell commands that show each limit."""
    chat = ("-H 'Content-Type: application/json' -d '{\"model\": \"mock-model\", "
            "\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], "
            "\"max_tokens\": 16}'")

    def loop(name: str) -> str:
        return (f"  for i in $(seq {TOUR_REQUESTS}); do curl -s -o /dev/null -D - "
                f"{base}/v1/chat/completions -H 'Authorization: Bearer {secrets[name]}' "
                f"{chat} | grep -iE '^(HTTP|retry-after)' | tr -d '\\r' | paste -sd' '; done")

    return "\n".join([
        "Demo gateway: embedded store (in memory, gone when this process stops) and a mock "
        "upstream.",
        f"  account '{DEMO_ACCOUNT}' with ${DEMO_CREDITS_MICRO / 1e6:.4f} of prepaid credits",
        f"  demo-rate    {secrets['demo-rate']}    {DEMO_RATE_RPM} requests per minute",
        f"  demo-budget  {secrets['demo-budget']}    a ${DEMO_BUDGET_USD} budget per day",
        f"  demo-credit  {secrets['demo-credit']}    pays from the account's credits",
        f"  management   {mgmt_secret}    reads the account's usage (/api/*)",
        f"  dashboard    {base}/dashboard    sign in with the management key; "
        "\"Refresh every 5 s\" shows the tour's requests as they come",
        "",
        "A short tour (each request is logged below as it happens):",
        "1. A rate limit: the 4th request in a minute is 429, with Retry-After.",
        loop("demo-rate"),
        "",
        "2. A budget running out: 200s until the period's budget is spent, then 429.",
        loop("demo-budget"),
        "",
        "3. Credits running out: 200s until the balance is gone, then 429.",
        loop("demo-credit"),
        "",
        "4. What a key and its account see:",
        f"  curl -s -w '\\n' {base}/v1/usage -H 'Authorization: Bearer "
        f"{secrets['demo-budget']}'",
        f"  curl -s -w '\\n' {base}/api/usage -H 'Authorization: Bearer {mgmt_secret}'",
        f"  curl -s -w '\\n' {base}/api/plans",
        "",
    ])
