"""The gateway benchmark: `python -m bench.run` (see docs/performance.md).

Starts a private redis-server, a fast raw-asyncio upstream, `gateway serve` (--workers 1 and
2; and --workers 1 against a private 3-master Redis Cluster, unless --no-cluster) and the
middleware shape (GatewayMiddleware around MockUpstream in uvicorn, next to MockUpstream
alone), then measures side by side: throughput and latency direct vs through the gateway, each
process's CPU time per request, Redis round trips per metered request (MONITOR), Redis's own
CPU per request, one-connection added latency and time to first byte of streams. Prints
ratios and per-request costs, asserts nothing about speed, and writes a JSON result.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson
import redis

from bench import profile, report
from bench.cluster import LocalCluster
from bench.procs import Service, free_port, pinning, redis_server
from bench.redisstats import Monitor, delta, snapshot

RESULTS = Path(__file__).resolve().parent / "results"
PATH = "/v1/chat/completions"
STREAM_CHUNK_DELAY_MS = 2
# Measured beside the gateway so that its cost reads the same on any machine (bench/apps.py):
# uvicorn answering a canned body, and redis-py + aiohttp composed the obvious way.
YARDSTICKS = ("bare", "naive")
_MESSAGES = [{"role": "system", "content": "You are a terse assistant."},
             {"role": "user", "content": "Say something about load testing in one line."}]
BODIES = {
    "non_streamed": orjson.dumps({"model": "llama-3.1-8b", "max_tokens": 16,
                                  "messages": _MESSAGES}),
    "streamed": orjson.dumps({"model": "llama-3.1-8b", "max_tokens": 16, "stream": True,
                              "messages": _MESSAGES}),
}
CONFIG = """\
# Written by bench/run.py: one plan whose limits never bind, and an auth cache that outlives
# the run, so what is measured is the steady state.
auth_cache_seconds = 3600

[plans.bench]
name = "Bench"
price_usdc = "0"
rpm = 100000000
tpm = 100000000
"""
# --features all: the same plan using every limit issue 16 added, none of them binding (so
# the cost is the checking, not refusals), an account with its own limits, and alerts on.
FEATURES = """models = ["llama-3.1-8b", "qwen*"]
max_concurrent = 100000
budgets = [{ usd = 1000000, duration = "1d" }, { usd = 10000000, duration = "30d" }]
reset = "calendar"
max_queue_wait = "2s"
enforce = true

[plans.bench.model_limits."llama-3.1-8b"]
rpm = 100000000
tpm = 100000000

[alerts]
budget_thresholds = [0.8, 1.0]
credits_low_usd = 1

