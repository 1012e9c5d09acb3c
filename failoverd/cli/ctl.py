"""failoverctl: the operator's CLI, a client of the REST API.

API URL from ``--api``, ``FAILOVERD_API`` or the config (``api.advertise_url``,
else ``api.listen``); token from ``--token``, ``FAILOVERD_TOKEN`` or ``--token-file``.  Exit
codes: 0 ok, 1 refused (401/403/409), 2 usage (bad arguments, 400/404/413),
3 unreachable (no answer, 5xx).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from failoverd.config import ConfigError, load_settings
from failoverd.core.data import format_bytes
from failoverd.core.durations import format_duration, parse_duration

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# How long ``drill --live`` follows a drill past its hold (two sagas).
LIVE_FOLLOW_SLACK_S = 1800.0


def _parser() -> argparse.ArgumentParser:
    # No abbreviations: "--to" must never be read as "--token".
    p = argparse.ArgumentParser(prog="failoverctl", description="Operate a failoverd cluster.",
                                allow_abbrev=False)
    p.add_argument("--api", help="API base URL (env FAILOVERD_API)")
    p.add_argument("--token", help="bearer token (env FAILOVERD_TOKEN)")
    p.add_argument("--token-file", type=Path, help="file holding the bearer token")
    p.add_argument("--config", "-c", type=Path, help="a failoverd config (for the API URL)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("--timeout", type=float, default=15.0)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="regions, groups and the coordinator")
    sub.add_parser("power", help="per region: every power sensor and source, the rule that "
                   "applies to it, and what the engine concludes")
    h = sub.add_parser("history", help="audit events, newest first")
    h.add_argument("--limit", type=int, default=20)
    for name in ("switchover", "failover"):
        sp = sub.add_parser(name, help=f"{name} a group to a region")
        sp.add_argument("group")
        sp.add_argument("--to", required=True, help="target region")
        if name == "failover":
            sp.add_argument("--force", action="store_true", help="skip the candidate rules")
            sp.add_argument("--accept-data-loss", action="store_true",
                            help="with --force: the target's database is behind (or not "
                            "known to be current) and losing what it has not replayed is "
                            "accepted (the estimate is recorded)")
            sp.add_argument("--yes", "-y", action="store_true", help="do not ask")
    sub.add_parser("retry", help="run a group's failed saga again from its failed step"
                   ).add_argument("group")
    sub.add_parser("pause", help="stop automatic actions")
    sub.add_parser("resume", help="resume automatic actions")
    dr = sub.add_parser("drill", help="dry run: would a power failure move GROUP to REGION, "
                        "and would it work? changes nothing (exit 0: every check passed); "
                        "--live: switch over for real, hold, and switch back")
    dr.add_argument("group")
    dr.add_argument("--to", help="the region to rehearse a failover to")
    dr.add_argument("--live", action="store_true",
                    help="a real planned switchover to REGION, a hold, and a switchover back "
                         "(only when the dry run passes; refused while paused or during a "
                         "failover); waits for the end unless --no-wait; Ctrl-C aborts")
    dr.add_argument("--hold", type=_duration, metavar="DURATION",
                    help="live: how long to stay in REGION (default 60s)")
    dr.add_argument("--no-wait", action="store_true", help="live: return once started")
    dr.add_argument("--abort", action="store_true",
                    help="end GROUP's live drill now (it switches back)")
    d = sub.add_parser("drain", help="take a region out of candidacy for a while")
    d.add_argument("region")
    d.add_argument("--for", dest="duration", metavar="DURATION", type=_duration,
                   help="how long: 90s, 15m, 4h, 3d (default: the cluster's "
                        "policy.drain_default_s; at most policy.drain_max_s)")
    sub.add_parser("undrain", help="return a region to candidacy").add_argument("region")
    return p


def _duration(text: str) -> str:
    try:
        parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return text


def _local(ts: float) -> str:
    """A timestamp in this machine's local time, with its zone."""
    return time.strftime("%Y-%m-%d %H:%M %Z", time.localtime(ts))


