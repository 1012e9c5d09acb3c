"""The decision engine: ``decide(view, policy, now) -> Decision``.

Pure: no I/O, no asyncio, no clock reads — ``now`` is an argument.  It is the
only place that decides *whether* and *where* a group moves; the coordinator
(imperative shell) only commits what it returns, fenced.
"""

from __future__ import annotations

from dataclasses import dataclass

from failoverd.config import Settings
from failoverd.model import AUTOMATIC_TRIGGERS, ActiveRecord, ClusterView

HOUR_S = 3600.0


@dataclass(frozen=True)
class GroupPolicy:
    name: str
    regions: tuple[str, ...]


@dataclass(frozen=True)
class Policy:
    priorities: tuple[tuple[str, int], ...]  # region -> priority
    groups: tuple[GroupPolicy, ...]
    cooldown_s: float
    max_auto_failovers_per_hour: int
    failback: str  # "manual" | "auto"
    failback_stable_s: float
    bootstrap_grace_s: float = 0.0
    member_loss_grace_s: float = 0.0

    @classmethod
    def from_settings(cls, s: Settings) -> Policy:
        return cls(
            priorities=tuple((r.name, r.priority) for r in s.regions),
            groups=tuple(GroupPolicy(g.name, tuple(g.regions)) for g in s.groups),
            cooldown_s=s.policy.cooldown_s,
            max_auto_failovers_per_hour=s.policy.max_auto_failovers_per_hour,
            failback=s.policy.failback,
            failback_stable_s=s.policy.failback_stable_s,
            bootstrap_grace_s=s.policy.bootstrap_grace_s,
            member_loss_grace_s=s.policy.member_loss_grace_s,
        )

    def priority(self, region: str) -> int:
        return dict(self.priorities).get(region, 0)


@dataclass(frozen=True)
class SetActive:
    """Make ``region`` active for ``group`` at ``epoch`` (fenced on ``prev``)."""

    group: str
    region: str
    epoch: int
    trigger: str
    reason: str
    prev: ActiveRecord | None

    @property
    def automatic(self) -> bool:
        return self.trigger in AUTOMATIC_TRIGGERS


@dataclass(frozen=True)
class Alert:
    """Something an operator must look at; no change is made."""

    group: str
    reason: str


Intent = SetActive | Alert


@dataclass(frozen=True)
class Decision:
    intents: tuple[Intent, ...]
    reason: str  # one line, logged each cycle

    @property
    def changes(self) -> tuple[SetActive, ...]:
        return tuple(i for i in self.intents if isinstance(i, SetActive))


def candidates(view: ClusterView, policy: Policy, group: GroupPolicy,
               exclude: str | None) -> list[str]:
    """Regions of ``group`` that may take the load, best first.

    A candidate has live members and is not drained (later rules add health,
    power and readiness).  Best = highest priority, then name, so the choice
    is deterministic.
    """
    alive = view.regions_with_members()
    ok = [r for r in group.regions
          if r != exclude and r in alive and r not in view.control.drained]
    return sorted(ok, key=lambda r: (-policy.priority(r), r))


def _region_stable_since(view: ClusterView, region: str) -> float | None:
    started = [m.started for m in view.members_in(region)]
    return min(started) if started else None


def _decide_group(view: ClusterView, policy: Policy, group: GroupPolicy, now: float,
                  auto_budget: int) -> tuple[Intent | None, str]:
    rec = view.active.get(group.name)
    if rec is None:
        best = candidates(view, policy, group, exclude=None)
        if view.control.paused:
            return None, "no active region; paused, not bootstrapping"
        if not best:
            return Alert(group.name, "no region can be made active"), "no candidate to bootstrap"
        # At a cold start daemons come up in any order: give the preferred
        # regions a moment to register before picking one.
        missing = [r for r in group.regions if r not in view.regions_with_members()]
        oldest = min((m.started for m in view.members.values()), default=now)
        if missing and now - oldest < policy.bootstrap_grace_s:
            return None, (f"waiting up to {policy.bootstrap_grace_s - (now - oldest):.0f}s "
                          f"for {', '.join(missing)} before bootstrapping")
        return (SetActive(group.name, best[0], 1, "bootstrap",
                          f"bootstrap: {best[0]} is the best region with live members", None),
                f"bootstrap -> {best[0]}")

    why: str | None = None
    trigger = ""
    if rec.region not in group.regions:
        why, trigger = f"{rec.region} is no longer in the group", "config"
    elif not view.members_in(rec.region):
        gone_for = now - view.absent_since.get(rec.region, now)
        if gone_for >= policy.member_loss_grace_s:
            why, trigger = f"every member of {rec.region} is gone", "member_loss"
        else:
            return None, (f"{rec.region} active (epoch {rec.epoch}): no members for "
                          f"{gone_for:.1f}s, within member_loss_grace_s")

    here = f"{rec.region} active (epoch {rec.epoch})"
    if why is None:
        return _consider_failback(view, policy, group, rec, now, auto_budget, here)

    best = candidates(view, policy, group, exclude=rec.region)
    if view.control.paused:
        return None, f"{here}: {why}; paused, holding"
    if rec.trigger in AUTOMATIC_TRIGGERS and now - rec.since < policy.cooldown_s:
        left = policy.cooldown_s - (now - rec.since)
        return None, f"{here}: {why}; in cooldown for {left:.0f}s more, holding"
    if auto_budget <= 0:
        return (Alert(group.name, f"{why}; cluster-wide failover limit reached"),
                f"{here}: {why}; max_auto_failovers_per_hour reached, holding")
    if not best:
        return (Alert(group.name, f"{why}; no candidate region"),
                f"{here}: {why}; no candidate, staying")
    return (SetActive(group.name, best[0], rec.epoch + 1, trigger,
                      f"{trigger}: {why}", rec),
            f"failover {rec.region} -> {best[0]}: {why}")


def _consider_failback(view: ClusterView, policy: Policy, group: GroupPolicy,
                       rec: ActiveRecord, now: float, auto_budget: int,
                       here: str) -> tuple[Intent | None, str]:
    if policy.failback != "auto" or view.control.paused or auto_budget <= 0:
        return None, f"{here}, ok"
    best = candidates(view, policy, group, exclude=None)
    if not best or best[0] == rec.region or policy.priority(best[0]) <= policy.priority(
            rec.region):
        return None, f"{here}, ok"
    target = best[0]
    since = _region_stable_since(view, target)
    if since is None or now - since < policy.failback_stable_s:
        return None, f"{here}, ok; {target} preferred but not stable yet"
    if now - rec.since < policy.cooldown_s:
        return None, f"{here}, ok; failback to {target} waits for cooldown"
    return (SetActive(group.name, target, rec.epoch + 1, "failback",
                      f"failback: {target} has priority and is stable", rec),
            f"failback {rec.region} -> {target}")


def decide(view: ClusterView, policy: Policy, now: float) -> Decision:
    """What to change, and one line saying why, for every group."""
    recent = sum(1 for t in view.control.auto_failovers if now - t < HOUR_S)
    budget = policy.max_auto_failovers_per_hour - recent
    intents: list[Intent] = []
    reasons: list[str] = []
    for group in policy.groups:
        intent, reason = _decide_group(view, policy, group, now, budget)
        if intent is not None:
            intents.append(intent)
            if isinstance(intent, SetActive) and intent.automatic:
                budget -= 1  # two groups failing over in one cycle both count
        reasons.append(f"{group.name}: {reason}")
    return Decision(tuple(intents), "; ".join(reasons) or "no groups configured")
