"""Planned switchover of a PostgreSQL group without losing an acknowledged
write, and its abort: real PostgreSQL (a primary and two streaming
standbys), HAProxy in TCP mode in front, etcd, the daemons and the
deploy/hooks/postgresql scripts."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from devstack.postgres import PgReplicaSet, PgWriter, database_group_toml, hook_env_dir
from devstack.stack import (
    OPERATOR_TOKEN,
    EtcdCluster,
    Haproxy,
    LocalCluster,
    call,
    wait_until,
)

pytestmark = pytest.mark.cluster
REGIONS = {"east": 100, "west": 50, "south": 10}


@pytest.fixture
async def db_cluster(request: pytest.FixtureRequest, tmp_path: Path, etcd: EtcdCluster,
                     cluster_name: str
                     ) -> AsyncIterator[tuple[LocalCluster, PgReplicaSet, Haproxy]]:
    """The stack; the coordinator in south (away from the regions that
    move).  ``request.param``: catchup_timeout_s (default 3)."""
    pg = PgReplicaSet(list(REGIONS), "east").start()
    pg["east"].sql("CREATE TABLE acked (n int PRIMARY KEY)")
    hp = Haproxy(tmp_path, {r: s.port for r, s in pg.servers.items()}, "east", mode="tcp")
    hp.start()
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS,
                     {"db": list(REGIONS)}, drain_s=0, policy={"cooldown_s": 0},
                     group_toml=database_group_toml(pg, hp.socket, check_interval_s=0.2,
                                                    catchup_timeout_s=getattr(
                                                        request, "param", 3)))
    try:
        for region in ("south", "east", "west"):
            c.add(f"{region}-1", region,
                  env={"FAILOVERD_PG_ENV_DIR": str(hook_env_dir(pg, region, "db", tmp_path))})
            if region == "south":
                await c.wait_coordinator(15)
        await c.wait_active("db", "east", 20)
        await _saga_done(c, 1)
        yield c, pg, hp
    finally:
        await c.close()
        hp.stop()
        pg.stop()


async def _saga_done(c: LocalCluster, epoch: int, timeout: float = 30) -> dict:
    """The steps' details of the db saga of ``epoch``, once done."""
    wf = await c.wait_saga_done("db", epoch, timeout)
    return {st.name: st.detail for st in wf.steps}


async def test_planned_switchover_loses_no_acknowledged_write(db_cluster) -> None:
    c, pg, hp = db_cluster
    writer = PgWriter(hp.port)
    task = asyncio.create_task(writer.run())
    await wait_until(lambda: len(writer.acked) >= 50, 10, "writes flowing through HAProxy")
    status, body = await call(c.daemons["south-1"].api, "POST", "/v1/groups/db/switchover",
                              OPERATOR_TOKEN, {"to": "west"})
    assert status == 200, body
    rec = await c.wait_active("db", "west", 20)
    steps = await _saga_done(c, rec.epoch)
    before = len(writer.acked)
    await wait_until(lambda: len(writer.acked) >= before + 50, 15, "writes flowing to west")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task

    missing = writer.missing_in(pg["west"])
    print(f"switchover: {len(writer.acked)} writes acknowledged, {len(missing)} missing, "
          f"write outage {writer.outage_ms():.0f} ms, epoch {rec.epoch}; steps: {steps}")
    assert not missing, f"acknowledged writes lost: {sorted(missing)[:20]}"
    assert "replayed" in steps["catchup"] and "fenced" not in steps["catchup"]

    # The old primary never takes a write again: it is a standby of west now
    # (rewound and rejoined), and south follows west too.
    assert "rejoined as a standby of west" in steps["rejoin_old"], steps
    with pytest.raises(RuntimeError, match="read-only"):
        pg["east"].sql("INSERT INTO acked (n) VALUES (-1)")

    async def both_follow_west() -> bool:
        return pg["west"].sql("SELECT count(*) FROM pg_stat_replication "
                              "WHERE state = 'streaming'") == "2"
    await wait_until(both_follow_west, 20, "east and south streaming from west")


