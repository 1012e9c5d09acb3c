"""The README's first command plays every scenario end to end, and stops clean."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEMO = [sys.executable, str(ROOT / "scripts" / "demo.py")]
pytestmark = pytest.mark.cluster


def _result(stdout: str) -> dict:
    line = next(line for line in stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT "):])


@pytest.mark.parametrize("scenario", ["power", "nut", "health", "crash", "switchover"])
def test_demo_scenario_moves_traffic_to_the_new_region(tmp_path: Path, scenario: str) -> None:
    out = subprocess.run([*DEMO, "--exit", "--scenario", scenario,
                          "--workdir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    r = _result(out.stdout)
    assert (r["scenario"], r["from"], r["to"], r["epochs"]) == (scenario, "east", "west", [1, 2])
    ms = r["ms"]
    # The order an operator expects to read in the timeline.
    assert ms["promoted"] < ms["rerouted (HAProxy + DNS)"] <= ms["verified"]
    assert ms["verified"] <= ms["old region demoted, saga done"]
    # Traffic through HAProxy and by DNS name answers from west, after promotion.
    assert ms["promoted"] < ms["HAProxy traffic on the new region"]
    assert ms["promoted"] < ms["DNS traffic on the new region"]
    if scenario == "power":
        lines = out.stdout.splitlines()
        held = next(i for i, s in enumerate(lines) if "power on_battery (900s left)" in s)
        failed = next(i for i, s in enumerate(lines) if "generator: failed to start" in s)
        assert held < failed  # within the grace the coordinator held
        assert "east power critical (gen:generator_failed)" in out.stdout
        assert ms["decision committed"] < ms["old region drained (planned only)"]
    if scenario == "nut":
        # The upsd status changes as east-1 polled them, and the decision
        # (the low-battery poll is logged once relayed: it may share the
        # decision's millisecond).
        lines = out.stdout.splitlines()
        on_battery = next(i for i, s in enumerate(lines)
                          if "polled nut-ups1 (nut): on_battery - ups.status OB DISCHRG" in s)
        decided = next(i for i, s in enumerate(lines)
                       if "east power critical (nut-ups1:low_battery)" in s)
        assert on_battery < decided
        assert "polled nut-ups1 (nut): low_battery - ups.status OB DISCHRG LB" in out.stdout
        assert '"groups": 3' in out.stdout  # every group left east
    if scenario == "health":
        assert "east is down (quorum" in out.stdout
        assert ms["decision committed"] < ms["old region fenced (forced only)"]
    if scenario == "crash":
        assert "elected coordinator" in out.stdout and "kill -9 central-1" in out.stdout


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by its parent) is not running.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().split(") ", 1)[1][0] != "Z"


def test_demo_database_scenario_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """The database scenario: a power event in east moves the PostgreSQL
    primary to west with every acknowledged write, and says so."""
    out = subprocess.run([*DEMO, "--exit", "--scenario", "database",
                          "--workdir", str(tmp_path / "demo")],
                         capture_output=True, text=True, timeout=180,
                         stdin=subprocess.DEVNULL, check=False)
    assert out.returncode == 0, out.stdout + out.stderr
    r = _result(out.stdout)
    assert r["scenario"] == "database" and r["epoch"] == 2
    assert r["acknowledged"] > 300 and r["missing"] == 0
    assert 0 < r["outage_ms"] < 10_000
    assert "east rejoined as a standby of west" in out.stdout


def test_demo_stays_up_then_the_stop_command_stops_everything(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    log = tmp_path / "demo.out"
    with open(log, "w") as out:
        demo = subprocess.Popen([*DEMO, "--keep", "--scenario", "switchover",
                                 "--workdir", str(work)], stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while "Stop it with Ctrl-C here" not in log.read_text():
            assert demo.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        pids = [int(p) for p in (work / "pids").read_text().split()]
        assert len(pids) == 3 + 1 + 1 + 1 + 3  # etcd, mosquitto, BIND, HAProxy, daemons
        assert all(_alive(p) for p in pids)
        stop = subprocess.run([*DEMO, "stop", "--workdir", str(work)], capture_output=True,
                              text=True, timeout=60, check=False)
        assert stop.returncode == 0 and "==> stopped" in stop.stdout, stop.stdout
        assert demo.wait(30) == 0
        assert not [p for p in pids if _alive(p)]
        assert not (work / "demo.pid").exists() and not (work / "pids").exists()
        assert "==> stopped" in log.read_text()
    finally:
        if demo.poll() is None:
            demo.kill()