def _ago(ts: float) -> str:
    return f"{max(time.time() - ts, 0):.0f}s ago"


def evacuation_line(ev: dict[str, Any]) -> str:
    """One alert line per incident of the last hour."""
    if ev.get("kind") == "failback":
        return f"! failback {_ago(ev['at'])}: {ev.get('reason', '')}"
    held = f", {ev['held']} held" if ev.get("held") else ""
    return (f"! EVACUATED {ev['region']} {_ago(ev['at'])} ({ev['trigger']}): "
            f"{ev['groups']} group(s) moved{held} - {ev.get('reason', '')}")


def live_drill_line(d: dict[str, Any]) -> str:
    """A running live drill, as ``status`` shows it on top."""
    line = f"! LIVE DRILL {d['group']} {d['home']} -> {d['to']} by {d['by']}: {d['phase']}"
    if d["phase"] == "holding" and d.get("switched_at") is not None:
        left = max(d["switched_at"] + d["hold_s"] - time.time(), 0.0)
        line += f", {format_duration(left)} left"
    return line + (" (abort asked)" if d.get("abort_by") else "")


def print_status(st: dict[str, Any]) -> None:
    coord = st.get("coordinator") or {}
    print(f"cluster {st['cluster']}   coordinator {coord.get('member', '-')} "
          f"(term {coord.get('term', '-')})   paused {str(st['paused']).lower()}")
    for ev in st.get("evacuations", []):
        print(evacuation_line(ev))
    for d in st.get("live_drills", {}).values():
        if d["running"]:
            print(live_drill_line(d))
    for name, r in st["regions"].items():
        if r.get("drain"):
            d = r["drain"]
            print(f"! DRAINED {name} by {d['by']}, " + (
                f"{format_duration(d['left_s'])} left (until {_local(d['until'])})"
                if d["left_s"] is not None else "no end yet"))
    print(f"\n{'REGION':<12}{'HEALTH':<10}{'READY':<7}{'POWER':<14}{'DRAINED':<13}"
          f"{'ACTIVE FOR':<16}MEMBERS")
    for name, r in st["regions"].items():
        d = r.get("drain")
        drained = ("no" if not d else "expiring" if not r["drained"]
                   else "yes" if d["left_s"] is None else f"{format_duration(d['left_s'])} left")
        print(f"{name:<12}{r['health']['verdict']:<10}{str(r['health']['ready']).lower():<7}"
              f"{r['power']['state']:<14}{drained:<13}"
              f"{','.join(r['active_for']) or '-':<16}{','.join(r['members']) or '-'}")
    print(f"\n{'GROUP':<12}{'ACTIVE':<10}{'EPOCH':<7}{'SINCE':<12}{'WORKFLOW':<22}REASON")
    for name, g in st["groups"].items():
        a, wf = g.get("active"), g.get("workflow")
        flow = "-"
        if wf:
            step = next((s["name"] for s in wf["steps"] if s["state"] != "done"), "")
            flow = f"{wf['state']}{' at ' + step if step else ''}"
        if a is None:
            print(f"{name:<12}{'-':<10}{'-':<7}{'-':<12}{flow:<22}not bootstrapped")
        else:
            print(f"{name:<12}{a['region']:<10}{a['epoch']:<7}{_ago(a['since']):<12}"
                  f"{flow:<22}{a['reason']}")
        current = next((s for s in wf["steps"] if s["state"] != "done"), None) if wf else None
        if wf and wf["state"] == "running" and current and current.get("detail"):
            # What the saga waits for (a drain, the old region's self-fence).
            print(f"{'':<12}└ {current['name']}: {current['detail']}")
        for line in data_lines(g.get("data")):
            print(f"{'':<12}{line}")


