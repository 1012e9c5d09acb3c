"""Polled power sources end to end: a real NUT ``upsd`` with ``dummy-ups``
drivers, real etcd, real daemons."""

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
    OPERATOR_TOKEN,
    ROOT,
    VIEWER_TOKEN,
    EtcdCluster,
    LocalCluster,
    Mosquitto,
    NutServer,
    SnmpSim,
    call,
    free_port,
    wait_until,
    write_config,
)
from tests.test_statuspage import render

pytestmark = pytest.mark.cluster


class SourceStack:
    """A cluster whose east region polls power sources (``nut`` when the
    sources include the test's upsd)."""

    def __init__(self, c: LocalCluster, nut: NutServer | None = None) -> None:
        self.c = c
        self._nut = nut

    @property
    def nut(self) -> NutServer:
        assert self._nut is not None
        return self._nut

    async def started(self) -> Any:
        self.c.add("e1", "east")
        self.c.add("w1", "west")
        return await self.c.wait_active("app", "east", 10)

    async def reading(self, sensor: str, state: str, timeout: float = 10,
                      detail: str = "") -> Any:
        """Wait until etcd holds ``sensor``'s relayed reading in ``state``
        (with ``detail`` in its detail)."""
        async def seen() -> Any:
            for r in (await self.c.view()).power.get(("east", sensor), []):
                if r.state == state and detail in r.detail:
                    return r
            return None
        return await wait_until(seen, timeout, f"{sensor} relayed as {state} {detail}")

    async def decided(self, text: str, after: float) -> None:
        """Wait for a coordinator decision, logged after ``after``, whose
        reason contains ``text``."""
        async def seen() -> bool:
            return any(e.get("event") == "decision" and text in e.get("reason", "")
                       and _ts(e) >= after
                       for d in self.c.daemons.values() for e in d.log_events())
        await wait_until(seen, 10, f"a decision saying {text!r}")


def _ts(e: dict[str, Any]) -> float:
    return datetime.fromisoformat(e["timestamp"]).timestamp()


@pytest.fixture
async def nut_stack(tmp_path: Path, etcd: EtcdCluster, cluster_name: str
                    ) -> AsyncIterator[Callable[..., SourceStack]]:
    made: list[tuple[LocalCluster, NutServer]] = []

    def make(sources: list[dict[str, Any]] | None = None, **policy: Any) -> SourceStack:
        nut = NutServer(tmp_path / "nut").start()
        sources = sources if sources is not None else [
            {"kind": "nut", "sensor": "ups1", "ups": "ups1", "server": nut.server,
             "poll_interval_s": 0.5}]
        pol = {"power_grace_s": 600, "sensor_stale_s": 3, "expected_failover_s": 5,
               "power_runtime_margin_s": 10, **policy}
        c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                         {"app": ["east", "west"]}, policy=pol,
                         region_settings={"east": {"power_sources": sources}})
        made.append((c, nut))
        return SourceStack(c, nut)
    yield make
    for c, nut in made:
        await c.close()
        nut.stop()


async def _status_power(s: SourceStack, member: str, state: str) -> bool:
    _, st = await call(s.c.daemons[member].api, "GET", "/v1/status", VIEWER_TOKEN)
    return bool(st["regions"]["east"]["power"]["state"] == state)


