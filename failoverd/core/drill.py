"""A drill's judgement, pure: would a power failure of the group's active
region move it to the region the operator names, and is that region fit to
take it?  The real engine decides on the real view with one simulated
sensor — the active region's generator failed — added; nothing is written.
The I/O checks (routes, hooks on the target's members) are the daemon's
(:mod:`failoverd.daemon.drill`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from failoverd.core.data import data_state, format_bytes
from failoverd.core.durations import format_duration
from failoverd.core.engine import (
    Assessment,
    Policy,
    RequestOutcome,
    SetActive,
    decide,
    is_drained,
    power_of,
    region_health,
)
from failoverd.core.model import ClusterView, LiveDrill, OperatorRequest
from failoverd.core.power import DEGRADED, Reading

DRILL_SENSOR = "failoverd-drill"


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str


def with_power_failure(view: ClusterView, region: str, now: float) -> ClusterView:
    """``view`` as if ``region``'s generator had just failed."""
    reading = Reading(region, DRILL_SENSOR, "generator_failed", now, now, since=now,
                      source="drill", detail="simulated by a drill")
    return replace(view, power={**view.power, (region, DRILL_SENSOR): [reading]})


def drill_checks(view: ClusterView, policy: Policy, group: str, to: str, now: float,
                 learned_failover_s: float | None = None
                 ) -> tuple[list[Check], SetActive | None]:
    """The checklist of a dry-run drill of ``group`` to ``to``, and the move
    the engine would make (None if it would not move the group)."""
    spec = policy.group(group)
    if spec is None:
        return [Check("group", False, f"unknown group {group!r}")], None
    if to not in spec.regions:
        return [Check("target", False, f"{to!r} is not a region of {group}")], None
    rec = view.active.get(group)
    if rec is None:
        return [Check("active region", False, f"{group} has no active region yet")], None
    checks = [Check("active region", rec.region != to,
                    f"{group} is active in {rec.region} (epoch {rec.epoch})"
                    + (f"; {to} is already active" if rec.region == to else ""))]
    checks.append(Check("automatic actions", not view.control.paused,
                        "paused: a real power event would move nothing" if view.control.paused
                        else "not paused"))
    members = [m.member for m in view.members_in(to)]
    checks.append(Check(f"{to} members", bool(members),
                        f"live: {', '.join(members)}" if members else "no live member"))
    health = region_health(view, policy, to)
    checks.append(Check(f"{to} health", health.verdict in {"up", "unprobed"},
                        health.describe()))
    checks.append(Check(f"{to} readiness", health.ready,
                        "ready" if health.ready else "readiness probes failing"))
    power = power_of(view, policy, to, now)
    checks.append(Check(f"{to} power", power.state not in DEGRADED,
                        f"{power.state}" + (f": {power.detail}" if power.detail else "")))
    drained = is_drained(view, policy, to, now)
    checks.append(Check(f"{to} drain", not drained,
                        "drained: not a candidate" if drained else "not drained"))
    if spec.max_lag_bytes is not None:
        data = data_state(view.data.get(group, {}), to, rec.region, spec.max_lag_bytes)
        checks.append(Check(f"{to} data", data.ok, data.why or (
            f"{to}'s database is {data.role}, "
            f"{format_bytes(data.lag_bytes or 0)} behind (max "
            f"{format_bytes(spec.max_lag_bytes)})")))
    decision = decide(with_power_failure(view, rec.region, now), policy, now)
    move = next((c for c in decision.changes if c.group == group), None)
    if move is None:
        why = next((r for r in decision.reason.split("; ") if r.startswith(f"{group}:")),
                   decision.reason)
        checks.append(Check("engine", False, f"a power failure of {rec.region} would not "
                                             f"move {group}: {why}"))
    else:
        mode = "planned" if move.planned else "forced"
        checks.append(Check("engine", move.region == to,
                            f"a power failure of {rec.region} moves {group} to {move.region} "
                            f"({mode}, epoch {move.epoch})"
                            + ("" if move.region == to else f", not to {to}")))
    expected = policy.expected_failover_s
    if learned_failover_s is None:
        checks.append(Check("failover budget", True, "not learned yet (three failovers "
                            f"needed); UPS runtimes are judged against expected_failover_s "
                            f"{format_duration(expected)} + margin"))
    else:
        checks.append(Check(
            "failover budget", learned_failover_s <= expected,
            f"failovers take {format_duration(learned_failover_s)} (learned); "
            f"expected_failover_s is {format_duration(expected)}"
            + ("" if learned_failover_s <= expected else
               ": raise it, or batteries are judged against too short a failover")))
    return checks, move if move is not None and move.region == to else None


