"""failoverctl: look at a failoverd cluster.

This first cut reads etcd directly (endpoints and cluster from ``--config``
or ``--etcd``/``--cluster``); the REST client with operator actions replaces
it when the API lands.  Exit codes: 0 ok, 2 usage, 3 store unreachable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from failoverd.config import ConfigError, EtcdSettings, load_settings
from failoverd.etcd import EtcdStore
from failoverd.history import read_history
from failoverd.model import Keyspace, parse_view
from failoverd.store import StoreError

EXIT_OK, EXIT_USAGE, EXIT_UNREACHABLE = 0, 2, 3


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="failoverctl", description="Inspect a failoverd cluster.")
    p.add_argument("--config", "-c", type=Path, help="a failoverd config file")
    p.add_argument("--etcd", help="comma-separated etcd endpoints (instead of --config)")
    p.add_argument("--cluster", help="cluster name (instead of --config)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="coordinator, members and active regions")
    h = sub.add_parser("history", help="audit events, newest first")
    h.add_argument("--limit", type=int, default=20)
    return p


def _ago(ts: float) -> str:
    return f"{max(time.time() - ts, 0):.1f}s ago"


async def _status(store: EtcdStore, keys: Keyspace) -> dict[str, object]:
    view = parse_view(keys, await store.snapshot(keys.prefix, exclude=("history/",)))
    return {
        "cluster": keys.cluster,
        "revision": view.revision,
        "coordinator": ({"member": view.coordinator.member, "term": view.coordinator.term}
                        if view.coordinator else None),
        "members": [{"member": m.member, "region": m.region, "version": m.version,
                     "started": m.started} for m in sorted(view.members.values(),
                                                           key=lambda m: m.member)],
        "groups": {g: {"region": r.region, "epoch": r.epoch, "since": r.since,
                       "reason": r.reason, "trigger": r.trigger, "term": r.term}
                   for g, r in sorted(view.active.items())},
        "paused": view.control.paused,
        "drained": sorted(view.control.drained),
    }


def _print_status(st: dict[str, object]) -> None:
    coord = st["coordinator"]
    print(f"cluster {st['cluster']}  revision {st['revision']}  paused {st['paused']}  "
          f"drained {', '.join(st['drained']) or '-'}")  # type: ignore[arg-type]
    if isinstance(coord, dict):
        print(f"coordinator {coord['member']} (term {coord['term']})")
    else:
        print("coordinator: none")
    print(f"\n{'MEMBER':<16}{'REGION':<12}{'VERSION':<10}UP")
    for m in st["members"]:  # type: ignore[attr-defined]
        print(f"{m['member']:<16}{m['region']:<12}{m['version']:<10}{_ago(m['started'])}")
    print(f"\n{'GROUP':<14}{'ACTIVE':<10}{'EPOCH':<7}{'SINCE':<14}REASON")
    for g, r in st["groups"].items():  # type: ignore[attr-defined]
        print(f"{g:<14}{r['region']:<10}{r['epoch']:<7}{_ago(r['since']):<14}{r['reason']}")


def _print_history(events: list[dict[str, object]]) -> None:
    for ev in events:
        ts = ev.get("ts")
        when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, float) else "?"
        rest = {k: v for k, v in ev.items() if k not in {"ts", "kind", "member", "member_region"}}
        detail = " ".join(f"{k}={v}" for k, v in sorted(rest.items()))
        print(f"{when}  {ev.get('member', '?'):<12}{ev.get('kind', '?'):<26}{detail}")


async def _run(args: argparse.Namespace, etcd: EtcdSettings, cluster: str) -> int:
    store = EtcdStore(etcd)
    keys = Keyspace(cluster)
    try:
        if args.command == "status":
            st = await _status(store, keys)
            print(json.dumps(st, indent=2)) if args.output == "json" else _print_status(st)
        else:
            events = await read_history(store, keys, args.limit)
            print(json.dumps(events, indent=2)) if args.output == "json" else _print_history(
                events)
    except StoreError as exc:
        print(f"failoverctl: etcd unreachable: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    finally:
        await store.close()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.config is not None:
        try:
            settings = load_settings(args.config)
        except ConfigError as exc:
            print(f"failoverctl: {exc}", file=sys.stderr)
            return EXIT_USAGE
        etcd, cluster = settings.etcd, settings.cluster
    elif args.etcd and args.cluster:
        etcd, cluster = EtcdSettings(endpoints=args.etcd.split(","), timeout_s=2.0), args.cluster
    else:
        parser.print_usage(sys.stderr)
        print("failoverctl: give --config, or --etcd and --cluster", file=sys.stderr)
        return EXIT_USAGE
    return asyncio.run(_run(args, etcd, cluster))


if __name__ == "__main__":
    raise SystemExit(main())
