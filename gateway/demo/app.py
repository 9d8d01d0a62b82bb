"""`gateway demo`: the embedded store, a built-in mock upstream, and ready-made keys."""

from __future__ import annotations

from gateway.config.settings import Settings
from gateway.demo.mock_upstream import MockUpstream
from gateway.http.admin import KeySpec, account_or_default, create_key
from gateway.http.middleware import GatewayMiddleware
from gateway.store.embedded import embedded_store
from gateway.types import Receive, Scope, Send

DEMO_KEYS = (
    KeySpec(name="demo-standard", plan="standard", budget_usd="1"),
    KeySpec(name="demo-pro", plan="pro"),
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
        account_id = await account_or_default(self.store, None)
        await self.store.add_credits(account_id, 5_000_000)
        lines = ["Demo gateway (embedded store: in memory, gone when this process stops)",
                 f"  account {account_id} with $5.00 of credits", ""]
        first = ""
        for spec in DEMO_KEYS:
            record, secret = await create_key(self.store, self.settings, account_id, spec)
            first = first or secret
            label = f"{spec.plan} plan" if spec.plan else "credit"
            lines.append(f"  {record.name:<14} {label:<14} {secret}")
        lines += [
            "", "Try it:",
            f"  curl -s {self.base}/v1/chat/completions -H 'Authorization: Bearer {first}' "
            "-H 'Content-Type: application/json' "
            "-d '{\"model\": \"mock-model\", \"messages\": [{\"role\": \"user\", "
            "\"content\": \"Hello!\"}], \"max_tokens\": 16}'",
            f"  curl -s {self.base}/v1/usage -H 'Authorization: Bearer {first}'",
            f"  curl -s {self.base}/api/plans", "",
        ]
        print("\n".join(lines), flush=True)