async def test_nut_ups_on_battery_then_low_battery_evacuates(nut_stack):
    """OL → OB DISCHRG (within the grace, with runtime to spare: nothing
    moves) → OB LB (critical, as upsmon reads it): the region evacuates."""
    s = nut_stack()
    before = await s.started()
    first = await s.reading("ups1", "utility_ok")
    assert first.source == "nut" and first.charge_pct == 100 and "input 230.0 V" in first.detail
    s.nut.set("ups1", **{"ups.status": "OB DISCHRG", "battery.runtime": 900,
                         "battery.charge": 80, "input.voltage": 0})
    on_battery = await s.reading("ups1", "on_battery")
    assert on_battery.runtime_s is not None and on_battery.runtime_s <= 900
    assert (await s.c.view()).active["app"].epoch == before.epoch
    # What the operator sees: the sensor, its source, the rule, the verdict,
    # and (asked of a member that polls it) how the polls go. The status is
    # served from each member's watch-fed mirror, a watch hop behind etcd.
    for member in ("e1", "w1"):
        await wait_until(lambda m=member: _status_power(s, m, "on_battery"), 5,
                         f"{member}'s status to show east on battery", interval=0.1)
    shown = await asyncio.to_thread(_ctl, "power", api=s.c.daemons["e1"].api)
    assert shown.returncode == 0, shown.stderr
    assert "REGION east: power on_battery" in shown.stdout
    line = next(x for x in shown.stdout.splitlines() if x.strip().startswith("ups1"))
    assert line.split()[:3] == ["ups1", "nut", "on_battery"] and " grace " in line
    assert f"source ups1 (nut ups1@{s.nut.server}): reading relayed; answering" in shown.stdout
    doc = json.loads((await asyncio.to_thread(
        _ctl, "-o", "json", "power", api=s.c.daemons["w1"].api)).stdout)
    assert doc["east"]["state"] == "on_battery"
    assert doc["east"]["sensors"][0]["rule"] == "grace"
    assert "poll" not in doc["east"]["sources"][0]  # west does not poll east's UPS
    s.nut.set("ups1", **{"ups.status": "OB DISCHRG LB", "battery.runtime": 120,
                         "battery.charge": 9})
    after = await s.c.wait_active("app", "west", 10)
    assert after.trigger == "power" and "ups1:low_battery" in after.reason


async def test_nut_recharging_after_an_outage_is_not_critical(nut_stack, tmp_path: Path):
    """``OL CHRG LB``: the utility is back and the battery recharges — upsmon
    does not shut down for it, and neither do we evacuate."""
    s = nut_stack()
    before = await s.started()
    await s.reading("ups1", "utility_ok")
    s.nut.set("ups1", **{"ups.status": "OL CHRG LB", "battery.charge": 12})
    reading = await s.reading("ups1", "utility_ok", detail="OL CHRG LB")
    await s.decided("power normal", after=reading.received)
    view = await s.c.view()
    assert view.active["app"].epoch == before.epoch
    # The status page shows the sensor, its source and the rule that applies.
    dom = await asyncio.to_thread(render, f"{s.c.daemons['w1'].api}/#token={VIEWER_TOKEN}",
                                  tmp_path)
    m = re.search(r'<tr data-region="east" data-sensor="ups1">(.*?)</tr>', dom, re.S)
    assert m, "no power row for ups1"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", m.group(1), re.S)
    assert cells[:4] == ["east", "ups1", "nut", "utility_ok"] and cells[6] == "normal", cells
    assert "OL CHRG LB" in cells[7]


async def test_rule_10_upsd_gone_during_an_outage_is_critical_after_the_bound(nut_stack):
    """A UPS on battery whose upsd stops answering (the site's network died
    with it) is critical after power_silence_during_outage_s, as upsmon
    treats a UPS on battery that stops answering."""
    s = nut_stack(sensor_stale_s=1, power_silence_during_outage_s=3)
    before = await s.started()
    s.nut.set("ups1", **{"ups.status": "OB DISCHRG", "battery.runtime": 3000})
    await s.reading("ups1", "on_battery")
    t0 = time.time()
    s.nut.stop_upsd()
    after = await s.c.wait_active("app", "west", 15)
    assert after.epoch == before.epoch + 1
    assert time.time() - t0 >= 3 - 0.6  # the bound, less one poll interval
    assert "ups1:on_battery, silent" in after.reason
    logged = [e for e in s.c.daemons["e1"].log_events()
              if e.get("event") == "power source poll failed"]
    assert logged and logged[0]["reason"] == "unreachable"


def _ctl(*args: str, api: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "failoverd.cli.ctl", "--api", api,
                           "--token", OPERATOR_TOKEN, *args], capture_output=True, text=True,
                          timeout=30, stdin=subprocess.DEVNULL, check=False)


async def _garbage_server() -> tuple[asyncio.Server, int]:
    """Something on the NUT port that is not upsd."""
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readline():
            writer.write(b"HTTP/1.0 400 Bad Request\r\n")
            await writer.drain()
        writer.close()
    port = free_port()
    return await asyncio.start_server(answer, "127.0.0.1", port), port


