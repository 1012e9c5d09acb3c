"""Power-event latency: MQTT publish of ``generator_failed`` in the active
region → active record committed → promote hook started.  Printed beside the
floor measured raw in the same run: one MQTT publish→receive, two etcd
put→watch-event hops and one etcd txn (what the path cannot avoid).
"""

from __future__ import annotations

import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.takeover import pct, row
from devstack.stack import EtcdCluster, LocalCluster, Mosquitto, wait_until
from failoverd.config import EtcdSettings
from failoverd.core.store import Compare, Put
from failoverd.etcd.client import EtcdStore

REGIONS = {"east": 100, "west": 90}


async def _floor(etcd: EtcdCluster, broker: Mosquitto, trials: int) -> dict[str, float]:
    store = EtcdStore(EtcdSettings(endpoints=etcd.endpoints, timeout_s=2))
    mqtt_rt, hop, txn = [], [], []
    try:
        async with aiomqtt.Client("127.0.0.1", broker.port) as sub, \
                aiomqtt.Client("127.0.0.1", broker.port) as pub:
            await sub.subscribe("floor/#", qos=1)
            for i in range(trials):
                t0 = time.perf_counter()
                await pub.publish(f"floor/{i}", b"x", qos=1)
                async for _ in sub.messages:
                    break
                mqtt_rt.append(time.perf_counter() - t0)
        # One long-lived watch, as the daemons have: each hop is put -> event.
        arrivals: asyncio.Queue[float] = asyncio.Queue()

        async def watch() -> None:
            start = await store.put("/floor/k", "start")
            async for _ in store.watch("/floor/k", start):
                arrivals.put_nowait(time.perf_counter())
        task = asyncio.create_task(watch())
        await arrivals.get()  # the watch is established
        for i in range(trials):
            t0 = time.perf_counter()
            await store.put("/floor/k", str(i))
            hop.append(await arrivals.get() - t0)
            t0 = time.perf_counter()
            await store.txn([Compare("/floor/k", "create", 0)], [Put("/floor/x", "1")])
            txn.append(time.perf_counter() - t0)
        task.cancel()
    finally:
        await store.close()
    return {"mqtt": pct(mqtt_rt, 50), "hop": pct(hop, 50), "txn": pct(txn, 50)}


async def run(trials: int, ttl: int) -> list[dict[str, object]]:
    work = Path(tempfile.mkdtemp(prefix="failoverd-bench-power-"))
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    broker = Mosquitto(work).start()
    c = LocalCluster(work, "bench-power", etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     ttl=ttl, mqtt=[broker.url], drain_s=0,
                     policy={"cooldown_s": 0, "max_evacuations_per_hour": 10_000,
                             "max_auto_failovers_per_group_per_hour": 10_000,
                             "bootstrap_grace_s": 1, "power_grace_s": 600})
    to_commit: list[float] = []
    to_hook: list[float] = []
    try:
        floor = await _floor(etcd, broker, 20)
        c.add("e1", "east")
        c.add("w1", "west")
        await c.wait_active("app", "east", 20)
        committed: dict[int, float] = {}

        async def watch_commits() -> None:
            start = (await c.store.get_prefix(c.keys.groups)).revision + 1
            async for batch in c.store.watch(c.keys.active("app"), start):
                for ev in batch:
                    if not ev.deleted:
                        committed[json.loads(ev.value)["epoch"]] = time.time()
        watcher = asyncio.create_task(watch_commits())
        async with aiomqtt.Client("127.0.0.1", broker.port) as mq:
            for region in REGIONS:  # every sensor starts normal
                await mq.publish(f"failoverd/power/{region}/gen",
                                 json.dumps({"state": "utility_ok", "ts": time.time()}), qos=1)
            for _ in range(trials):
                rec = (await c.view()).active["app"]

                async def settled(epoch: int = rec.epoch) -> bool:
                    kv = await c.store.get(c.keys.workflow("app"))
                    wf = json.loads(kv.value) if kv else {}
                    return wf.get("epoch") == epoch and wf.get("state") == "done"
                await wait_until(settled, 20, "the last failover's saga done")
                await wait_until(lambda: _normal(c), 10, "power normal everywhere")
                t0 = time.time()
                await mq.publish(f"failoverd/power/{rec.region}/gen",
                                 json.dumps({"state": "generator_failed", "ts": t0}), qos=1)

                async def hooked(epoch: int = rec.epoch + 1) -> list[dict]:
                    return [h for h in c.hooks() if h["epoch"] == epoch and h["role"] == "active"]
                hooks = await wait_until(hooked, 10, "promote hook", interval=0.005)
                to_hook.append(hooks[0]["t"] - t0)
                to_commit.append(committed[rec.epoch + 1] - t0)
                await mq.publish(f"failoverd/power/{rec.region}/gen",
                                 json.dumps({"state": "utility_ok", "ts": time.time()}), qos=1)
        watcher.cancel()
    finally:
        await c.close()
        broker.stop()
        etcd.stop()
    raw = floor["mqtt"] + 2 * floor["hop"] + floor["txn"]
    note = (f"floor {raw * 1000:.1f} ms = mqtt {floor['mqtt'] * 1000:.1f} + 2 x put->watch "
            f"{floor['hop'] * 1000:.1f} + txn {floor['txn'] * 1000:.1f}; "
            f"target p99 < {(2 * raw * 1000 + 50):.1f} ms")
    return [row("power event: MQTT publish -> record committed", to_commit, note),
            row("power event: MQTT publish -> promote hook started", to_hook,
                note + " (drain_s = 0; a planned switchover adds drain_s here)")]


async def _normal(c: LocalCluster) -> bool:
    v = await c.view()
    return bool(v.power) and all(r.state == "utility_ok" for rs in v.power.values() for r in rs)
