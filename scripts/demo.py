"""Local multi-region demo: a real stack on loopback, a scripted incident, and
the timeline with timings.

Starts a 3-member etcd, mosquitto, HAProxy, BIND 9, one small app per region
(its HTTP answer names its region, each on its own loopback address) and one
failoverd per region (east, west, central), then plays a scenario:

  power       (default) east loses utility power, its generator fails to
              start, its UPS battery drains: every group (--groups, default 3)
              leaves east for west in one evacuation, planned
  health      east's app starts failing its health checks: a forced failover
  crash       the coordinator is killed -9 in the middle of a switchover; the
              next coordinator finishes the saga
  switchover  an operator's planned switchover with failoverctl
  database    PostgreSQL primary in east, streaming standbys in west and
              central, a writer through HAProxy; east's generator fails: the
              switchover fences east, waits for west to replay its last WAL,
              promotes west and rejoins east; prints writes acknowledged,
              found, missing (must be 0) and the write outage

On a terminal (or with --keep) the stack stays up for failoverctl and the
status page until Ctrl-C or ``scripts/demo stop``; otherwise (or with --exit)
it stops when the scenario is done.  Everything lives under ./.demo/.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiohttp
import aiomqtt
import dns.asyncquery
import dns.message

from devstack.postgres import PgReplicaSet, PgWriter, database_group_toml, hook_env_dir
from devstack.stack import (
    OPERATOR_TOKEN,
    VIEWER_TOKEN,
    Bind,
    EtcdCluster,
    Haproxy,
    HttpService,
    LocalCluster,
    Mosquitto,
    NutServer,
    free_port,
    wait_until,
)

ROOT = Path(__file__).resolve().parent.parent
REGIONS = {"east": 100, "west": 50, "central": 25}
ADDRESS = {"east": "127.0.1.1", "west": "127.0.2.1", "central": "127.0.3.1"}
NAME = "app.example.test."
SENSOR_PERIOD_S = 5.0
SCENARIOS = ("power", "nut", "health", "crash", "switchover", "database")


def say(msg: str = "") -> None:
    print(msg, flush=True)


def _app_port() -> int:
    """One port free on every region's address (the apps share it, as real
    regions would, so DNS alone says where traffic goes)."""
    for _ in range(50):
        port = free_port()
        try:
            for addr in ADDRESS.values():
                with socket.socket() as s:
                    s.bind((addr, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every region address")


async def _names_region(url: str, region: str) -> bool:
    """Does ``url`` answer with ``region``'s app?"""
    try:
        async with aiohttp.ClientSession() as s, s.get(
                url, timeout=aiohttp.ClientTimeout(total=1)) as r:
            return (await r.text()).strip() == f"region {region}"
    except (aiohttp.ClientError, TimeoutError):
        return False


