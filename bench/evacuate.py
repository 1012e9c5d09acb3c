"""Region evacuation at scale: G groups active in east, one ``generator_failed``.

For each G (default 10, 100, 1,000), on a fresh 3-member etcd, mosquitto and
3 daemons (east 100, west 50, south 10), default policy, ``drain_s = 0``, one
exec route per group, batch hooks (``hook_batch``; FAILOVERD_BENCH_HOOK_BATCH=0
runs one hook process per group, the product's default):

- bootstrap: daemons started → the last promote hook of the G groups ran;
- idle CPU per daemon (the busiest of the three) once every saga is done;
- MQTT publish → the last active record committed, → the last promote hook
  started in west, → the last saga done;
- the pure decision (``engine.decide``) at G groups, CPU time.

Each figure is printed with its ratio to G = 10 and the target at 1,000.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiomqtt

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.footprint import _cpu_ticks
from bench.workdirs import py_spy, work_dir
from devstack.stack import EtcdCluster, LocalCluster, Mosquitto, wait_until
from failoverd.core.engine import GroupPolicy, Policy, decide
from failoverd.core.model import ActiveRecord, ClusterView, ControlState, MemberRecord
from failoverd.core.power import Reading

REGIONS = {"east": 100, "west": 50, "south": 10}
TARGETS_1000 = {"commit": 1.0, "hook": 3.0, "saga": 10.0, "bootstrap": 10.0, "idle": 3.0,
                "decide": 0.05}
TICK = os.sysconf("SC_CLK_TCK")


def batch_hooks() -> bool:
    """The groups' hooks take many groups a run (``hook_batch``), as the
    README recommends for regions active for hundreds of groups;
    FAILOVERD_BENCH_HOOK_BATCH=0: one hook process per group (the default
    of the product, which every row then says)."""
    return os.environ.get("FAILOVERD_BENCH_HOOK_BATCH", "1") == "1"


def hook_mode() -> str:
    return "batch hooks" if batch_hooks() else "one hook process per group"


def decide_cpu_s(groups: int, repeat: int = 5) -> float:
    """CPU time of one ``decide`` that evacuates ``groups`` groups (best of N)."""
    now = 1_000_000.0
    members = {f"{r}-1": MemberRecord(f"{r}-1", r, "0", "", now - 3600) for r in REGIONS}
    policy = Policy(priorities=tuple(REGIONS.items()),
                    groups=tuple(GroupPolicy(f"g{i}", tuple(REGIONS)) for i in range(groups)),
                    cooldown_s=300, max_evacuations_per_hour=3, failback="manual",
                    failback_stable_s=300)
    view = ClusterView(
        revision=1, coordinator=None, members=members,
        active={f"g{i}": ActiveRecord("east", 3, now - 9999, "", 1, "bootstrap", 7)
                for i in range(groups)},
        control=ControlState(),
        power={("east", "gen"): [Reading("east", "gen", "generator_failed", now, now, None,
                                         None, now)]})
    best = float("inf")
    for _ in range(repeat):
        t0 = time.process_time()
        d = decide(view, replace(policy), now)
        best = min(best, time.process_time() - t0)
        assert len(d.changes) == groups
    return best


class Tracker:
    """Follows groups/ by one watch (polling 5,000 keys would load etcd more
    than the daemons do): when each record and each saga got where."""

    def __init__(self, c: LocalCluster) -> None:
        self.c = c
        self.active: dict[str, tuple[str, int, float]] = {}
        self.done: dict[tuple[str, int], float] = {}

    def _apply(self, key: str, value: str, now: float) -> None:
        name = key[len(self.c.keys.groups):].split("/", 1)[0]
        if key.endswith("/active"):
            d = json.loads(value)
            if self.active.get(name, ("", 0, 0.0))[:2] != (d["region"], d["epoch"]):
                self.active[name] = (d["region"], d["epoch"], now)
        elif key.endswith("/workflow"):
            d = json.loads(value)
            if d["state"] == "done":
                self.done.setdefault((name, d["epoch"]), now)

    async def run(self) -> None:
        snap = await self.c.store.get_prefix(self.c.keys.groups)
        for kv in snap.kvs:
            self._apply(kv.key, kv.value, time.time())
        async for batch in self.c.store.watch(self.c.keys.groups, snap.revision + 1):
            now = time.time()
            for ev in batch:
                if not ev.deleted:
                    self._apply(ev.key, ev.value, now)

    def in_region(self, region: str, epoch: int, n: int) -> bool:
        return sum(1 for r, e, _ in self.active.values() if r == region and e == epoch) >= n

    def sagas_done(self, epoch: int, n: int) -> bool:
        return sum(1 for (_, e) in self.done if e == epoch) >= n


class HookLog:
    """The hook log, read on from where the last look stopped: re-parsing
    thousands of lines four times a second cost the bench a tenth of a core,
    taken from the daemons it measures."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._offset = 0
        self.hooks: list[dict[str, Any]] = []

    def _read(self) -> list[dict[str, Any]]:
        if self._path.exists():
            with self._path.open("rb") as f:
                f.seek(self._offset)
                data = f.read()
            end = data.rfind(b"\n") + 1  # a line being written waits for the next look
            self._offset += end
            self.hooks += [json.loads(line) for line in data[:end].splitlines() if line.strip()]
        return self.hooks

    def done(self, epoch: int, n: int) -> bool:
        return len({(h["member"], h["group"]) for h in self._read()
                    if h["epoch"] == epoch}) >= n

    def last(self, member: str, epoch: int, n: int) -> float | None:
        hooks = [h for h in self._read()
                 if h["member"] == member and h["role"] == "active" and h["epoch"] == epoch]
        return max(h["t"] for h in hooks) if len({h["group"] for h in hooks}) >= n else None