[[alerts.webhooks]]
url = "http://127.0.0.1:9/bench-hook"
secret = "bench-webhook-secret-0123456789"
"""
ACCOUNT_LIMITS = ["--rpm", "100000000", "--tpm", "100000000", "--max-concurrent", "100000",
                  "--budget-window", "100000000/30d/calendar"]


@dataclass(frozen=True)
class Size:
    duration: float
    warmup: float
    connections: int
    sequential: int
    monitored: int


SIZES = {
    "full": Size(duration=7.0, warmup=1.5, connections=32, sequential=2000, monitored=1000),
    "tiny": Size(duration=0.4, warmup=0.2, connections=8, sequential=60, monitored=60),
}


@dataclass
class Load:
    """How load is generated: wrk (C) when installed, else the bundled asyncio client."""

    tool: str
    cpu: int | None
    workdir: Path

    def run(self, port: int, kind: str, secret: str | None, connections: int,
            duration: float | None = None, requests: int | None = None,
            extra_headers: tuple[str, ...] = ()) -> dict[str, Any]:
        headers = [f"Authorization: Bearer {secret}"] if secret else []
        headers.extend(extra_headers)
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        if self.tool == "wrk" and requests is None:
            result = self._wrk(port, kind, headers, connections, duration or 1.0)
        else:
            result = self._builtin(port, kind, headers, connections, duration, requests)
        usage_after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (usage_after.ru_utime + usage_after.ru_stime
               - usage_before.ru_utime - usage_before.ru_stime)
        result["loadgen_cpu_ms_per_request"] = cpu * 1000 / max(1, result["requests"])
        return result

    def _builtin(self, port: int, kind: str, headers: list[str], connections: int,
                 duration: float | None, requests: int | None) -> dict[str, Any]:
        body = self.workdir / f"{kind}.json"
        args = [sys.executable, "-m", "bench.load", "--port", str(port), "--path", PATH,
                "--body-file", str(body), "--connections", str(connections)]
        args += ["--requests", str(requests)] if requests else ["--duration", str(duration)]
        for header in headers:
            args += ["--header", header]
        done = subprocess.run(args, capture_output=True, check=True, preexec_fn=pinning(self.cpu))
        result: dict[str, Any] = orjson.loads(done.stdout)
        result["loadgen"] = "builtin"
        return result

    def _wrk(self, port: int, kind: str, headers: list[str], connections: int,
             duration: float) -> dict[str, Any]:
        script = self.workdir / f"wrk-{kind}-{len(headers)}.lua"
        lines = ['wrk.method = "POST"',
                 f"wrk.body = [==[{BODIES[kind].decode()}]==]",
                 'wrk.headers["Content-Type"] = "application/json"']
        for header in headers:
            name, _, value = header.partition(":")
            lines.append(f'wrk.headers["{name.strip()}"] = "{value.strip()}"')
        lines.append(_WRK_DONE)
        script.write_text("\n".join(lines) + "\n")
        done = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
             "-s", str(script), f"http://127.0.0.1:{port}{PATH}"],
            capture_output=True, check=True, text=True, preexec_fn=pinning(self.cpu))
        line = next(x for x in done.stdout.splitlines() if x.startswith("BENCH_JSON "))
        raw = orjson.loads(line.removeprefix("BENCH_JSON "))
        elapsed = raw["duration_us"] / 1e6
        return {"requests": raw["requests"], "errors": raw["errors"], "non_2xx": raw["non_2xx"],
                "elapsed_s": elapsed, "rps": raw["requests"] / elapsed,
                "p50_ms": raw["p50_us"] / 1000, "p90_ms": raw["p90_us"] / 1000,
                "p99_ms": raw["p99_us"] / 1000, "loadgen": "wrk"}


_WRK_DONE = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"errors":%d,"non_2xx":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d}\\n',
    summary.requests, summary.duration, e.connect + e.read + e.write + e.timeout, e.status,
    latency:percentile(50), latency:percentile(90), latency:percentile(99)))
end"""


