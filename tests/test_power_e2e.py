"""Power-aware failover end to end: real mosquitto, real etcd, real daemons."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import aiomqtt
import pytest

from devstack.stack import (
    VIEWER_TOKEN,
    EtcdCluster,
    LocalCluster,
    Mosquitto,
    call,
    wait_until,
    write_config,
)
from failoverd.config import EtcdSettings, Overrides, load_settings
from failoverd.core.model import Keyspace
from failoverd.core.power import Reading
from failoverd.etcd.client import EtcdStore
from failoverd.sensing.mqtt import RELAY_AFTER_DECISION_S, PowerFeeds

pytestmark = pytest.mark.cluster
TOPIC = "failoverd/power/east"


class PowerStack:
    def __init__(self, c: LocalCluster, broker: Mosquitto) -> None:
        self.c, self.broker = c, broker

    async def publish(self, sensor: str, payload: str | bytes, qos: int = 1) -> None:
        async with aiomqtt.Client("127.0.0.1", self.broker.port) as client:
            await client.publish(f"{TOPIC}/{sensor}", payload, qos=qos)

    async def state(self, sensor: str, state: str, **kw: Any) -> None:
        await self.publish(sensor, json.dumps({"state": state, "ts": time.time(), **kw}))

    async def started(self) -> Any:
        self.c.add("e1", "east")
        self.c.add("w1", "west")
        rec = await self.c.wait_active("app", "east", 10)
        await wait_until(lambda: _connected(self.c, 2), 10, "both members on the broker")
        return rec

    async def decided(self, text: str, after: float = 0.0) -> dict:
        """Wait for a coordinator decision whose reason contains ``text``
        (a regular expression)."""
        async def seen() -> dict | None:
            for d in self.c.daemons.values():
                for e in d.log_events():
                    if (e.get("event") == "decision" and re.search(text, e.get("reason", ""))
                            and _ts(e) >= after):
                        return e
            return None
        try:
            return await wait_until(seen, 10, f"a decision saying {text!r}")
        except AssertionError as exc:
            # Say what the daemons did decide and log (a CI failure must be
            # readable without the work directory).
            tail = [f"{d.member} {e.get('timestamp', '')[11:23]} {e.get('event')}: "
                    f"{str(e.get('reason', e.get('error', '')))[:160]}"
                    for d in self.c.daemons.values() for e in d.log_events()
                    if e.get("event") in {"decision", "stepping down", "elected coordinator",
                                          "lease lost; starting a new session"}
                    or e.get("level") in {"warning", "error"}]
            raise AssertionError(f"{exc}; after={after:.3f}; the daemons said:\n"
                                 + "\n".join(tail[-40:])) from None


def _ts(e: dict) -> float:
    return datetime.fromisoformat(e["timestamp"]).timestamp()


async def _connected(c: LocalCluster, n: int, times: int = 1) -> bool:
    return sum(1 for d in c.daemons.values()
               if sum(e.get("event") == "mqtt connected" for e in d.log_events()) >= times) >= n


@pytest.fixture
async def power_stack(tmp_path: Path, etcd: EtcdCluster, cluster_name: str
                      ) -> AsyncIterator[Callable[..., PowerStack]]:
    made: list[tuple[LocalCluster, Mosquitto]] = []

    def make(**policy: Any) -> PowerStack:
        broker = Mosquitto(tmp_path).start()
        pol = {"power_grace_s": 2, "sensor_stale_s": 3, "expected_failover_s": 5,
               "power_runtime_margin_s": 10, **policy}
        c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                         {"app": ["east", "west"]}, policy=pol, mqtt=[broker.url])
        made.append((c, broker))
        return PowerStack(c, broker)
    yield make
    for c, broker in made:
        await c.close()
        broker.stop()


async def test_utility_lost_then_generator_within_grace_no_failover(power_stack):
    s = power_stack()
    before = await s.started()
    t0 = time.time()
    await s.state("ats", "utility_lost")
    await s.state("gen", "on_generator")
    # Well past the grace, the coordinator still judges east on generator.
    await s.decided("power on_generator", after=t0 + 2.5)
    rec = (await s.c.view()).active["app"]
    assert (rec.region, rec.epoch) == ("east", before.epoch)


async def test_generator_failed_fails_over_planned(power_stack):
    s = power_stack()
    before = await s.started()
    await s.state("ats", "utility_lost")
    await s.state("gen", "generator_failed")
    after = await s.c.wait_active("app", "west", 10)
    assert after.epoch == before.epoch + 1
    assert (after.trigger, after.mode) == ("power", "planned")
    assert "power critical (gen:generator_failed)" in after.reason
    # The coordinator's own member relays what it heard after the commit it
    # led to, not in front of it.
    view = await s.c.view()
    coordinator = view.coordinator.member
    active = await s.c.store.get(s.c.keys.active("app"))
    assert active is not None and json.loads(active.value)["epoch"] == after.epoch

    async def relayed() -> Any:
        return await s.c.store.get(s.c.keys.power("east", "gen", coordinator))
    own = await wait_until(relayed, 5, "the coordinator member's relay of gen")
    assert json.loads(own.value)["state"] == "generator_failed"
    assert own.mod_revision > active.mod_revision, (own.mod_revision, active.mod_revision)

    async def promoted() -> bool:
        return any(h["member"] == "w1" and h["role"] == "active" and h["epoch"] == after.epoch
                   for h in s.c.hooks())
    await wait_until(promoted, 5, "west promote hook with the new epoch")


async def test_battery_runtime_below_budget_fails_over_before_zero(power_stack):
    s = power_stack(power_grace_s=600)  # budget: 5 s expected + 10 s margin = 15 s
    before = await s.started()
    for runtime in (300, 120, 40, 20):
        await s.state("ups1", "on_battery", runtime_s=runtime)
    # Runtimes after the first reach etcd up to relay_min_interval_s later,
    # counted down from their arrival: seen as 20 or a second less.
    await s.decided(r"power on_battery \((19|20)s left\)")
    assert (await s.c.view()).active["app"].epoch == before.epoch
    await s.state("ups1", "on_battery", runtime_s=12)
    after = await s.c.wait_active("app", "west", 5)
    assert "12s left, under the 15s failover budget" in after.reason


async def test_silence_after_utility_ok_is_unknown(power_stack):
    s = power_stack(sensor_stale_s=1.5)
    before = await s.started()
    t0 = time.time()
    await s.state("ats", "utility_ok")
    await s.decided("power normal")
    await s.decided("power unknown", after=t0 + 1.5)
    assert (await s.c.view()).active["app"].epoch == before.epoch


async def test_rule_10_silence_after_an_outage_state_is_critical_after_the_bound(power_stack):
    """A generator that carried the load and then went silent (its network
    died with the site) is not good news: after
    power_silence_during_outage_s the region is critical and evacuated."""
    s = power_stack(power_grace_s=600, sensor_stale_s=1, power_silence_during_outage_s=3)
    before = await s.started()
    t0 = time.time()
    await s.state("gen", "on_generator")
    await s.decided("power on_generator")
    # Past sensor_stale_s it keeps its state (rule 10), it does not decay:
    # the coordinator decides again when the reading turns stale.
    await s.decided("power on_generator", after=t0 + 1)
    assert (await s.c.view()).active["app"].epoch == before.epoch
    after = await s.c.wait_active("app", "west", 10)
    assert time.time() - t0 >= 3
    assert "gen:on_generator, silent" in after.reason


async def test_rule_10_generator_failed_then_silent_stays_critical(power_stack):
    """generator_failed and then silence: with no candidate to move to, the
    region must stay critical past sensor_stale_s (not decay to unknown)."""
    s = power_stack(sensor_stale_s=1)
    before = await s.started()
    await s.c.store.put(s.c.keys.drained("west"), "{}")  # no candidate
    t0 = time.time()
    await s.state("gen", "generator_failed")
    await s.decided("power critical")
    # Decided again once the reading is stale: still critical, and silent.
    await s.decided(r"power critical \(gen:generator_failed, silent.*no candidate",
                    after=t0 + 1)
    assert (await s.c.view()).active["app"].epoch == before.epoch

    # The drain written by hand (no end) was given one: drain_max_s from
    # when the coordinator first saw it.
    async def given_an_end() -> bool:
        drains = (await s.c.view()).control.drains
        return bool(drains) and drains[0].until is not None
    await wait_until(given_an_end, 5, "the hand-written drain to get an end")
    drain = (await s.c.view()).control.drains[0]
    assert drain.until is not None and drain.at is not None
    assert drain.until - drain.at == 72 * 3600 and t0 - 10 < drain.at < time.time()


async def test_on_battery_runtime_counts_down_without_new_messages(power_stack):
    """One message, 19 s left; the budget is 15 s (5 + 10): the daemon
    counts the runtime down itself and leaves about 4 s later."""
    s = power_stack(power_grace_s=600, power_silence_during_outage_s=600, sensor_stale_s=600)
    await s.started()
    t0 = time.time()
    await s.state("ups1", "on_battery", runtime_s=19)
    after = await s.c.wait_active("app", "west", 15)
    assert time.time() - t0 >= 3.5
    assert "under the 15s failover budget" in after.reason


async def test_rule_10_last_will_after_on_battery_keeps_it_then_critical(power_stack):
    s = power_stack(power_grace_s=600, power_silence_during_outage_s=3)
    before = await s.started()
    # A sensor process that registers a Last Will, reports on battery, then
    # dies without disconnecting: the broker publishes its will.
    script = (
        "import asyncio, json, os, time, aiomqtt\n"
        "async def main():\n"
        f"    will = aiomqtt.Will('{TOPIC}/ups9', json.dumps({{'state': 'offline'}}), qos=1)\n"
        f"    async with aiomqtt.Client('127.0.0.1', {s.broker.port}, will=will) as c:\n"
        f"        await c.publish('{TOPIC}/ups9', json.dumps({{'state': 'on_battery', "
        "'runtime_s': 900, 'ts': time.time()}), qos=1)\n"
        "        os._exit(0)\n"
        "asyncio.run(main())\n")
    t0 = time.time()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=20)
    await s.decided("(last will)")
    after = await s.c.wait_active("app", "west", 10)
    assert after.epoch == before.epoch + 1 and time.time() - t0 >= 3
    assert "ups9:on_battery, silent" in after.reason


async def test_nut_sequence_fails_over_on_low_battery(power_stack):
    s = power_stack(power_grace_s=600)
    before = await s.started()
    await s.publish("ups1/ups.status", "OL")
    await s.publish("ups1/ups.status", "OB DISCHRG")
    await s.publish("ups1/battery.runtime", "600")
    await s.decided(r"power on_battery \((599|600)s left\)")
    assert (await s.c.view()).active["app"].epoch == before.epoch
    await s.publish("ups1/ups.status", "OB LB")
    after = await s.c.wait_active("app", "west", 5)
    assert "ups1:low_battery" in after.reason


async def _status(s: PowerStack, member: str) -> dict:
    async with aiomqtt.Client("127.0.0.1", s.broker.port) as client:
        await client.subscribe(f"failoverd/status/{s.c.keys.cluster}/{member}", qos=1)
        async for message in client.messages:  # retained: arrives at once
            return json.loads(message.payload)  # type: ignore[arg-type]
    raise AssertionError("no status")


async def test_safety_rule_9_ten_thousand_malformed_messages(power_stack):
    s = power_stack()
    before = await s.started()
    bad = [b"{nope", json.dumps({"state": "on_fire"}).encode(), b"x" * 5000,
           json.dumps({"state": "utility_ok", "ts": time.time() + 86400}).encode()]
    async with aiomqtt.Client("127.0.0.1", s.broker.port) as client:
        for i in range(10_000):
            await client.publish(f"{TOPIC}/junk", bad[i % 4], qos=0)

    async def counted() -> dict | None:
        st = await _status(s, "e1")
        return st if sum(st["rejected"].values()) >= 10_000 else None
    st = await wait_until(counted, 30, "e1 to count 10,000 rejections", interval=0.5)
    assert st["rejected"] == {"malformed": 2500, "unknown_state": 2500, "oversized": 2500,
                              "future_timestamp": 2500}
    assert st["state"] == "online" and all(d.alive() for d in s.c.daemons.values())
    await s.state("gen", "generator_failed")
    after = await s.c.wait_active("app", "west", 10)
    assert after.epoch == before.epoch + 1


async def test_broker_restart_reconnects_and_acts(power_stack):
    s = power_stack()
    before = await s.started()
    s.broker.stop()
    s.broker.start()
    await wait_until(lambda: _connected(s.c, 2, times=2), 20, "both members reconnected")
    await s.state("gen", "generator_failed")
    after = await s.c.wait_active("app", "west", 10)
    assert after.epoch == before.epoch + 1


async def test_broker_down_ten_seconds_members_reconnect_within_two_seconds(power_stack):
    """A broker restart that takes a while (an upgrade): once it is back,
    every member is connected again within 2 s, and a power event acts."""
    s = power_stack()
    before = await s.started()
    s.broker.stop()
    await asyncio.sleep(10)  # the outage itself (the fault), not a wait for a result
    back = time.time()
    s.broker.start()
    await wait_until(lambda: _connected(s.c, 2, times=2), 10, "both members reconnected")
    reconnects = [_ts(e) for d in s.c.daemons.values() for e in d.log_events()
                  if e.get("event") == "mqtt connected"]
    assert max(reconnects) - back <= 2.0, max(reconnects) - back
    await s.state("gen", "generator_failed")
    after = await s.c.wait_active("app", "west", 10)
    assert after.epoch == before.epoch + 1


class _Writes:
    """Counts etcd writes under a prefix (each put is one watch event)."""

    def __init__(self, c: LocalCluster, prefix: str) -> None:
        self.c, self.prefix = c, prefix
        self.by_key: dict[str, int] = {}
        self.last: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> _Writes:
        start = (await self.c.store.get_prefix(self.prefix)).revision + 1
        ready = asyncio.Event()

        async def run() -> None:
            ready.set()
            async for batch in self.c.store.watch(self.prefix, start):
                for ev in batch:
                    if not ev.deleted:
                        self.by_key[ev.key] = self.by_key.get(ev.key, 0) + 1
                        self.last[ev.key] = ev.value
        self._task = asyncio.create_task(run())
        await ready.wait()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()


async def test_a_sensor_flooding_runtimes_costs_one_etcd_write_per_second(power_stack):
    """A UPS reporting a new runtime every few milliseconds for 3 s: each
    member relays it at most once per relay_min_interval_s (1 s), and the
    newest runtime still reaches etcd."""
    s = power_stack(power_grace_s=600)
    await s.started()
    await s.state("ups1", "on_battery", runtime_s=20_000)
    prefix = s.c.keys.power("east", "ups1", "")
    await wait_until(lambda: _relayed_by(s, "ups1", 2), 10, "both members relaying ups1")
    async with _Writes(s.c, prefix) as writes:
        t0 = time.monotonic()
        async with aiomqtt.Client("127.0.0.1", s.broker.port) as client:
            runtime = 19_999
            while time.monotonic() - t0 < 3:
                await client.publish(f"{TOPIC}/ups1", json.dumps(
                    {"state": "on_battery", "runtime_s": runtime, "ts": time.time()}), qos=0)
                runtime -= 1
                await asyncio.sleep(0.002)
        sent = 19_999 - runtime
        last = runtime + 1

        async def newest_relayed() -> bool:
            return len(writes.last) == 2 and all(
                json.loads(v)["runtime_s"] == last for v in writes.last.values())
        await wait_until(newest_relayed, 5, "the newest runtime relayed by both members")
    assert sent >= 500
    # 3 s of flood: the first change at once, then one a second, then the
    # trailing newest value — whatever the message rate.
    assert all(n <= 5 for n in writes.by_key.values()), (sent, writes.by_key)


async def test_sensor_names_past_max_sensors_per_region_are_refused(power_stack):
    """A bridge publishing 60 distinct sensor names for west: the first
    max_sensors_per_region (5) are relayed, the rest are counted, logged
    and never written to etcd; the API says so.  Once west is full, each
    member subscribes to west's known sensors only, so a further flood of
    new names is filtered out by the broker while the known sensors still
    get through."""
    s = power_stack(max_sensors_per_region=5)
    await s.started()

    async def publish_names(names: list[str], state: str = "utility_ok") -> None:
        async with aiomqtt.Client("127.0.0.1", s.broker.port) as client:
            for name in names:
                await client.publish(f"failoverd/power/west/{name}",
                                     json.dumps({"state": state, "ts": time.time()}), qos=1)

    await publish_names([f"s{i:02d}" for i in range(5)])
    await wait_until(lambda: _relayed_as(s, "west", "s04", "utility_ok", 2), 10,
                     "five west sensors relayed")
    await publish_names([f"s{i:02d}" for i in range(5, 60)])

    async def refused(member: str) -> dict | None:
        _, st = await call(s.c.daemons[member].api, "GET", "/v1/status", VIEWER_TOKEN)
        r = st["regions"]["west"]["power"]["refused"]
        return r if r["messages"] >= 1 and r["narrowed"] else None
    for member in ("e1", "w1"):
        r = await wait_until(lambda m=member: refused(m), 15,
                             f"{member} refusing west names, narrowed", interval=0.2)
        assert 1 <= len(r["names"]) <= 10 and all(n >= "s05" for n in r["names"])  # named
    before = {m: await _refusals(s, m) for m in s.c.daemons}

    # Narrowed: 60 more new names never reach the members; a known sensor
    # does (and, one connection keeping its order, after all of them).
    await publish_names([f"t{i:02d}" for i in range(60)])
    await publish_names(["s00"], state="utility_lost")
    await wait_until(lambda: _relayed_as(s, "west", "s00", "utility_lost", 2), 10,
                     "s00's new state relayed by both members")
    assert {m: await _refusals(s, m) for m in s.c.daemons} == before
    keys = [kv.key for kv in (await s.c.store.get_prefix(s.c.keys.prefix + "power/west/")).kvs]
    sensors = {k.split("/")[-2] for k in keys}
    assert len(sensors) == 5 and len(keys) == 10, keys  # 5 sensors x 2 relaying members
    for d in s.c.daemons.values():
        events = d.log_events()
        logged = [e for e in events if e.get("event") == "mqtt message rejected"
                  and e.get("reason") == "too_many_sensors"]
        assert 1 <= len(logged) <= 2  # rate-limited: once per 10 s
        assert any(e.get("event") == "mqtt lane narrowed to the region's known sensors"
                   and e.get("power_region") == "west" for e in events)


async def _refusals(s: PowerStack, member: str) -> float:
    """Messages ``member`` refused for too many sensor names (its metrics)."""
    _, text = await call(s.c.daemons[member].api, "GET", "/metrics")
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("failoverd_mqtt_messages_total{")
               and 'reason="too_many_sensors"' in line)


async def _relayed_as(s: PowerStack, region: str, sensor: str, state: str, members: int
                      ) -> bool:
    readings = (await s.c.view()).power.get((region, sensor), [])
    return sum(r.state == state for r in readings) >= members


async def _relayed_by(s: PowerStack, sensor: str, members: int) -> bool:
    return len((await s.c.view()).power.get(("east", sensor), [])) >= members


async def test_a_relay_waits_for_the_coordinator_here_but_not_past_its_bound(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str) -> None:
    """News the coordinator in this daemon decides on is relayed once that
    decision is done — and after RELAY_AFTER_DECISION_S at the latest."""
    cfg = write_config(tmp_path / "failoverd.toml", cluster=cluster_name,
                       endpoints=etcd.endpoints, regions={"east": 100}, groups={"app": ["east"]},
                       state_dir=tmp_path / "state")
    settings = load_settings(cfg, Overrides(member="e1", region="east"))
    keys = Keyspace(cluster_name)
    store = EtcdStore(EtcdSettings(endpoints=etcd.endpoints))
    try:
        lease, _ = await store.grant(10)
        feeds = PowerFeeds(store, keys, lambda: settings, lambda: lease)
        decided = asyncio.Event()
        feeds.on_reading = lambda: decided
        now = time.time()
        heard = feeds.ingest(Reading("east", "gen", "generator_failed", now, now, since=now))
        relay = asyncio.ensure_future(heard)
        # Held while the decision is pending (bounded wait, not a sleep).
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(relay), 0.1)
        assert await store.get(keys.power("east", "gen", "e1")) is None
        assert ("east", "gen") in feeds.unrelayed  # the coordinator reads it meanwhile
        decided.set()
        await asyncio.wait_for(relay, 2)
        kv = await store.get(keys.power("east", "gen", "e1"))
        assert kv is not None and json.loads(kv.value)["state"] == "generator_failed"

        # A decision that never comes holds the relay for the bound only.
        feeds.on_reading = asyncio.Event
        started = time.monotonic()
        now = time.time()
        await asyncio.wait_for(feeds.ingest(Reading("east", "gen", "utility_ok", now, now,
                                                    since=now)), 2)
        assert time.monotonic() - started >= RELAY_AFTER_DECISION_S
        kv = await store.get(keys.power("east", "gen", "e1"))
        assert kv is not None and json.loads(kv.value)["state"] == "utility_ok"
    finally:
        await store.close()
