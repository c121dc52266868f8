"""Deployment files stay valid: compose.yaml against the Compose Specification, the
Prometheus rules (promtool when Debian's is installed, else parsed here), the Grafana
dashboard and the systemd unit refer only to metrics the worker exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import jsonschema
import yaml
from prometheus_client import CollectorRegistry

from worker.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]


def exported_metric_names() -> set[str]:
    registry = CollectorRegistry()
    Metrics(registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"], "gauge": [""]}
    names = {"up"}
    for family in registry.collect():
        names |= {family.name + suffix for suffix in suffixes.get(family.type, [""])}
    return names


def metric_names_in(expression: str) -> set[str]:
    return {
        name
        for name in re.findall(r"\b([a-z_][a-z0-9_]*)\b(?=\s*[{\[)]|\s*$|\s*[=!<>])", expression)
        if name.startswith("sam_") or name == "up"
    }


def test_compose_file_matches_the_compose_specification() -> None:
    schema = json.loads((ROOT / "ops" / "reference" / "compose-spec.json").read_text())
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(compose)
    assert compose["services"]["sam-worker"]["deploy"]["replicas"] >= 2
    assert (ROOT / compose["services"]["sam-worker"]["build"]["dockerfile"]).exists()


def test_alert_rules() -> None:
    path = ROOT / "ops" / "prometheus" / "alerts.yml"
    promtool = shutil.which("promtool")
    if promtool:
        result = subprocess.run(
            [promtool, "check", "rules", str(path)], capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr
    rules = yaml.safe_load(path.read_text())
    alerts = {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}
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


def test_dashboard_uses_exported_metrics() -> None:
    dashboard = json.loads((ROOT / "ops" / "prometheus" / "grafana-dashboard.json").read_text())
    known = exported_metric_names()
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(expressions) >= 8
    for expression in expressions:
        assert metric_names_in(expression) <= known, expression


def test_scrape_config_loads_the_rules() -> None:
    for name in ("prometheus.yml", "compose-prometheus.yml"):
        config = yaml.safe_load((ROOT / "ops" / "prometheus" / name).read_text())
        assert config["rule_files"] == ["alerts.yml"]
        assert config["scrape_configs"][0]["job_name"] == "sam-worker"


def test_systemd_unit_stops_gracefully_and_reloads_with_sighup() -> None:
    unit = (ROOT / "ops" / "systemd" / "sam-worker@.service").read_text()
    assert "KillSignal=SIGTERM" in unit and "ExecReload=/bin/kill -HUP $MAINPID" in unit
    assert "ExecStart=/opt/sam-worker/bin/sam-worker" in unit


def test_logrotate_config_never_copytruncates() -> None:
    config = (ROOT / "ops" / "logrotate" / "sam-worker").read_text()
    directives = [
        line.strip() for line in config.splitlines() if line.strip() and not line.strip().startswith("#")
    ]
    assert "create 0640 root root" in directives and "copytruncate" not in directives
    assert any("kill -HUP" in line for line in directives)
