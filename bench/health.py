"""Health-triggered failover: stop the active region's service → the new
region's promote hook has started.  3 regions, one daemon each, probes every
0.2 s with fall 3 (a 0.6 s detection window); printed beside that window.
"""

from __future__ import annotations

import sys
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.takeover import row
from bench.workdirs import work_dir
from devstack.stack import EtcdCluster, HttpService, LocalCluster, http_probe, wait_until
from failoverd.core.engine import Policy, region_health

REGIONS = {"east": 100, "west": 90, "central": 10}
INTERVAL, FALL = 0.2, 3


async def _up_everywhere(c: LocalCluster, region: str) -> bool:
    p = Policy(priorities=tuple(REGIONS.items()), groups=(), cooldown_s=0,
               max_evacuations_per_hour=0, failback="manual", failback_stable_s=0,
               probed_regions=frozenset(REGIONS))
    h = region_health(await c.view(), p, region)
    return h.verdict == "up" and len(h.votes) == len(REGIONS)


async def run(trials: int, ttl: int) -> list[dict[str, object]]:
    work = work_dir("failoverd-bench-health-")
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    services = {r: await HttpService(r).start() for r in REGIONS}
    c = LocalCluster(work, "bench-health", etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     ttl=ttl, probes={r: [http_probe(s.url)] for r, s in services.items()},
                     policy={"cooldown_s": 0, "max_evacuations_per_hour": 10_000,
                             "max_auto_failovers_per_group_per_hour": 10_000,
                             "bootstrap_grace_s": 2})
    xs: list[float] = []
    overhead: list[float] = []
    try:
        for region in REGIONS:
            c.add(f"{region[0]}1", region)
        await c.wait_active("app", "east", 20)
        for _ in range(trials):
            rec = (await c.view()).active["app"]
            for r in REGIONS:
                await wait_until(lambda r=r: _up_everywhere(c, r), 20, f"{r} up")

            async def promoted(epoch: int = rec.epoch) -> bool:
                return any(h["epoch"] == epoch and h["role"] == "active" for h in c.hooks())
            await wait_until(promoted, 10, "current region promoted")
            t0 = time.time()
            await services[rec.region].stop()

            async def moved(epoch: int = rec.epoch + 1) -> list[dict]:
                return [h for h in c.hooks() if h["epoch"] == epoch and h["role"] == "active"]
            hooks = await wait_until(moved, 10, "promote hook", interval=0.005)
            xs.append(hooks[0]["t"] - t0)
            # When did a quorum of observers (2 of the 3, the target's own
            # view counting once) publish "down"?  From each daemon's log.
            downs = sorted(
                datetime.fromisoformat(e["timestamp"]).timestamp()
                for d in c.daemons.values() for e in d.log_events()
                if e.get("event") == "observation changed" and e.get("target") == rec.region
                and e.get("verdict") == "down"
                and datetime.fromisoformat(e["timestamp"]).timestamp() >= t0)
            if len(downs) >= 2:
                overhead.append(hooks[0]["t"] - downs[1])
            await services[rec.region].start()
    finally:
        await c.close()
        for s in services.values():
            await s.stop()
        etcd.stop()
    window = INTERVAL * FALL
    r = row("health failover (service down -> promote hook started)", xs,
            f"detection window {window:.1f}s (interval {INTERVAL}s x fall {FALL})")
    o = row("  of which: quorum 'down' published -> promote hook started", overhead,
            "watch + snapshot + txn + watch + hook spawn; aim < 250 ms p99")
    return [r, o]
