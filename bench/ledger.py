"""The ledger's cost and lag: `python -m bench.ledger` (see docs/performance.md).

Starts a private redis-server and PostgreSQL, the fast upstream, and two `gateway serve
--workers 1` on that Redis, one without a ledger and one with (GATEWAY_POSTGRES_URL), plus
`gateway ledger export`. Drives the same closed-loop load through each (alternating, `--rounds`
times) and prints, from the same run: the gateway's and Redis's CPU per request with the
ledger over without it, the exporter's lag sampled from its /metrics while the load runs (the
most entries waiting, the oldest entry's age), the exporter's own CPU per row, and at the end
the rows in PostgreSQL against the requests answered 200, and `gateway ledger reconcile`'s
verdict. Asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import orjson
import redis

from bench.procs import Service, free_port, redis_server
from gateway.store import Names

BODY = orjson.dumps({"model": "llama-3.1-8b", "max_tokens": 16, "messages": [
    {"role": "user", "content": "Say something about load testing in one line."}]})
CONFIG = """\
auth_cache_seconds = 3600
[plans.bench]
name = "Bench"
price_usdc = "0"
rpm = 100000000
tpm = 100000000
[ledger]
max_stream_entries = 10000000
"""


def _load(port: int, secret: str, connections: int, seconds: float, workdir: Path
          ) -> dict[str, Any]:
    body = workdir / "body.json"
    body.write_bytes(BODY)
    done = subprocess.run([sys.executable, "-m", "bench.load", "--port", str(port),
                           "--body-file", str(body), "--connections", str(connections),
                           "--duration", str(seconds), "--header",
                           f"Authorization: Bearer {secret}"],
                          capture_output=True, check=True)
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as answer:
        for line in answer.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


class _Sampler(threading.Thread):
    """The account stream itself every 50 ms while the load runs (not the exporter's own
    gauges, which it sets after a pass): the most entries waiting and the oldest's age."""

    def __init__(self, rds: redis.Redis, stream: str) -> None:
        super().__init__(daemon=True)
        self.rds = rds
        self.stream = stream
        self.stop = threading.Event()
        self.active = threading.Event()  # set while the ledger's gateway is loaded
        self.most_entries = 0
        self.oldest_seconds = 0.0
        self.samples = 0

    def run(self) -> None:
        while not self.stop.wait(0.05):
            if not self.active.is_set():
                continue
            length = int(self.rds.xlen(self.stream))
            first = self.rds.xrange(self.stream, count=1)
            seconds, micros = self.rds.time()
            self.samples += 1
            self.most_entries = max(self.most_entries, length)
            if first:
                ms = int(first[0][0].split(b"-")[0])
                self.oldest_seconds = max(self.oldest_seconds,
                                          (seconds * 1000 + micros // 1000 - ms) / 1000)


def _key(env: dict[str, str], url: str, config: Path, name: str) -> tuple[str, str]:
    created = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--json",
                              "--plan", "bench", "--name", name, "--account", name,
                              "--redis", url, "--config", str(config)],
                             capture_output=True, env=env, check=False)
    if created.returncode != 0:  # the account first
        subprocess.run([sys.executable, "-m", "gateway", "accounts", "create", "--name", name,
                        "--redis", url], env=env, check=True, capture_output=True)
        created = subprocess.run([sys.executable, "-m", "gateway", "keys", "create", "--json",
                                  "--plan", "bench", "--name", name, "--account", name,
                                  "--redis", url, "--config", str(config)],
                                 capture_output=True, env=env, check=True)
    doc = orjson.loads(created.stdout)
    return str(doc["key"]), str(doc["account_id"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ledger", description=__doc__)
    parser.add_argument("--seconds", type=float, default=8.0, help="per load run")
    parser.add_argument("--rounds", type=int, default=3, help="off/on alternations")
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.postgres import PostgresServer

    workdir = Path(tempfile.mkdtemp(prefix="bench-ledger-"))
    pg = PostgresServer()
    pg.start()
    services: list[Service] = []
    try:
        db_url = pg.create_database("ledger_bench")
        store = redis_server(free_port(), workdir)
        services.append(store)
        store.ready()
        url = f"redis://127.0.0.1:{store.port}/0"
        config = workdir / "gateway.toml"
        config.write_text(CONFIG)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
        env |= {"GATEWAY_CONFIG": str(config)}
        py = sys.executable
        up = free_port()
        services.append(Service("upstream", [py, "-m", "bench.upstream", "--port", str(up)],
                                up, env, workdir / "upstream.log"))
        ports: dict[str, int] = {}
        for name, extra in (("off", {}), ("on", {"GATEWAY_POSTGRES_URL": db_url})):
            ports[name] = free_port()
            services.append(Service(f"gateway ({name})", [
                py, "-m", "gateway", "serve", "--upstream", f"http://127.0.0.1:{up}",
                "--redis", url, "--port", str(ports[name]), "--workers", "1",
                "--metrics-port", "0"], ports[name], env | extra, workdir / f"gw-{name}.log"))
        subprocess.run([py, "-m", "gateway", "ledger", "migrate", "--postgres", db_url],
                       env=env, check=True, capture_output=True)
        metrics_port = free_port()
        exporter = Service("exporter", [
            py, "-m", "gateway", "ledger", "export", "--redis", url, "--postgres", db_url,
            "--metrics-port", str(metrics_port), "--interval", "0.1",
            "--lag-interval", "0.25"], metrics_port, env,
            workdir / "exporter.log")
        services.append(exporter)
        for service in services:
            service.ready()
        made = {name: _key(env, url, config, f"bench-{name}") for name in ports}
        secrets = {name: secret for name, (secret, _) in made.items()}
        gateways = {s.name: s for s in services}
        rds = redis.Redis(port=store.port)
        worst = _Sampler(rds, Names.ledger(made["on"][1]))
        worst.start()
        cpu = {name: [0.0, 0.0, 0] for name in ports}  # gateway s, redis s, requests
        ok_on = 0
        exporter_before = exporter.cpu()
        for _ in range(args.rounds):
            for name in ("off", "on"):
                gateway = gateways[f"gateway ({name})"]
                g0, r0 = gateway.cpu(), float(rds.info("cpu")["used_cpu_user"]) + float(
                    rds.info("cpu")["used_cpu_sys"])
                if name == "on":
                    worst.active.set()
                result = _load(ports[name], secrets[name], args.connections, args.seconds,
                               workdir)
                worst.active.clear()
                r1 = float(rds.info("cpu")["used_cpu_user"]) + float(
                    rds.info("cpu")["used_cpu_sys"])
                requests = int(result["requests"]) - int(result.get("non_2xx", 0))
                cpu[name][0] += gateway.cpu() - g0
                cpu[name][1] += r1 - r0
                cpu[name][2] += requests
                if name == "on":
                    ok_on += requests
        deadline = time.monotonic() + 60
        while _metric(metrics_port, "gateway_ledger_lag_entries") > 0 or _metric(
                metrics_port, "gateway_ledger_exported_total") < ok_on:
            if time.monotonic() > deadline:
                break
            time.sleep(0.25)
        worst.stop.set()
        exported = _metric(metrics_port, "gateway_ledger_exported_total")
        exporter_cpu = exporter.cpu() - exporter_before
        rows = int(pg.query("SELECT count(*) FROM ledger_entries", "ledger_bench")[0][0])
        reconcile = subprocess.run([py, "-m", "gateway", "ledger", "reconcile", "--redis", url,
                                    "--postgres", db_url], env=env, capture_output=True,
                                   text=True)
        per = {n: (c[0] * 1e6 / max(1, c[2]), c[1] * 1e6 / max(1, c[2]), c[2])
               for n, c in cpu.items()}
        print(f"requests: off {per['off'][2]}, on {per['on'][2]} "
              f"({args.rounds} rounds x {args.seconds:g} s, {args.connections} connections)")
        print(f"gateway CPU per request: off {per['off'][0]:.0f} us, on {per['on'][0]:.0f} us,"
              f" ratio on/off {per['on'][0] / per['off'][0]:.3f}")
        print(f"Redis CPU per request:   off {per['off'][1]:.1f} us, on {per['on'][1]:.1f} us,"
              f" ratio on/off {per['on'][1] / per['off'][1]:.3f}")
        per_row = exporter_cpu * 1e6 / max(1, exported)
        print(f"exporter: {exported:.0f} rows exported, CPU {per_row:.0f} us per row; "
              f"lag under load (the stream, {worst.samples} samples): at most "
              f"{worst.most_entries} entries waiting, the oldest {worst.oldest_seconds:.3f} s")
        print(f"PostgreSQL rows {rows} == requests answered through the ledger gateway "
              f"{ok_on}: {rows == ok_on}")
        print("reconcile:", reconcile.stdout.strip().splitlines()[-1] if reconcile.stdout
              else reconcile.stderr.strip(), f"(exit {reconcile.returncode})")
        return 0 if rows == ok_on and reconcile.returncode == 0 else 1
    finally:
        for service in reversed(services):
            service.stop()
        pg.close()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