# -- the live drill ----------------------------------------------------------

def live_drill_refusal(view: ClusterView, policy: Policy, group: str, to: str,
                       now: float) -> str | None:
    """Why a live drill of ``group`` to ``to`` must not start now (None: it
    may).  Refused while paused, while any saga runs or a region was
    evacuated within ``cooldown_s`` (a drill must not compete with an
    incident), while the group cools down from its last move, has a failed
    saga, or already drills; and when ``to`` is not a candidate."""
    spec = policy.group(group)
    if spec is None:
        return f"unknown group {group!r}"
    if to not in spec.regions:
        return f"{to!r} is not a region of {group}"
    if view.control.paused:
        return "automatic actions are paused (failoverctl resume first)"
    current = view.live_drills.get(group)
    if current is not None and current.running:
        return f"a live drill of {group} is already {current.phase} ({current.id})"
    evacuated = [i for i in view.control.incidents
                 if i.kind == "evacuation" and now - i.at < policy.cooldown_s]
    if evacuated:
        last = max(evacuated, key=lambda i: i.at)
        return (f"{last.region} was evacuated {format_duration(now - last.at)} ago "
                f"(cooldown_s {format_duration(policy.cooldown_s)})")
    running = sorted(g for g, wf in view.workflows.items()
                     if wf.state == "running" and (r := view.active.get(g)) is not None
                     and r.epoch == wf.epoch)
    if running:
        shown = ", ".join(running[:3]) + (f" and {len(running) - 3} more"
                                         if len(running) > 3 else "")
        return f"a failover is under way ({len(running)} saga(s) running: {shown})"
    rec = view.active.get(group)
    if rec is None:
        return f"{group} has no active region yet"
    if rec.region == to:
        return f"{to} is already active for {group}"
    wf = view.workflows.get(group)
    if wf is not None and wf.epoch == rec.epoch and wf.state == "failed":
        return f"the saga of {group}'s epoch {rec.epoch} failed (failoverctl retry first)"
    if rec.trigger != "bootstrap" and now - rec.since < policy.cooldown_s:
        return (f"{group} moved {format_duration(now - rec.since)} ago "
                f"(cooldown_s {format_duration(policy.cooldown_s)})")
    a = Assessment(view, policy, now)
    if to not in a.candidates(spec, rec.region):
        return f"{to} is not a candidate: {a.region(to).not_candidate}"
    return None


def start_live_drill(drill_id: str, view: ClusterView, policy: Policy, group: str, to: str,
                     hold_s: float, by: str, now: float
                     ) -> tuple[LiveDrill | None, SetActive | None, str]:
    """The drill's first state and its switch out, or why it is refused."""
    refusal = live_drill_refusal(view, policy, group, to, now)
    rec = view.active.get(group)
    if refusal is not None or rec is None:
        return None, None, refusal or f"{group} has no active region yet"
    change = SetActive(group, to, rec.epoch + 1, "drill",
                       f"live drill by {by}: switchover to {to}, hold "
                       f"{format_duration(hold_s)}, then back to {rec.region}", rec,
                       planned=True)
    drill = LiveDrill(id=drill_id, group=group, home=rec.region, to=to, hold_s=hold_s, by=by,
                      started=now, phase="switching", out_epoch=change.epoch)
    return drill, change, change.reason