def data_lines(data: dict[str, Any] | None) -> list[str]:
    """A database group's copies, one line per region (status)."""
    if not data:
        return []
    lines = []
    for region, d in data["regions"].items():
        lag = "" if d["lag_bytes"] is None else f", {format_bytes(d['lag_bytes'])} behind"
        secs = f", {d['lag_s']:.1f}s" if d.get("lag_s") else ""
        verdict = "can take over" if d["ok"] else f"NOT a candidate: {d['why']}"
        lines.append(f"db {region}: {d['role'] or 'no report'}{lag}{secs}"
                     f"{', replay paused' if d.get('paused') else ''} -> {verdict}")
    return lines


def _secs(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}s"


def print_power(st: dict[str, Any]) -> None:
    for name, r in st["regions"].items():
        p = r["power"]
        runtime = f", {p['runtime_s']:.0f}s left" if p.get("runtime_s") is not None else ""
        print(f"REGION {name}: power {p['state']}{runtime}   (failover budget "
              f"{p['budget_s']:.0f}s, power_quorum {p['quorum']})")
        if p.get("evidence"):
            print(f"  critical because: {', '.join(p['evidence'])}")
        elif p.get("minority"):
            print(f"  {len(p['minority'])} of {p['quorum']} sensors needed say critical: "
                  f"{', '.join(p['minority'])}")
        if p["sensors"]:
            print(f"  {'SENSOR':<14}{'SOURCE':<7}{'STATE':<18}{'RUNTIME':<9}{'CHARGE':<8}"
                  f"{'AGE':<7}{'RULE':<10}WHY")
            for x in p["sensors"]:
                charge = "-" if x["charge_pct"] is None else f"{x['charge_pct']:.0f}%"
                print(f"  {x['sensor']:<14}{x['source']:<7}{x['state']:<18}"
                      f"{_secs(x['runtime_s']):<9}{charge:<8}{_secs(x['age_s']):<7}"
                      f"{x['rule']:<10}{x['explanation']}")
                if x.get("detail"):
                    print(f"  {'':<14}└ {x['detail']}")
        else:
            print("  no sensor has said anything")
        refused = p.get("refused") or {}
        if refused.get("messages"):
            print(f"  REFUSED: {refused['messages']} message(s) from sensors past "
                  f"max_sensors_per_region, e.g. {', '.join(refused['names'])}"
                  + ("; now subscribed to the known sensors' topics only"
                     if refused.get("narrowed") else ""))
        for src in p.get("sources", []):
            poll = src.get("poll")
            how = ("polled elsewhere (by the region's members)" if poll is None
                   else "answering" if poll["ok"] else f"failing: {poll['reason']}")
            print(f"  source {src['sensor']} ({src['kind']} {src['target']}): "
                  f"{'reading relayed' if src['reading'] else 'NO READING'}; {how}")
        print()


def print_history(events: list[dict[str, Any]]) -> None:
    for ev in events:
        ts = ev.get("ts")
        when = time.strftime("%H:%M:%S", time.localtime(ts)) if isinstance(ts, float) else "?"
        rest = {k: v for k, v in ev.items()
                if k not in {"ts", "kind", "member", "member_region"} and v is not None}
        detail = " ".join(f"{k}={v}" for k, v in sorted(rest.items()))
        print(f"{when}  {ev.get('member', '?'):<12}{ev.get('kind', '?'):<24}{detail}")


def _api_url(args: argparse.Namespace) -> str | None:
    url = args.api or os.environ.get("FAILOVERD_API")
    if not url and args.config is not None:
        try:
            url = load_settings(args.config).api.url()
        except ConfigError as exc:
            print(f"failoverctl: {exc}", file=sys.stderr)
            return None
    return url.rstrip("/") if url else None


def _token(args: argparse.Namespace) -> str | None:
    if args.token:
        return str(args.token)
    if os.environ.get("FAILOVERD_TOKEN"):
        return os.environ["FAILOVERD_TOKEN"]
    if args.token_file is not None:
        return Path(args.token_file).read_text().strip()
    return None


