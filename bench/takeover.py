"""Coordinator takeover and member-loss failover on a real 3-member etcd.

(a) kill -9 the coordinator → a new coordinator key exists;
(b) SIGTERM the coordinator → a new coordinator key exists (resign path);
(c) kill -9 every daemon of the active region → the standby's promote hook
    has started (hook start time is stamped by the hook itself).
Each is measured over --trials runs and printed with p50/p99 beside the
configured lease TTL, which bounds (a) and (c).
"""

from __future__ import annotations

import math
import signal
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdirs import work_dir
from devstack.stack import EtcdCluster, LocalCluster, wait_until

POLL_S = 0.005


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[max(math.ceil(p / 100 * len(s)) - 1, 0)]


async def _new_coordinator(c: LocalCluster, old_term: int) -> None:
    async def changed() -> bool:
        seat = await c.store.get(c.keys.coordinator)
        return seat is not None and seat.create_revision != old_term
    await wait_until(changed, c.ttl + 10, "new coordinator", interval=POLL_S)


async def _members(c: LocalCluster, n: int) -> bool:
    return len((await c.view()).members) >= n


async def bench_takeover(c: LocalCluster, trials: int, sig: int) -> list[float]:
    for m in ("a1", "a2", "a3"):
        c.add(m, "west")
    await wait_until(lambda: _members(c, 3), 20, "members")
    out = []
    for _ in range(trials):
        seat = await c.wait_coordinator(20)
        d = c.daemons[seat.member]
        t0 = time.monotonic()
        d.signal(sig)
        await _new_coordinator(c, seat.term)
        out.append(time.monotonic() - t0)
        assert d.proc is not None
        d.proc.wait()
        d.start()
        await wait_until(lambda: _members(c, 3), 20, "member back")
    return out


async def bench_member_loss(c: LocalCluster, trials: int) -> list[float]:
    regions = {"e1": "east", "w1": "west", "c1": "central"}
    for m, r in regions.items():
        c.add(m, r)
    await c.wait_active("app", "east", 20)
    await wait_until(lambda: _members(c, 3), 20, "members")
    out = []
    for _ in range(trials):
        rec = (await c.view()).active["app"]
        victims = [m for m, r in regions.items() if r == rec.region]

        async def settled(epoch: int = rec.epoch, who: list[str] = victims) -> bool:
            return all(any(h["member"] == m and h["role"] == "active" and h["epoch"] == epoch
                           for h in c.hooks()) for m in who)
        await wait_until(settled, 20, "active region promoted")
        t0 = time.time()
        for m in victims:
            c.daemons[m].kill9()

        async def promoted(epoch: int = rec.epoch + 1) -> list[dict]:
            return [h for h in c.hooks() if h["epoch"] == epoch and h["role"] == "active"]
        hooks = await wait_until(promoted, c.ttl + 10, "promote hook", interval=POLL_S)
        out.append(hooks[0]["t"] - t0)
        for m in victims:
            c.daemons[m].start()
        await wait_until(lambda: _members(c, 3), 20, "members back")

        async def demoted(epoch: int = rec.epoch + 1, who: list[str] = victims) -> bool:
            return all(any(h["member"] == m and h["role"] == "standby" and h["epoch"] == epoch
                           for h in c.hooks()) for m in who)
        await wait_until(demoted, 20, "old region demoted")
    return out


def row(name: str, xs: list[float], floor: str, unit: str = "ms") -> dict[str, object]:
    """One line of the report; latencies come in seconds and print in ms."""
    k = 1000 if unit == "ms" else 1
    return {"benchmark": name, "unit": unit, "samples": len(xs),
            "p50": round(pct(xs, 50) * k, 2), "p99": round(pct(xs, 99) * k, 2),
            "min": round(min(xs) * k, 2), "max": round(max(xs) * k, 2),
            "stdev": round(statistics.pstdev(xs) * k, 2), "floor": floor}


async def run(trials: int, ttl: int) -> list[dict[str, object]]:
    work = work_dir("failoverd-bench-")
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    rows = []
    # Storm guards off: the bench fails over on purpose, many times an hour.
    policy = {"member_loss_grace_s": 0, "cooldown_s": 0, "bootstrap_grace_s": 1,
              "max_evacuations_per_hour": 10_000,
              "max_auto_failovers_per_group_per_hour": 10_000}
    try:
        for name, sig in (("coordinator takeover after kill -9", signal.SIGKILL),
                          ("coordinator handover after SIGTERM", signal.SIGTERM)):
            (work / name[:8]).mkdir(exist_ok=True)
            c = LocalCluster(work / name[:8], f"bench-{sig}", etcd.endpoints, {"west": 1},
                             {"app": ["west"]}, ttl=ttl, policy=policy)
            try:
                xs = await bench_takeover(c, trials, sig)
            finally:
                await c.close()
            floor = f"lease TTL {ttl}s" if sig == signal.SIGKILL else "none (resign is immediate)"
            rows.append(row(name, xs, floor))
        (work / "loss").mkdir()
        c = LocalCluster(work / "loss", "bench-loss", etcd.endpoints,
                         {"east": 100, "west": 90, "central": 10},
                         {"app": ["east", "west", "central"]}, ttl=ttl, policy=policy)
        try:
            xs = await bench_member_loss(c, trials)
        finally:
            await c.close()
        rows.append(row("member-loss failover (kill -> promote hook started)", xs,
                        f"lease TTL {ttl}s + member_loss_grace_s 0"))
    finally:
        etcd.stop()
    return rows
