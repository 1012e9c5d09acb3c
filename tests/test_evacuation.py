"""Region evacuation end to end (rule 6, rule 10): real etcd, mosquitto, daemons.

A site-wide event moves every group active in the region in one decision
cycle, as one incident; the storm guards count incidents and never hold a
group in a dying region.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devstack.stack import EtcdCluster, LocalCluster, Mosquitto, call, wait_until

pytestmark = pytest.mark.cluster

REGIONS = {"east": 100, "west": 50, "south": 10}
# The product's defaults, not the harness's fast ones: the guards must not
# hold a dying region's groups.
DEFAULT_GUARDS = {"cooldown_s": 300, "max_auto_failovers_per_group_per_hour": 3,
                  "max_evacuations_per_hour": 3}


@pytest.fixture
async def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    b = Mosquitto(tmp_path).start()
    yield b
    b.stop()


async def publish(broker: Mosquitto, region: str, sensor: str, state: str, **kw: Any) -> None:
    async with aiomqtt.Client("127.0.0.1", broker.port) as client:
        await client.publish(f"failoverd/power/{region}/{sensor}",
                             json.dumps({"state": state, "ts": time.time(), **kw}), qos=1)


async def active_in(c: LocalCluster, groups: list[str], region: str) -> bool:
    view = await c.view()
    return all((rec := view.active.get(g)) is not None and rec.region == region
               for g in groups)


async def mqtt_ready(c: LocalCluster) -> bool:
    return all(any(e.get("event") == "mqtt connected" for e in d.log_events())
               for d in c.daemons.values())


def start(c: LocalCluster) -> None:
    for member, region in (("e1", "east"), ("w1", "west"), ("s1", "south")):
        c.add(member, region)


async def test_fifty_groups_evacuate_on_generator_failed_as_one_incident(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, broker: Mosquitto):
    groups = {f"app{i:02d}": ["east", "west", "south"] for i in range(50)}
    # Half the groups' hooks take many groups a run (hook_batch), half one.
    batched = sorted(groups)[::2]
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS, groups,
                     policy=DEFAULT_GUARDS, mqtt=[broker.url], drain_s=0,
                     group_tomls=dict.fromkeys(batched, "hook_batch = true"))
    try:
        start(c)
        names = sorted(groups)
        await wait_until(lambda: active_in(c, names, "east"), 30, "50 groups bootstrapped")
        await wait_until(lambda: mqtt_ready(c), 10, "members on the broker")
        before = await c.view()
        t0 = time.time()
        before_iso = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t0 - 1))
        await publish(broker, "east", "gen", "generator_failed")
        await wait_until(lambda: active_in(c, names, "west"), 15, "every group in west")
        after = await c.view()
        assert all(after.active[g].epoch == before.active[g].epoch + 1 for g in names)
        assert {after.active[g].trigger for g in names} == {"power"}
        # One decision cycle: every record carries the same reason and was
        # committed within the same fraction of a second.
        assert len({after.active[g].reason for g in names}) == 1
        assert max(r.since for r in after.active.values()) - min(
            r.since for r in after.active.values()) < 1.0
        events = await c.history()
        evacuations = [e for e in events if e["kind"] == "evacuation"]
        assert len(evacuations) == 1
        ev = evacuations[0]
        assert (ev["region"], ev["trigger"]) == ("east", "power")
        assert ev["groups"] == dict.fromkeys(names, "west")
        assert any("gen:generator_failed" in x for x in ev["evidence"])
        assert ev["ts"] >= t0
        incidents = after.control.incidents
        assert [(i.region, i.trigger, i.groups) for i in incidents] == [("east", "power", 50)]

        # The coordinator counted one evacuation, and the status says so.
        coord = after.coordinator
        assert coord is not None
        api = c.daemons[coord.member].api
        _, metrics = await call(api, "GET", "/metrics")
        assert 'failoverd_evacuations_total{region="east",trigger="power"} 1.0' in metrics
        # The status is served from the watch-fed mirror: it shows the
        # incident one watch hop after the commit read above.

        async def status_evacuations() -> list[tuple[str, int]] | None:
            _, status = await call(api, "GET", "/v1/status",
                                   token="viewer-secret-for-tests")
            found = [(e["region"], e["groups"]) for e in status["evacuations"]]
            return found or None
        assert await wait_until(status_evacuations, 5, "the evacuation in the status",
                                interval=0.1) == [
            ("east", 50)]

        async def promoted() -> bool:
            done = {(h["group"], h["epoch"]) for h in c.hooks()
                    if h["member"] == "w1" and h["role"] == "active"}
            return all((g, after.active[g].epoch) in done for g in names)
        await wait_until(promoted, 30, "every promote hook in west")
        # The batched groups' promotes shared runs; the others had one each.
        runs = [e for e in c.daemons["w1"].log_events()
                if e.get("event") == "promote starting" and e["timestamp"] >= before_iso]
        in_batches = sum(e["groups"] for e in runs if e.get("batch"))
        assert in_batches == len(batched) and sum(1 for e in runs if e.get("batch")) < 10
        assert sorted(e["group"] for e in runs if not e.get("batch")) == [
            g for g in names if g not in batched]
    finally:
        await c.close()


async def test_dead_region_after_a_power_evacuation_still_moves_every_group(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, broker: Mosquitto):
    """east loses power: its 10 groups move to west (one incident, the only
    one allowed this hour).  Then every member of west dies: the 10 groups
    that just moved (in their cooldown) and west's own 5 move to south all
    the same — a dead region is never a place to hold a group — and history
    says which guards were overridden."""
    groups = {f"a{i}": ["east", "west", "south"] for i in range(10)}
    groups |= {f"b{i}": ["west", "south"] for i in range(5)}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS, groups,
                     policy={**DEFAULT_GUARDS, "max_evacuations_per_hour": 1,
                             "member_loss_grace_s": 1},
                     mqtt=[broker.url], drain_s=0)
    try:
        start(c)
        a = sorted(g for g in groups if g.startswith("a"))
        b = sorted(g for g in groups if g.startswith("b"))
        await wait_until(lambda: active_in(c, a, "east"), 30, "a* in east")
        await wait_until(lambda: active_in(c, b, "west"), 30, "b* in west")
        await wait_until(lambda: mqtt_ready(c), 10, "members on the broker")
        await publish(broker, "east", "ats", "transfer_failed")
        await wait_until(lambda: active_in(c, a, "west"), 15, "a* evacuated to west")
        c.daemons["w1"].kill9()
        await wait_until(lambda: active_in(c, a + b, "south"), c.ttl + 15,
                         "every group out of the dead west")
        view = await c.view()
        assert {view.active[g].trigger for g in a + b} == {"member_loss"}
        events = await c.history()
        evacuations = [e for e in events if e["kind"] == "evacuation"]
        assert [(e["region"], e["trigger"]) for e in reversed(evacuations)] == [
            ("east", "power"), ("west", "member_loss")]
        overridden = evacuations[0]["overridden"]
        assert all("cooldown" in overridden[g] for g in a)
        assert all("max_evacuations_per_hour" in why for why in overridden.values())
        assert any(e["kind"] == "alert" and "despite" in e["reason"] for e in events)
    finally:
        await c.close()


async def test_power_quorum_two_one_lying_sensor_does_nothing_two_evacuate(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str, broker: Mosquitto):
    groups = {f"g{i}": ["east", "west"] for i in range(5)}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, REGIONS, groups,
                     policy=DEFAULT_GUARDS, mqtt=[broker.url], drain_s=0,
                     region_settings={"east": {"power_quorum": 2}})
    try:
        start(c)
        names = sorted(groups)
        await wait_until(lambda: active_in(c, names, "east"), 30, "groups in east")
        await wait_until(lambda: mqtt_ready(c), 10, "members on the broker")
        for sensor in ("ups1", "ups2", "ats"):
            await publish(broker, "east", sensor, "utility_ok")
        t0 = time.time()
        await publish(broker, "east", "ups1", "shutdown_imminent")  # the liar

        async def judged() -> bool:
            return any(e.get("event") == "decision" and "1 of 2 sensors" in e.get("reason", "")
                       and e["timestamp"] >= time.strftime("%Y-%m-%dT%H:%M:%S",
                                                           time.gmtime(t0 - 1))
                       for d in c.daemons.values() for e in d.log_events())
        await wait_until(judged, 10, "the coordinator to see 1 of 2 sensors")
        assert await active_in(c, names, "east")
        await publish(broker, "east", "ats", "transfer_failed")
        await wait_until(lambda: active_in(c, names, "west"), 10, "evacuated on two votes")
        ev = next(e for e in await c.history() if e["kind"] == "evacuation")
        assert sorted(ev["evidence"]) == ["ats:transfer_failed", "ups1:shutdown_imminent"]
    finally:
        await c.close()
