"""Under load: sensor spam and a busy dashboard must not load etcd or slow a
failover (issue 18).

Three regions, one daemon each, a 3-member etcd and mosquitto.  For
``--load-s`` seconds (default 30) a spammer publishes as fast as it can up to
10,000 MQTT messages/s — changing runtimes of one UPS and 5,000 distinct
sensor names — and a dashboard asks ``GET /v1/status`` of every member at up
to 500 requests/s.  Meanwhile, once a second, a power event
(``generator_failed`` in the active region, then back) is timed from the
MQTT publish to the active record committed.  Printed: that latency under
load beside the same measured unloaded first (goal: p99 <= 2x), the etcd
writes/s the daemons caused and the power keys left in etcd (goal: <= one
write per sensor per second, keys bounded by ``max_sensors_per_region``),
each daemon's RSS growth (goal: flat) and CPU, and what the spammer and the
dashboard achieved (the 429s are the rate limit working).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint import TICK, _cpu_ticks, _rss_mib
from bench.takeover import pct, row
from devstack.stack import VIEWER_TOKEN, EtcdCluster, LocalCluster, Mosquitto, wait_until

REGIONS = {"east": 100, "west": 50, "central": 25}
SPAM_RATE = 10_000
STATUS_RATE = 500
NAMES = 5_000


async def _spam(port: int, until: float, sent: list[int]) -> None:
    """Sensor spam for west (never the active region): one UPS's runtime
    changing on every message, and NAMES distinct sensor names."""
    async with aiomqtt.Client("127.0.0.1", port, max_queued_outgoing_messages=100_000) as c:
        i = 0
        while time.monotonic() < until:
            started = time.monotonic()
            for _ in range(SPAM_RATE // 100):  # a 10 ms slice of the rate
                if i % 2:
                    topic = "failoverd/power/west/ups-spam"
                    body = {"state": "on_battery", "runtime_s": 50_000 - i % 40_000}
                else:
                    topic = f"failoverd/power/west/name{i % NAMES}"
                    body = {"state": "utility_ok"}
                await c.publish(topic, json.dumps({**body, "ts": time.time()}), qos=0)
                i += 1
            sent[0] = i
            await asyncio.sleep(max(0.01 - (time.monotonic() - started), 0))


async def _dashboard(apis: list[str], until: float, codes: dict[int, int]) -> None:
    headers = {"Authorization": f"Bearer {VIEWER_TOKEN}"}
    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as s:
        async def one(url: str) -> None:
            try:
                async with s.get(url + "/v1/status", headers=headers) as r:
                    await r.read()
                    codes[r.status] = codes.get(r.status, 0) + 1
            except (aiohttp.ClientError, TimeoutError):
                codes[0] = codes.get(0, 0) + 1
        i = 0
        while time.monotonic() < until:
            started = time.monotonic()
            burst = [one(apis[(i + k) % len(apis)]) for k in range(STATUS_RATE // 10)]
            i += len(burst)
            await asyncio.gather(*burst)
            await asyncio.sleep(max(0.1 - (time.monotonic() - started), 0))


async def _power_events(c: LocalCluster, port: int, until: float, n: int | None = None
                        ) -> list[float]:
    """generator_failed in the active region → record committed, repeatedly."""
    out: list[float] = []
    async with aiomqtt.Client("127.0.0.1", port) as mq:
        while time.monotonic() < until and (n is None or len(out) < n):
            rec = (await c.view()).active["app"]
            t0 = time.time()
            await mq.publish(f"failoverd/power/{rec.region}/gen",
                             json.dumps({"state": "generator_failed", "ts": t0}), qos=1)

            async def moved(epoch: int = rec.epoch) -> Any:
                kv = await c.store.get(c.keys.active("app"))
                return kv if kv and json.loads(kv.value)["epoch"] > epoch else None
            kv = await wait_until(moved, 20, "the power event's commit", interval=0.002)
            out.append(json.loads(kv.value)["since"] - t0)
            await mq.publish(f"failoverd/power/{rec.region}/gen",
                             json.dumps({"state": "utility_ok", "ts": time.time()}), qos=1)
            await asyncio.sleep(1.0)
    return out


async def _count_writes(c: LocalCluster, counts: list[int], stop: asyncio.Event) -> None:
    start = (await c.store.get_prefix(c.keys.prefix + "power/")).revision + 1
    async for batch in c.store.watch(c.keys.prefix + "power/", start):
        counts[0] += sum(1 for ev in batch if not ev.deleted)
        if stop.is_set():
            return


async def run(trials: int, ttl: int, load_s: float = 30.0) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="failoverd-bench-load-"))
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    broker = Mosquitto(work).start()
    c = LocalCluster(work, "bench-load", etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     ttl=ttl, mqtt=[broker.url], drain_s=0, log_level="info",
                     policy={"cooldown_s": 0, "max_evacuations_per_hour": 10_000,
                             "max_auto_failovers_per_group_per_hour": 10_000,
                             "power_grace_s": 600})
    try:
        for region in REGIONS:
            c.add(f"{region}-1", region)
        await c.wait_active("app", "east", 20)
        apis = [d.api for d in c.daemons.values()]
        quiet = await _power_events(c, broker.port, time.monotonic() + 120, n=trials)
        pids = {m: d.pid for m, d in c.daemons.items()}
        rss0 = {m: _rss_mib(p) for m, p in pids.items()}
        cpu0 = {m: _cpu_ticks(p) for m, p in pids.items()}
        writes, stop = [0], asyncio.Event()
        counter = asyncio.create_task(_count_writes(c, writes, stop))
        sent, codes = [0], {}
        t0 = time.monotonic()
        until = t0 + load_s
        results = await asyncio.gather(
            _spam(broker.port, until, sent), _dashboard(apis, until, codes),
            _power_events(c, broker.port, until))
        took = time.monotonic() - t0
        loaded = results[2]
        stop.set()
        counter.cancel()
        rss1 = {m: _rss_mib(p) for m, p in pids.items()}
        cpu = {m: (_cpu_ticks(p) - cpu0[m]) / TICK / took * 100 for m, p in pids.items()}
        keys = len((await c.store.get_prefix(c.keys.prefix + "power/")).kvs)
    finally:
        await c.close()
        broker.stop()
        etcd.stop()
    goal = 2 * pct(quiet, 99)
    served = codes.get(200, 0)
    return [
        row("load: power publish -> record committed, unloaded", quiet,
            "the same cluster before the load"),
        row("load: power publish -> record committed, under load", loaded,
            f"goal p99 <= 2x unloaded = {goal * 1000:.1f} ms "
            + ("MET" if pct(loaded, 99) <= goal else "MISSED")),
        {"benchmark": "load: etcd writes/s caused by the power relays", "unit": "/s",
         "samples": 1, "p50": round(writes[0] / took, 1), "p99": round(writes[0] / took, 1),
         "min": 0, "max": 0, "stdev": 0,
         "floor": f"{sent[0] / took:.0f} msgs/s published ({NAMES} names + one UPS); "
                  f"{keys} power keys in etcd after (3 members x max_sensors_per_region 64 "
                  "+ the event sensors)"},
        {"benchmark": "load: RSS growth per daemon over the load", "unit": "MiB",
         "samples": len(rss1), "p50": round(max(rss1[m] - rss0[m] for m in rss1), 1),
         "p99": round(max(rss1[m] - rss0[m] for m in rss1), 1), "min": 0, "max": 0, "stdev": 0,
         "floor": ", ".join(f"{m} {rss0[m]:.0f}->{rss1[m]:.0f}" for m in rss1)},
        {"benchmark": "load: CPU per daemon under load", "unit": "%", "samples": len(cpu),
         "p50": round(max(cpu.values()), 1), "p99": round(max(cpu.values()), 1), "min": 0,
         "max": 0, "stdev": 0, "floor": ", ".join(f"{m} {v:.0f}%" for m, v in cpu.items())},
        {"benchmark": "load: dashboard GET /v1/status answers", "unit": "/s", "samples": 1,
         "p50": round(served / took, 1), "p99": round(sum(codes.values()) / took, 1),
         "min": 0, "max": 0, "stdev": 0,
         "floor": "p50 = served (200), p99 = asked; by status: "
                  + ", ".join(f"{k}: {v}" for k, v in sorted(codes.items()))},
    ]