async def one(groups: int, ttl: int) -> dict[str, Any]:
    work = work_dir(f"failoverd-bench-evac-{groups}-")
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    broker = Mosquitto(work).start()
    route = work / "route.sh"
    route.write_text("#!/bin/sh\nexit 0\n")
    route.chmod(0o755)
    c = LocalCluster(
        work, "bench-evac", etcd.endpoints, REGIONS,
        {f"g{i:04d}": list(REGIONS) for i in range(groups)}, ttl=5, etcd_timeout_s=2.0,
        mqtt=[broker.url], drain_s=0, log_level="info",
        policy={"cooldown_s": 300, "max_evacuations_per_hour": 3,
                "max_auto_failovers_per_group_per_hour": 3, "bootstrap_grace_s": 2,
                "member_loss_grace_s": 5, "tick_s": 1.0,
                **({"hook_nice": int(os.environ["FAILOVERD_BENCH_HOOK_NICE"])}
                   if os.environ.get("FAILOVERD_BENCH_HOOK_NICE") else {})},
        group_toml=(("hook_batch = true\n" if batch_hooks() else "")
                    + f'[[groups.routes]]\nkind = "exec"\ncommand = ["{route}"]\n'))
    out: dict[str, Any] = {}
    try:
        t0 = time.time()
        # The coordinator in south, neither the evacuated nor the target
        # region, so runs compare like with like.
        c.add("south-1", "south")
        await c.wait_coordinator(20)
        c.add("east-1", "east")
        c.add("west-1", "west")
        track = Tracker(c)
        hooks = HookLog(c.hook_log)
        tracker = asyncio.create_task(track.run())
        await wait_until(lambda: track.in_region("east", 1, groups), 120,
                         "records bootstrapped", interval=0.2)
        last = await wait_until(lambda: hooks.last("east-1", 1, groups), 300,
                                "every bootstrap promote", interval=0.2)
        out["bootstrap"] = last - t0
        await wait_until(lambda: track.sagas_done(1, groups), 300, "bootstrap sagas done",
                         interval=0.5)
        await wait_until(lambda: hooks.done(1, 3 * groups), 300,
                         "every bootstrap hook (the standbys' demotes too)", interval=0.5)
        await asyncio.sleep(3)  # let the last acks and history writes settle
        pids = [d.pid for d in c.daemons.values()]
        before = [_cpu_ticks(p) for p in pids]
        w0 = time.monotonic()
        await asyncio.sleep(10)
        spent = [(_cpu_ticks(p) - b) / TICK for p, b in zip(pids, before, strict=True)]
        out["idle"] = max(spent) / (time.monotonic() - w0) * 100

        # FAILOVERD_BENCH_PROFILE=S: S seconds from the power event on.
        profilers = py_spy(c.daemons, work, float(os.environ.get("FAILOVERD_BENCH_PROFILE") or 0),
                           200)
        cpu0 = _cpu_all(c, etcd)
        seat = (await c.view()).coordinator
        out["coordinator"] = seat.member if seat else "?"
        async with aiomqtt.Client("127.0.0.1", broker.port) as mq:
            t0 = time.time()
            await mq.publish("failoverd/power/east/gen",
                             json.dumps({"state": "generator_failed", "ts": t0}), qos=1)
        await wait_until(lambda: track.in_region("west", 2, groups), 60,
                         "every record committed", interval=0.05)
        out["commit"] = max(t for _, _, t in track.active.values()) - t0
        last = await wait_until(lambda: hooks.last("west-1", 2, groups), 300,
                                "every promote in west", interval=0.25)
        out["hook"] = last - t0
        await wait_until(lambda: track.sagas_done(2, groups), 300, "every saga done",
                         interval=0.1)
        out["saga"] = max(t for (_, e), t in track.done.items() if e == 2) - t0
        out["steps"] = _step_times(await c.history(5 * groups + 100), t0)
        cpu1 = _cpu_all(c, etcd)
        for k in cpu1:
            out[f"cpu:{k}"] = (cpu1[k] - cpu0.get(k, 0)) / TICK
        tracker.cancel()
        for p in profilers:
            p.wait()
    finally:
        await c.close()
        broker.stop()
        etcd.stop()
    out["decide"] = decide_cpu_s(groups)
    return out