async def test_bad_nut_answers_are_logged_once_counted_and_decide_nothing(nut_stack):
    """An unknown UPS name, a server that is not upsd, TLS required from a
    server without it, a port nobody listens on: each is one log line (not
    one per poll), a metric by reason, no reading and no power verdict.  A
    flag we do not know decides nothing either: logged once, counted."""
    server, garbage_port = await _garbage_server()
    try:
        def src(sensor: str, **kw: Any) -> dict[str, Any]:
            return {"kind": "nut", "sensor": sensor, "ups": "ups1", "poll_interval_s": 0.3, **kw}
        s = nut_stack(sources=[])
        nut = s.nut.server
        sources = [src("ghost", server=nut, ups="nope"),
                   src("noise", server=f"127.0.0.1:{garbage_port}", tls="off"),
                   src("plain", server=nut, tls="required"),
                   src("nobody", server=f"127.0.0.1:{free_port()}"),
                   src("odd", server=nut)]
        # A flag from a newer NUT (or a vendor): read, logged once, counted.
        s.nut.set("ups1", **{"ups.status": "OL SOMETHINGNEW"})
        s.c.config = s.c.config_variant("bad", region_settings={
            "east": {"power_sources": sources}})
        before = await s.started()
        expected = {"ghost": "unknown_ups", "noise": "malformed", "plain": "tls",
                    "nobody": "unreachable"}
        api = s.c.daemons["e1"].api

        async def counted() -> dict[str, float] | None:
            _, text = await call(api, "GET", "/metrics")
            found = {m.group(1): float(m.group(3)) for m in re.finditer(
                r'failoverd_power_source_polls_total\{kind="nut",result="([a-z_]+)",'
                r'sensor="([a-z]+)"\} ([0-9.]+)', text) if expected.get(m.group(2)) == m.group(1)}
            return found if len(found) == 4 and min(found.values()) >= 5 else None
        await wait_until(counted, 15, "five failed polls of each bad source, by reason")
        for sensor, reason in expected.items():
            lines = [e for e in s.c.daemons["e1"].log_events()
                     if e.get("event") == "power source poll failed"
                     and e.get("sensor") == sensor]
            assert len(lines) == 1, (sensor, lines)
            assert lines[0]["reason"] == reason
        odd = await s.reading("odd", "utility_ok")
        assert "OL SOMETHINGNEW" in odd.detail
        _, text = await call(api, "GET", "/metrics")
        m = re.search(r'failoverd_power_source_polls_total\{kind="nut",result="unknown_flags",'
                      r'sensor="odd"\} ([0-9.]+)', text)
        assert m and float(m.group(1)) >= 3
        flagged = [e for e in s.c.daemons["e1"].log_events()
                   if e.get("event") == "power source sent flags we do not know; they decide "
                   "nothing"]
        assert len(flagged) == 1 and flagged[0]["flags"] == ["SOMETHINGNEW"]
        view = await s.c.view()
        assert [k for k in view.power if k[0] == "east"] == [("east", "odd")]
        assert view.active["app"].epoch == before.epoch
    finally:
        server.close()


