"""Health probing with quorum verdicts, end to end: real etcd, real daemons,
one small HTTP service per region (served from the test on loopback)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from devstack.stack import (
    EtcdCluster,
    HttpService,
    LocalCluster,
    TcpProxy,
    http_probe,
    wait_until,
)
from failoverd.core.engine import Policy, region_health

pytestmark = pytest.mark.cluster

REGIONS = {"east": 100, "west": 50, "central": 25}
INTERVAL, FALL = 0.2, 3


class Stack:
    def __init__(self, c: LocalCluster, services: dict[str, HttpService]) -> None:
        self.c, self.services = c, services

    async def health(self, region: str) -> Any:
        v = await self.c.view()
        p = Policy(priorities=tuple(REGIONS.items()), groups=(), cooldown_s=0,
                   max_evacuations_per_hour=0, failback="manual", failback_stable_s=0,
                   probed_regions=frozenset(REGIONS))
        return region_health(v, p, region)

    async def wait_verdict(self, region: str, verdict: str, timeout: float = 10) -> Any:
        async def ok() -> Any:
            h = await self.health(region)
            return h if h.verdict == verdict and len(h.votes) == len(REGIONS) else None
        return await wait_until(ok, timeout, f"{region} {verdict} by every observer region")

    def start_daemons(self, configs: dict[str, Path] | None = None) -> None:
        for region in REGIONS:
            member = f"{region[0]}1"
            self.c.add(member, region, config=(configs or {}).get(member))


@pytest.fixture
async def stack(tmp_path: Path, etcd: EtcdCluster, cluster_name: str) -> AsyncIterator[Stack]:
    services = {r: await HttpService(r).start() for r in REGIONS}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     probes={r: [http_probe(s.url)] for r, s in services.items()},
                     policy={"max_evacuations_per_hour": 100})
    yield Stack(c, services)
    await c.close()
    for s in services.values():
        await s.stop()


async def test_active_service_down_fails_over_within_the_detection_window(stack: Stack):
    c = stack.c
    stack.start_daemons()
    before = await c.wait_active("app", "east", 10)
    await stack.wait_verdict("east", "up")
    await stack.wait_verdict("west", "up")
    t0 = time.monotonic()
    await stack.services["east"].stop()
    after = await c.wait_active("app", "west", INTERVAL * FALL + 5)
    took = time.monotonic() - t0
    assert took <= INTERVAL * FALL + 1.0, took
    assert after.epoch == before.epoch + 1 and after.trigger == "health"
    assert "east is down (quorum 2 of 2 remote regions" in after.reason

    async def promoted() -> bool:
        return any(h["member"] == "w1" and h["role"] == "active" and h["epoch"] == after.epoch
                   for h in c.hooks())
    await wait_until(promoted, 5, "west promoted")


async def test_one_observer_cut_off_from_the_active_region_is_not_a_failover(stack: Stack):
    c = stack.c
    proxy = await TcpProxy(stack.services["east"].port).start()
    try:
        probes = {r: [http_probe(s.url)] for r, s in stack.services.items()}
        probes["east"] = [http_probe(f"http://127.0.0.1:{proxy.port}/health")]
        west_view = c.config_variant("w1", probes=probes)
        stack.start_daemons({"w1": west_view})
        before = await c.wait_active("app", "east", 10)
        await stack.wait_verdict("east", "up")
        proxy.cut()

        # w1 now reports east down...
        key = c.keys.observation("w1", "east")

        async def w1_sees_down() -> Any:
            kv = await c.store.get(key)
            return kv if kv is not None and '"verdict":"down"' in kv.value else None
        kv = await wait_until(w1_sees_down, 5, "w1 to see east down")
        # ...and the coordinator has decided on a snapshot that includes it.
        await wait_until(lambda: _decided_since(c, kv.mod_revision), 5, "a decision after it")
        h = await stack.health("east")
        assert h.verdict == "up" and dict(h.votes) == {"central": "up", "east": "up",
                                                      "west": "down"}
        rec = (await c.view()).active["app"]
        assert (rec.region, rec.epoch) == ("east", before.epoch)
    finally:
        await proxy.stop()


async def _decided_since(c: LocalCluster, revision: int) -> bool:
    return any(e.get("event") == "decision" and e.get("revision", 0) >= revision
               for d in c.daemons.values() for e in d.log_events())


async def test_safety_rule_5_and_8_no_failover_into_unhealthy_standbys_traffic_stays(stack: Stack):
    c = stack.c
    stack.start_daemons()
    before = await c.wait_active("app", "east", 10)
    await stack.wait_verdict("east", "up")
    stack.services["west"].mode = "fail"
    stack.services["central"].mode = "fail"
    await stack.wait_verdict("west", "down")
    await stack.wait_verdict("central", "down")
    await stack.services["east"].stop()

    async def alerted() -> list[dict]:
        return [e for e in await c.history() if e["kind"] == "alert"]
    alerts = await wait_until(alerted, 5, "a no-candidate alert in history")
    assert "no candidate" in alerts[0]["reason"]
    rec = (await c.view()).active["app"]
    assert (rec.region, rec.epoch) == ("east", before.epoch)  # stayed: fail open

    # Retried every cycle: once central recovers it takes over (not west).
    stack.services["central"].mode = "ok"
    after = await c.wait_active("app", "central", 5)
    assert after.epoch == before.epoch + 1
    assert not any(h["region"] == "west" and h["role"] == "active" for h in c.hooks())


async def test_flapping_service_does_not_fail_over(stack: Stack):
    c = stack.c
    stack.start_daemons()
    before = await c.wait_active("app", "east", 10)
    await stack.wait_verdict("east", "up")
    east = stack.services["east"]
    east.flap_s = INTERVAL * 1.5  # down for ~1.5 probes at a time, never `fall` (3)
    east.mode = "flap"
    start_hits = east.hits

    async def probed_a_while() -> bool:
        return east.hits - start_hits >= 3 * 30  # ~30 probes by each observer
    await wait_until(probed_a_while, 20, "observers to probe the flapping service")
    flips = [e for d in c.daemons.values() for e in d.log_events()
             if e.get("event") == "observation changed" and e.get("target") == "east"
             and e.get("verdict") == "down"]
    assert flips == []
    rec = (await c.view()).active["app"]
    assert (rec.region, rec.epoch) == ("east", before.epoch)


async def test_rule_6_flapping_health_is_held_by_the_per_group_cooldown(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """Health is the flapping kind: east goes down, the group moves to west
    (a health evacuation); east recovers, then west goes down within the
    group's cooldown: the group is held in west, and the decision says why.
    (A dying region would not be held: rule 6, tested in test_evacuation.)"""
    services = {r: await HttpService(r).start() for r in REGIONS}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     probes={r: [http_probe(s.url)] for r, s in services.items()},
                     policy={"cooldown_s": 600, "max_evacuations_per_hour": 100})
    stack = Stack(c, services)
    try:
        stack.start_daemons()
        before = await c.wait_active("app", "east", 10)
        await stack.wait_verdict("west", "up")
        services["east"].mode = "fail"
        moved = await c.wait_active("app", "west", INTERVAL * FALL + 5)
        assert moved.trigger == "health" and moved.epoch == before.epoch + 1
        services["east"].mode = "ok"
        await stack.wait_verdict("east", "up")
        services["west"].mode = "fail"
        await stack.wait_verdict("west", "down")

        async def held() -> bool:
            return any(e.get("event") == "decision" and "held by cooldown" in e.get("reason", "")
                       for d in c.daemons.values() for e in d.log_events())
        await wait_until(held, 10, "the coordinator to hold app in west for its cooldown")
        rec = (await c.view()).active["app"]
        assert (rec.region, rec.epoch) == ("west", moved.epoch)
        incidents = (await c.view()).control.incidents
        assert [(i.region, i.trigger) for i in incidents] == [("east", "health")]
    finally:
        await c.close()
        for s in services.values():
            await s.stop()
