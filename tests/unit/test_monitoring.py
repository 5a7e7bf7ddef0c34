"""The shipped monitoring files (deploy/): Prometheus's own promtool checks the scrape config and
the alert rules and runs the rules' unit tests; every metric the alerts and the Grafana
dashboard query is one the code exports; compose wires them to the services it runs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.unit.test_metrics_names import families

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
PROMTOOL = Path("/usr/bin/promtool")  # Debian's prometheus package (scripts/test.sh)


def promtool(*args: str) -> str:
    assert PROMTOOL.exists(), "Debian's prometheus package is needed (scripts/test.sh)"
    done = subprocess.run(
        [str(PROMTOOL), *args], capture_output=True, text=True, timeout=60, cwd=DEPLOY
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_promtool_checks_the_scrape_config_and_its_rules() -> None:
    out = promtool("check", "config", "prometheus/prometheus.yml")
    assert "SUCCESS: 1 rule files found" in out


def test_promtool_checks_the_alert_rules() -> None:
    out = promtool("check", "rules", "prometheus/alerts.yml")
    assert "SUCCESS: 6 rules found" in out


def test_the_alerts_fire_on_their_unit_tests() -> None:
    promtool("test", "rules", "prometheus/alerts_test.yml")


def test_the_alerts_the_issue_asks_for() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus/alerts.yml").read_text())
    names = {r["alert"] for g in rules["groups"] for r in g["rules"]}
    assert names >= {
        "CogviewQueueGrowing",
        "CogviewNoLiveWorker",
        "CogviewTaskFailureRate",
        "CogviewWebhookBacklog",
        "CogviewHttpLatencyP99",
    }


def exported() -> set[str]:
    """Every sample name a scrape can show (histograms' _bucket/_sum/_count, _total)."""
    names: set[str] = set()
    for family in families():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
        else:
            names.add(family.name)
    return names


def queried(text: str) -> set[str]:
    return set(re.findall(r"\bcogview_[a-z0-9_]+", text)) - {"cogview_api"}


def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads((DEPLOY / "grafana/dashboards/cogview.json").read_text())
    return data


@pytest.mark.parametrize("path", ["prometheus/alerts.yml", "grafana/dashboards/cogview.json"])
def test_every_queried_metric_is_exported(path: str) -> None:
    text = (DEPLOY / path).read_text()
    if path.endswith(".json"):
        text = " ".join(t["expr"] for p in dashboard()["panels"] for t in p["targets"])
    used = queried(text)
    assert used, path
    assert used - exported() == set()


def test_the_dashboard_is_provisioned_from_the_compose_prometheus() -> None:
    board = dashboard()
    assert board["uid"] == "cogview-api" and len(board["panels"]) >= 10
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    source = yaml.safe_load(
        (DEPLOY / "grafana/provisioning/datasources/prometheus.yml").read_text()
    )
    (ds,) = source["datasources"]
    assert {t["datasource"]["uid"] for p in board["panels"] for t in p["targets"]} == {ds["uid"]}
    assert ds["url"] == "http://prometheus:9090"


def test_compose_scrapes_every_replica_and_every_worker() -> None:
    compose = yaml.safe_load((ROOT / "compose.yml").read_text())
    services = compose["services"]
    config = yaml.safe_load((DEPLOY / "prometheus/prometheus.yml").read_text())
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    (api_sd,) = jobs["cogview-api"]["dns_sd_configs"]
    assert api_sd["names"] == ["api"]
    assert str(api_sd["port"]) == services["api"]["environment"]["COGVIEW_PORT"]
    workers = {n: s for n, s in services.items() if s.get("image") == "cogview-api-worker:local"}
    targets = {t for sc in jobs["cogview-worker"]["static_configs"] for t in sc["targets"]}
    expected = set()
    for name, service in workers.items():
        command = service["command"]
        port = command[command.index("--metrics-port") + 1]
        assert service["environment"]["COGVIEW_HOST"] == "0.0.0.0"
        expected.add(f"{name}:{port}")
    assert targets == expected
    prom = services["prometheus"]
    assert "./deploy/prometheus:/etc/prometheus:ro" in prom["volumes"]
    assert "--config.file=/etc/prometheus/prometheus.yml" in prom["command"]
    grafana = services["grafana"]
    assert "./deploy/grafana/provisioning:/etc/grafana/provisioning:ro" in grafana["volumes"]