async def test_a_catchup_that_cannot_finish_switches_back(db_cluster) -> None:
    """West's replay is paused (a few bytes behind: still a candidate): the
    switchover fences east, west never replays east's last WAL, and after
    catchup_timeout_s the coordinator switches back to east's primary,
    which starts again with every write."""
    c, pg, _ = db_cluster
    pg["west"].sql("SELECT pg_wal_replay_pause()")
    pg["east"].sql("INSERT INTO acked (n) VALUES (1)")
    status, body = await call(c.daemons["south-1"].api, "POST", "/v1/groups/db/switchover",
                              OPERATOR_TOKEN, {"to": "west"})
    assert status == 200, body

    async def rolled_back() -> object:
        rec = (await c.view()).active.get("db")
        return rec if rec is not None and rec.trigger == "rollback" else None
    rec = await wait_until(rolled_back, 30, "the rollback to east")
    assert rec.region == "east" and "did not catch up" in rec.reason
    await _saga_done(c, rec.epoch)
    assert pg["east"].sql("SELECT pg_is_in_recovery()") == "f"
    # West was never promoted: the failed saga stopped before promote_new.
    assert pg["west"].sql("SELECT pg_is_in_recovery()") == "t"
    history = await c.history(200)
    assert not any(e.get("kind") == "promote_done" and e.get("region") == "west"
                   for e in history)
    # Nobody followed west (it never became primary): no rejoin ran.
    assert not any(e.get("kind") in {"rejoin_done", "rejoin_failed"} for e in history)
    assert pg["east"].sql("SELECT count(*) FROM acked WHERE n = 1") == "1"
    failed = [e for e in await c.history(200) if e.get("kind") == "alert"]
    assert any("catchup" in e.get("reason", "") for e in failed), failed
    pg["west"].sql("SELECT pg_wal_replay_resume()")


@pytest.mark.parametrize("db_cluster", [20], indirect=True)
async def test_the_fence_holds_through_a_coordinator_crash_mid_saga(db_cluster) -> None:
    """The coordinator dies while the switchover waits for west to catch up:
    east's primary stays fenced (no write is acknowledged meanwhile), the
    next coordinator finishes the saga, and nothing acknowledged is lost."""
    c, pg, hp = db_cluster
    writer = PgWriter(hp.port)
    task = asyncio.create_task(writer.run())
    await wait_until(lambda: len(writer.acked) >= 30, 10, "writes flowing")
    pg["west"].sql("SELECT pg_wal_replay_pause()")
    seat = (await c.view()).coordinator
    assert seat is not None and seat.member == "south-1"
    status, body = await call(c.daemons["east-1"].api, "POST", "/v1/groups/db/switchover",
                              OPERATOR_TOKEN, {"to": "west"})
    assert status == 200, body

    async def catching_up() -> bool:
        wf = (await c.view()).workflows.get("db")
        step = wf.step("catchup") if wf is not None else None
        return step is not None and step.state == "running"
    await wait_until(catching_up, 15, "the saga waiting at catchup")
    c.daemons["south-1"].kill9()
    fenced_at = len(writer.acked)
    with pytest.raises(RuntimeError):  # shut down: it takes nothing
        pg["east"].sql("INSERT INTO acked (n) VALUES (-1)")
    new = await c.wait_coordinator(20, not_term=seat.term)
    assert len(writer.acked) == fenced_at, "a write was acknowledged while fenced"
    pg["west"].sql("SELECT pg_wal_replay_resume()")
    rec = await c.wait_active("db", "west", 10)
    steps = await _saga_done(c, rec.epoch)
    await wait_until(lambda: len(writer.acked) >= fenced_at + 30, 15, "writes to west")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not writer.missing_in(pg["west"])
    assert "replayed" in steps["catchup"], steps
    assert new.member in {"east-1", "west-1"}


async def test_after_a_site_power_loss_the_old_primary_rejoins_when_it_returns(
        db_cluster) -> None:
    """East's site loses power (its daemon killed, PostgreSQL stopped
    immediate): west is promoted with every write the writer saw
    acknowledged; when east comes back its member fences and rejoins it
    (crash recovery, pg_rewind) as a standby of west."""
    c, pg, hp = db_cluster
    writer = PgWriter(hp.port)
    task = asyncio.create_task(writer.run())
    await wait_until(lambda: len(writer.acked) >= 30, 10, "writes flowing")
    c.daemons["east-1"].kill9()
    pg["east"].stop("immediate")
    rec = await c.wait_active("db", "west", 20)
    steps = await _saga_done(c, rec.epoch)
    assert rec.trigger == "member_loss" and "NEEDS AN OPERATOR" in steps["rejoin_old"]
    n = len(writer.acked)
    await wait_until(lambda: len(writer.acked) >= n + 30, 15, "writes to west")
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert not writer.missing_in(pg["west"])

    c.restart("east-1")  # power is back: the member finds west active

    async def east_follows_west() -> bool:
        return pg["west"].sql("SELECT count(*) FROM pg_stat_replication "
                              "WHERE application_name = 'east' AND state = 'streaming'") == "1"
    await wait_until(east_follows_west, 30, "east rewound and streaming from west")
    assert pg["east"].sql("SELECT pg_is_in_recovery()") == "t"

    async def recorded() -> bool:  # history is written in batches
        return any(e.get("kind") == "rejoin_done" and e.get("region") == "east"
                   for e in await c.history(200))
    await wait_until(recorded, 10, "rejoin_done in history")