def _step_times(events: list[dict[str, Any]], t0: float) -> dict[str, tuple[float, float]]:
    """Where the evacuation's time went: per saga step, the median and the
    last finish after the publish, from the sagas' ``workflow_done`` events
    ("created" is when the coordinator started the saga)."""
    by_step: dict[str, list[float]] = {}
    for e in events:
        if e.get("kind") != "workflow_done" or e.get("epoch") != 2:
            continue
        done = float(e["ts"])
        by_step.setdefault("created", []).append(done - float(e["duration_s"]) - t0)
        for st in e.get("steps", []):
            by_step.setdefault(str(st["step"]), []).append(float(st["finished"]) - t0)
    return {k: (sorted(v)[len(v) // 2], max(v)) for k, v in by_step.items()}


def _cpu_all(c: LocalCluster, etcd: EtcdCluster) -> dict[str, int]:
    ticks = {m: _cpu_ticks(d.pid) for m, d in c.daemons.items()}
    ticks["etcd x3"] = sum(_cpu_ticks(m.proc.pid) for m in etcd.members if m.proc)
    ticks["bench"] = _cpu_ticks(os.getpid())  # its watch and polls share the box
    return ticks


NAMES = {
    "bootstrap": "bootstrap: start -> last promote hook",
    "idle": "idle CPU, busiest daemon (% of a core)",
    "commit": "evacuation: MQTT publish -> last record committed",
    "hook": "evacuation: MQTT publish -> last promote hook started",
    "saga": "evacuation: MQTT publish -> last saga done",
    "decide": "decide() CPU, one evacuating cycle",
}


async def run(ttl: int, sizes: list[int]) -> list[dict[str, Any]]:
    results = {g: await one(g, ttl) for g in sizes}
    base = results.get(min(sizes))
    rows: list[dict[str, Any]] = []
    for key, name in NAMES.items():
        for g in sizes:
            v = results[g][key]
            unit = "%" if key == "idle" else "ms"
            shown = v if key == "idle" else v * 1000
            ratio = (v / base[key]) if base and base[key] else float("nan")
            target = TARGETS_1000[key]
            goal = (f"target at 1,000: <= {target:g}{' %' if key == 'idle' else ' s'}"
                    + ("" if g != 1000 else (" MET" if v <= target else " MISSED")))
            rows.append({"benchmark": f"{name} (G={g})", "unit": unit, "samples": 1,
                         "p50": round(shown, 2), "p99": round(shown, 2),
                         "min": round(shown, 2), "max": round(shown, 2), "stdev": 0.0,
                         "floor": f"x{ratio:.1f} of G={min(sizes)}; {goal}; {hook_mode()}"})
    for g in sizes:
        for step, (p50, last) in results[g]["steps"].items():
            rows.append({"benchmark": f"evacuation: publish -> step {step} finished (G={g})",
                         "unit": "ms", "samples": g, "p50": round(p50 * 1000, 1),
                         "p99": round(last * 1000, 1), "min": 0, "max": round(last * 1000, 1),
                         "stdev": 0.0, "floor": "where the time goes (p99 column: the last)"})
    for g in sizes:
        cpu = ", ".join(f"{k.removeprefix('cpu:')} {float(v):.1f} s"
                        for k, v in results[g].items() if k.startswith("cpu:"))
        rows.append({"benchmark": f"CPU during the evacuation (G={g})", "unit": "s",
                     "samples": 1, "p50": round(sum(float(v) for k, v in results[g].items()
                                                    if k.startswith("cpu:")), 1),
                     "p99": 0, "min": 0, "max": 0, "stdev": 0.0,
                     "floor": f"{cpu} (coordinator: {results[g]['coordinator']})"})
    return rows
