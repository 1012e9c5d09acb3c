"""Play a :class:`~devstack.chaos.schedule.Schedule` on a real stack and record
what happened (the imperative half of the chaos suite).

The stack: a 3-member etcd, mosquitto, HAProxy (group ``app``), BIND (every
group's DNS name and epoch fence), one daemon per region (east, west,
central), each reaching etcd through its own :class:`TcpProxy` so that one
member can be cut off from etcd while its peers still reach it, and each
serving its API on (and asking its peers from) its own loopback address, so
that nftables rules can cut one member off from its peers
(:class:`PeerCut`).  Groups: ``app`` (HAProxy + DNS), ``app2`` and ``app3``
(DNS).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt
import dns.asyncquery
import dns.exception
import dns.message

from devstack.chaos.checker import Record, healed, violations
from devstack.chaos.schedule import REGIONS, Fault, Operation, Schedule
from devstack.stack import (
    OPERATOR_TOKEN,
    Bind,
    EtcdCluster,
    Haproxy,
    HttpService,
    LocalCluster,
    Mosquitto,
    TcpProxy,
    http_probe,
)
from failoverd.config import HaproxyRoute
from failoverd.traffic.routers import ADMIN_DRAIN, ADMIN_MAINT, HaproxyRouter, RouterError

PRIORITY = {"east": 100, "west": 50, "central": 25}
MEMBER = {r: f"{r}-1" for r in REGIONS}
HOST = {r: f"127.0.0.{21 + i}" for i, r in enumerate(REGIONS)}
GROUPS = ("app", "app2", "app3")
ADDRS = {"east": "192.0.2.10", "west": "192.0.2.20", "central": "192.0.2.30"}
SAMPLE_S = 0.25
SETTLE_S = 60.0
TTL = 2


def _maint_or_drain(bits: int) -> str:
    # As the product reads HAProxy's admin state (routers.ADMIN_*): forced
    # maintenance, forced drain.  Every server is set explicitly by the
    # bootstrap's reroute before sampling starts.
    if bits & ADMIN_MAINT:
        return "maint"
    return "drain" if bits & ADMIN_DRAIN else "ready"


@dataclass
class Outcome:
    seed: int
    nemeses: tuple[str, ...]
    violations: list[str]
    seconds: float
    workdir: Path
    operations: dict[str, int] = field(default_factory=dict)


class PeerCut:
    """An nftables table that drops the traffic between one member's address
    and the other members' (both ways): a partition from its peers, while
    its etcd relays, the broker and the test's own requests (all from
    127.0.0.1) still pass.  Needs root and ``nft``; the table is named after
    the seed and deleted on heal."""

    def __init__(self, seed: int) -> None:
        self.table = f"failoverd_chaos_{seed}"

    def cut(self, host: str, others: list[str]) -> None:
        peers = ", ".join(others)
        rules = (f"table ip {self.table} {{\n"
                 "  chain out { type filter hook output priority 0; policy accept;\n"
                 f"    ip saddr {host} ip daddr {{ {peers} }} drop\n"
                 f"    ip saddr {{ {peers} }} ip daddr {host} drop\n"
                 "  }\n}\n")
        subprocess.run(["nft", "-f", "-"], input=rules, text=True, check=True,
                       capture_output=True)

    def heal(self) -> None:
        subprocess.run(["nft", "delete", "table", "ip", self.table], check=False,
                       capture_output=True)


class ChaosStack:
    def __init__(self, work: Path, seed: int) -> None:
        self.work = work
        self.seed = seed
        self.etcd = EtcdCluster(work / "etcd", size=3)
        self.broker = Mosquitto(work)
        self.apps: dict[str, HttpService] = {}
        self.haproxy: Haproxy | None = None
        self.bind = Bind(work)
        self.proxies: dict[str, list[TcpProxy]] = {}
        self.c: LocalCluster | None = None
        self.hp_route: HaproxyRoute | None = None
        self.expected_down: set[str] = set()  # daemons a nemesis stopped
        self.unavailable: list[tuple[str, str, float, float]] = []
        self.paused_etcd: set[int] = set()
        self.samples_dns: list[tuple[float, str, int | None, frozenset[str]]] = []
        self.samples_hp: list[tuple[float, dict[str, str]]] = []
        self.sampling = False  # cleared to stop sample()
        self.ops: dict[str, int] = {}
        self.peer_cut = PeerCut(seed)

    async def start(self) -> LocalCluster:
        (self.work / "etcd").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.etcd.start)
        self.broker.start()
        self.apps = {r: await HttpService(r).start() for r in REGIONS}
        self.haproxy = Haproxy(self.work, {r: s.port for r, s in self.apps.items()},
                               active="east").start()
        self.bind.start()
        servers = ", ".join(f'{r} = "{r}"' for r in REGIONS)
        addrs = ", ".join(f'{r} = ["{ADDRS[r]}"]' for r in REGIONS)

        def dns_route(name: str) -> str:
            return (f'[[groups.routes]]\nkind = "dns"\nserver = "{self.bind.server}"\n'
                    f'zone = "example.test."\nname = "{name}"\nttl = 5\n'
                    f'tsig_key_file = "{self.bind.key_file}"\naddresses = {{ {addrs} }}\n')
        hp = (f'[[groups.routes]]\nkind = "haproxy"\nsocket = "{self.haproxy.socket}"\n'
              f'backend = "app"\nservers = {{ {servers} }}\n')
        tomls = {"app": "step_attempts = 3\n" + hp + dns_route("app"),
                 "app2": "step_attempts = 3\n" + dns_route("app2"),
                 "app3": "step_attempts = 3\n" + dns_route("app3")}
        self.hp_route = HaproxyRoute(kind="haproxy", socket=self.haproxy.socket, backend="app",
                                     servers={r: r for r in REGIONS})
        c = self.c = LocalCluster(
            self.work, f"chaos{self.seed}", self.etcd.endpoints, PRIORITY,
            {g: list(REGIONS) for g in GROUPS}, ttl=TTL, mqtt=[self.broker.url],
            group_tomls=tomls, log_level="info",
            probes={r: [http_probe(f"{self.apps[r].url}/health")] for r in REGIONS},
            policy={"member_loss_grace_s": 1, "isolation_grace_s": 1, "cooldown_s": 0,
                    "max_evacuations_per_hour": 10000,
                    "max_auto_failovers_per_group_per_hour": 10000,
                    "power_grace_s": 0, "bootstrap_grace_s": 2})
        for region in REGIONS:
            proxies = [await TcpProxy(ep).start() for ep in self.etcd.endpoints]
            self.proxies[region] = proxies
            c.add(MEMBER[region], region, api_host=HOST[region], config=c.config_variant(
                MEMBER[region], endpoints=[p.endpoint for p in proxies],
                api_settings={"peer_source_address": HOST[region]}))
        return c

    # -- sampling ---------------------------------------------------------
    async def sample(self) -> None:
        """Sample DNS and HAProxy until :attr:`sampling` is cleared.  A flag,
        not only a cancel: on Python 3.11 ``asyncio.wait_for`` (inside
        dnspython's queries) can swallow a cancellation that lands as the
        query completes, and the loop would then sample for ever (a CI
        teardown hung 180 s on it)."""
        assert self.hp_route is not None
        router = HaproxyRouter(self.hp_route)
        self.sampling = True
        while self.sampling:
            now = time.time()
            for g in GROUPS:
                with contextlib.suppress(OSError, dns.exception.DNSException):
                    self.samples_dns.append((now, g, *await self._dns(g)))
            with contextlib.suppress(RouterError, OSError, TimeoutError):
                bits = await router.states()
                self.samples_hp.append((now, {s: _maint_or_drain(b) for s, b in bits.items()}))
            await asyncio.sleep(SAMPLE_S)

    async def _dns(self, group: str) -> tuple[int | None, frozenset[str]]:
        out = []
        for name, kind in ((f"_failoverd.{group}.example.test.", "TXT"),
                           (f"{group}.example.test.", "A")):
            resp = await dns.asyncquery.tcp(dns.message.make_query(name, kind), "127.0.0.1",
                                            port=self.bind.port, timeout=1)
            out.append({rd.to_text() for rr in resp.answer for rd in rr})
        fence = next((int(t.strip('"').split("=")[1]) for t in out[0]
                      if t.startswith('"epoch=')), None)
        return fence, frozenset(out[1])

    # -- nemeses -----------------------------------------------------------
    async def fault(self, f: Fault, rnd: random.Random) -> None:
        assert self.c is not None
        member = MEMBER[f.target]
        d = self.c.daemons[member]
        etcd_member = self.etcd.members[REGIONS.index(f.target)]
        if f.nemesis == "kill_daemon":
            self.expected_down.add(member)
            down = time.time()
            d.kill9()
            await asyncio.sleep(f.lasts)
            d.start()
            self.unavailable.append((member, "kill", down, time.time()))
            self.expected_down.discard(member)
        elif f.nemesis == "pause_daemon":
            down = time.time()
            d.signal(signal.SIGSTOP)
            await asyncio.sleep(f.lasts)
            d.signal(signal.SIGCONT)
            self.unavailable.append((member, "pause", down, time.time()))
        elif f.nemesis in {"kill_etcd_member", "kill_etcd_leader"}:
            victim = (await asyncio.to_thread(self.etcd.leader)
                      if f.nemesis == "kill_etcd_leader" else etcd_member)
            self.etcd.kill(victim)
            await asyncio.sleep(f.lasts)
            await self._restart_etcd([victim])
        elif f.nemesis == "pause_etcd_member":
            assert etcd_member.proc is not None
            pid = etcd_member.proc.pid
            os.kill(pid, signal.SIGSTOP)
            await asyncio.sleep(f.lasts)
            os.kill(pid, signal.SIGCONT)
        elif f.nemesis == "etcd_quorum_loss":
            victims = rnd.sample(self.etcd.members, 2)
            for m in victims:
                self.etcd.kill(m)
            await asyncio.sleep(f.lasts)
            await self._restart_etcd(victims)
        elif f.nemesis == "restart_broker":
            self.broker.stop()
            await asyncio.sleep(f.lasts)
            self.broker.start()
        elif f.nemesis in {"partition_from_etcd", "partition_from_peers", "partition_total"}:
            from_etcd = f.nemesis != "partition_from_peers"
            from_peers = f.nemesis != "partition_from_etcd"
            if from_peers:
                self.peer_cut.cut(HOST[f.target], [h for r, h in HOST.items() if r != f.target])
            for p in self.proxies[f.target] if from_etcd else []:
                p.cut()
            await asyncio.sleep(f.lasts)
            for p in self.proxies[f.target] if from_etcd else []:
                p.heal()
            self.peer_cut.heal()
        else:
            raise ValueError(f"unknown nemesis {f.nemesis}")

    async def _restart_etcd(self, members: list[Any]) -> None:
        for m in members:
            self.etcd.start_member(m, state="existing")
        await asyncio.to_thread(self.etcd.wait_healthy, 30.0, members)

    # -- client operations -------------------------------------------------
    async def operate(self, op: Operation, rnd: random.Random) -> None:
        self.ops[op.kind] = self.ops.get(op.kind, 0) + 1
        if op.kind in {"power_outage", "power_restored"}:
            state = "generator_failed" if op.kind == "power_outage" else "utility_ok"
            await self.power(op.region, state)
        elif op.kind == "health_flap":
            app = self.apps[op.region]
            app.mode = "fail"
            await asyncio.sleep(rnd.uniform(1.0, 4.0))
            app.mode = "ok"
        elif op.kind == "switchover":
            assert self.c is not None
            api = self.c.daemons[MEMBER[rnd.choice(REGIONS)]].api
            group = rnd.choice(GROUPS)
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                    await s.post(f"{api}/v1/groups/{group}/switchover",
                                 headers={"Authorization": f"Bearer {OPERATOR_TOKEN}"},
                                 json={"to": op.region})

    async def power(self, region: str, state: str) -> None:
        with contextlib.suppress(aiomqtt.MqttError, OSError, TimeoutError):
            async with asyncio.timeout(2), aiomqtt.Client("127.0.0.1", self.broker.port) as mq:
                await mq.publish(f"failoverd/power/{region}/gen",
                                 json.dumps({"state": state, "ts": time.time()}), qos=1,
                                 retain=True)

    # -- the record -----------------------------------------------------------
    async def record(self) -> Record:
        c = self.c
        assert c is not None
        view = await c.view()
        history = await c.history(limit=5000)
        alerted: set[str] = set()
        for e in history:
            if e.get("kind") == "alert":
                alerted.update([e["group"]] if "group" in e else e.get("groups", []))
        sagas = {}
        for g, rec in view.active.items():
            wf = view.workflows.get(g)
            sagas[g] = wf.state if wf is not None and wf.epoch == rec.epoch else "missing"
        crashed = {m: d.proc.returncode if d.proc else None for m, d in c.daemons.items()
                   if not d.alive() and m not in self.expected_down}
        states = {}
        for m in c.daemons:
            path = self.work / "state" / f"chaos{self.seed}-{m}.json"
            with contextlib.suppress(OSError, ValueError):
                states[m] = {g: int(v["epoch"]) for g, v in json.loads(path.read_text()).items()}
        return Record(
            hooks=c.hooks(),
            epoch_changes=[e for e in history if e.get("kind") == "epoch_changed"],
            dns=list(self.samples_dns), haproxy=list(self.samples_hp),
            final_active={g: (r.region, r.epoch) for g, r in view.active.items()},
            live_regions=view.regions_with_members(), final_sagas=sagas,
            alerted=frozenset(alerted), groups=GROUPS, crashed=crashed, state_files=states,
            unavailable=list(self.unavailable), wake_s=TTL + 2.0)

    async def stop(self) -> None:
        self.peer_cut.heal()
        if self.c is not None:
            for d in self.c.daemons.values():
                with contextlib.suppress(OSError):
                    d.signal(signal.SIGCONT)
            await self.c.close()
        for proxies in self.proxies.values():
            for p in proxies:
                await p.stop()
        for m in self.etcd.members:
            if m.proc is not None:
                with contextlib.suppress(OSError):
                    os.kill(m.proc.pid, signal.SIGCONT)
        self.etcd.stop()
        self.broker.stop()
        if self.haproxy is not None:
            self.haproxy.stop()
        self.bind.stop()
        for a in self.apps.values():
            await a.stop()


async def run_schedule(schedule: Schedule, work: Path) -> Outcome:
    """Start the stack, wait for every group's first epoch, play the
    schedule, heal everything, wait for the cluster to settle (at most
    SETTLE_S) and judge the record."""
    started = time.monotonic()
    stack = ChaosStack(work, schedule.seed)
    rnd = random.Random(schedule.seed)
    tasks: list[asyncio.Task[None]] = []
    try:
        c = await stack.start()

        async def bootstrapped() -> bool:
            v = await c.view()
            return all(g in v.active and v.workflows.get(g) is not None
                       and v.workflows[g].state == "done" for g in GROUPS)
        deadline = time.monotonic() + 60
        while not await _safe(bootstrapped):
            if time.monotonic() > deadline:
                raise RuntimeError("chaos stack did not bootstrap")
            await asyncio.sleep(0.2)
        sampler = asyncio.create_task(stack.sample(), name="chaos-sampler")
        t0 = time.monotonic()

        async def at(when: float, coro: Any) -> None:
            await asyncio.sleep(max(when - (time.monotonic() - t0), 0))
            await coro

        tasks = [asyncio.create_task(at(f.at, stack.fault(f, rnd))) for f in schedule.faults]
        tasks += [asyncio.create_task(at(o.at, stack.operate(o, rnd)))
                  for o in schedule.operations]
        await asyncio.gather(*tasks)
        for region in REGIONS:  # the clients' last word: power and health are back
            await stack.power(region, "utility_ok")
            stack.apps[region].mode = "ok"
        deadline = time.monotonic() + SETTLE_S
        while True:
            record = await _safe(stack.record)
            if record is not None and not healed(record):
                # Settled: a last second of samples, then judge a record
                # taken after it (a late client operation may have started
                # a saga meanwhile: then settle again).
                await asyncio.sleep(1.0)
                record = await _safe(stack.record)
                if record is not None and not healed(record):
                    break
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(1.0)
        stack.sampling = False
        sampler.cancel()
        record = await stack.record()
        return Outcome(schedule.seed, schedule.nemeses(), violations(record),
                       time.monotonic() - started, work, dict(stack.ops))
    finally:
        stack.sampling = False
        for t in tasks:
            t.cancel()
        await stack.stop()


async def _safe(fn: Any) -> Any:
    from failoverd.core.store import StoreError  # noqa: PLC0415
    try:
        return await fn()
    except (StoreError, OSError):
        return None
