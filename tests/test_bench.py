"""The benchmark in its tiny mode: it runs end to end and writes a complete JSON result.

Speeds are never asserted; the Redis round-trip count is, because it is a behaviour: at steady
state a metered request costs exactly one admission and one settlement call, and no lookup,
against one Redis and against a Redis Cluster (the "cluster" column) alike.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import orjson
import pytest

from bench import report
from bench.run import main

KINDS = ("non_streamed", "streamed")
RUN_FIELDS = {"requests", "rps", "p50_ms", "p99_ms", "cpu_ms_per_request", "redis",
              "loadgen_cpu_ms_per_request"}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        pytest.fail("redis-server and redis-cli are needed (apt-get install redis-server)")
    out: Path = tmp_path_factory.mktemp("bench") / "result.json"
    assert main(["--tiny", "--loadgen", "builtin", "--workers", "1", "--out", str(out)]) == 0
    doc: dict[str, object] = orjson.loads(out.read_bytes())
    return doc


def test_every_run_is_measured_and_clean(result: dict[str, object]) -> None:
    throughput = result["throughput"]
    assert isinstance(throughput, dict)
    for target in ("upstream", "gateway1", "cluster", "mock", "middleware"):
        for kind in KINDS:
            run = throughput[f"{target}.{kind}"]
            assert run.keys() >= RUN_FIELDS
            assert run["requests"] > 0
            assert run["non_2xx"] == 0 and run["errors"] == 0
            assert run["cpu_ms_per_request"][target] > 0
    for yardstick in ("bare", "naive"):  # measured beside the gateway, non-streamed only
        run = throughput[f"{yardstick}.non_streamed"]
        assert run["requests"] > 0 and run["non_2xx"] == 0 and run["errors"] == 0
        assert run["cpu_ms_per_request"][yardstick] > 0
    sequential = result["sequential"]
    assert isinstance(sequential, dict)
    for target in ("upstream", "gateway1"):
        for kind in KINDS:
            assert sequential[f"{target}.{kind}"]["non_2xx"] == 0
    # The upstream spaced its events apart: the first arrived before the whole stream ended.
    stream = sequential["gateway1.streamed"]
    assert stream["first_byte_p50_ms"] < stream["p50_ms"]
    # Each of those events carried its send time, through the gateway as directly.
    for target in ("upstream", "gateway1"):
        run = sequential[f"{target}.streamed"]
        assert 0 < run["event_lag_p50_ms"] <= run["slowest_event_lag_p50_ms"] < run["p50_ms"]


def test_a_metered_request_costs_one_redis_call_before_and_one_after(
        result: dict[str, object]) -> None:
    trips = result["round_trips"]
    assert isinstance(trips, dict)
    for kind in KINDS:
        assert trips[kind]["non_2xx"] == 0
        assert trips[kind]["by_command"] == {"EVALSHA admit": 1.0, "EVALSHA settle": 1.0}
        assert trips[kind]["per_request"] == 2.0
        assert trips[kind]["auth"] == 0


def test_summary_reports_ratios_costs_and_targets(result: dict[str, object]) -> None:
    summary = result["summary"]
    assert isinstance(summary, dict)
    assert set(summary) == {"ratios", "per_request_ms", "one_connection_added", "targets"}
    for kind in KINDS:
        assert summary["ratios"][f"serve_rps_over_direct.{kind}"] > 0
        assert summary["per_request_ms"][f"serve_gateway_cpu_ms.{kind}"] > 0
    assert {t["name"] for t in summary["targets"]} >= {
        "gateway CPU per non-streamed proxied request (ms)",
        "Redis round trips for auth at steady state", "one-connection added p50 (ms)"}
    assert all(isinstance(t["met"], bool) for t in summary["targets"])
    scaling = result["scaling"]
    assert isinstance(scaling, list)
    assert [row["workers"] for row in scaling] == [1]
    environment = result["environment"]
    assert isinstance(environment, dict)
    assert environment["loadgen"] == "builtin"


def test_the_cluster_column_meters_like_one_redis(result: dict[str, object]) -> None:
    cluster = result["cluster"]
    assert isinstance(cluster, dict)
    assert (cluster["masters"], cluster["replicas"]) == (3, 0)
    for kind in KINDS:
        # MONITOR on each of the 3 nodes, summed: the same two calls as against one Redis.
        trips = cluster["round_trips"][kind]
        assert trips["non_2xx"] == 0 and trips["requests"] > 0
        assert trips["by_command"] == {"EVALSHA admit": 1.0, "EVALSHA settle": 1.0}
        assert trips["per_request"] == 2.0
        run = result["throughput"][f"cluster.{kind}"]  # type: ignore[index]
        assert run["redis"]["cpu_ms_per_request"] > 0  # INFO summed over the nodes
        assert run["redis"]["commandstats"]["evalsha"]["calls_per_request"] > 0
    summary = result["summary"]
    assert isinstance(summary, dict)
    for kind in KINDS:
        assert summary["ratios"][f"cluster_cpu_over_standalone.{kind}"] > 0
        assert summary["ratios"][f"cluster_rps_over_standalone.{kind}"] > 0
        assert summary["per_request_ms"][f"cluster_gateway_cpu_ms.{kind}"] > 0
    assert "Redis Cluster: round trips per request in all" in {
        t["name"] for t in summary["targets"]}


def test_a_run_without_the_cluster_column_still_summarizes(
        result: dict[str, object]) -> None:
    """What --no-cluster leaves out: no "cluster" section, no cluster figures."""
    without = {k: v for k, v in result.items() if k != "cluster"}
    without["throughput"] = {k: v for k, v in result["throughput"].items()  # type: ignore[attr-defined]
                             if not k.startswith("cluster.")}
    summary = report.summary(without)
    assert not any(k.startswith("cluster") for k in summary["ratios"])
    assert not any(k.startswith("cluster") for k in summary["per_request_ms"])
    assert not any(t["name"].startswith("Redis Cluster") for t in summary["targets"])


def test_the_store_calls_bench_measures_both_topologies(
        capsys: pytest.CaptureFixture[str]) -> None:
    from bench import store_calls

    assert store_calls.main(["--pairs", "300", "--rounds", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("round ") == 2
    assert "standalone" in out and "cluster/standalone median" in out


def test_the_ledger_bench_runs_end_to_end(capsys: pytest.CaptureFixture[str]) -> None:
    from bench import ledger
    from tests.postgres import find_bindir

    if find_bindir() is None:
        pytest.skip("PostgreSQL's initdb is not installed")
    assert ledger.main(["--seconds", "1", "--rounds", "1", "--connections", "4"]) == 0
    out = capsys.readouterr().out
    assert "ratio on/off" in out and "the ledger matches Redis (exit 0)" in out
    assert ": True" in out  # rows == requests answered
