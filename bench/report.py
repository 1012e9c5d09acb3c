"""Runs every benchmark and prints one table (``--json`` for JSON)."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import health, power, routers, takeover


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--ttl", type=int, default=2, help="lease TTL (s) of the bench clusters")
    ap.add_argument("--only", choices=("takeover", "health", "power", "routers"),
                    action="append")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    rows: list[dict[str, object]] = []
    for name, mod in (("takeover", takeover), ("health", health), ("power", power),
                      ("routers", routers)):
        if not args.only or name in args.only:
            rows += await mod.run(args.trials, args.ttl)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'benchmark':<60}{'n':>4}{'p50 ms':>9}{'p99 ms':>9}{'min':>8}{'max':>8}  floor")
    for r in rows:
        print(f"{r['benchmark']:<60}{r['trials']:>4}{r['p50_ms']:>9}{r['p99_ms']:>9}"
              f"{r['min_ms']:>8}{r['max_ms']:>8}  {r['floor']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