class Stack:
    """Every process of the demo, and the demo's own record of what it did."""

    def __init__(self, work: Path, ttl: int, groups: int = 3, nut: bool = False) -> None:
        self.work = work
        self.ttl = ttl
        # East's UPS behind a real NUT upsd (dummy-ups), polled by east-1.
        self.nut = NutServer(work / "nut", ["ups1"]) if nut else None
        # "app" (HAProxy + DNS + verify) and app2..appN (a DNS name each).
        self.groups = ["app", *(f"app{i}" for i in range(2, groups + 1))]
        self.etcd = EtcdCluster(work, size=3)
        self.broker = Mosquitto(work)
        self.app_port = _app_port()
        self.apps = {r: HttpService(r, ADDRESS[r], self.app_port) for r in REGIONS}
        self.haproxy: Haproxy | None = None
        self.bind = Bind(work, a_record=ADDRESS["east"])
        self.cluster: LocalCluster | None = None
        self.marks: list[tuple[float, str]] = []
        self.sensors: dict[tuple[str, str], dict[str, Any]] = {}
        self._mqtt: aiomqtt.Client | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def c(self) -> LocalCluster:
        assert self.cluster is not None
        return self.cluster

    def mark(self, text: str) -> float:
        now = time.time()
        self.marks.append((now, text))
        return now

    def _record_pids(self) -> None:
        procs = [m.proc for m in self.etcd.members] + [self.broker.proc, self.bind.proc]
        if self.nut is not None:
            procs += [self.nut.upsd, *self.nut.drivers.values()]
        procs += [self.haproxy.proc if self.haproxy else None]
        procs += [d.proc for d in (self.cluster.daemons.values() if self.cluster else [])]
        (self.work / "pids").write_text(
            "".join(f"{p.pid}\n" for p in procs if p is not None))

    async def start(self) -> None:
        say(f"==> etcd: 3 members ({', '.join(self.etcd.endpoints)})")
        self.etcd.start()
        say(f"==> mosquitto on {self.broker.url}")
        self.broker.start()
        if self.nut is not None:
            self.nut.start()
            say(f"==> NUT upsd on {self.nut.server}: east's UPS 'ups1' (dummy-ups driver), "
                "polled by east-1 as sensor nut-ups1")
        for r, app in self.apps.items():
            await app.start()
            say(f"==> app of {r:<8} on http://{app.address}/ (answers 'region {r}')")
        self.haproxy = Haproxy(self.work, {r: a.address for r, a in self.apps.items()},
                               active="east").start()
        say(f"==> HAProxy on http://127.0.0.1:{self.haproxy.port}/ (admin socket "
            f"{self.haproxy.socket})")
        self.bind.start()
        say(f"==> BIND 9 on {self.bind.server}, zone example.test, {NAME} A {ADDRESS['east']}")
        self._mqtt = aiomqtt.Client("127.0.0.1", self.broker.port)
        await self._mqtt.__aenter__()
        for r in REGIONS:
            self.sensors[(r, "ats")] = {"state": "utility_ok"}
            self.sensors[(r, "ups1")] = {"state": "utility_ok", "runtime_s": 900,
                                         "charge_pct": 100}
        await self._publish_all()
        self._tasks.append(asyncio.create_task(self._sensor_feed(), name="sensors"))
        self.cluster = self._make_cluster()
        # The coordinator starts in central, away from the regions the
        # scenarios take down (any member can be elected; this keeps the
        # story simple to read).
        for member, region in (("central-1", "central"), ("east-1", "east"),
                               ("west-1", "west")):
            self.c.add(member, region)
            if member == "central-1":
                await self.c.wait_coordinator(15)
        self._record_pids()
        say("==> failoverd: central-1, east-1, west-1 (one per region)")
        rec = await self.c.wait_active("app", "east", 30)
        await wait_until(lambda: self.all_settled("east"), 60, "every bootstrap saga")
        await wait_until(lambda: self.answers_haproxy("east"), 10, "HAProxy serving east")
        coord = await self.c.wait_coordinator(5)
        say(f"    coordinator {coord.member} (term {coord.term}); app active in east "
            f"(epoch {rec.epoch}); HAProxy and DNS send traffic to east")

    def _make_cluster(self) -> LocalCluster:
        assert self.haproxy is not None
        hp, bind = self.haproxy, self.bind
        servers = ", ".join(f'{r} = "{r}"' for r in REGIONS)
        addrs = ", ".join(f'{r} = ["{a}"]' for r, a in ADDRESS.items())
        group_toml = (
            f'verify_url = "http://127.0.0.1:{hp.port}/"\nverify_timeout_s = 5\n'
            f'[[groups.routes]]\nkind = "haproxy"\nsocket = "{hp.socket}"\nbackend = "app"\n'
            f"servers = {{ {servers} }}\n"
            f'[[groups.routes]]\nkind = "dns"\nserver = "{bind.server}"\n'
            f'zone = "example.test."\nname = "app"\nttl = 5\n'
            f'tsig_key_file = "{bind.key_file}"\naddresses = {{ {addrs} }}\n')
        probes = {r: [{"kind": "http", "target": f"http://{a.address}/health",
                       "interval_s": 0.5, "timeout_s": 0.4, "fall": 2, "rise": 2}]
                  for r, a in self.apps.items()}
        # bootstrap_grace_s as in production: the daemons start one after the
        # other, and east must be judged before the first choice is made.
        policy = {"power_grace_s": 30, "sensor_stale_s": 3 * SENSOR_PERIOD_S,
                  "bootstrap_grace_s": 10,
                  "member_loss_grace_s": 0, "max_evacuations_per_hour": 100}
        extra = {g: (f'[[groups.routes]]\nkind = "dns"\nserver = "{bind.server}"\n'
                     f'zone = "example.test."\nname = "{g}"\nttl = 5\n'
                     f'tsig_key_file = "{bind.key_file}"\naddresses = {{ {addrs} }}\n')
                 for g in self.groups[1:]}
        sources = ({"east": {"power_sources": [
            {"kind": "nut", "sensor": "nut-ups1", "ups": "ups1", "server": self.nut.server,
             "poll_interval_s": 0.5}]}} if self.nut is not None else None)
        return LocalCluster(self.work, "demo", self.etcd.endpoints, REGIONS,
                            {g: list(REGIONS) for g in self.groups}, ttl=self.ttl,
                            policy=policy, probes=probes, mqtt=[self.broker.url],
                            group_toml=group_toml, group_tomls=extra, drain_s=1.0,
                            region_settings=sources)

    async def all_settled(self, region: str) -> dict[str, float] | None:
        """Every group active in ``region`` with its saga done: when each was."""
        view = await self.c.view()
        done = {}
        for g in self.groups:
            rec, wf = view.active.get(g), view.workflows.get(g)
            if rec is None or rec.region != region or wf is None or wf.epoch != rec.epoch \
                    or wf.state != "done":
                return None
            done[g] = wf.updated
        return done

    async def _settled(self, epoch: int) -> bool:
        wf = (await self.c.view()).workflows.get("app")
        return wf is not None and wf.epoch == epoch and wf.state == "done"

    # -- power sensors ---------------------------------------------------
    async def sensor(self, region: str, sensor: str, state: str, **kw: Any) -> float:
        """Set one sensor's state and publish it now (as a UPS/ATS bridge would)."""
        self.sensors[(region, sensor)] = {"state": state, **kw}
        return await self._publish(region, sensor)

    async def _publish(self, region: str, sensor: str) -> float:
        assert self._mqtt is not None
        payload = json.dumps({**self.sensors[(region, sensor)], "ts": time.time()})
        sent = time.time()
        await self._mqtt.publish(f"failoverd/power/{region}/{sensor}", payload, qos=1,
                                 retain=True)
        return sent

    async def _publish_all(self) -> None:
        for region, sensor in list(self.sensors):
            await self._publish(region, sensor)

    async def _sensor_feed(self) -> None:
        # Real bridges report periodically; silence would read as "unknown".
        while True:
            await asyncio.sleep(SENSOR_PERIOD_S)
            with contextlib.suppress(aiomqtt.MqttError):
                await self._publish_all()

    # -- traffic ---------------------------------------------------------
    async def answers_haproxy(self, region: str) -> bool:
        assert self.haproxy is not None
        return await _names_region(f"http://127.0.0.1:{self.haproxy.port}/", region)

    async def dns_answer(self) -> set[str]:
        q = dns.message.make_query(NAME, "A")
        resp = await dns.asyncquery.udp(q, "127.0.0.1", port=self.bind.port, timeout=1)
        return {rd.to_text() for rr in resp.answer for rd in rr}

    async def answers_dns(self, region: str) -> bool:
        """The name resolves to the region's address, and the app there answers."""
        if await self.dns_answer() != {ADDRESS[region]}:
            return False
        return await _names_region(f"http://{ADDRESS[region]}:{self.app_port}/", region)

    async def watch_traffic(self, region: str, within: float) -> tuple[float, float]:
        """When HAProxy, and then DNS, first sent traffic to ``region``."""
        async def first(check: Callable[[str], Awaitable[bool]], what: str) -> float:
            await wait_until(lambda: check(region), within, what, interval=0.005)
            return time.time()
        hp, dn = await asyncio.gather(first(self.answers_haproxy, f"HAProxy -> {region}"),
                                      first(self.answers_dns, f"DNS -> {region}"))
        self.marks.append((hp, f"traffic: HAProxy now answers 'region {region}'"))
        self.marks.append((dn, f"traffic: {NAME} A {ADDRESS[region]}, its app answers "
                               f"'region {region}'"))
        return hp, dn

    # -- stopping --------------------------------------------------------
    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._mqtt is not None:
            with contextlib.suppress(Exception):
                await self._mqtt.__aexit__(None, None, None)
        if self.cluster is not None:
            await self.cluster.close()
        for app in self.apps.values():
            await app.stop()
        for thing in (self.haproxy, self.bind, self.broker, self.nut):
            if thing is not None:
                thing.stop()
        self.etcd.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.work / "pids").unlink()


