"""Reroute step time per router (real HAProxy, real BIND 9) beside the raw
cost of the same command sent directly: for HAProxy the ``set server``
commands alone (the router adds the read-back), for DNS the signed update
alone (the router adds the fence read)."""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.takeover import pct, row
from devstack.stack import Bind, Haproxy, HttpService
from failoverd.config import DnsRoute, HaproxyRoute
from failoverd.traffic.routers import Change, DnsRouter, HaproxyRouter

ADDRS = {"east": ["192.0.2.10"], "west": ["198.51.100.10"]}


async def run(trials: int, ttl: int) -> list[dict[str, object]]:
    del ttl
    work = Path(tempfile.mkdtemp(prefix="failoverd-bench-routers-"))
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
        rows.append(row("reroute step: haproxy runtime API (+ read-back)", routed,
                        f"raw set-server x2 p50 {pct(raw, 50) * 1000:.2f} ms, "
                        f"p99 {pct(raw, 99) * 1000:.2f} ms"))
        routed, raw = [], []
        epoch = 1
        for i in range(trials):
            to, frm = ("west", "east") if i % 2 == 0 else ("east", "west")
            epoch += 1
            t0 = time.perf_counter()
            await d.apply(Change("app", frm, to, epoch, "reroute"))
            routed.append(time.perf_counter() - t0)
            epoch += 1
            upd = d.update(epoch, ADDRS[frm], current=epoch - 1)
            t0 = time.perf_counter()
            assert await d.send(upd) == 0
            raw.append(time.perf_counter() - t0)
        rows.append(row("reroute step: dns RFC 2136 + TSIG (+ fence read)", routed,
                        f"raw signed update p50 {pct(raw, 50) * 1000:.2f} ms, "
                        f"p99 {pct(raw, 99) * 1000:.2f} ms"))
    finally:
        hp.stop()
        bind.stop()
        for a in apps.values():
            await a.stop()
    return rows
