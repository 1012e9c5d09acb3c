"""``failoverd run --config FILE`` and ``failoverd check-config FILE``."""

from __future__ import annotations

import argparse
import asyncio
import sys
import tomllib
from pathlib import Path

from failoverd.config import ConfigError, Overrides, Settings, load_settings


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="failoverd", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    for name, helptext in (("run", "run the daemon"),
                           ("check-config", "validate a config file and exit")):
        sp = sub.add_parser(name, help=helptext)
        if name == "run":
            sp.add_argument("--config", "-c", type=Path, required=True)
        else:
            sp.add_argument("config", type=Path)
            sp.add_argument("--connect", action="store_true",
                            help="also try etcd, every broker and every route with the "
                                 "configured credentials (read-only), a line per endpoint")
        sp.add_argument("--member", help="member id (env FAILOVERD_MEMBER)")
        sp.add_argument("--region", help="this member's region (env FAILOVERD_REGION)")
        sp.add_argument("--api-listen", help="API host:port (env FAILOVERD_API_LISTEN)")
    return p


def _shared_file_stand_ins(path: Path, overrides: Overrides) -> tuple[Overrides, str]:
    """check-config on the file every member shares: it need not name a
    member or region (each daemon gets them from flags or the environment);
    check it with stand-ins, and say so."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return overrides, ""  # load_settings reports it properly
    missing = []
    if "member" not in raw and not overrides.member:
        overrides = Overrides("check-config", overrides.region, overrides.api_listen)
        missing.append("member")
    regions = raw.get("regions")
    first = regions[0].get("name") if isinstance(regions, list) and regions and isinstance(
        regions[0], dict) else None
    if "region" not in raw and not overrides.region and isinstance(first, str):
        overrides = Overrides(overrides.member, first, overrides.api_listen)
        missing.append("region")
    if not missing:
        return overrides, ""
    return overrides, (f"; shared file: no {' or '.join(missing)} in it, each daemon gets "
                       f"{'them' if len(missing) > 1 else 'it'} from --member/--region or "
                       "FAILOVERD_MEMBER/FAILOVERD_REGION")


def _site_loss_timing(s: Settings) -> str:
    """How long a group waits to leave a region whose members vanished:
    detection (lease TTL + member-loss grace), then the old members'
    self-fence deadline (rule 4), whichever is later."""
    from failoverd.daemon.isolation import self_fence_deadline  # noqa: PLC0415

    ttl, p = s.etcd.lease_ttl_s, s.policy
    detect = ttl + p.member_loss_grace_s
    # Seconds from the loss: members vanish after the TTL, the move is
    # decided at detection; the saga's own formula gives the promotion.
    fence = self_fence_deadline(ttl, detect, p.isolation_grace_s, s.peer_timeout_s)
    return (f"site loss: member loss after ~{detect:g}s (lease_ttl_s {ttl} + "
            f"member_loss_grace_s {p.member_loss_grace_s:g}); promotion elsewhere after "
            f"~{fence:g}s (the old members' self-fence deadline: lease + "
            f"isolation_grace_s {p.isolation_grace_s:g} + checks + peer timeout "
            f"{s.peer_timeout_s:g}s)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    overrides = Overrides(args.member, args.region, args.api_listen).over(Overrides.from_env())
    shared = ""
    if args.command == "check-config":
        overrides, shared = _shared_file_stand_ins(args.config, overrides)
    try:
        settings = load_settings(args.config, overrides)
    except ConfigError as exc:
        print(f"{exc.path}: {len(exc.errors)} error(s)", file=sys.stderr)
        for err in exc.errors:
            print(f"  {err}", file=sys.stderr)
        return 1
    for warning in settings.policy.deprecations():
        print(f"{args.config}: warning: {warning}", file=sys.stderr)
    needed, later = settings.unreadable_files()
    for problem in later:
        print(f"{args.config}: warning: {problem} (needed when a group fails over)",
              file=sys.stderr)
    if needed:
        # A clear error and exit 1, never a traceback (and, under systemd,
        # ExecStartPre=check-config stops the restart loop before it starts).
        print(f"{args.config}: {len(needed)} error(s)", file=sys.stderr)
        for problem in needed:
            print(f"  {problem}", file=sys.stderr)
        return 1
    if args.command == "check-config":
        print(f"{args.config}: ok (cluster {settings.cluster}, {len(settings.regions)} regions, "
              f"{len(settings.groups)} groups{shared})")
        print(_site_loss_timing(settings))
        if args.connect:
            from failoverd.cli.connectcheck import connect_check  # noqa: PLC0415
            results = asyncio.run(connect_check(settings))
            for r in results:
                print(r.line())
            failed = sum(not r.ok and not r.warning for r in results)
            warned = sum(not r.ok and r.warning for r in results)
            print(f"{len(results)} endpoint(s), {failed} failed"
                  + (f", {warned} warning(s)" if warned else ""))
            return 1 if failed else 0
        return 0
    from failoverd.daemon.wiring import Daemon  # noqa: PLC0415 - keeps check-config light
    from failoverd.logs import setup_logging  # noqa: PLC0415

    setup_logging(settings.log.level, settings.log.format)

    async def _run() -> None:
        # Built inside the loop: the gRPC channel binds to the running loop.
        await Daemon(settings, args.config, overrides).run()

    asyncio.run(_run())
    return 0