# -- the timeline ----------------------------------------------------------
STORY_EVENTS = {"epoch_changed", "workflow_step", "workflow_done", "promote_done",
                "demote_done", "promote_failed", "demote_failed", "coordinator_elected",
                "alert", "operator_request", "workflow_superseded"}


def _describe(e: dict[str, Any]) -> str:
    kind = e["kind"]
    if kind == "epoch_changed":
        return (f"decision committed: {e['group']} {e.get('previous_region')} -> {e['region']}, "
                f"epoch {e['epoch']} ({e.get('mode')}): {e.get('reason')}")
    if kind == "workflow_step":
        extra = f" ({e['detail']})" if e.get("detail") else ""
        err = f" error: {e['error']}" if e.get("error") else ""
        return (f"[{e['group']}] saga step {e['step']} {e['state']} in {e['duration_s']}s"
                f"{extra}{err}")
    if kind == "workflow_done":
        return f"[{e['group']}] saga done: {e['mode']} {e['previous_region']} -> {e['region']}"
    if kind in {"promote_done", "demote_done"}:
        return f"{kind.replace('_', ' ')} on {e['member']} ({e['region']}), hook " \
               f"{e['duration_s']}s"
    if kind == "coordinator_elected":
        return f"{e['member']} elected coordinator, term {e['term']}"
    if kind == "operator_request":
        return f"operator request {e.get('action')} seen by the coordinator"
    return f"{kind}: " + ", ".join(f"{k}={v}" for k, v in e.items()
                                  if k not in {"kind", "ts", "member", "region"})


