"""A group with a database: only a region whose copy is current may take it
(pure judging, the checker against real PostgreSQL, and end to end)."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devstack.postgres import PgReplicaSet
from devstack.stack import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    EtcdCluster,
    LocalCluster,
    Mosquitto,
    call,
    wait_until,
)
from failoverd.config import GroupSettings, PostgresDatabase
from failoverd.core.data import DataReport, data_state, parse_data_report
from failoverd.core.engine import Alert, GroupPolicy, Policy, decide, handle_request
from failoverd.core.model import (
    ActiveRecord,
    ClusterView,
    ControlState,
    MemberRecord,
    OperatorRequest,
)
from failoverd.core.power import Reading
from failoverd.sensing.database import DatabaseChecker
from tests.test_api import ctl
from tests.test_statuspage import render, row

MIB = 1024 * 1024
NOW = 1_000_000.0


def primary(region: str, lsn: int) -> DataReport:
    return DataReport("db", f"{region}-1", region, "primary", NOW, lsn=lsn)


def standby(region: str, replay: int, primary_lsn: int, *, streaming: bool = True,
            paused: bool = False) -> DataReport:
    return DataReport("db", f"{region}-1", region, "standby", NOW, lsn=replay,
                      receive_lsn=replay, primary_lsn=primary_lsn, streaming=streaming,
                      paused=paused)


@pytest.mark.parametrize(("reports", "region", "active", "ok", "why"), [
    ([primary("east", 10 * MIB), standby("west", 10 * MIB, 10 * MIB)], "west", "east",
     True, ""),
    ([primary("east", 10 * MIB), standby("west", 8 * MIB, 10 * MIB)], "west", "east",
     False, "west is 2.0 MiB behind (max 1.0 MiB)"),
    ([primary("east", 10 * MIB), standby("west", 8 * MIB, 10 * MIB, paused=True)], "west",
     "east", False, "replay paused"),
    # Cut off from its primary, a standby's own view is stale: the primary's
    # report shows the real gap.
    ([primary("east", 30 * MIB), standby("west", 10 * MIB, 10 * MIB, streaming=False)],
     "west", "east", False, "west is 20.0 MiB behind"),
    # The primary gone (its report with its lease): the standby's own numbers.
    ([standby("west", 10 * MIB - 100, 10 * MIB)], "west", "east", True, ""),
    ([primary("east", 1)], "west", "east", False, "no database report from west"),
    ([DataReport("db", "west-1", "west", "down", NOW, error="connection refused")], "west",
     "east", False, "west's database is down (connection refused)"),
    ([primary("east", 1), primary("west", 1)], "west", "east", False, "a primary too"),
    ([primary("east", 5)], "east", "east", True, ""),
    # Bootstrap: the group starts where the database's primary is.
    ([primary("east", 5), standby("west", 5, 5)], "east", None, True, ""),
    ([primary("east", 5), standby("west", 5, 5)], "west", None, False, "is a standby"),
])
def test_data_state_judges_a_regions_copy(reports: list[DataReport], region: str,
                                          active: str | None, ok: bool, why: str) -> None:
    state = data_state({r.member: r for r in reports}, region, active, MIB)
    assert state.ok is ok
    assert why in state.why


def test_a_report_survives_its_json() -> None:
    r = standby("west", 5, 9, paused=True)
    assert parse_data_report(r.to_value()) == r
    caught_up = replace(standby("west", 0, 0), lag_s=0.0)  # zero is not "unknown"
    assert parse_data_report(caught_up.to_value()) == caught_up
    with pytest.raises(ValueError, match="role"):
        parse_data_report(json.dumps({"group": "g", "member": "m", "region": "r",
                                      "role": "leader", "at": 1}))
    with pytest.raises(ValueError, match="LSN"):
        parse_data_report(json.dumps({"group": "g", "member": "m", "region": "r",
                                      "role": "standby", "at": 1, "lsn": -4}))


REGIONS = {"east": 100, "west": 50, "south": 10}


def _view(reports: list[DataReport], power_critical: bool = True) -> ClusterView:
    members = {f"{r}-1": MemberRecord(f"{r}-1", r, "0", "", NOW - 3600) for r in REGIONS}
    power = ({("east", "gen"): [Reading("east", "gen", "generator_failed", NOW, NOW, None,
                                        None, NOW)]} if power_critical else {})
    return ClusterView(revision=1, coordinator=None, members=members,
                       active={"db": ActiveRecord("east", 3, NOW - 9999, "", 1,
                                                  "bootstrap", 7)},
                       control=ControlState(), power=power,
                       data={"db": {r.member: r for r in reports}})


POLICY = Policy(priorities=tuple(REGIONS.items()),
                groups=(GroupPolicy("db", tuple(REGIONS), max_lag_bytes=MIB),),
                cooldown_s=300, max_evacuations_per_hour=3, failback="manual",
                failback_stable_s=300)


def test_power_evacuation_skips_a_lagging_standby_for_a_current_one() -> None:
    d = decide(_view([primary("east", 10 * MIB), standby("west", 2 * MIB, 10 * MIB),
                      standby("south", 10 * MIB, 10 * MIB)]), POLICY, NOW)
    (change,) = d.changes
    assert change.region == "south"
    assert "skipped: west is 8.0 MiB behind" in change.reason


def test_a_lagging_standby_as_the_only_candidate_keeps_the_group_with_an_alert() -> None:
    d = decide(_view([primary("east", 10 * MIB), standby("west", 2 * MIB, 10 * MIB),
                      DataReport("db", "south-1", "south", "down", NOW, error="refused")]),
               POLICY, NOW)
    assert not d.changes
    (alert,) = [i for i in d.intents if isinstance(i, Alert)]
    assert "no candidate region" in alert.reason and "west is 8.0 MiB behind" in alert.reason


def test_without_a_database_the_guard_is_off() -> None:
    policy = replace(POLICY, groups=(GroupPolicy("db", tuple(REGIONS)),))
    (change,) = decide(_view([]), policy, NOW).changes
    assert change.region == "west"


def test_a_forced_failover_to_a_lagging_region_needs_accept_data_loss() -> None:
    view = _view([primary("east", 10 * MIB), standby("west", 2 * MIB, 10 * MIB)],
                 power_critical=False)
    req = OperatorRequest("r1", "failover", "ops", NOW, group="db", region="west")
    refused = handle_request(view, POLICY, req, NOW)
    assert not refused.accepted and "8.0 MiB behind" in refused.reason
    forced = handle_request(view, POLICY, replace(req, force=True), NOW)
    assert not forced.accepted and "accept_data_loss" in forced.reason
    taken = handle_request(view, POLICY, replace(req, force=True, accept_data_loss=True), NOW)
    assert taken.accepted and taken.change is not None
    assert taken.change.data_loss_bytes == 8 * MIB
    assert "accepting data loss" in taken.change.reason


def test_every_region_of_a_database_group_needs_a_server() -> None:
    with pytest.raises(ValueError, match="no server for south"):
        GroupSettings(name="db", regions=["east", "west", "south"],
                      database=PostgresDatabase(kind="postgres", dsn={
                          "east": "postgresql://a@h/d", "west": "postgresql://a@h/d"}))


# -- real PostgreSQL ------------------------------------------------------------

@pytest.fixture(scope="module")
def pg() -> Iterator[PgReplicaSet]:
    replicas = PgReplicaSet(["east", "west", "south"], "east").start()
    replicas["east"].sql("CREATE TABLE IF NOT EXISTS filler (i int, pad text)")
    yield replicas
    replicas.stop()


def _fill(pg: PgReplicaSet, mib: int) -> None:
    pg["east"].sql(f"INSERT INTO filler SELECT g, repeat('x', 1000) "
                   f"FROM generate_series(1, {mib * 1000}) g")


class _Settings:
    """Just what DatabaseChecker reads."""

    def __init__(self, region: str, dsns: dict[str, str]) -> None:
        self.member, self.region = f"{region}-1", region
        self.groups = [GroupSettings(name="db", regions=list(dsns), database=PostgresDatabase(
            kind="postgres", dsn=dsns, check_interval_s=0.2))]


async def _look(pg: PgReplicaSet, region: str) -> DataReport:
    s: Any = _Settings(region, {r: pg[r].dsn for r in ("east", "west", "south")})
    checker = DatabaseChecker(None, None, lambda: s, lambda: None)  # type: ignore[arg-type]
    g = s.groups[0]
    await checker._check("db", g.database, g.database.dsn[region], s.member, region)
    return checker.reports["db"]


@pytest.mark.cluster
async def test_the_checker_reads_role_positions_and_lag_from_real_postgres(
        pg: PgReplicaSet) -> None:
    east = await _look(pg, "east")
    assert east.role == "primary" and east.lsn is not None and east.lsn > 0
    _fill(pg, 1)
    pg.wait_streaming()

    async def caught_up() -> DataReport | None:
        west = await _look(pg, "west")
        return west if west.streaming and west.own_lag_bytes == 0 else None
    west = await wait_until(caught_up, 15, "west streaming and caught up")
    assert west.role == "standby" and west.lag_s == 0.0

    pg["west"].sql("SELECT pg_wal_replay_pause()")
    try:
        _fill(pg, 3)

        async def behind() -> DataReport | None:
            w = await _look(pg, "west")
            return w if (w.own_lag_bytes or 0) > 2 * MIB else None
        west = await wait_until(behind, 15, "west's lag to show")
        assert west.paused
        state = data_state({"west-1": west}, "west", "east", MIB)
        assert not state.ok and "behind" in state.why
    finally:
        pg["west"].sql("SELECT pg_wal_replay_resume()")


@pytest.mark.cluster
async def test_an_unreachable_server_is_reported_down_not_raised(pg: PgReplicaSet) -> None:
    s: Any = _Settings("south", {"east": pg["east"].dsn, "west": pg["west"].dsn,
                                 "south": "postgresql://postgres@127.0.0.1:1/postgres"})
    checker = DatabaseChecker(None, None, lambda: s, lambda: None)  # type: ignore[arg-type]
    db = s.groups[0].database
    await checker._check("db", db, db.dsn["south"], s.member, "south")
    report = checker.reports["db"]
    assert report.role == "down" and report.error


# -- end to end: daemons, etcd, mosquitto, PostgreSQL ------------------------------

@pytest.mark.cluster
async def test_power_event_promotes_the_current_standby_not_the_lagging_one(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, pg: PgReplicaSet) -> None:
    """East (primary) loses power; west is preferred but its replay is
    paused far behind: the group goes to south, and the history says why."""
    broker = Mosquitto(tmp_path).start()
    dsn = ", ".join(f'{r} = "{pg[r].dsn}"' for r in ("east", "west", "south"))
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS,
                     {"db": ["east", "west", "south"]}, mqtt=[broker.url],
                     policy={"power_grace_s": 1, "expected_failover_s": 5},
                     group_toml=("[groups.database]\nkind = \"postgres\"\n"
                                 f"dsn = {{ {dsn} }}\ncheck_interval_s = 0.2\n"))
    pg["west"].sql("SELECT pg_wal_replay_pause()")
    try:
        for region in ("south", "east", "west"):
            c.add(f"{region}-1", region)
        before = await c.wait_active("db", "east", 20)
        _fill(pg, 3)

        async def west_behind_south_current() -> bool:
            reports = (await c.view()).data.get("db", {})
            west, south = reports.get("west-1"), reports.get("south-1")
            return (west is not None and (west.own_lag_bytes or 0) > 2 * MIB
                    and south is not None and south.own_lag_bytes is not None
                    and south.own_lag_bytes < MIB)
        await wait_until(west_behind_south_current, 15,
                         "west's lag and south's catching up in etcd")
        api = c.daemons["south-1"].api
        # Status, failoverctl status and the drill all say why west may not take over.
        async def status_shows_it() -> dict[str, Any] | None:
            # The status document is rebuilt at most once a second.
            _, st = await call(api, "GET", "/v1/status", VIEWER_TOKEN)
            regions = st["groups"]["db"]["data"]["regions"]
            return regions if regions["south"]["ok"] and not regions["west"]["ok"] else None
        data = await wait_until(status_shows_it, 5, "the status document to catch up")
        assert data["east"]["role"] == "primary" and data["east"]["ok"]
        assert not data["west"]["ok"] and data["west"]["paused"]
        assert "behind" in data["west"]["why"] and data["south"]["ok"]
        shown = await asyncio.to_thread(ctl, "status", api=api, token=VIEWER_TOKEN)
        assert re.search(r"db west: standby, [0-9.]+ MiB behind.*replay paused -> NOT a "
                         r"candidate: west is", shown.stdout), shown.stdout
        # The status page too, in a real browser: each copy, and why not west.
        dom = await asyncio.to_thread(render, f"{api}/#token={VIEWER_TOKEN}", tmp_path)
        west = " ".join(row(dom, "data", "db/west").split())
        assert re.match(r"db west standby [0-9.]+ MiB\b.* paused .*NO: west is .*behind",
                        west), west
        south = row(dom, "data", "db/south").split()
        assert south[:3] == ["db", "south", "standby"] and south[-1] == "yes", south
        assert row(dom, "data", "db/east").split()[:3] == ["db", "east", "primary"]
        _, drill = await call(api, "POST", "/v1/groups/db/drill", OPERATOR_TOKEN, {"to": "west"})
        failed = {ch["name"]: ch["detail"] for ch in drill["checks"] if not ch["ok"]}
        assert "behind" in failed["west data"], drill
        # An operator's forced failover there must accept the loss by name.
        refused = await asyncio.to_thread(ctl, "failover", "db", "--to", "west", "--force",
                                          "--yes", api=api)
        assert refused.returncode != 0 and "accept-data-loss" in refused.stderr + refused.stdout
        assert (await c.view()).active["db"].epoch == before.epoch
        async with aiomqtt.Client("127.0.0.1", broker.port) as mq:
            await mq.publish("failoverd/power/east/gen",
                             json.dumps({"state": "generator_failed", "ts": time.time()}), qos=1)
        after = await c.wait_active("db", "south", 15)
        assert after.epoch == before.epoch + 1
        assert "skipped: west is" in after.reason and "behind" in after.reason
        events = [e for e in await c.history(200) if e.get("kind") == "epoch_changed"
                  and e.get("epoch") == after.epoch]
        assert events and "skipped: west is" in events[0]["reason"]
        # Forced into the lagging west with the loss accepted: recorded.
        taken = await asyncio.to_thread(ctl, "failover", "db", "--to", "west", "--force",
                                        "--accept-data-loss", "--yes", api=api)
        assert taken.returncode == 0, taken.stderr
        forced = await c.wait_active("db", "west", 10)
        event = next(e for e in await c.history(200) if e.get("kind") == "epoch_changed"
                     and e.get("epoch") == forced.epoch)
        assert event["data_loss_bytes"] > 2 * MIB and "accepting data loss" in event["reason"]
    finally:
        pg["west"].sql("SELECT pg_wal_replay_resume()")
        await c.close()
        broker.stop()


# -- the switchover's pure parts -----------------------------------------------------

def test_the_demote_hooks_final_position_is_read_from_its_output() -> None:
    from failoverd.daemon.roles import final_lsn  # noqa: PLC0415
    from failoverd.daemon.saga import format_lsn  # noqa: PLC0415

    assert final_lsn("demote db: fencing\nfinal_lsn=0/4024988\ndemote db: fenced\n") == 0x4024988
    assert final_lsn("final_lsn=1/0\nfinal_lsn=2/A0\n") == (2 << 32) | 0xA0  # the last one
    assert final_lsn("a standby: nothing to fence\n") is None
    assert final_lsn("final_lsn=zz/1\n") is None
    assert format_lsn((2 << 32) | 0xA0) == "2/A0" and format_lsn(None) == "?"


def test_a_database_saga_fences_and_catches_up_before_promoting() -> None:
    from failoverd.core.workflow import Workflow, may_demote, may_rejoin  # noqa: PLC0415

    wf = Workflow.new("db", 4, "east", "west", "planned", NOW, data=True)
    assert [s.name for s in wf.steps] == ["precheck", "drain_old", "fence_old", "catchup",
                                          "promote_new", "reroute", "verify", "rejoin_old"]
    assert not may_demote(wf, 4)  # draining: the old primary still serves
    fencing = wf.with_step(replace(wf.steps[2], state="running"), NOW)
    assert may_demote(fencing, 4) and not may_rejoin(fencing, 4)
    plain = Workflow.new("app", 4, "east", "west", "planned", NOW)
    assert not plain.has("catchup") and not may_demote(
        plain.with_step(replace(plain.steps[2], state="running"), NOW), 4)
    rejoining = wf.with_step(replace(wf.steps[-1], state="running"), NOW)
    assert may_rejoin(rejoining, 4) and not may_rejoin(rejoining, 5)
    # A catch-up that failed never lets the new region promote.
    from failoverd.core.workflow import may_promote  # noqa: PLC0415
    aborted = wf.with_step(replace(wf.steps[3], state="failed", error="timeout"), NOW)
    assert aborted.state == "failed" and not may_promote(aborted, 4)
    assert not may_rejoin(aborted, 4)  # nobody follows a region that never promoted
    assert may_promote(wf.with_step(replace(wf.steps[4], state="running"), NOW), 4)


def test_a_failed_catchup_switches_back_to_the_fenced_primary() -> None:
    from failoverd.core.workflow import Workflow  # noqa: PLC0415

    wf = Workflow.new("db", 4, "east", "west", "planned", NOW, data=True)
    failed = wf.with_step(replace(wf.steps[3], state="failed", error="west did not replay"),
                          NOW)
    view = replace(_view([], power_critical=False),
                   active={"db": ActiveRecord("west", 4, NOW - 5, "", 1, "operator", 7)},
                   workflows={"db": failed})
    (change,) = decide(view, POLICY, NOW).changes
    assert (change.region, change.epoch, change.trigger) == ("east", 5, "rollback")
    assert "did not catch up" in change.reason
    paused = replace(view, control=ControlState(paused=True))
    assert not decide(paused, POLICY, NOW).changes
    # Another step's failure is an operator's (retry), not a rollback.
    other = wf.with_step(replace(wf.steps[5], state="failed", error="haproxy"), NOW)
    assert not decide(replace(view, workflows={"db": other}), POLICY, NOW).changes


@pytest.mark.cluster
async def test_a_lagging_standby_as_the_only_candidate_keeps_the_group_on_real_postgres(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, pg: PgReplicaSet) -> None:
    """East and west only; west's replay is paused far behind: east's power
    event moves nothing, and an alert says why (Azure 2018: better stay
    than lose the writes)."""
    broker = Mosquitto(tmp_path).start()
    dsn = ", ".join(f'{r} = "{pg[r].dsn}"' for r in ("east", "west"))
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"db": ["east", "west"]}, mqtt=[broker.url],
                     policy={"power_grace_s": 1, "expected_failover_s": 5},
                     group_toml=("[groups.database]\nkind = \"postgres\"\n"
                                 f"dsn = {{ {dsn} }}\ncheck_interval_s = 0.2\n"))
    pg["west"].sql("SELECT pg_wal_replay_pause()")
    try:
        c.add("east-1", "east")
        c.add("west-1", "west")
        before = await c.wait_active("db", "east", 20)
        _fill(pg, 3)

        async def west_behind() -> bool:
            r = (await c.view()).data.get("db", {}).get("west-1")
            return r is not None and (r.own_lag_bytes or 0) > 2 * MIB
        await wait_until(west_behind, 15, "west's lag in etcd")
        async with aiomqtt.Client("127.0.0.1", broker.port) as mq:
            await mq.publish("failoverd/power/east/gen",
                             json.dumps({"state": "generator_failed", "ts": time.time()}), qos=1)

        async def alerted() -> dict[str, Any] | None:
            return next((e for e in await c.history(200) if e.get("kind") == "alert"
                         and "no candidate region" in e.get("reason", "")), None)
        alert = await wait_until(alerted, 15, "the no-candidate alert")
        assert "west is" in alert["reason"] and "behind" in alert["reason"]
        rec = (await c.view()).active["db"]
        assert (rec.region, rec.epoch) == ("east", before.epoch)
    finally:
        pg["west"].sql("SELECT pg_wal_replay_resume()")
        await c.close()
        broker.stop()