PLUG = """
import asyncio, sys
import aiomqtt

async def main() -> None:
    will = aiomqtt.Will("tele/plug7/LWT", "Offline", qos=1, retain=True)
    async with aiomqtt.Client("127.0.0.1", int(sys.argv[1]), will=will, keepalive=5) as c:
        await c.publish("tele/plug7/LWT", "Online", qos=1, retain=True)
        print("online", flush=True)
        await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_mqtt_mappings_read_zigbee2mqtt_and_tasmota_through_a_real_broker(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """docs/power-sources.md's Tasmota and Zigbee2MQTT recipes on a real
    mosquitto: a plug's Last Will (the broker publishes it when the plug
    dies) and a Zigbee sensor's ``ac_power: false`` past the grace."""
    broker = Mosquitto(tmp_path).start()
    mappings = [
        {"topic": "tele/+/LWT", "region": "west", "sensor": "{1}",
         "states": {"Online": "utility_ok", "Offline": "offline"}},
        {"topic": "zigbee2mqtt/+", "region": "east", "sensor": "{1}", "json_path": "ac_power",
         "states": {"true": "utility_ok", "false": "utility_lost"}, "charge_path": "battery"},
    ]
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"app": ["east", "west"]}, mqtt=[broker.url], mqtt_mappings=mappings,
                     policy={"power_grace_s": 2, "sensor_stale_s": 3})
    plug: subprocess.Popen[bytes] | None = None
    try:
        c.add("e1", "east")
        c.add("w1", "west")
        before = await c.wait_active("app", "east", 10)
        await wait_until(lambda: _mqtt_connected(c), 10, "both members on the broker")

        async def relayed(region: str, sensor: str, state: str) -> Any:
            found = (await c.view()).power.get((region, sensor), [])
            return next((r for r in found if r.state == state), None)

        plug = subprocess.Popen([sys.executable, "-c", PLUG, str(broker.port)],
                                stdout=subprocess.PIPE)
        await wait_until(lambda: relayed("west", "plug7", "utility_ok"), 10, "the plug online")
        plug.kill()  # dies with the power: no DISCONNECT, so the broker sends its will
        plug.wait()
        await wait_until(lambda: relayed("west", "plug7", "offline"), 10, "the plug's will")

        async def publish(payload: str) -> None:
            async with aiomqtt.Client("127.0.0.1", broker.port) as client:
                await client.publish("zigbee2mqtt/hall", payload, qos=1)
        await publish('{"ac_power": true, "battery": 97}')
        ok = await wait_until(lambda: relayed("east", "hall", "utility_ok"), 10, "hall on mains")
        assert ok.charge_pct == 97 and ok.detail == "ac_power = true"
        await publish('{"ac_power": false, "battery": 96}')
        after = await c.wait_active("app", "west", 10)
        assert after.epoch == before.epoch + 1 and "hall:utility_lost" in after.reason
    finally:
        if plug is not None and plug.poll() is None:
            plug.kill()
        await c.close()
        broker.stop()


async def _mqtt_connected(c: LocalCluster) -> bool:
    return all(any(e.get("event") == "mqtt connected" for e in d.log_events())
               for d in c.daemons.values())


async def test_check_config_connect_reads_each_nut_source_and_only_warns(
        tmp_path: Path, etcd: EtcdCluster):
    """check-config --connect polls each NUT source once: a working one says
    what it read; an unreachable one is a warning (only the region's members
    must reach it), not a failure."""
    nut = NutServer(tmp_path / "nut").start()
    dead = free_port()
    try:
        cfg = write_config(
            tmp_path / "c.toml", cluster="cc", endpoints=etcd.endpoints,
            regions={"east": 100, "west": 50}, groups={"app": ["east", "west"]},
            state_dir=tmp_path / "state", region_settings={"east": {"power_sources": [
                {"kind": "nut", "sensor": "ups1", "ups": "ups1", "server": nut.server},
                {"kind": "nut", "sensor": "ups2", "ups": "ups2",
                 "server": f"127.0.0.1:{dead}"}]}})
        out = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "failoverd", "check-config", "--connect",
                             str(cfg)], capture_output=True, text=True, timeout=60, cwd=ROOT,
            check=False)
        assert out.returncode == 0, out.stdout + out.stderr
        lines = out.stdout.splitlines()
        assert (f"ok   nut ups1@{nut.server} (sensor ups1): ups.status OL, input 230.0 V "
                "read as utility_ok (plain text)") in lines
        assert any(x.startswith(f"warn nut ups2@127.0.0.1:{dead} (sensor ups2): unreachable")
                   for x in lines), lines
        assert lines[-1] == "3 endpoint(s), 0 failed, 1 warning(s)"
    finally:
        nut.stop()


OUTPUT_SOURCE, BATTERY_STATUS = "1.3.6.1.2.1.33.1.4.1.0", "1.3.6.1.2.1.33.1.2.1.0"
RECORDINGS = {"eaton": "eaton-93e-80.snmprec.bz2", "huawei": "huawei-gse200m.snmprec.bz2"}


@pytest.fixture
async def snmp(tmp_path: Path) -> AsyncIterator[tuple[dict[str, SnmpSim], Path, Path]]:
    """One responder per recording: snmpsim's writecache is keyed by OID
    alone, so a SET on one recording would show in the other."""
    sims = {name: SnmpSim(tmp_path / f"snmpsim-{name}", {name: recording},
                          writable=[OUTPUT_SOURCE, BATTERY_STATUS]).start()
            for name, recording in RECORDINGS.items()}
    auth, priv = tmp_path / "auth.key", tmp_path / "priv.key"
    auth.write_text(SnmpSim.V3_AUTH + "\n")
    priv.write_text(SnmpSim.V3_PRIV + "\n")
    yield sims, auth, priv
    for sim in sims.values():
        sim.stop()