async def timeline(stack: Stack, since: float, t0: float) -> list[tuple[float, str]]:
    lines = [(ts, f"demo: {text}") for ts, text in stack.marks if ts >= since]
    for e in await stack.c.history():
        if e["ts"] >= since and e["kind"] in STORY_EVENTS:
            lines.append((e["ts"], _describe(e)))
        if e["ts"] >= since and e["kind"] == "workflow_done":
            # One event lists every step with its end: one line each.
            for st in e.get("steps", []):
                extra = f" ({st['detail']})" if st.get("detail") else ""
                lines.append((st["finished"], f"[{e['group']}] saga step {st['step']} done in "
                              f"{st['duration_s']}s{extra}"))
    for d in stack.c.daemons.values():
        for e in d.log_events():
            if e.get("event") == "power reading" and e.get("source") in {"nut", "snmp"}:
                ts = datetime.fromisoformat(e["timestamp"]).timestamp()
                if ts >= since:
                    lines.append((ts, f"{e['member']} polled {e['sensor']} ({e['source']}): "
                                      f"{e['state']} - {e.get('detail')}"))
            if e.get("event") == "decision" and e.get("level") == "info":
                ts = datetime.fromisoformat(e["timestamp"]).timestamp()
                if ts >= since:
                    lines.append((ts, f"coordinator decides: {e['reason']}"))
    lines.sort()
    say("\n==> timeline (milliseconds from the trigger)")
    for ts, text in lines:
        say(f"  {(ts - t0) * 1000:+9.1f}  {text}")
    return lines


def first(lines: list[tuple[float, str]], text: str, after: float) -> float | None:
    return next((ts for ts, line in lines if ts >= after and text in line), None)


def summary(name: str, lines: list[tuple[float, str]], t0: float, frm: str, to: str,
            epochs: tuple[int, int]) -> None:
    # The figures follow group "app" (HAProxy and DNS); the others are in
    # the timeline with their names.
    marks = [("decision committed", "decision committed: app "),
             ("old region drained (planned only)", "[app] saga step drain_old done"),
             ("old region fenced (forced only)", "[app] saga step fence_old done"),
             ("promoted", "[app] saga step promote_new done"),
             ("rerouted (HAProxy + DNS)", "[app] saga step reroute done"),
             ("verified", "[app] saga step verify done"),
             ("HAProxy traffic on the new region", "traffic: HAProxy"),
             ("DNS traffic on the new region", f"traffic: {NAME}"),
             ("old region demoted, saga done", "[app] saga done")]
    say(f"\n==> {name}: app moved {frm} -> {to}, epoch {epochs[0]} -> {epochs[1]}")
    figures = {}
    for label, text in marks:
        ts = first(lines, text, t0)
        if ts is not None:
            figures[label] = (ts - t0) * 1000
            say(f"    {label:<36} {figures[label]:8.1f} ms after the trigger")
    say("RESULT " + json.dumps({"scenario": name, "from": frm, "to": to,
                               "epochs": list(epochs),
                               "ms": {k: round(v, 1) for k, v in figures.items()}}))


