"""Runs every benchmark and prints one table (``--json`` for JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (
    chaos,
    database,
    evacuate,
    footprint,
    health,
    load,
    power,
    routers,
    takeover,
)


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=20,
                    help="samples per row (load: one event a second for --load-s instead)")
    ap.add_argument("--ttl", type=int, default=2, help="lease TTL (s) of the bench clusters")
    ap.add_argument("--only", choices=("takeover", "health", "power", "routers", "footprint",
                                       "evacuate", "load", "chaos", "database"),
                    action="append",
                    help="chaos and database run only when named (chaos takes ~45 s per "
                         "schedule; database ~15 min: Patroni's defaults wait 30 s a run)")
    ap.add_argument("--schedules", type=int, default=200, help="chaos: how many schedules")
    ap.add_argument("--first-seed", type=int, default=1000, help="chaos: the first seed")
    ap.add_argument("--groups", type=int, action="append",
                    help="evacuate: group counts to measure (default 10, 100, 1000)")
    ap.add_argument("--footprint-s", type=float, default=60.0,
                    help="how long the footprint is sampled (default 60 s)")
    ap.add_argument("--load-s", type=float, default=30.0,
                    help="load: how long the spam and the dashboard run, and the unloaded "
                         "phase before them (default 30 s)")
    ap.add_argument("--db-runs", type=int, default=10,
                    help="database: runs per system and scenario (default 10)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    for name, mod in (("takeover", takeover), ("health", health), ("power", power),
                      ("routers", routers)):
        if not args.only or name in args.only:
            rows += await mod.run(args.trials, args.ttl)
    if not args.only or "footprint" in args.only:
        rows += await footprint.run(args.trials, args.ttl, args.footprint_s)
    if not args.only or "evacuate" in args.only:
        rows += await evacuate.run(args.ttl, args.groups or [10, 100, 1000])
    if not args.only or "load" in args.only:
        rows += await load.run(args.ttl, args.load_s)
    if args.only and "database" in args.only:
        rows += await database.run(args.ttl, args.db_runs)
    if args.only and "chaos" in args.only:
        rows += await chaos.run(args.schedules, args.first_seed)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'benchmark':<62}{'n':>4}{'p50':>9}{'p99':>9}{'min':>9}{'max':>9}  unit  floor")
    for r in rows:
        print(f"{r['benchmark']:<62}{r['samples']:>4}{r['p50']:>9}{r['p99']:>9}"
              f"{r['min']:>9}{r['max']:>9}  {r['unit']:<4}  {r['floor']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