def _request(args: argparse.Namespace) -> tuple[str, str, dict[str, Any] | None]:
    c = args.command
    if c in {"status", "power"}:
        return "GET", "/v1/status", None
    if c == "history":
        return "GET", f"/v1/history?limit={args.limit}", None
    if c == "switchover":
        return "POST", f"/v1/groups/{args.group}/switchover", {"to": args.to}
    if c == "failover":
        failover: dict[str, Any] = {"to": args.to, "force": args.force}
        if args.accept_data_loss:
            failover["accept_data_loss"] = True
        return "POST", f"/v1/groups/{args.group}/failover", failover
    if c == "retry":
        return "POST", f"/v1/groups/{args.group}/retry", None
    if c in {"pause", "resume"}:
        return "POST", f"/v1/{c}", None
    if c == "drill" and args.abort:
        return "POST", f"/v1/groups/{args.group}/drill/abort", None
    if c == "drill":
        body: dict[str, Any] = {"to": args.to}
        if args.live:
            body["live"] = True
            if args.hold:
                body["hold"] = args.hold
        return "POST", f"/v1/groups/{args.group}/drill", body
    if c == "drain":
        return ("POST", f"/v1/regions/{args.region}/drain",
                {"for": args.duration} if args.duration else None)
    return "DELETE", f"/v1/regions/{args.region}/drain", None


def exit_code(status: int) -> int:
    if status < 300:
        return EXIT_OK
    if status in {401, 403, 409}:
        return EXIT_REFUSED
    if status >= 500:
        return EXIT_UNREACHABLE
    return EXIT_USAGE


async def _call(url: str, token: str | None, method: str, path: str,
                body: dict[str, Any] | None, limit_s: float) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=limit_s)) as s, \
            s.request(method, url + path, json=body, headers=headers) as resp:
        try:
            data = await resp.json(content_type=None)
        except ValueError:
            data = {"error": "bad_response", "message": (await resp.text())[:200]}
        return resp.status, data


def print_drill(report: dict[str, Any], live: bool = False) -> None:
    """The checklist, the expected timeline, and the verdict."""
    print(f"DRILL {report['group']} -> {report['to']} "
          + ("(live: its dry run first)" if live else "(dry run: nothing changed)"))
    for c in report["checks"]:
        print(f"  {'✓' if c['ok'] else '✗'} {c['name']}: {c['detail']}")
    print("\nexpected timeline (planned switchover, as a power event starts it):")
    for step in report["timeline"]:
        took = "" if step["expected_s"] is None else f"{format_duration(step['expected_s'])}"
        print(f"  {step['step']:<18}{took:<8}{step['detail']}")
    failed = [c["name"] for c in report["checks"] if not c["ok"]]
    print("\nPASSED: every check" if report["ok"] else
          f"\nFAILED: {len(failed)} check(s): {', '.join(failed)}")


def _live_phase(d: dict[str, Any]) -> str:
    took = {"holding": d.get("out_s"), "done": d.get("back_s")}.get(d["phase"])
    return (f"  {time.strftime('%H:%M:%S')} {d['phase']}"
            + (f" (saga took {format_duration(took)})" if took is not None else "")
            + (f": {d['reason']}" if d.get("reason") else ""))


async def _follow_live(url: str, token: str | None, group: str, limit_s: float,
                       deadline_s: float) -> dict[str, Any] | None:
    """Poll the group's live drill until it ends, printing each phase; on
    Ctrl-C (cancellation) ask for an abort and keep following."""
    last = ""
    aborted = False
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        try:
            status, d = await _call(url, token, "GET", f"/v1/groups/{group}/drill", None,
                                    limit_s)
            if status == 200 and isinstance(d, dict):
                if d["phase"] != last:
                    last = d["phase"]
                    print(_live_phase(d), flush=True)
                if not d["running"]:
                    return d
            await asyncio.sleep(1.0)
        except asyncio.CancelledError:
            if aborted:
                raise
            aborted = True
            print("  aborting: switching back (Ctrl-C again stops watching)", flush=True)
            await _call(url, token, "POST", f"/v1/groups/{group}/drill/abort", None, limit_s)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            print(f"  (cannot reach {url}: {exc or type(exc).__name__}; retrying)",
                  file=sys.stderr, flush=True)
            await asyncio.sleep(1.0)
    return None  # not ended within the deadline


