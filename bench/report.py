"""Ratios, per-request costs and targets from the raw measurements, and their printout."""

from __future__ import annotations

import sys
import time
from typing import Any

KINDS = ("non_streamed", "streamed")


class Progress:
    def __init__(self) -> None:
        self.started = time.monotonic()

    def __call__(self, what: str) -> None:
        print(f"[{time.monotonic() - self.started:6.1f}s] {what}", file=sys.stderr, flush=True)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _cpu(run: dict[str, Any], process: str) -> float:
    return float(run["cpu_ms_per_request"].get(process, 0.0))


def summary(results: dict[str, Any]) -> dict[str, Any]:
    t = results["throughput"]
    seq = results["sequential"]
    trips = results["round_trips"]
    ratios: dict[str, float] = {}
    costs: dict[str, float] = {}
    for kind in KINDS:
        direct, serve = t[f"upstream.{kind}"], t[f"gateway1.{kind}"]
        mock, wrapped = t[f"mock.{kind}"], t[f"middleware.{kind}"]
        ratios[f"serve_rps_over_direct.{kind}"] = _ratio(serve["rps"], direct["rps"])
        ratios[f"middleware_rps_over_mock.{kind}"] = _ratio(wrapped["rps"], mock["rps"])
        # The same code costs a different number of ms on another machine; its ratio to a
        # plain uvicorn app measured in the same run moves much less.
        ratios[f"serve_cpu_over_mock_alone.{kind}"] = _ratio(_cpu(serve, "gateway1"),
                                                             _cpu(mock, "mock"))
        costs[f"serve_gateway_cpu_ms.{kind}"] = _cpu(serve, "gateway1")
        costs[f"serve_upstream_cpu_ms.{kind}"] = _cpu(serve, "upstream")
        costs[f"direct_upstream_cpu_ms.{kind}"] = _cpu(direct, "upstream")
        costs[f"serve_redis_cpu_ms.{kind}"] = serve["redis"]["cpu_ms_per_request"]
        costs[f"mock_alone_cpu_ms.{kind}"] = _cpu(mock, "mock")
        costs[f"middleware_process_cpu_ms.{kind}"] = _cpu(wrapped, "middleware")
        costs[f"middleware_added_cpu_ms.{kind}"] = (_cpu(wrapped, "middleware")
                                                    - _cpu(mock, "mock"))
        costs[f"loadgen_cpu_ms.serve.{kind}"] = serve["loadgen_cpu_ms_per_request"]
    serve_cpu = costs["serve_gateway_cpu_ms.non_streamed"]
    for name, label in (("bare", "bare_uvicorn"), ("naive", "naive_composition")):
        run = t.get(f"{name}.non_streamed")
        if run is not None:
            costs[f"{label}_cpu_ms.non_streamed"] = _cpu(run, name)
            ratios[f"serve_cpu_over_{label}.non_streamed"] = _ratio(serve_cpu, _cpu(run, name))
    added = {
        "non_streamed_p50_ms": seq["gateway1.non_streamed"]["p50_ms"]
        - seq["upstream.non_streamed"]["p50_ms"],
        "non_streamed_p99_ms": seq["gateway1.non_streamed"]["p99_ms"]
        - seq["upstream.non_streamed"]["p99_ms"],
        "streamed_first_byte_p50_ms": seq["gateway1.streamed"]["first_byte_p50_ms"]
        - seq["upstream.streamed"]["first_byte_p50_ms"],
        "streamed_total_p50_ms": seq["gateway1.streamed"]["p50_ms"]
        - seq["upstream.streamed"]["p50_ms"],
    }
    gw_stream, direct_stream = seq["gateway1.streamed"], seq["upstream.streamed"]
    ratios["stream_spread_over_direct"] = _ratio(
        gw_stream["p50_ms"] - gw_stream["first_byte_p50_ms"],
        direct_stream["p50_ms"] - direct_stream["first_byte_p50_ms"])
    added["stream_event_lag_p50_ms"] = (gw_stream["event_lag_p50_ms"]
                                        - direct_stream["event_lag_p50_ms"])
    added["stream_slowest_event_lag_p50_ms"] = (gw_stream["slowest_event_lag_p50_ms"]
                                                - direct_stream["slowest_event_lag_p50_ms"])
    spacing = float(results.get("stream_chunk_delay_ms", 0.0))
    ns = trips["non_streamed"]
    targets = [
        _target("gateway CPU per non-streamed proxied request (ms)", "<= 0.45",
                costs["serve_gateway_cpu_ms.non_streamed"],
                costs["serve_gateway_cpu_ms.non_streamed"] <= 0.45),
        _target("Redis round trips before forwarding", "== 1", ns["before_forwarding"],
                ns["before_forwarding"] == 1),
        _target("Redis round trips after forwarding", "== 1", ns["after_forwarding"],
                ns["after_forwarding"] == 1),
        _target("Redis round trips per request in all", "== 2", ns["per_request"],
                ns["per_request"] == 2),
        _target("Redis round trips for auth at steady state", "== 0", ns["auth"],
                ns["auth"] == 0),
        _target("one-connection added p50 (ms)", "<= 0.6", added["non_streamed_p50_ms"],
                added["non_streamed_p50_ms"] <= 0.6),
        # The upstream writes an event every `spacing` ms, stamped with its send time. A
        # gateway that held any event until more arrived would make that event at least
        # `spacing` later than direct; one that relays each as it comes adds only its own
        # processing time, to every event alike.
        _target("stream: slowest event's added relay lag, p50 (ms)",
                f"< {spacing:g} (event spacing)", added["stream_slowest_event_lag_p50_ms"],
                added["stream_slowest_event_lag_p50_ms"] < spacing),
    ]
    cluster = results.get("cluster")
    if cluster is not None:
        _cluster_summary(t, cluster["round_trips"], ratios, costs, targets)
    return {"ratios": ratios, "per_request_ms": costs, "one_connection_added": added,
            "targets": targets}


