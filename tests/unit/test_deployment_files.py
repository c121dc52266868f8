"""Deployment files stay valid: compose.yaml against the Compose Specification, the
Prometheus rules and scrape configurations by promtool (which also runs the rules' unit
tests), the Grafana dashboard and the systemd unit refer only to metrics the worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from prometheus_client import CollectorRegistry

from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "ops" / "prometheus"

# PromQL words that read like metric names (a name before "(" is a function)
_PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan"}


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    names = {"up"}
    for family in registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


def metric_names_in(expression: str) -> set[str]:
    """The metric names a PromQL expression (or a Grafana ``label_values()`` query) reads:
    what is left once strings, label matchers, ranges and label lists are taken out."""
    bare = re.sub(r"label_values\((.*),\s*\w+\s*\)", r"\1", expression)
    bare = re.sub(r'"(?:[^"\\]|\\.)*"', " ", bare)
    bare = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", bare)
    bare = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", bare)
    names = re.findall(r"(?<![\w.$])([a-zA-Z_:][\w:]*)\b(?!\s*\()", bare)
    return set(names) - _PROMQL_WORDS


def alert_rules() -> dict[str, dict[str, Any]]:
    rules = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads((PROMETHEUS / "grafana-dashboard.json").read_text())
    return document


def panel_queries() -> list[str]:
    return [target["expr"] for panel in dashboard()["panels"] for target in panel["targets"]]


def dashboard_queries() -> list[str]:
    """Every panel's expressions, then the query of every query variable."""
    variables = dashboard()["templating"]["list"]
    return panel_queries() + [v["query"] for v in variables if v["type"] == "query"]


def metric_names_used_by_rules_and_dashboard() -> set[str]:
    used: set[str] = set()
    for expression in [rule["expr"] for rule in alert_rules().values()] + dashboard_queries():
        used |= metric_names_in(expression)
    return used


def promtool(*arguments: str) -> None:
    """Run promtool in ops/prometheus (where the configurations find alerts.yml). It is
    required, not optional: ./ops/test installs it (Debian's prometheus package)."""
    path = shutil.which("promtool")
    assert path, "promtool not found: ./ops/test installs it (apt package prometheus)"
    result = subprocess.run([path, *arguments], cwd=PROMETHEUS, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("expression", "names"),
    [
        ('up{job="sam-worker"} == 0', {"up"}),
        ('sum by (le, operation) (rate(sam_x_bucket{instance=~"$instance"}[5m]))', {"sam_x_bucket"}),
        ("increase(a_total[5m]) > 0 or (a_total > 0 unless a_total offset 5m)", {"a_total"}),
        ("avg_over_time(in_flight[5m]) >= 0.9 * prefetch", {"in_flight", "prefetch"}),
        ('label_values(up{job="sam-worker"}, instance)', {"up"}),
        (
            'process_resident_memory_bytes{job="sam-worker", instance=~"$instance"}',
            {"process_resident_memory_bytes"},
        ),
    ],
)
def test_metric_names_in(expression: str, names: set[str]) -> None:
    assert metric_names_in(expression) == names


def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads((ROOT / "ops" / "reference" / "compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    assert compose["services"]["sam-worker"]["deploy"]["replicas"] >= 2
    assert (ROOT / compose["services"]["sam-worker"]["build"]["dockerfile"]).exists()


def test_alert_rules() -> None:
    alerts = alert_rules()
    assert {
        "SamWorkerDown",
        "SamAuditFailures",
        "SamHsmErrors",
        "SamRejectionSpike",
        "SamQueueBacklog",
    } <= set(alerts)
    known = exported_metric_names()
    for name, rule in alerts.items():
        assert rule["expr"].strip() and rule["labels"]["severity"] in ("critical", "warning"), name
        assert rule["annotations"]["summary"], name
        used = metric_names_in(rule["expr"])
        assert used, (name, rule["expr"])
        assert used <= known, (name, used - known)


def test_alert_rules_pass_their_unit_tests() -> None:
    promtool("test", "rules", "alerts.test.yml")


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_stays_quiet() -> None:
    """promtool only checks the cases written down: a new rule without any would pass."""
    tests = yaml.safe_load((PROMETHEUS / "alerts.test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    cases = [case for test in tests["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case.get("exp_alerts")}
    quiet = {case["alertname"] for case in cases if not case.get("exp_alerts")}
    alerts = set(alert_rules())
    assert fires == alerts, alerts ^ fires
    assert quiet == alerts, alerts ^ quiet


def test_promtool_accepts_the_rules_and_both_scrape_configurations() -> None:
    promtool("check", "rules", "alerts.yml")
    promtool("check", "config", "prometheus.yml", "compose-prometheus.yml")


def test_dashboard_uses_exported_metrics() -> None:
    known = exported_metric_names()
    queries = dashboard_queries()
    assert len(queries) >= 8
    for query in queries:
        assert metric_names_in(query) <= known, query
    # memory, the SAD-use window (the README's sizing metric), audit batch and HSM latency
    assert {
        "process_resident_memory_bytes",
        "sam_sad_use_entries",
        "sam_audit_flush_seconds_bucket",
        "sam_hsm_operation_seconds_bucket",
    } <= metric_names_used_by_rules_and_dashboard()


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Grafana shows a query that does not parse as an empty panel: promtool parses them
    here as recording rules (with $instance set to match every instance)."""
    rules = [
        {"record": f"dashboard:query_{n}", "expr": query.replace("$instance", ".*")}
        for n, query in enumerate(panel_queries())
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    promtool("check", "rules", str(path))


def test_every_dashboard_panel_filters_by_the_instance_variable() -> None:
    document = dashboard()
    instance = {variable["name"]: variable for variable in document["templating"]["list"]}["instance"]
    # the instances of `up`, so that a worker that is down can still be picked
    assert instance["query"] == 'label_values(up{job="sam-worker"}, instance)'
    assert instance["multi"] and instance["includeAll"]
    for query in panel_queries():
        assert 'instance=~"$instance"' in query, query
    assert len({panel["id"] for panel in document["panels"]}) == len(document["panels"])


def test_scrape_config_loads_the_rules() -> None:
    for name in ("prometheus.yml", "compose-prometheus.yml"):
        config = yaml.safe_load((PROMETHEUS / name).read_text())
        assert config["rule_files"] == ["alerts.yml"]
        assert config["scrape_configs"][0]["job_name"] == "sam-worker"