def _v3(sim: SnmpSim, auth: Path, priv: Path, **kw: Any) -> dict[str, Any]:
    return {"kind": "snmp", "target": sim.target, "version": "3", "user": SnmpSim.V3_USER,
            "auth_protocol": "SHA", "auth_key_file": str(auth), "priv_protocol": "AES",
            "priv_key_file": str(priv), "poll_interval_s": 0.5, **kw}


async def test_snmp_ups_mib_of_two_vendors_and_an_oid_table(
        snmp, tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """Real recordings of an Eaton 93E (SNMPv2c) and a Huawei UPS2000
    (SNMPv3 authPriv) read through RFC 1628, and the Eaton's output source
    read again through a declared OID table: on battery changes nothing
    within the grace; the Huawei's battery going low evacuates east."""
    sims, auth, priv = snmp
    sources = [
        {"kind": "snmp", "sensor": "eaton", "target": sims["eaton"].target,
         "community": "eaton", "poll_interval_s": 0.5},
        _v3(sims["huawei"], auth, priv, sensor="huawei", context="huawei"),
        {"kind": "snmp", "sensor": "eaton-oids", "target": sims["eaton"].target,
         "community": "eaton",
         "mib": "oids", "poll_interval_s": 0.5,
         "oids": {"state": OUTPUT_SOURCE, "states": {"3": "utility_ok", "5": "on_battery"},
                  "runtime": "1.3.6.1.2.1.33.1.2.3.0", "runtime_scale": 60}},
    ]
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"app": ["east", "west"]},
                     region_settings={"east": {"power_sources": sources}},
                     policy={"power_grace_s": 600, "sensor_stale_s": 3})
    s = SourceStack(c)
    try:
        before = await s.started()
        eaton = await s.reading("eaton", "utility_ok")
        assert eaton.source == "snmp" and eaton.charge_pct == 100 and eaton.runtime_s == 1092 * 60
        assert "upsOutputSource normal" in eaton.detail
        huawei = await s.reading("huawei", "utility_ok")
        assert huawei.runtime_s is None  # the Huawei says -1: it does not know
        await s.reading("eaton-oids", "utility_ok")
        await sims["eaton"].set("eaton", OUTPUT_SOURCE, 5)
        await s.reading("eaton", "on_battery")
        oids = await s.reading("eaton-oids", "on_battery")
        assert oids.runtime_s == 1092 * 60 and oids.detail == f"{OUTPUT_SOURCE} = 5"
        assert (await c.view()).active["app"].epoch == before.epoch
        await sims["huawei"].set("huawei", OUTPUT_SOURCE, 5)
        await sims["huawei"].set("huawei", BATTERY_STATUS, 3)
        after = await c.wait_active("app", "west", 15)
        assert after.epoch == before.epoch + 1 and "huawei:low_battery" in after.reason
        answering = [e for e in c.daemons["e1"].log_events()
                     if e.get("event") == "power source answering"]
        assert {(e["sensor"], e["via"]) for e in answering} >= {
            ("eaton", "SNMPv2c"), ("huawei", "SNMPv3 authPriv")}
    finally:
        await c.close()