def _cluster_summary(t: dict[str, Any], trips: dict[str, Any], ratios: dict[str, float],
                     costs: dict[str, float], targets: list[dict[str, Any]]) -> None:
    """The same gateway (--workers 1) against a 3-master Redis Cluster instead of one Redis."""
    for kind in KINDS:
        standalone, cluster = t[f"gateway1.{kind}"], t[f"cluster.{kind}"]
        ratios[f"cluster_cpu_over_standalone.{kind}"] = _ratio(_cpu(cluster, "cluster"),
                                                                _cpu(standalone, "gateway1"))
        ratios[f"cluster_rps_over_standalone.{kind}"] = _ratio(cluster["rps"],
                                                                standalone["rps"])
        costs[f"cluster_gateway_cpu_ms.{kind}"] = _cpu(cluster, "cluster")
        costs[f"cluster_redis_cpu_ms.{kind}"] = cluster["redis"]["cpu_ms_per_request"]
    ns = trips["non_streamed"]
    targets.append(_target("Redis Cluster: round trips per request in all", "== 2",
                           ns["per_request"], ns["per_request"] == 2))


def _target(name: str, target: str, measured: float, met: bool) -> dict[str, Any]:
    return {"name": name, "target": target, "measured": round(measured, 4), "met": met}


def render(results: dict[str, Any]) -> None:
    env = results["environment"]
    t = results["throughput"]
    print(f"\ngateway benchmark  ({env['command']}; commit {env['commit']}; {env['cpus']} cpus; "
          f"load: {env['loadgen']} pinned to cpu {env['loadgen_pinned_to_cpu']}; "
          f"uvicorn {env['uvicorn']} http={env['uvicorn_http']} loop={env['uvicorn_loop']})")
    print(f"\n{'run':<30}{'req/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'non2xx':>7}   "
          "CPU ms per request by process (and Redis)")
    for name, run in t.items():
        cpu = "  ".join(f"{p} {v:.3f}" for p, v in run["cpu_ms_per_request"].items())
        print(f"{name:<30}{run['rps']:>9.0f}{run['p50_ms']:>8.2f}{run['p99_ms']:>8.2f}"
              f"{run['non_2xx'] + run['errors']:>7}   {cpu}  redis "
              f"{run['redis']['cpu_ms_per_request']:.3f}  loadgen "
              f"{run['loadgen_cpu_ms_per_request']:.3f}")
    print("\none connection, sequential (event lag: an event's arrival minus its sending)"
          f"\n{'run':<30}{'n':>6}{'p50 ms':>8}{'p99 ms':>8}{'1st byte p50':>14}"
          f"{'event lag p50':>15}{'slowest p50':>13}")
    for name, run in results["sequential"].items():
        print(f"{name:<30}{run['requests']:>6}{run['p50_ms']:>8.3f}{run['p99_ms']:>8.3f}"
              f"{run['first_byte_p50_ms']:>14.3f}{run.get('event_lag_p50_ms', 0.0):>15.3f}"
              f"{run.get('slowest_event_lag_p50_ms', 0.0):>13.3f}")
    print("\nRedis commands per metered request (MONITOR, script-internal calls excluded)")
    for kind, trips in results["round_trips"].items():
        detail = ", ".join(f"{k} {v:.3f}" for k, v in trips["by_command"].items())
        print(f"  {kind:<14} {trips['per_request']:.3f}  ({detail}; n={trips['requests']})")
    print(f"\nscaling (non-streamed, gateway serve)\n{'workers':>7}{'req/s':>9}{'p50 ms':>8}"
          f"{'gw CPU ms/req':>15}{'redis CPU ms/req':>18}{'evalsha us/req':>16}")
    for row in results["scaling"]:
        evalsha = row["redis"]["commandstats"].get("evalsha", {}).get("usec_per_request", 0)
        print(f"{row['workers']:>7}{row['rps']:>9.0f}{row['p50_ms']:>8.2f}"
              f"{row['gateway_cpu_ms_per_request']:>15.3f}"
              f"{row['redis']['cpu_ms_per_request']:>18.3f}{evalsha:>16.1f}")
    if "cluster" in results:
        _render_cluster(results)
    s = results["summary"]
    print("\nratios")
    for name, value in s["ratios"].items():
        print(f"  {name:<44} {value:.3f}")
    print("per-request costs (ms)")
    for name, value in s["per_request_ms"].items():
        print(f"  {name:<44} {value:.3f}")
    print("one connection: added by the gateway (ms)")
    for name, value in s["one_connection_added"].items():
        print(f"  {name:<44} {value:.3f}")
    print("targets (reported, not asserted)")
    for row in s["targets"]:
        mark = "met" if row["met"] else "MISSED"
        print(f"  {row['name']:<52} {row['target']:<22} {row['measured']:>9.4f}  {mark}")
    prof = results.get("profile")
    if prof and "self" in prof:
        print(f"\nprofile ({prof['samples']} samples; {prof['raw']}): top self time")
        for row in prof["self"][:15]:
            print(f"  {row['percent']:5.1f}%  {row['function']}")


