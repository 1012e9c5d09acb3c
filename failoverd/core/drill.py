"""A drill's judgement, pure: would a power failure of the group's active
region move it to the region the operator names, and is that region fit to
take it?  The real engine decides on the real view with one simulated
sensor — the active region's generator failed — added; nothing is written.
The I/O checks (routes, hooks on the target's members) are the daemon's
(:mod:`failoverd.daemon.drill`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from failoverd.core.durations import format_duration
from failoverd.core.engine import (
    Policy,
    SetActive,
    decide,
    is_drained,
    power_of,
    region_health,
)
from failoverd.core.model import ClusterView
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
    spec = next((g for g in policy.groups if g.name == group), None)
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