async def test_bad_snmp_answers_are_logged_once_counted_and_decide_nothing(
        snmp, tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """A wrong community (an agent does not answer those), a wrong SNMPv3
    key, an OID the device does not have, a value the table does not list,
    and something on the port that is not SNMP: one log line each, a metric
    by reason, no reading, no verdict."""
    sims, _, priv = snmp
    sim = sims["eaton"]
    wrong = tmp_path / "wrong.key"
    wrong.write_text("not-the-key-at-all\n")
    noise = await asyncio.get_running_loop().create_datagram_endpoint(
        _Noise, local_addr=("127.0.0.1", free_port()))
    noise_port = noise[0].get_extra_info("sockname")[1]
    table = {"state": OUTPUT_SOURCE, "states": {"5": "on_battery"}}
    sources = [
        {"kind": "snmp", "sensor": "wrongcomm", "target": sim.target, "community": "nope",
         "poll_interval_s": 0.3, "timeout_s": 0.5},
        _v3(sim, wrong, priv, sensor="wrongkey", context="eaton", poll_interval_s=0.3),
        {"kind": "snmp", "sensor": "nooid", "target": sim.target, "community": "eaton",
         "mib": "oids", "poll_interval_s": 0.3,
         "oids": {"state": "1.3.6.1.4.1.99999.1.0", "states": {"1": "utility_ok"}}},
        {"kind": "snmp", "sensor": "unlisted", "target": sim.target, "community": "eaton",
         "mib": "oids", "poll_interval_s": 0.3, "oids": table},
        {"kind": "snmp", "sensor": "noise", "target": f"127.0.0.1:{noise_port}",
         "poll_interval_s": 0.3, "timeout_s": 0.5},
    ]
    expected = {"wrongcomm": "timeout", "wrongkey": "auth", "nooid": "malformed",
                "unlisted": "unmapped_value", "noise": "timeout"}
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"app": ["east", "west"]},
                     region_settings={"east": {"power_sources": sources}})
    try:
        c.add("e1", "east")
        c.add("w1", "west")
        before = await c.wait_active("app", "east", 10)
        api = c.daemons["e1"].api

        async def counted() -> dict[str, float] | None:
            _, text = await call(api, "GET", "/metrics")
            found = {m.group(2): float(m.group(3)) for m in re.finditer(
                r'failoverd_power_source_polls_total\{kind="snmp",result="([a-z_]+)",'
                r'sensor="([a-z]+)"\} ([0-9.]+)', text) if expected.get(m.group(2)) == m.group(1)}
            return found if len(found) == len(expected) and min(found.values()) >= 3 else None
        await wait_until(counted, 20, "three failed polls of each bad source, by reason")
        for sensor, reason in expected.items():
            lines = [e for e in c.daemons["e1"].log_events()
                     if e.get("event") == "power source poll failed"
                     and e.get("sensor") == sensor]
            assert len(lines) == 1 and lines[0]["reason"] == reason, (sensor, lines)
        view = await c.view()
        assert not [k for k in view.power if k[0] == "east"]
        assert view.active["app"].epoch == before.epoch
    finally:
        noise[0].close()
        await c.close()


class _Noise(asyncio.DatagramProtocol):
    """Answers every datagram with bytes that are not SNMP."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        assert isinstance(self.transport, asyncio.DatagramTransport)
        self.transport.sendto(b"\x30\x03garbage that is not BER", addr)


async def test_nut_starttls_is_used_when_offered_and_verified(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str):
    """An upsd that offers STARTTLS (Debian's, NSS-backed, with a
    self-signed certificate): with its certificate as ca_file the polls go
    over TLS; without it the certificate does not verify and the source
    gives no reading — never a silent fall back to plain text."""
    nut = NutServer(tmp_path / "nut", tls=True).start()
    sources = [
        {"kind": "nut", "sensor": "secure", "ups": "ups1", "server": nut.server,
         "ca_file": str(nut.ca_file), "poll_interval_s": 0.5},
        {"kind": "nut", "sensor": "unverified", "ups": "ups1", "server": nut.server,
         "poll_interval_s": 0.5},
    ]
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100, "west": 50},
                     {"app": ["east", "west"]},
                     region_settings={"east": {"power_sources": sources}})
    s = SourceStack(c, nut)
    try:
        await s.started()
        await s.reading("secure", "utility_ok")
        events = c.daemons["e1"].log_events()
        assert any(e.get("event") == "power source answering" and e.get("sensor") == "secure"
                   and e.get("via") == "TLS" for e in events)

        async def refused() -> list[dict[str, Any]]:
            return [e for e in c.daemons["e1"].log_events()
                    if e.get("event") == "power source poll failed"
                    and e.get("sensor") == "unverified"]
        failed = await wait_until(refused, 10, "the unverifiable upsd refused")
        assert failed[0]["reason"] == "tls" and "CERTIFICATE_VERIFY_FAILED" in failed[0]["error"]
        assert ("east", "unverified") not in (await c.view()).power
    finally:
        await c.close()
        nut.stop()