# -- scenarios ---------------------------------------------------------------
async def _failover_done(stack: Stack, to: str, before: int, within: float) -> int:
    rec = await stack.c.wait_active("app", to, within)
    assert rec.epoch > before
    await wait_until(lambda: stack._settled(rec.epoch), 30, "the failover saga")
    return int(rec.epoch)


async def scenario_power(stack: Stack) -> None:
    say("\n==> scenario: power event in east (the active region)")
    start = stack.mark("east ATS: utility power lost; UPS on battery, 900 s runtime")
    await stack.sensor("east", "ats", "utility_lost")
    await stack.sensor("east", "ups1", "on_battery", runtime_s=900, charge_pct=100)

    async def held(text: str) -> bool:
        return any(e.get("event") == "decision" and text in e.get("reason", "")
                   for d in stack.c.daemons.values() for e in d.log_events())
    # Within the grace the coordinator holds: the generator should start.
    await wait_until(lambda: held("power on_battery"), 10, "the coordinator to hold")
    before = (await stack.c.view()).active["app"].epoch
    t0 = await stack.sensor("east", "gen", "generator_failed")
    stack.marks.append((t0, "east generator: failed to start (sensor message published)"))
    drain = asyncio.create_task(_battery_drains(stack))
    traffic = asyncio.create_task(stack.watch_traffic("west", 30))
    epoch = await _failover_done(stack, "west", before, 20)
    await traffic
    done = await wait_until(lambda: stack.all_settled("west"), 60, "every group's saga")
    drain.cancel()
    lines = await timeline(stack, start, t0)
    summary("power", lines, t0, "east", "west", (before, epoch))
    await evacuation_summary(stack, t0, done)


async def scenario_nut(stack: Stack) -> None:
    """East's UPS speaks NUT: utility lost → on battery → low battery, read
    from a real upsd by east-1."""
    assert stack.nut is not None
    say("\n==> scenario: east's UPS (NUT upsd) - utility lost, on battery, low battery")
    start = stack.mark("east: utility power lost; the UPS goes on battery (upsd: OB DISCHRG)")
    await stack.sensor("east", "ats", "utility_lost")
    stack.nut.set("ups1", **{"ups.status": "OB DISCHRG", "battery.runtime": 900,
                             "battery.charge": 95, "input.voltage": 0.0})

    async def held() -> bool:
        return any(e.get("event") == "decision" and "power on_battery" in e.get("reason", "")
                   for d in stack.c.daemons.values() for e in d.log_events())
    await wait_until(held, 15, "the coordinator to hold east on battery")
    before = (await stack.c.view()).active["app"].epoch
    t0 = stack.mark("east UPS: battery low (upsd: OB DISCHRG LB, 120 s left)")
    stack.nut.set("ups1", **{"ups.status": "OB DISCHRG LB", "battery.runtime": 120,
                             "battery.charge": 11, "input.voltage": 0.0})
    traffic = asyncio.create_task(stack.watch_traffic("west", 30))
    epoch = await _failover_done(stack, "west", before, 20)
    await traffic
    done = await wait_until(lambda: stack.all_settled("west"), 60, "every group's saga")
    lines = await timeline(stack, start, t0)
    summary("nut", lines, t0, "east", "west", (before, epoch))
    await evacuation_summary(stack, t0, done)


async def evacuation_summary(stack: Stack, t0: float, done: dict[str, float]) -> None:
    """The whole site left east: how many groups, as how many incidents."""
    events = [e for e in await stack.c.history()
              if e["kind"] == "evacuation" and e["ts"] >= t0 - 1]
    last = max(done.values())
    say(f"\n==> evacuation: {len(done)} group(s) moved east -> west in "
        f"{len(events)} evacuation event(s); the last saga was done "
        f"{(last - t0) * 1000:.1f} ms after the trigger")
    for e in events:
        say(f"    {e['region']} ({e['trigger']}): {e['reason']}; groups "
            + ", ".join(f"{g}->{r}" for g, r in sorted(e["groups"].items())))
    say("EVACUATION " + json.dumps({"groups": len(done), "events": len(events),
                                    "last_done_ms": round((last - t0) * 1000, 1)}))


