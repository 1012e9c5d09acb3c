"""Reroute step time per router (real HAProxy, real BIND 9) beside the raw
cost of the same command sent directly: for HAProxy the ``set server``
commands alone (the router adds the read-back), for DNS the signed update
alone (the router's update carries the fence as its prerequisite: on the
happy path it is that one round trip)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.takeover import pct, row
from bench.workdirs import work_dir
from devstack.stack import Bind, Haproxy, HttpService
from failoverd.config import DnsRoute, HaproxyRoute
from failoverd.traffic.routers import Change, DnsRouter, HaproxyRouter

ADDRS = {"east": ["192.0.2.10"], "west": ["198.51.100.10"]}


async def run(trials: int, ttl: int) -> list[dict[str, object]]:
    del ttl
    work = work_dir("failoverd-bench-routers-")
    apps = {r: await HttpService(r).start() for r in ADDRS}
    hp = Haproxy(work, {r: s.port for r, s in apps.items()}, active="east").start()
    bind = Bind(work).start()
    rows = []
    try:
        h = HaproxyRouter(HaproxyRoute(kind="haproxy", socket=hp.socket, backend="app",
                                       servers={"east": "east", "west": "west"}))
        d = DnsRouter(DnsRoute(kind="dns", server=bind.server, zone="example.test.",
                               name="app", ttl=5, tsig_key_file=bind.key_file,
                               addresses=ADDRS))
        routed, raw = [], []
        for i in range(trials):
            to, frm = ("west", "east") if i % 2 == 0 else ("east", "west")
            t0 = time.perf_counter()
            await h.apply(Change("app", frm, to, i + 2, "reroute"))
            routed.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            await h.command(f"set server app/{to} state ready")
            await h.command(f"set server app/{frm} state maint")
            raw.append(time.perf_counter() - t0)
        goal = 1.5 * pct(raw, 99)
        rows.append(row("reroute step: haproxy runtime API (+ read-back)", routed,
                        f"raw set-server x2 p50 {pct(raw, 50) * 1000:.2f} ms, "
                        f"p99 {pct(raw, 99) * 1000:.2f} ms; goal p99 <= 1.5 x raw = "
                        f"{goal * 1000:.2f} ms "
                        + ("MET" if pct(routed, 99) <= goal else "MISSED")))
        # The raw update moves a record of its own (its own fence): the
        # router's prerequisite is the fence it last moved, and nobody else
        # writes it, as in production.
        r = DnsRouter(DnsRoute(kind="dns", server=bind.server, zone="example.test.",
                               name="raw", ttl=5, tsig_key_file=bind.key_file,
                               addresses=ADDRS))
        # Warm up both (the first signed exchange of a process costs ~5 ms
        # more: imports, key set-up), then time from the next epochs on.
        await d.apply(Change("app", "east", "west", 1, "reroute"))
        assert await r.send(r.update(1, ADDRS["west"], current=None)) == 0
        routed, raw = [], []
        for i in range(1, trials + 1):
            to, frm = ("west", "east") if i % 2 == 0 else ("east", "west")
            epoch = i + 1
            t0 = time.perf_counter()
            await d.apply(Change("app", frm, to, epoch, "reroute"))
            routed.append(time.perf_counter() - t0)
            upd = r.update(i + 1, ADDRS[to], current=i)
            t0 = time.perf_counter()
            assert await r.send(upd) == 0
            raw.append(time.perf_counter() - t0)
        goal = 1.5 * pct(raw, 99)
        rows.append(row("reroute step: dns RFC 2136 + TSIG (fenced by its prerequisite)",
                        routed,
                        f"raw signed update p50 {pct(raw, 50) * 1000:.2f} ms, "
                        f"p99 {pct(raw, 99) * 1000:.2f} ms; goal p99 <= 1.5 x raw = "
                        f"{goal * 1000:.2f} ms "
                        + ("MET" if pct(routed, 99) <= goal else "MISSED")))
    finally:
        hp.stop()
        bind.stop()
        for a in apps.values():
            await a.stop()
    return rows
