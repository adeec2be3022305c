"""The monitoring kit in ansible/monitoring/: the Prometheus alert rules pass ``promtool
check rules`` and their unit tests (``promtool test rules``: each alert fires on the
series that should raise it and not on healthy ones), the example scrape configuration
parses, the Grafana dashboard is valid JSON with a panel per alerted signal, and every
Quiver metric the rules and the dashboard use is one a real server exports -- or one
listed in ansible/monitoring/README.md as still to be exported.

promtool comes with Debian's ``prometheus`` package (``.ci/run`` installs it as root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from tests.harness import start_server

pytestmark = pytest.mark.slow  # subprocesses, fuzzing or deployment checks: make test-fast skips it

MONITORING = Path(__file__).resolve().parent.parent / "ansible" / "monitoring"
RULES = MONITORING / "alerts.yml"
DASHBOARD = MONITORING / "grafana-dashboard.json"
README = MONITORING / "README.md"
# Series that come from elsewhere: Prometheus itself, blackbox_exporter, node_exporter.
EXTERNAL = re.compile(r"^(up|probe_[a-z_]+|node_[a-z_]+)$")
METRIC = re.compile(r"\b(quiver_[a-z0-9_]+|process_[a-z0-9_]+|probe_[a-z0-9_]+|node_[a-z0-9_]+|up)\b")
ALERTS = {
    "QuiverDown",
    "QuiverHealthzFailing",
    "QuiverAuthFailureSpike",
    "QuiverSyncLagging",
    "QuiverBackupTooOld",
    "QuiverMemoryNearLimit",
    "QuiverDiskNearlyFull",
    "QuiverCertificateExpiresSoon",
}


def _promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        if os.environ.get("CI") == "true" and os.geteuid() == 0:
            pytest.fail("promtool is missing: .ci/run installs Debian's prometheus package as root")
        pytest.skip("promtool is not installed here (apt-get install prometheus); .ci/run installs it")
    return found


def _promtool_run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_promtool(), *argv], cwd=MONITORING, capture_output=True, text=True, timeout=120)


def _rule_expressions() -> dict[str, str]:
    doc = yaml.safe_load(RULES.read_text())
    return {rule["alert"]: rule["expr"] for group in doc["groups"] for rule in group["rules"]}


def _dashboard_expressions() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def _base(name: str) -> str:
    return re.sub(r"_(bucket|count|sum)$", "", name)


def test_promtool_check_rules() -> None:
    result = _promtool_run("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_promtool_rule_unit_tests() -> None:
    result = _promtool_run("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout
    tested = set(re.findall(r"alertname: (\w+)", (MONITORING / "alerts_test.yml").read_text()))
    assert tested >= ALERTS, ALERTS - tested


def test_example_scrape_config_parses() -> None:
    result = _promtool_run("check", "config", "--syntax-only", "prometheus.example.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alerted_signal_has_an_alert_and_a_panel() -> None:
    rules = _rule_expressions()
    assert set(rules) >= ALERTS, ALERTS - set(rules)
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["panels"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    panel_metrics = {_base(m) for e in _dashboard_expressions() for m in METRIC.findall(e)}
    for alert in ALERTS:
        used = {_base(m) for m in METRIC.findall(rules[alert])} - {"up"} or {"up"}
        assert used & panel_metrics, f"{alert}: no dashboard panel shows {used}"
    readme = README.read_text()
    for alert in ALERTS:
        assert alert in readme, f"README.md does not explain {alert}"


def test_metric_names_are_exported_or_listed_as_pending(tmp_path: Path) -> None:
    """A typo in a metric name makes an alert that never fires: each name is checked
    against a real server's /metrics (or README.md's list of metrics still to come)."""
    server = start_server(tmp_path / "data", demo=False)
    try:
        with httpx.Client(base_url=server.http_url, timeout=30) as http:
            response = http.get("/metrics", headers={"authorization": f"Bearer {server.admin_token}"})
        assert response.status_code == 200, response.text
    finally:
        server.stop()
    exported = {_base(line.split()[2]) for line in response.text.splitlines() if line.startswith("# TYPE ")}
    exported |= {name.removesuffix("_total") for name in exported}
    readme = README.read_text()
    pending = set(re.findall(r"^\| `((?:quiver|process)_[a-z0-9_]+)` \|", readme, re.M))
    used = {
        _base(m)
        for e in [*_rule_expressions().values(), *_dashboard_expressions()]
        for m in METRIC.findall(e)
    }
    unknown = {m for m in used if not EXTERNAL.match(m) and m not in exported and m not in pending}
    assert not unknown, f"not exported by Quiver and not listed as pending in README.md: {unknown}"