async def _battery_drains(stack: Stack) -> None:
    runtime = 900
    while runtime > 0:
        await asyncio.sleep(0.5)
        runtime -= 60
        await stack.sensor("east", "ups1", "on_battery", runtime_s=runtime,
                           charge_pct=round(runtime / 9))
        stack.mark(f"east UPS: battery draining, {runtime} s left")


async def scenario_health(stack: Stack) -> None:
    say("\n==> scenario: east's app fails its health checks")
    before = (await stack.c.view()).active["app"].epoch
    t0 = stack.mark("east app now answers 503 to every request")
    stack.apps["east"].mode = "fail"
    traffic = asyncio.create_task(stack.watch_traffic("west", 30))
    epoch = await _failover_done(stack, "west", before, 20)
    await traffic
    lines = await timeline(stack, t0, t0)
    summary("health", lines, t0, "east", "west", (before, epoch))


async def _ctl(stack: Stack, *argv: str) -> str:
    api = next(d.api for d in stack.c.daemons.values() if d.alive())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failoverd.cli.ctl", "--api", api, "--token", OPERATOR_TOKEN, *argv,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    return out.decode()


async def scenario_switchover(stack: Stack) -> None:
    say("\n==> scenario: planned switchover by an operator")
    before = (await stack.c.view()).active["app"].epoch
    t0 = stack.mark("failoverctl switchover app --to west")
    traffic = asyncio.create_task(stack.watch_traffic("west", 30))
    out = await _ctl(stack, "switchover", "app", "--to", "west")
    say("    " + out.strip().replace("\n", "\n    "))
    epoch = await _failover_done(stack, "west", before, 20)
    await traffic
    lines = await timeline(stack, t0, t0)
    summary("switchover", lines, t0, "east", "west", (before, epoch))


async def scenario_crash(stack: Stack) -> None:
    say("\n==> scenario: the coordinator crashes in the middle of a switchover")
    before = (await stack.c.view()).active["app"].epoch
    seat = await stack.c.wait_coordinator(5)
    start = stack.mark("failoverctl switchover app --to west")
    traffic = asyncio.create_task(stack.watch_traffic("west", 60))
    out = await _ctl(stack, "switchover", "app", "--to", "west")
    say("    " + out.strip().replace("\n", "\n    "))

    async def draining() -> bool:
        wf = (await stack.c.view()).workflows.get("app")
        step = wf.current() if wf is not None and wf.epoch > before else None
        return step is not None and step.name == "drain_old" and step.state == "running"
    await wait_until(draining, 15, "the saga to start draining east")
    t0 = stack.mark(f"kill -9 {seat.member} (coordinator, term {seat.term}) while east drains")
    stack.c.daemons[seat.member].kill9()
    new = await stack.c.wait_coordinator(stack.ttl + 15, not_term=seat.term)
    stack.mark(f"{new.member} holds the seat (term {new.term})")
    epoch = await _failover_done(stack, "west", before, 30)
    await traffic
    lines = await timeline(stack, start, t0)
    summary("crash", lines, t0, "east", "west", (before, epoch))
    say(f"    lease TTL {stack.ttl}s: the seat was free after the TTL, the new coordinator "
        "resumed the saga from etcd")


PLAYS: dict[str, Callable[[Stack], Awaitable[None]]] = {
    "power": scenario_power, "nut": scenario_nut, "health": scenario_health,
    "crash": scenario_crash,
    "switchover": scenario_switchover,
}


