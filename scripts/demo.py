"""Local multi-region demo: a 3-member etcd, three regions of failoverd, and
the loss of the active region, with the timeline printed.

Everything runs on 127.0.0.1 under ./.demo/.  On a terminal it leaves the
cluster running for ``failoverctl`` until Ctrl-C; otherwise (or with
``--exit``) it stops when the scenario is done.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import OPERATOR_TOKEN, EtcdCluster, LocalCluster, wait_until

ROOT = Path(__file__).resolve().parent.parent
REGIONS = {"east": 100, "west": 50, "central": 25}
MEMBERS = {"east-1": "east", "east-2": "east", "west-1": "west", "west-2": "west",
           "central-1": "central"}


def say(msg: str) -> None:
    print(msg, flush=True)


async def scenario_region_loss(c: LocalCluster, etcd: EtcdCluster, ttl: int) -> None:
    say(f"==> starting etcd (3 members: {', '.join(etcd.endpoints)})")
    say(f"==> starting failoverd: {', '.join(f'{m} ({r})' for m, r in MEMBERS.items())}")
    for m, r in MEMBERS.items():
        c.add(m, r)
    rec = await c.wait_active("app", "east", 20)
    coord = await c.wait_coordinator(10)
    await wait_until(lambda: _members(c), 10, "all members registered")
    say(f"    coordinator {coord.member} (term {coord.term}); app active in {rec.region} "
        f"(epoch {rec.epoch})")
    await _status(c)

    say(f"\n==> kill -9 every daemon of the active region (east); lease TTL {ttl}s")
    t0 = time.time()
    for m, r in MEMBERS.items():
        if r == "east":
            c.daemons[m].kill9()
    new = await c.wait_active("app", "west", ttl + 10)

    async def promoted() -> bool:
        return sum(1 for h in c.hooks() if h["epoch"] == new.epoch and h["role"] == "active"
                   ) >= 2
    await wait_until(promoted, 10, "west promote hooks")
    say("\n==> timeline (seconds after the kill)")
    lines: list[tuple[float, str]] = []
    for e in await c.history():
        if e["ts"] >= t0:
            detail = {k: v for k, v in e.items()
                      if k in {"term", "epoch", "region", "previous_region", "reason"}}
            lines.append((e["ts"], f"{e['member']:<10} {e['kind']:<22} "
                          + " ".join(f"{k}={v}" for k, v in detail.items())))
    lines += [(h["t"], f"{h['member']:<10} {'hook ran':<22} role={h['role']} "
                       f"epoch={h['epoch']}") for h in c.hooks() if h["t"] >= t0]
    for ts, text in sorted(lines):
        say(f"  +{ts - t0:6.3f}s  {text}")
    say(f"\n    app moved east -> {new.region}, epoch {rec.epoch} -> {new.epoch}, "
        f"{new.since - t0:.2f}s after the kill (lease TTL {ttl}s)")
    await _status(c)


async def _members(c: LocalCluster) -> bool:
    return len((await c.view()).members) == len(MEMBERS)


async def _status(c: LocalCluster) -> None:
    api = next(d.api for d in c.daemons.values() if d.alive())
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "failoverd.ctl", "--api", api, "--token", OPERATOR_TOKEN,
        "status", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    say("\n" + "\n".join("    " + line for line in out.decode().splitlines()))


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--exit", action="store_true", help="stop when the scenario is done")
    ap.add_argument("--ttl", type=int, default=2, help="lease TTL in seconds (default 2)")
    ap.add_argument("--workdir", type=Path, default=ROOT / ".demo",
                    help="where etcd data, configs and logs go (wiped first)")
    args = ap.parse_args()
    work = args.workdir
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    c = LocalCluster(work, "demo", etcd.endpoints, REGIONS, {"app": list(REGIONS)},
                     ttl=args.ttl, policy={"member_loss_grace_s": 0})
    try:
        await scenario_region_loss(c, etcd, args.ttl)
        if not args.exit and sys.stdin.isatty():
            api = next(d.api for d in c.daemons.values() if d.alive())
            say(f"\n==> cluster left running.  Try:\n"
                f"    export FAILOVERD_API={api} FAILOVERD_TOKEN={OPERATOR_TOKEN}\n"
                f"    .venv/bin/failoverctl status\n"
                f"    .venv/bin/failoverctl history\n"
                f"    .venv/bin/failoverctl switchover app --to central\n"
                f"    logs: {work}/*.log\n"
                f"Press Ctrl-C to stop everything.")
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            loop.add_signal_handler(signal.SIGINT, stop.set)
            loop.add_signal_handler(signal.SIGTERM, stop.set)
            await stop.wait()
    finally:
        say("==> stopping")
        await c.close()
        etcd.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