class Bench:
    def __init__(self, size: Size, load: Load, workdir: Path, workers: list[int],
                 cluster: bool = True, features: bool = False) -> None:
        self.size = size
        self.features = features
        self.load = load
        self.workdir = workdir
        self.workers = workers
        self.services: dict[str, Service] = {}
        self.secret = ""
        self.redis: redis.Redis | None = None
        # `gateway serve --workers 1` against a private Redis Cluster: the "cluster" target,
        # with its own key (created in the cluster) and its own Redis statistics.
        self.with_cluster = cluster
        self.cluster: LocalCluster | None = None
        self.cluster_secret = ""

    # -- processes ------------------------------------------------------------------------

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        try:
            self._start()
            yield
        finally:
            for service in reversed(list(self.services.values())):
                service.stop()
            if self.redis is not None:
                self.redis.close()
            if self.cluster is not None:
                self.cluster.stop()

    def _start(self) -> None:
        config = self.workdir / "gateway.toml"
        config.write_text(CONFIG + FEATURES if self.features else CONFIG)
        for kind, body in BODIES.items():
            (self.workdir / f"{kind}.json").write_bytes(body)
        store = redis_server(free_port(), self.workdir)
        self.services["redis"] = store
        store.ready()
        url = f"redis://127.0.0.1:{store.port}/0"
        self.redis = redis.Redis(port=store.port)
        env = {**os.environ, "GATEWAY_REDIS_URL": url, "GATEWAY_CONFIG": str(config)}
        py = sys.executable
        port = free_port()
        self.services["upstream"] = Service("upstream", [
            py, "-m", "bench.upstream", "--port", str(port)], port, env,
            self.workdir / "upstream.log")
        upstream = f"http://127.0.0.1:{port}"
        for workers in self.workers:
            port = free_port()
            self.services[f"gateway{workers}"] = Service(f"gateway --workers {workers}", [
                py, "-m", "gateway", "serve", "--upstream", upstream, "--redis", url,
                "--config", str(config), "--port", str(port), "--workers", str(workers),
                "--metrics-port", "0"], port, env,
                self.workdir / f"gateway{workers}.log")
        if self.with_cluster:
            self._start_cluster(upstream, config, env)
        env["BENCH_UPSTREAM"] = upstream
        for name, factory in (("mock", "bench.apps:mock"),
                              ("middleware", "bench.apps:gateway_mock"),
                              ("bare", "bench.apps:bare"), ("naive", "bench.apps:naive")):
            port = free_port()
            self.services[name] = Service(name, [
                py, "-m", "uvicorn", factory, "--factory", "--port", str(port),
                "--log-level", "warning", "--no-access-log"], port, env,
                self.workdir / f"{name}.log")
        created = subprocess.run([
            py, "-m", "gateway", "keys", "create", "--json", "--plan", "bench", "--name",
            "bench", "--rpm", "100000000", "--tpm", "100000000", "--redis", url,
            "--config", str(config)], capture_output=True, env=env, check=True)
        self.secret = orjson.loads(created.stdout)["key"]
        if self.features:
            self._account_limits(url, config, env)
        for service in self.services.values():
            service.ready()

    def _start_cluster(self, upstream: str, config: Path, env: dict[str, str]) -> None:
        """3 masters, no replicas; the gateway's own cluster client (redis+cluster://)."""
        self.cluster = LocalCluster(self.workdir)
        self.cluster.ready()
        url = self.cluster.url
        cluster_env = {**env, "GATEWAY_REDIS_URL": url}
        port = free_port()
        self.services["cluster"] = Service("gateway --workers 1 (Redis Cluster)", [
            sys.executable, "-m", "gateway", "serve", "--upstream", upstream, "--redis", url,
            "--config", str(config), "--port", str(port), "--workers", "1",
            "--metrics-port", "0"], port, cluster_env, self.workdir / "cluster.log")
        created = subprocess.run([
            sys.executable, "-m", "gateway", "keys", "create", "--json", "--plan", "bench",
            "--name", "bench", "--rpm", "100000000", "--tpm", "100000000", "--redis", url,
            "--config", str(config)], capture_output=True, env=cluster_env, check=True)
        self.cluster_secret = orjson.loads(created.stdout)["key"]
        if self.features:
            self._account_limits(url, config, cluster_env)

    @staticmethod
    def _account_limits(url: str, config: Path, env: dict[str, str]) -> None:
        subprocess.run([sys.executable, "-m", "gateway", "accounts", "update", "default",
                        *ACCOUNT_LIMITS, "--redis", url, "--config", str(config)],
                       capture_output=True, env=env, check=True)

    def _secret_for(self, target: str) -> str | None:
        if target == "cluster":
            return self.cluster_secret
        return None if target in ("upstream", "mock", *YARDSTICKS) else self.secret

    def _stores(self, target: str) -> list[redis.Redis]:
        """The Redis server(s) a target's requests reach: the cluster's nodes, or the one."""
        if target == "cluster":
            assert self.cluster is not None
            return self.cluster.clients
        assert self.redis is not None
        return [self.redis]

    # -- measurements ---------------------------------------------------------------------

    def throughput(self, target: str, kind: str, connections: int | None = None
                   ) -> dict[str, Any]:
        """Load for `duration` seconds after a warm-up; CPU of every process per request."""
        service = self.services[target]
        conns = connections or self.size.connections
        secret = self._secret_for(target)
        self.load.run(service.port, kind, secret, conns, duration=self.size.warmup)
        stores = self._stores(target)
        cpu_before = {name: s.cpu() for name, s in self.services.items() if name != "redis"}
        redis_before = snapshot(*stores)
        result = self.load.run(service.port, kind, secret, conns, duration=self.size.duration)
        redis_after = snapshot(*stores)
        requests = max(1, result["requests"])
        # The processes this run goes through; the idle ones only tick their timers.
        involved = ([target, "upstream"] if target.startswith("gateway")
                    or target in ("naive", "cluster") else [target])
        result["cpu_ms_per_request"] = {
            name: (self.services[name].cpu() - cpu_before[name]) * 1000 / requests
            for name in involved}
        result["redis"] = delta(redis_before, redis_after, requests)
        result["connections"] = conns
        return result

    def sequential(self, target: str, kind: str, requests: int,
                   extra_headers: tuple[str, ...] = ()) -> dict[str, Any]:
        service = self.services[target]
        secret = self._secret_for(target)
        self.load.run(service.port, kind, secret, 1, requests=max(10, requests // 10),
                      extra_headers=extra_headers)
        return self.load.run(service.port, kind, secret, 1, requests=requests,
                             extra_headers=extra_headers)

    def round_trips(self, target: str, kind: str) -> dict[str, Any]:
        """Commands the gateway sent to Redis per metered request, from MONITOR (on every
        node of the cluster for the "cluster" target, summed)."""
        service = self.services[target]
        secret = self._secret_for(target)
        self.load.run(service.port, kind, secret, 4, requests=50)  # warm: auth cache
        if target == "cluster":
            assert self.cluster is not None
            monitors = self.cluster.monitors()
        else:
            monitors = [Monitor("127.0.0.1", self.services["redis"].port)]
        result = self.load.run(service.port, kind, secret, 4, requests=self.size.monitored)
        counted = LocalCluster.finish(monitors, script_names())
        requests = max(1, result["requests"])
        by_command = {name: n / requests for name, n in sorted(counted.items())}
        before = sum(v for k, v in by_command.items() if k.endswith("admit"))
        after = sum(v for k, v in by_command.items() if k.endswith("settle"))
        return {"requests": result["requests"], "non_2xx": result["non_2xx"],
                "per_request": sum(counted.values()) / requests,
                "before_forwarding": before, "after_forwarding": after,
                "auth": by_command.get("GET", 0.0), "by_command": by_command}


def script_names() -> dict[str, str]:
    """SHA-1 of each shipped Lua script -> its name, to label EVALSHA calls."""
    from gateway.store import lua_source

    return {hashlib.sha1(lua_source(name).encode()).hexdigest(): name
            for name in ("admit", "settle", "usage")}


def environment(load: Load, size_name: str, argv: list[str]) -> dict[str, Any]:
    import uvicorn

    def has(module: str) -> bool:
        return importlib.util.find_spec(module) is not None

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, cwd=Path(__file__).parent).stdout.strip()
    wrk = ""
    if shutil.which("wrk"):
        wrk = subprocess.run(["wrk", "-v"], capture_output=True, text=True).stdout.split("\n")[0]
    return {
        "command": " ".join(["python -m bench.run", *argv]), "size": size_name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "commit": commit,
        "python": platform.python_version(), "uvicorn": uvicorn.__version__,
        "uvicorn_http": "httptools" if has("httptools") else "h11",
        "uvicorn_loop": "uvloop" if has("uvloop") else "asyncio",
        "cpus": os.cpu_count(), "loadgen": load.tool, "wrk": wrk,
        "loadgen_pinned_to_cpu": load.cpu,
        # Other jobs on the machine skew req/s and latency more than CPU time per request.
        "load_average_at_end": os.getloadavg()[0],
    }


