"""``failoverctl drill GROUP --to REGION``: a dry run on the live cluster that
changes nothing but the audit trail.

The pure judgement (:func:`failoverd.core.drill.drill_checks`: the real
engine on the real view with the active region's generator failed, the
target's members, health, readiness, power and drain, the learned failover
time against the budget) plus what needs I/O, read-only: each route's
precheck against the real resource (:mod:`failoverd.traffic.prechecks`), and
the promote hook on every member of the target region — each member checks
its own, asked over its API with the caller's token.  The report carries the
expected timeline of the planned saga.  A drill is recorded as a ``drill``
history event and in ``control/drills/<group>`` (its time feeds the
``failoverd_last_drill_timestamp_seconds`` gauge and the overdue alert).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import structlog

from failoverd.config import Settings, engine_policy
from failoverd.core.drill import Check, drill_checks
from failoverd.core.durations import format_duration
from failoverd.core.model import ClusterView, Keyspace, to_json
from failoverd.core.store import Store
from failoverd.daemon.coordinator import learn_failover_s
from failoverd.etcd.history import History
from failoverd.traffic.prechecks import Result, find_executable, route_check

log = structlog.get_logger("failoverd.daemon.drill")

CHECK_TIMEOUT_S = 5.0
HISTORY_FOR_LEARNING = 500


def hook_checks(settings: Settings, group: str) -> list[Check]:
    """This member's promote and demote hooks for ``group``: present and
    executable (what a member answers when a drill asks)."""
    spec = settings.group_by_name(group)
    if spec is None:
        return [Check("hooks", False, f"unknown group {group!r}")]
    out = []
    for role, argv in (("promote", spec.promote), ("demote", spec.demote)):
        name = f"{settings.member} {role} hook"
        if not argv:
            out.append(Check(name, True, "none configured"))
            continue
        path, problem = find_executable(argv[0])
        detail = (f"{path} not found" if problem == "not found"
                  else f"{path} is {problem or 'executable'}")
        out.append(Check(name, not problem, detail))
    return out


class Drill:
    """Runs dry-run drills for the API (operator requests, any member).
    Owns nothing; reads the member's view, history and config, asks peers
    over HTTP, and writes the audit trail.  Errors of a check are the
    check's result, never an exception."""

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 view: Callable[[], Awaitable[ClusterView]], history: History,
                 events: Callable[[int], Awaitable[list[dict[str, Any]]]]) -> None:
        self._store = store
        self._keys = keys
        self._settings = settings
        self._view = view
        self._history = history
        self._events = events

    async def dry_run(self, group: str, to: str, by: str, authorization: str
                      ) -> dict[str, Any]:
        s = self._settings()
        view = await self._view()
        now = time.time()
        learned = learn_failover_s(await self._events(HISTORY_FOR_LEARNING))
        checks, move = drill_checks(view, engine_policy(s), group, to, now, learned)
        spec = s.group_by_name(group)
        if spec is not None and to in spec.regions:
            checks += await self._routes(s, group)
            checks += await self._hooks(s, view, group, to, authorization)
        ok = all(c.ok for c in checks)
        timeline = self._timeline(s, view, group, to, learned) if spec is not None else []
        report = {"group": group, "to": to, "ok": ok, "at": now, "by": by,
                  "epoch": move.epoch if move else None,
                  "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in checks],
                  "timeline": timeline}
        failed = [c.name for c in checks if not c.ok]
        await self._history.record("drill", group=group, to=to, ok=ok, failed=failed,
                                   by=by, live=False)
        if spec is not None:
            await self._store.put(self._keys.drill(group), to_json(
                {"at": now, "ok": ok, "to": to, "by": by, "failed": failed}))
        log.info("drill", group=group, to=to, ok=ok, failed=failed, by=by)
        return report

    async def _routes(self, s: Settings, group: str) -> list[Check]:
        spec = s.group_by_name(group)
        if spec is None:
            return []
        pending: list[Awaitable[Result]] = []
        done: list[Result] = []
        for route in spec.routes:
            check = route_check(route, CHECK_TIMEOUT_S)
            if isinstance(check, Result):
                done.append(check)
            else:
                pending.append(check)
        results = [*await asyncio.gather(*pending), *done]
        return [Check(f"route {r.what}", r.ok, r.detail) for r in results]

    async def _hooks(self, s: Settings, view: ClusterView, group: str, to: str,
                     authorization: str) -> list[Check]:
        members = view.members_in(to)

        async def ask(member: str, url: str) -> list[Check]:
            if member == s.member:
                return hook_checks(s, group)
            try:
                timeout = aiohttp.ClientTimeout(total=CHECK_TIMEOUT_S)
                async with aiohttp.ClientSession(timeout=timeout) as session, session.get(
                        f"{url.rstrip('/')}/v1/drill/hooks", params={"group": group},
                        headers={"Authorization": authorization}) as r:
                    body = await r.json(content_type=None)
                    if r.status != 200:
                        return [Check(f"{member} hooks", False,
                                      f"{member} answered {r.status}: "
                                      f"{body.get('message', '')}")]
            except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                return [Check(f"{member} hooks", False,
                              f"{member} did not answer at {url}: {exc or 'timed out'}")]
            return [Check(str(c["name"]), bool(c["ok"]), str(c["detail"]))
                    for c in body.get("checks", [])]
        answers = await asyncio.gather(*(ask(m.member, m.api_url) for m in members))
        return [c for answer in answers for c in answer]

    @staticmethod
    def _timeline(s: Settings, view: ClusterView, group: str, to: str,
                  learned: float | None) -> list[dict[str, Any]]:
        spec = s.group_by_name(group)
        if spec is None:
            return []
        rec = view.active.get(group)
        old = rec.region if rec else "?"
        members = len(view.members_in(to))
        return [
            {"step": "decide and commit", "expected_s": 0.1,
             "detail": "the coordinator's next cycle after the power reading"},
            {"step": "precheck", "expected_s": 0.0, "detail": "config only"},
            {"step": "drain_old", "expected_s": spec.drain_s,
             "detail": f"{old} drains for drain_s {format_duration(spec.drain_s)}"},
            {"step": "promote_new", "expected_s": None,
             "detail": f"promote hook on {members} member(s) of {to}, each at most "
                       f"{format_duration(spec.hook_timeout_s)} x {spec.hook_attempts}"},
            {"step": "reroute", "expected_s": None,
             "detail": f"{len(spec.routes)} route(s) to {to}"},
            {"step": "verify", "expected_s": None,
             "detail": (f"GET {spec.verify_url} until it names {to} (at most "
                        f"{format_duration(spec.verify_timeout_s)})") if spec.verify_url
             else "routers' read-backs"},
            {"step": "demote_old", "expected_s": None, "detail": f"demote hook in {old}"},
            {"step": "total", "expected_s": learned or s.policy.expected_failover_s,
             "detail": "learned from the last failovers" if learned
             else "expected_failover_s (not learned yet)"},
        ]
