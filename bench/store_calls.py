"""The Redis client's own cost: `python -m bench.store_calls`.

CPU time per admission + settlement through the gateway's Store (admit.lua, then the
settlement queued on the connection as the middleware does), in this process, on one local
redis-server and on a local 3-master Redis Cluster, alternated in rounds in one run. What the
full benchmark measures per request is ~10x this plus HTTP, so a difference of a few
microseconds drowns in its noise; here it does not. Prints µs per pair, the cluster ÷
standalone ratio per round and the median ratio; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from bench.cluster import LocalCluster
from bench.procs import free_port, redis_server
from gateway.config.settings import Settings as _Settings
from gateway.core.keys import hash_secret, new_consumption_secret
from gateway.store import Ask, KeyRef, Store, connect

PLAN_LIMITS = _Settings().plan_limits


async def _pairs_cpu_us(url: str, pairs: int, concurrency: int) -> float:
    store = connect(url, 2.0)
    try:
        ref, secret_hash = await _key(store)
        gate = asyncio.Semaphore(concurrency)

        async def pair(i: int) -> None:
            async with gate:
                await store.admit(ref, secret_hash, f"b{i}", Ask.flat(10, 5), PLAN_LIMITS)
                started = store.settle_started(ref, f"b{i}", 3, 4, 5)
                if started is None:
                    await store.settle(ref, f"b{i}", 3, 4, 5)
                else:
                    await started

        await asyncio.gather(*(pair(i) for i in range(min(pairs, 2000))))  # warm
        cpu = time.process_time()
        await asyncio.gather(*(pair(i) for i in range(10_000, 10_000 + pairs)))
        return (time.process_time() - cpu) / pairs * 1e6
    finally:
        await store.close()


async def _key(store: Store) -> tuple[KeyRef, str]:
    account = await store.create_account(f"bench-{time.monotonic_ns()}")
    secret_hash = hash_secret(new_consumption_secret())
    record = await store.create_key(
        account_id=account.id, name="bench", key_type="credit", plan="", rpm=10**8,
        tpm=10**8, budget_limit=None, budget_duration=30 * 86400, expires_at_us=None,
        expires_in_seconds=None, secret_hash=secret_hash)
    await store.add_credits(account.id, 10**12)
    ref = await store.lookup(secret_hash)
    assert ref is not None and ref.key_id == record.id
    return ref, secret_hash


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.store_calls",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20_000, help="per measurement")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=100)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-store-") as tmp:
        single = redis_server(free_port(), Path(tmp))
        cluster = LocalCluster(Path(tmp))
        try:
            single.ready()
            cluster.ready()
            urls = {"standalone": f"redis://127.0.0.1:{single.port}/0",
                    "cluster": cluster.url}
            results: dict[str, list[float]] = {name: [] for name in urls}
            for round_number in range(args.rounds):
                for name, url in urls.items():
                    results[name].append(uvloop.run(
                        _pairs_cpu_us(url, args.pairs, args.concurrency)))
                ratio = results["cluster"][-1] / results["standalone"][-1]
                print(f"round {round_number + 1}: " + "  ".join(
                    f"{name} {results[name][-1]:.1f} us" for name in urls)
                    + f"  cluster/standalone {ratio:.2f}")
        finally:
            cluster.stop()
            single.stop()
    ratios = [c / s for c, s in zip(results["cluster"], results["standalone"], strict=True)]
    print(f"CPU per admission + settlement (median of {args.rounds}): standalone "
          f"{statistics.median(results['standalone']):.1f} us, cluster "
          f"{statistics.median(results['cluster']):.1f} us; cluster/standalone median "
          f"{statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