def measure(bench: Bench, profile_seconds: int,
            profile_kind: str = "non_streamed") -> dict[str, Any]:
    results: dict[str, Any] = {"round_trips": {}, "throughput": {}, "sequential": {},
                               "scaling": [], "stream_chunk_delay_ms": STREAM_CHUNK_DELAY_MS}
    step = report.Progress()
    for kind in BODIES:
        step(f"Redis round trips, {kind}")
        results["round_trips"][kind] = bench.round_trips("gateway1", kind)
    gateways: tuple[str, ...] = ("gateway1",)
    if bench.cluster is not None:
        gateways = ("gateway1", "cluster")
        results["cluster"] = {"masters": len(bench.cluster.ports), "replicas": 0,
                              "round_trips": {}}
        for kind in BODIES:
            step(f"Redis round trips, Redis Cluster, {kind}")
            results["cluster"]["round_trips"][kind] = bench.round_trips("cluster", kind)
    for kind in BODIES:
        for target in ("upstream", *gateways, "mock", "middleware"):
            step(f"throughput {target} {kind}")
            results["throughput"][f"{target}.{kind}"] = bench.throughput(target, kind)
    for target in YARDSTICKS:
        step(f"throughput {target} non_streamed")
        results["throughput"][f"{target}.non_streamed"] = bench.throughput(
            target, "non_streamed")
    for target in ("upstream", "gateway1"):
        step(f"one connection, {target}")
        results["sequential"][f"{target}.non_streamed"] = bench.sequential(
            target, "non_streamed", bench.size.sequential)
        results["sequential"][f"{target}.streamed"] = bench.sequential(
            target, "streamed", max(20, bench.size.sequential // 20),
            (f"x-bench-chunk-delay-ms: {STREAM_CHUNK_DELAY_MS}",))
    for workers in bench.workers:
        step(f"scaling, --workers {workers}")
        name = f"gateway{workers}"
        run = (results["throughput"][f"{name}.non_streamed"] if workers == 1
               else bench.throughput(name, "non_streamed"))
        results["scaling"].append({"workers": workers, "rps": run["rps"],
                                   "p50_ms": run["p50_ms"], "p99_ms": run["p99_ms"],
                                   "gateway_cpu_ms_per_request":
                                       run["cpu_ms_per_request"].get(name, 0.0),
                                   "redis": run["redis"]})
    if profile_seconds:
        step(f"py-spy profile of gateway --workers 1, {profile_kind}")
        results["profile"] = run_profile(bench, profile_seconds, profile_kind)
    return results


def run_profile(bench: Bench, seconds: int, kind: str = "non_streamed") -> dict[str, Any]:
    binary = profile.py_spy()
    if binary is None:
        return {"error": "py-spy is not installed (pip install py-spy)"}
    service = bench.services["gateway1"]
    raw = bench.workdir / "profile.txt"
    sampler = profile.record(binary, service.pid, seconds, raw)
    time.sleep(1.0)  # py-spy attaches
    bench.load.run(service.port, kind, bench.secret, bench.size.connections, duration=seconds)
    _, errors = sampler.communicate(timeout=seconds + 60)
    if sampler.returncode != 0 or not raw.exists():
        return {"error": errors.decode(errors="replace")[-500:]}
    kept = RESULTS / f"profile-{time.strftime('%Y%m%d-%H%M%S')}.txt"
    kept.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(raw, kept)
    return {"raw": str(kept), **profile.summarize(raw)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split(
        "\n\n")[0])
    parser.add_argument("--tiny", action="store_true",
                        help="a few hundred requests in a few seconds (the smoke test)")
    parser.add_argument("--loadgen", choices=("auto", "wrk", "builtin"), default="auto",
                        help="wrk when installed (auto), or the bundled asyncio client")
    parser.add_argument("--no-pin", action="store_true",
                        help="do not pin the load generator to the last CPU")
    parser.add_argument("--workers", default="1,2", help="gateway --workers for the scaling "
                        "table (comma-separated; 1 is always measured)")
    parser.add_argument("--duration", type=float, help="seconds per throughput run")
    parser.add_argument("--no-cluster", action="store_true",
                        help="skip the Redis Cluster column (gateway serve against a private "
                        "3-master cluster)")
    parser.add_argument("--profile", type=int, default=0, metavar="SECONDS",
                        help="also sample the gateway with py-spy under load for SECONDS")
    parser.add_argument("--profile-kind", choices=tuple(BODIES), default="non_streamed",
                        help="the requests sent while profiling")
    parser.add_argument("--features", choices=("none", "all"), default="none",
                        help="all: a plan using every limit of issue 16 (models, "
                             "max_concurrent, model_limits, budgets, calendar reset, queueing), "
                             "account limits and alerts, none of them binding")
    parser.add_argument("--out", type=Path, help="JSON result path "
                        "(default bench/results/<timestamp>.json)")
    args = parser.parse_args(argv)
    size_name = "tiny" if args.tiny else "full"
    size = SIZES[size_name]
    if args.duration:
        size = Size(args.duration, size.warmup, size.connections, size.sequential,
                    size.monitored)
    tool = args.loadgen
    if tool == "auto":
        tool = "wrk" if shutil.which("wrk") else "builtin"
    elif tool == "wrk" and not shutil.which("wrk"):
        parser.error("wrk is not installed (apt-get install wrk)")
    cpus = os.cpu_count() or 1
    workers = sorted({1, *(int(w) for w in args.workers.split(",") if w.strip())})
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        load = Load(tool, None if args.no_pin or cpus < 2 else cpus - 1, Path(tmp))
        bench = Bench(size, load, Path(tmp), workers, cluster=not args.no_cluster,
                      features=args.features == "all")
        started = time.monotonic()
        with bench.running():
            results = measure(bench, args.profile, args.profile_kind)
        results["environment"] = environment(load, size_name, sys.argv[1:] if argv is None
                                             else argv)
        results["environment"]["size_params"] = asdict(size)
        results["environment"]["wall_s"] = round(time.monotonic() - started, 1)
    results["summary"] = report.summary(results)
    out = args.out or RESULTS / f"{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    report.render(results)
    print(f"\nresult: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