# -- the database scenario (a stack of its own) ----------------------------------
class DbStack:
    """The database scenario's processes: etcd, mosquitto, PostgreSQL in
    three regions, HAProxy (TCP) in front of the primary, three daemons."""

    def __init__(self, work: Path, ttl: int) -> None:
        self.work, self.ttl = work, ttl
        self.etcd = EtcdCluster(work, size=3)
        self.broker = Mosquitto(work)
        self.pg = PgReplicaSet(list(REGIONS), "east")
        self.hp: Haproxy | None = None
        self.c: LocalCluster | None = None

    async def start(self) -> LocalCluster:
        self.etcd.start()
        self.broker.start()
        say(f"==> etcd: 3 members; mosquitto on {self.broker.url}")
        pg = self.pg.start()
        pg["east"].sql("CREATE TABLE acked (n int PRIMARY KEY)")
        say("==> PostgreSQL " + ", ".join(
            f"{r} {'primary' if r == 'east' else 'standby'} :{srv.port}"
            for r, srv in pg.servers.items()) + f" (data under {pg.root})")
        self.hp = Haproxy(self.work, {r: srv.port for r, srv in pg.servers.items()}, "east",
                          mode="tcp").start()
        say(f"==> HAProxy (TCP) on 127.0.0.1:{self.hp.port} in front of the primary")
        c = self.c = LocalCluster(
            self.work, "demo-db", self.etcd.endpoints, REGIONS, {"db": list(REGIONS)},
            ttl=self.ttl, mqtt=[self.broker.url], drain_s=0, log_level="info",
            policy={"power_grace_s": 0, "cooldown_s": 0, "bootstrap_grace_s": 5},
            group_toml=database_group_toml(pg, self.hp.socket, check_interval_s=0.5))
        for region in ("central", "east", "west"):
            c.add(f"{region}-1", region, env={
                "FAILOVERD_PG_ENV_DIR": str(hook_env_dir(pg, region, "db", self.work))})
        pids = [d.proc.pid for d in c.daemons.values() if d.proc is not None]
        pids += [m.proc.pid for m in self.etcd.members if m.proc is not None]
        pids += [p.pid for p in (self.broker.proc, self.hp.proc) if p is not None]
        pids += [int((srv.datadir / "postmaster.pid").read_text().split()[0])
                 for srv in pg.servers.values() if (srv.datadir / "postmaster.pid").exists()]
        (self.work / "pids").write_text("".join(f"{pid}\n" for pid in pids))
        return c

    async def stop(self) -> None:
        if self.c is not None:
            await self.c.close()
        if self.hp is not None:
            self.hp.stop()
        self.broker.stop()
        self.etcd.stop()
        self.pg.stop()
        with contextlib.suppress(FileNotFoundError):
            (self.work / "pids").unlink()


async def database_demo(work: Path, ttl: int) -> None:
    """A writer inserts a numbered row every 10 ms through HAProxy; east's
    generator fails.  The switchover fences east's primary, waits for west
    to replay its last WAL, promotes west, reroutes, and rejoins east as a
    standby: no acknowledged write may be lost."""
    say("\n==> scenario: database - PostgreSQL in three regions, a power event in east")
    stack = DbStack(work, ttl)
    try:
        c = await stack.start()
        assert stack.hp is not None
        rec = await c.wait_active("db", "east", 30)
        say(f"==> failoverd: db active in east (epoch {rec.epoch}); the data guard "
            "watches each region's replay")
        writer = PgWriter(stack.hp.port)
        writing = asyncio.create_task(writer.run(), name="writer")
        try:
            await wait_until(lambda: len(writer.acked) >= 200, 20, "writes through HAProxy")
            say(f"==> writer: {len(writer.acked)} rows acknowledged so far, one every 10 ms")
            async with aiomqtt.Client("127.0.0.1", stack.broker.port) as mq:
                t0 = time.time()
                await mq.publish("failoverd/power/east/gen",
                                 json.dumps({"state": "generator_failed", "ts": t0}), qos=1)
            say("==> east generator: failed (sensor message published)")
            after = await c.wait_active("db", "west", 30)
            wf = await c.wait_saga_done("db", after.epoch, 60)
            n = len(writer.acked)
            await wait_until(lambda: len(writer.acked) >= n + 200, 20, "writes to west")
        finally:
            writing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writing
        missing = writer.missing_in(stack.pg["west"])
        for st in wf.steps:
            say(f"    {st.name:<12} +{(st.finished or t0) - t0:6.3f}s  {st.detail}")
        say(f"==> writes acknowledged {len(writer.acked)}, found in west "
            f"{len(writer.acked) - len(missing)}, missing {len(missing)}; write outage "
            f"{writer.outage_ms():.0f} ms; epoch {rec.epoch} -> {after.epoch}")
        say("RESULT " + json.dumps({"scenario": "database", "acknowledged": len(writer.acked),
                                    "missing": len(missing),
                                    "outage_ms": round(writer.outage_ms()),
                                    "epoch": after.epoch}))
        if missing:
            raise AssertionError(f"{len(missing)} acknowledged writes lost")
    finally:
        await stack.stop()