def _live_drill(args: argparse.Namespace, url: str, data: dict[str, Any]) -> int:
    if args.output != "json":
        print_drill(data["report"], live=True)
        print(f"\nLIVE DRILL {args.group} -> {args.to} started: {data.get('reason')} "
              f"[request {data['request']}]", flush=True)
    if args.no_wait:
        return EXIT_OK
    hold = parse_duration(args.hold) if args.hold else 60.0
    # asyncio.run turns the first Ctrl-C into a cancellation of the follower
    # (which asks for an abort and keeps following), the second into
    # KeyboardInterrupt.
    try:
        d = asyncio.run(_follow_live(url, _token(args), args.group, args.timeout,
                                        hold + LIVE_FOLLOW_SLACK_S))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("failoverctl: stopped watching; the drill goes on (failoverctl drill "
              f"{args.group} --abort ends it)", file=sys.stderr)
        return EXIT_REFUSED
    if d is None:
        print("failoverctl: the drill did not end in time; see failoverctl status",
              file=sys.stderr)
        return EXIT_UNREACHABLE
    if args.output == "json":
        print(json.dumps(d, indent=2))
    elif d["phase"] == "done":
        print(f"\nPASSED: {args.group} went to {d['to']} in "
              f"{format_duration(d.get('out_s') or 0)}, held "
              f"{format_duration(d['hold_s'])}, and came back to {d['home']} in "
              f"{format_duration(d.get('back_s') or 0)}")
    else:
        print(f"\nFAILED ({d['phase']}): {d.get('reason')}")
    return EXIT_OK if d["phase"] == "done" else EXIT_REFUSED


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "drill" and not args.abort and not args.to:
        print("failoverctl: drill needs --to REGION (or --abort)", file=sys.stderr)
        return EXIT_USAGE
    url = _api_url(args)
    if url is None:
        print("failoverctl: give --api, FAILOVERD_API or --config", file=sys.stderr)
        return EXIT_USAGE
    if args.command == "failover" and not args.yes:
        if not sys.stdin.isatty():
            print("failoverctl: failover needs --yes when not on a terminal", file=sys.stderr)
            return EXIT_USAGE
        answer = input(f"Fail {args.group} over to {args.to}"
                       f"{' (forced)' if args.force else ''}"
                       f"{', accepting data loss' if args.accept_data_loss else ''}? [y/N] ")
        if answer.strip().lower() not in {"y", "yes"}:
            print("aborted", file=sys.stderr)
            return EXIT_REFUSED
    method, path, body = _request(args)
    try:
        status, data = asyncio.run(_call(url, _token(args), method, path, body, args.timeout))
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        print(f"failoverctl: cannot reach {url}: {exc or type(exc).__name__}", file=sys.stderr)
        return EXIT_UNREACHABLE
    code = exit_code(status)
    if args.command == "drill" and args.live and code == EXIT_OK:
        return _live_drill(args, url, data)
    if args.command == "drill" and args.live and "report" in data and args.output != "json":
        print_drill(data["report"], live=True)
    if args.command == "drill" and code == EXIT_OK and not args.abort:
        if args.output == "json":
            print(json.dumps(data, indent=2))
        else:
            print_drill(data)
        return EXIT_OK if data["ok"] else EXIT_REFUSED  # a check failed: no pass
    if args.output == "json":
        if args.command == "power" and code == EXIT_OK:
            data = {name: r["power"] for name, r in data["regions"].items()}
        print(json.dumps(data, indent=2))
    elif code != EXIT_OK:
        print(f"failoverctl: {data.get('error')}: {data.get('message')}", file=sys.stderr)
    elif args.command == "status":
        print_status(data)
    elif args.command == "power":
        print_power(data)
    elif args.command == "history":
        print_history(data["events"])
    else:
        print(f"{data['status']}: {data.get('reason')}"
              + (f" (epoch {data['epoch']})" if data.get("epoch") else "")
              + f" [request {data['request']}]")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