def advance_live_drill(d: LiveDrill, view: ClusterView, policy: Policy, now: float
                       ) -> tuple[LiveDrill, SetActive | None]:
    """The drill's next state, and the switch back when it is time for it.

    Out: wait for the switchover's saga; done → hold; failed → roll back
    (switch home).  Hold: until ``hold_s`` has passed since the saga was
    done, or an operator aborts → switch home.  Back: wait for that saga;
    done → done (``aborted`` if an operator cut it short, ``failed`` if it
    was a rollback).  A move the drill did not
    make (a power event, an operator) ends it as ``aborted``: the engine is
    in charge of the group again and nothing is switched back.
    """
    if not d.running:
        return d, None
    rec = view.active.get(d.group)
    if rec is None:
        return _ended(d, "failed", f"{d.group} has no active record", now), None
    wf = view.workflows.get(d.group)
    if d.phase == "switching":
        if rec.epoch != d.out_epoch:
            return _moved(d, rec.region, rec.epoch, rec.trigger, now), None
        if wf is None or wf.epoch != d.out_epoch or wf.state == "running":
            return d, None
        if wf.state == "failed":
            return _go_home(d, view, policy, now,
                            f"the switchover to {d.to} failed: {wf.error}; rolled back")
        d = replace(d, phase="holding", switched_at=now,
                    out_s=round(max(wf.updated - wf.created, 0.0), 3))
    if d.phase == "holding":
        if rec.epoch != d.out_epoch:
            return _moved(d, rec.region, rec.epoch, rec.trigger, now), None
        if d.abort_by is not None:
            return _go_home(d, view, policy, now, f"aborted by {d.abort_by} during the hold")
        assert d.switched_at is not None
        if now - d.switched_at >= d.hold_s:
            return _go_home(d, view, policy, now, "")
        return d, None
    # returning
    if rec.epoch != d.back_epoch:
        return _moved(d, rec.region, rec.epoch, rec.trigger, now), None
    if wf is None or wf.epoch != d.back_epoch or wf.state == "running":
        return d, None
    if wf.state == "failed":
        return _ended(d, "failed", (d.reason + "; " if d.reason else "")
                      + f"the switch back to {d.home} failed: {wf.error} (failoverctl retry "
                      f"{d.group})", now), None
    d = replace(d, returned_at=now, back_s=round(max(wf.updated - wf.created, 0.0), 3))
    # Back home: a full drill is done; one an operator cut short is aborted;
    # a rollback (the switch out failed) is failed.
    phase = "aborted" if d.abort_by else "failed" if d.reason else "done"
    return _ended(d, phase, d.reason, now), None


def _go_home(d: LiveDrill, view: ClusterView, policy: Policy, now: float, why: str
             ) -> tuple[LiveDrill, SetActive | None]:
    rec = view.active[d.group]
    spec = policy.group(d.group)
    a = Assessment(view, policy, now)
    if spec is None or d.home not in a.candidates(spec, rec.region):
        reason = (f"{why}; " if why else "") + (
            f"cannot switch back: {d.home} is not a candidate "
            f"({a.region(d.home).not_candidate}); {d.group} stays in {rec.region}")
        return _ended(d, "failed", reason, now), None
    change = SetActive(d.group, d.home, rec.epoch + 1, "drill",
                       f"live drill {d.id}: back to {d.home}"
                       + (f" ({why})" if why else ""), rec, planned=True)
    return replace(d, phase="returning", back_epoch=change.epoch, reason=why), change


def _moved(d: LiveDrill, region: str, epoch: int, trigger: str, now: float) -> LiveDrill:
    return _ended(d, "aborted", f"{d.group} moved to {region} at epoch {epoch} by {trigger}; "
                  "the drill stops and switches nothing back", now)


def _ended(d: LiveDrill, phase: str, reason: str, now: float) -> LiveDrill:
    return replace(d, phase=phase, reason=reason, ended=now)


DRILL_ACTIONS = frozenset({"drill", "drill_abort"})
DEFAULT_HOLD_S = 60.0
MAX_HOLD_S = 24 * 3600.0


def handle_drill_request(view: ClusterView, policy: Policy, req: OperatorRequest,
                         now: float) -> RequestOutcome:
    """Start a live drill (``drill``: the group, the target in ``region``,
    the hold in ``for_s``) or end one early (``drill_abort``)."""
    group = req.group or ""
    if req.action == "drill":
        hold = req.for_s if req.for_s is not None else DEFAULT_HOLD_S
        if not 0 <= hold <= MAX_HOLD_S:
            return RequestOutcome(req, False, f"a drill holds for 0 to "
                                  f"{format_duration(MAX_HOLD_S)}, not {format_duration(hold)}")
        drill, change, reason = start_live_drill(req.id, view, policy, group, req.region or "",
                                                 hold, req.by, now)
        if drill is None:
            return RequestOutcome(req, False, f"live drill refused: {reason}")
        return RequestOutcome(req, True, reason, change=change, control="drill", drill=drill)
    d = view.live_drills.get(group)
    if d is None or not d.running:
        return RequestOutcome(req, False, f"no live drill of {group!r} is running")
    if d.phase == "returning":
        return RequestOutcome(req, False, f"live drill {d.id} is already switching back to "
                                          f"{d.home}")
    return RequestOutcome(req, True, f"live drill {d.id} aborted by {req.by}: {group} "
                          f"switches back to {d.home} once {d.to} serves it",
                          control="drill_abort", drill=replace(d, abort_by=req.by))