# -- running and stopping ------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_demo(work: Path, timeout: float = 30.0) -> int:
    """``scripts/demo stop``: ask the running demo to stop, wait, then make
    sure nothing it started is left (even if the demo itself was killed)."""
    pidfile = work / "demo.pid"
    pid = int(pidfile.read_text()) if pidfile.exists() else None
    if pid is not None and _alive(pid):
        say(f"==> stopping the demo (pid {pid})")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    left = []
    pids = work / "pids"
    if pids.exists():
        left = [int(p) for p in pids.read_text().split() if _alive(int(p))]
        for p in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        pids.unlink()
    pidfile.unlink(missing_ok=True)
    if pid is None and not left:
        say("==> no demo running")
    else:
        say("==> stopped" + (f" (killed {len(left)} leftover processes)" if left else ""))
    return 0


def _help(stack: Stack, work: Path) -> None:
    api = next(d.api for d in stack.c.daemons.values() if d.alive())
    assert stack.haproxy is not None
    say(f"""
==> the stack is left running.  Try:
    export FAILOVERD_API={api} FAILOVERD_TOKEN={OPERATOR_TOKEN}
    .venv/bin/failoverctl status
    .venv/bin/failoverctl history
    .venv/bin/failoverctl switchover app --to central
    curl http://127.0.0.1:{stack.haproxy.port}/              # through HAProxy
    dig @127.0.0.1 -p {stack.bind.port} {NAME} A +short     # the authoritative DNS
    status page: {api}/#token={VIEWER_TOKEN}
    logs: {work}/*.log
Stop it with Ctrl-C here, or from another shell: scripts/demo stop""")


def prepare(work: Path) -> bool:
    """A fresh work directory, unless a demo is running there."""
    pidfile = work / "demo.pid"
    if pidfile.exists() and _alive(int(pidfile.read_text())):
        say(f"a demo is already running (pid {pidfile.read_text().strip()}); "
            "scripts/demo stop")
        return False
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    pidfile.write_text(f"{os.getpid()}\n")
    return True


async def run(args: argparse.Namespace) -> int:
    work: Path = args.workdir
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    stack = Stack(work, args.ttl, args.groups, nut=args.scenario == "nut")
    rc = 0

    async def play() -> None:
        if args.scenario == "database":
            await database_demo(work, args.ttl)
            return
        await stack.start()
        await PLAYS[args.scenario](stack)

    try:
        player = asyncio.create_task(play(), name="scenario")
        stopper = asyncio.create_task(stop.wait(), name="stop")
        await asyncio.wait({player, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if not player.done():
            player.cancel()
            say("\n==> interrupted")
        elif player.exception() is not None:
            exc = player.exception()
            say(f"\n==> the scenario failed: {exc!r}; logs in {work}")
            rc = 1
        elif not args.exit and args.scenario != "database" and (
                args.keep or sys.stdin.isatty()):
            _help(stack, work)
            await stopper
        stopper.cancel()
    finally:
        say("==> stopping")
        await stack.stop()
        (work / "demo.pid").unlink(missing_ok=True)
        say("==> stopped")
    return rc


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", nargs="?", choices=("run", "stop"), default="run",
                    help="run a scenario (default) or stop a running demo")
    ap.add_argument("--scenario", choices=SCENARIOS, default="power")
    ap.add_argument("--exit", action="store_true", help="stop when the scenario is done")
    ap.add_argument("--keep", action="store_true",
                    help="stay up after the scenario even without a terminal")
    ap.add_argument("--ttl", type=int, default=2, help="lease TTL in seconds (default 2)")
    ap.add_argument("--groups", type=int, default=3,
                    help="failover groups (default 3): 'app' with HAProxy, DNS and a "
                         "verified traffic path, and app2..appN each with a DNS name; "
                         "a power event evacuates them all")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".demo",
                    help="where data, configs and logs go (wiped first)")
    args = ap.parse_args()
    if args.action == "stop":
        return stop_demo(args.workdir)
    if not prepare(args.workdir):
        return 1
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