def _render_cluster(results: dict[str, Any]) -> None:
    cluster = results["cluster"]
    t = results["throughput"]
    print(f"\nRedis Cluster ({cluster['masters']} masters, {cluster['replicas']} replicas) vs "
          "one Redis, gateway serve --workers 1; Redis figures summed over the nodes"
          f"\n{'kind':<14}{'req/s':>9}{'vs one':>8}{'gw CPU ms/req':>15}{'vs one':>8}"
          f"{'redis CPU ms/req':>18}{'cmds/req':>10}{'evalsha/req':>13}")
    for kind in KINDS:
        run, one = t[f"cluster.{kind}"], t[f"gateway1.{kind}"]
        trips = cluster["round_trips"][kind]
        evalsha = run["redis"]["commandstats"].get("evalsha", {}).get("calls_per_request", 0)
        print(f"{kind:<14}{run['rps']:>9.0f}{_ratio(run['rps'], one['rps']):>8.2f}"
              f"{_cpu(run, 'cluster'):>15.3f}"
              f"{_ratio(_cpu(run, 'cluster'), _cpu(one, 'gateway1')):>8.2f}"
              f"{run['redis']['cpu_ms_per_request']:>18.3f}{trips['per_request']:>10.3f}"
              f"{evalsha:>13.3f}")
    for kind, trips in cluster["round_trips"].items():
        detail = ", ".join(f"{k} {v:.3f}" for k, v in trips["by_command"].items())
        print(f"  MONITOR {kind:<14} {trips['per_request']:.3f}  ({detail}; "
              f"n={trips['requests']})")
