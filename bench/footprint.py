"""The daemon's footprint at rest: CPU % and RSS of each daemon, sampled every
5 s for --footprint-s seconds (default 60), in a steady cluster of three
regions, one daemon each, every region probed over HTTP every second by every
daemon, all connected to mosquitto, production defaults otherwise (lease TTL
5 s, tick 1 s, log level info).

The floor beside it is a bare interpreter with the same imports doing the
probing alone (3 HTTP GETs a second with aiohttp), measured in the same run.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.takeover import pct, row
from bench.workdirs import py_spy, work_dir
from devstack.stack import EtcdCluster, HttpService, LocalCluster, Mosquitto, wait_until

REGIONS = {"east": 100, "west": 50, "central": 25}
TICK = os.sysconf("SC_CLK_TCK")
GOAL_PCT = 1.0  # issue 17: a daemon at rest, one group (1,000 groups: the evacuate bench)
FLOOR_SCRIPT = """
import asyncio, sys, time
import aiohttp, aiomqtt, etcd3aio, structlog, pydantic, prometheus_client  # same imports
import failoverd.daemon.wiring
async def main(urls, seconds):
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession() as s:
        print("ready", flush=True)
        while time.monotonic() < end:
            for u in urls:
                async with s.get(u) as r:
                    await r.read()
            await asyncio.sleep(1)
asyncio.run(main(sys.argv[2:], float(sys.argv[1])))
"""


def _cpu_ticks(pid: int) -> int:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def thread_ticks(pids: list[int]) -> dict[str, int]:
    """CPU ticks per thread name (``comm``: the main thread is ``failoverd``,
    gRPC's and the executors' threads have their own), summed over ``pids``."""
    out: dict[str, int] = {}
    for pid in pids:
        for task in Path(f"/proc/{pid}/task").iterdir():
            try:
                head, _, rest = (task / "stat").read_text().rpartition(")")
            except OSError:
                continue  # the thread ended
            name = head.split("(", 1)[1]
            fields = rest.split()
            out[name] = out.get(name, 0) + int(fields[11]) + int(fields[12])
    return out


def etcd_requests(etcd: EtcdCluster) -> dict[str, int]:
    """gRPC requests etcd received, per method, summed over its members
    (streams count each message: a keep-alive stream's renewals too)."""
    out: dict[str, int] = {}
    for m in etcd.members:
        with urllib.request.urlopen(m.metrics_url, timeout=5) as r:
            text = r.read().decode()
        for line in text.splitlines():
            if line.startswith("grpc_server_msg_received_total{"):
                method = line.split('grpc_method="', 1)[1].split('"', 1)[0]
                out[method] = out.get(method, 0) + int(float(line.rsplit(" ", 1)[1]))
    return out


WINDOW_S = 5.0  # CPU time is counted in 10 ms ticks: 5 s windows resolve 0.2 %


async def sample(pids: list[int], seconds: float) -> tuple[list[float], list[float]]:
    """CPU % and RSS (MiB) of each process, per window."""
    cpu: list[float] = []
    rss: list[float] = []
    last = {p: (_cpu_ticks(p), time.monotonic()) for p in pids}
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        await asyncio.sleep(WINDOW_S)
        for p in pids:
            ticks, now = _cpu_ticks(p), time.monotonic()
            cpu.append((ticks - last[p][0]) / TICK / (now - last[p][1]) * 100)
            rss.append(_rss_mib(p))
            last[p] = (ticks, now)
    return cpu, rss


async def run(trials: int, ttl: int, seconds: float = 60.0) -> list[dict[str, object]]:
    del trials, ttl  # a steady state is measured over time, at production defaults
    work = work_dir("failoverd-bench-footprint-")
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    broker = Mosquitto(work).start()
    apps = {r: await HttpService(r).start() for r in REGIONS}
    probes = {r: [{"kind": "http", "target": a.url, "interval_s": 1.0, "timeout_s": 0.5}]
              for r, a in apps.items()}
    c = LocalCluster(work, "bench-footprint", etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     ttl=5, probes=probes, mqtt=[broker.url], log_level="info",
                     policy={"tick_s": 1.0, "bootstrap_grace_s": 2})
    floor_proc = None
    try:
        for r in REGIONS:
            c.add(f"{r}-1", r)
        rec = await c.wait_active("app", "east", 30)

        async def settled() -> bool:
            wf = (await c.view()).workflows.get("app")
            return wf is not None and wf.epoch == rec.epoch and wf.state == "done"
        await wait_until(settled, 30, "the bootstrap saga")
        floor_proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", FLOOR_SCRIPT, str(seconds + 10),
            *(a.url for a in apps.values()), stdout=asyncio.subprocess.PIPE)
        assert floor_proc.stdout is not None
        async with asyncio.timeout(30):  # imports done: measure the steady state only
            await floor_proc.stdout.readline()
        pids = [d.pid for d in c.daemons.values()]
        profilers = py_spy(c.daemons, work, seconds, 100)  # FAILOVERD_BENCH_PROFILE=1
        threads0, t0 = thread_ticks(pids), time.monotonic()
        etcd0 = etcd_requests(etcd)
        (cpu, rss), (fcpu, frss) = await asyncio.gather(sample(pids, seconds),
                                                        sample([floor_proc.pid], seconds))
        threads1, took = thread_ticks(pids), time.monotonic() - t0
        etcd1 = etcd_requests(etcd)
        for p in profilers:
            p.wait()
    finally:
        if floor_proc is not None and floor_proc.returncode is None:
            floor_proc.kill()
            await floor_proc.wait()
        await c.close()
        for a in apps.values():
            await a.stop()
        broker.stop()
        etcd.stop()
    mean = sum(cpu) / len(cpu)
    return [
        row(f"footprint: CPU % per daemon at rest ({len(pids)} x {seconds:.0f} s, "
            f"mean {mean:.2f})", cpu,
            f"probing alone: p50 {pct(fcpu, 50):.2f} %, mean {sum(fcpu) / len(fcpu):.2f} %; "
            f"goal mean <= {GOAL_PCT:g} % at 1 group {'MET' if mean <= GOAL_PCT else 'MISSED'}",
            unit="%"),
        row("footprint: CPU % per daemon by thread", [mean], ", ".join(
            f"{name} {(n - threads0.get(name, 0)) / TICK / took / len(pids) * 100:.2f}"
            for name, n in sorted(threads1.items(), key=lambda kv: threads0.get(kv[0], 0)
                                  - kv[1]) if n > threads0.get(name, 0)), unit="%"),
        row("footprint: etcd requests/s at rest, all daemons", [
            (sum(etcd1.values()) - sum(etcd0.values())) / took], ", ".join(
            f"{k} {(v - etcd0.get(k, 0)) / took:.2f}/s" for k, v in sorted(etcd1.items())
            if v > etcd0.get(k, 0)), unit="/s"),
        row("footprint: RSS per daemon", rss,
            f"same imports, probing alone: {max(frss):.1f} MiB", unit="MiB"),
    ]
