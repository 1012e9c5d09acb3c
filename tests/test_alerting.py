"""The shipped alert rules and dashboard: promtool checks and unit-tests the
rules (Debian ``prometheus`` ships promtool), and every metric they name is
exported by a live daemon — with samples, for the coordinator's gauges."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from devstack.stack import LocalCluster, call, wait_until

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "deploy/prometheus/failoverd-rules.yml"
RULE_TESTS = [ROOT / "deploy/prometheus/failoverd-rules.test.yml",
              ROOT / "deploy/prometheus/failoverd-rules.drill.test.yml"]
DASHBOARD = ROOT / "deploy/grafana/failoverd.json"
METRIC = re.compile(r"\b(failoverd_[a-z_]+)\b")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        raise RuntimeError("promtool not found: scripts/test installs Debian's prometheus")
    return path


def test_rules_pass_promtool_check_and_their_unit_tests() -> None:
    checked = subprocess.run([promtool(), "check", "rules", str(RULES)], capture_output=True,
                             text=True, timeout=60, check=False)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 10 rules found" in checked.stdout
    tested = subprocess.run([promtool(), "test", "rules", *(t.name for t in RULE_TESTS)],
                            cwd=RULES.parent, capture_output=True, text=True, timeout=60,
                            check=False)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    # Every alert has a unit test.
    alerts = {r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]}
    tests = [t for f in RULE_TESTS for t in yaml.safe_load(f.read_text())["tests"]]
    tested_alerts = {a["alertname"] for t in tests for a in t["alert_rule_test"]}
    assert alerts == tested_alerts, alerts ^ tested_alerts


def _used_metrics() -> dict[str, set[str]]:
    rules = yaml.safe_load(RULES.read_text())
    used = {"rules": {m for g in rules["groups"] for r in g["rules"]
                      for m in METRIC.findall(r["expr"])}}
    dash = json.loads(DASHBOARD.read_text())
    used["dashboard"] = {m for p in dash["panels"] for t in p["targets"]
                         for m in METRIC.findall(t["expr"])}
    return used


def _exported(text: str) -> set[str]:
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


@pytest.mark.cluster
async def test_every_metric_in_the_rules_and_dashboard_is_exported_by_a_live_daemon(
        api_cluster: LocalCluster) -> None:
    c = api_cluster
    coordinator = (await c.view()).coordinator
    assert coordinator is not None
    api = c.daemons[coordinator.member].api

    async def coordinator_gauges() -> str | None:
        _, text = await call(api, "GET", "/metrics")
        return text if 'failoverd_group_active{group="app"} 1.0' in text else None
    text = await wait_until(coordinator_gauges, 10, "the coordinator's alerting gauges")
    exported = _exported(text)
    for where, names in _used_metrics().items():
        assert names, where
        assert names <= exported, f"{where} uses metrics no daemon exports: {names - exported}"
    # The coordinator's view has samples: one group active, a member per region.
    for line in ('failoverd_saga_failed{group="app"} 0.0', 'failoverd_groups_held_by_guard 0.0',
                 'failoverd_last_drill_timestamp_seconds{group="app"} 0.0',
                 'failoverd_region_members{region="east"} 1.0',
                 'failoverd_drain_seconds_left{region="west"} 0.0'):
        assert line in text, line
    # A member that is not the coordinator exports none of them.
    other = next(d for m, d in c.daemons.items() if m != coordinator.member)
    _, text = await call(other.api, "GET", "/metrics")
    assert "failoverd_group_active{" not in text
