"""The decision engine: ``decide(view, policy, now) -> Decision``.

Pure: no I/O, no asyncio, no clock reads — ``now`` is an argument.  It is the
only place that decides *whether* and *where* a group moves; the coordinator
(imperative shell) only commits what it returns, fenced.
"""

from __future__ import annotations

from dataclasses import dataclass

from failoverd.config import Settings
from failoverd.model import AUTOMATIC_TRIGGERS, ActiveRecord, ClusterView, OperatorRequest
from failoverd.power import DEGRADED, RegionPower, merge, region_power

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
    probed_regions: frozenset[str] = frozenset()  # regions with health probes
    health_quorum: int = 0  # 0 = majority of the observer regions
    power_grace_s: float = 30.0
    power_runtime_margin_s: float = 120.0
    sensor_stale_s: float = 30.0
    expected_failover_s: float = 60.0

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
            probed_regions=frozenset(r.name for r in s.regions if r.probes),
            health_quorum=s.policy.health_quorum,
            power_grace_s=s.policy.power_grace_s,
            power_runtime_margin_s=s.policy.power_runtime_margin_s,
            sensor_stale_s=s.policy.sensor_stale_s,
            expected_failover_s=s.policy.expected_failover_s,
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
    # Planned = graceful switchover while the old site still runs (power
    # events); otherwise the old region is fenced first.
    planned: bool = False

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


@dataclass(frozen=True)
class RegionHealth:
    """A region's health as judged by a quorum of observer regions.

    ``verdict`` is ``up``/``down``/``unknown``, or ``unprobed`` for a region
    with no health probes configured (then only membership counts).
    ``votes`` is each observer region's view (the majority of its members).
    """

    region: str
    verdict: str
    ready: bool
    up_since: float | None = None
    votes: tuple[tuple[str, str], ...] = ()
    quorum: int = 0

    def describe(self) -> str:
        votes = ", ".join(f"{r}:{v}" for r, v in self.votes) or "no observers"
        remote = sum(1 for r, _ in self.votes if r != self.region)
        return f"{self.verdict} (quorum {self.quorum} of {remote} remote regions; {votes})"


def _majority(values: list[str]) -> str:
    for v in ("up", "down"):
        if sum(1 for x in values if x == v) * 2 > len(values):
            return v
    return "unknown"


def region_health(view: ClusterView, policy: Policy, region: str) -> RegionHealth:
    """Quorum verdict on ``region`` from the live members' observations.

    Each observer region votes with the majority view of its members.  The
    verdict needs ``quorum`` votes (default: a majority of the observer
    regions other than the target) including at least one region other than
    the target: the target's own view counts as one vote, never alone.
    """
    if region not in policy.probed_regions:
        return RegionHealth(region, "unprobed", ready=True)
    health: dict[str, list[str]] = {}
    ready: dict[str, list[str]] = {}
    since: dict[str, list[float]] = {}
    for (member, target), obs in view.observations.items():
        m = view.members.get(member)
        if target != region or m is None:
            continue
        health.setdefault(m.region, []).append(obs.verdict)
        ready.setdefault(m.region, []).append("up" if obs.ready else "down")
        if obs.verdict == "up":
            since.setdefault(m.region, []).append(obs.since)
    votes = {r: _majority(v) for r, v in sorted(health.items())}
    ready_votes = {r: _majority(v) for r, v in ready.items()}
    others = [r for r in votes if r != region]
    quorum = policy.health_quorum or len(others) // 2 + 1

    def judged(value: str, by: dict[str, str]) -> bool:
        n = sum(1 for r in others if by.get(r) == value)
        return n >= 1 and n + (1 if by.get(region) == value else 0) >= quorum

    verdict = "down" if judged("down", votes) else "up" if judged("up", votes) else "unknown"
    up_since = None
    if verdict == "up":
        up_since = max(t for r, v in votes.items() if v == "up" for t in since.get(r, [0.0]))
    return RegionHealth(region, verdict, judged("up", ready_votes), up_since,
                        tuple(votes.items()), quorum)


def power_of(view: ClusterView, policy: Policy, region: str, now: float) -> RegionPower:
    """The region's power from every fresh sensor any live member relays."""
    readings = merge({k: v for k, v in view.power.items() if k[0] == region})
    return region_power(readings.get(region, []), now, grace_s=policy.power_grace_s,
                        stale_s=policy.sensor_stale_s)


def failover_budget_s(view: ClusterView, policy: Policy) -> float:
    """Battery runtime below which we must leave: the time a failover takes
    (learned from history, else configured) plus the margin."""
    expected = view.learned_failover_s or policy.expected_failover_s
    return expected + policy.power_runtime_margin_s


def candidates(view: ClusterView, policy: Policy, group: GroupPolicy,
               exclude: str | None, now: float) -> list[str]:
    """Regions of ``group`` that may take the load, best first.

    A candidate has live members, is not drained, its power is not degraded,
    and — when it has probes — it is up by quorum and ready.  Best = highest
    priority, then name, so the choice is deterministic.
    """
    alive = view.regions_with_members()
    ok = []
    for r in group.regions:
        if r == exclude or r not in alive or r in view.control.drained:
            continue
        h = region_health(view, policy, r)
        if (h.verdict in {"up", "unprobed"} and h.ready
                and power_of(view, policy, r, now).state not in DEGRADED):
            ok.append(r)
    return sorted(ok, key=lambda r: (-policy.priority(r), r))


def _region_stable_since(view: ClusterView, region: str) -> float | None:
    started = [m.started for m in view.members_in(region)]
    return min(started) if started else None


def _decide_group(view: ClusterView, policy: Policy, group: GroupPolicy, now: float,
                  auto_budget: int) -> tuple[Intent | None, str]:
    rec = view.active.get(group.name)
    if rec is None:
        if view.control.paused:
            return None, "no active region; paused, not bootstrapping"
        # At a cold start daemons come up, and probes settle, in any order:
        # give every region a moment to register and be judged before
        # picking one, so the preferred region is not passed over.
        alive = view.regions_with_members()
        pending = [r for r in group.regions if r not in alive
                   or region_health(view, policy, r).verdict == "unknown"]
        oldest = min((m.started for m in view.members.values()), default=now)
        if pending and now - oldest < policy.bootstrap_grace_s:
            return None, (f"waiting up to {policy.bootstrap_grace_s - (now - oldest):.0f}s "
                          f"for {', '.join(pending)} before bootstrapping")
        best = candidates(view, policy, group, exclude=None, now=now)
        if not best:
            return Alert(group.name, "no region can be made active"), "no candidate to bootstrap"
        return (SetActive(group.name, best[0], 1, "bootstrap",
                          f"bootstrap: {best[0]} is the best region with live members", None),
                f"bootstrap -> {best[0]}")

    why: str | None = None
    trigger = ""
    health = region_health(view, policy, rec.region)
    power = power_of(view, policy, rec.region, now)
    budget = failover_budget_s(view, policy)
    if rec.region not in group.regions:
        why, trigger = f"{rec.region} is no longer in the group", "config"
    elif health.verdict == "down":
        why, trigger = f"{rec.region} is {health.describe()}", "health"
    elif power.state == "critical":
        why, trigger = f"{rec.region} power critical ({power.detail})", "power"
    elif (power.state == "on_battery" and power.runtime_s is not None
          and power.runtime_s < budget):
        why, trigger = (f"{rec.region} on battery with {power.runtime_s:.0f}s left, "
                        f"under the {budget:.0f}s failover budget"), "power"
    elif not view.members_in(rec.region) and health.verdict == "up":
        # Only the failoverd daemons are gone; the region itself answers.
        return None, (f"{rec.region} active (epoch {rec.epoch}): no members, but "
                      f"{health.describe()}; holding")
    elif not view.members_in(rec.region):
        gone_for = now - view.absent_since.get(rec.region, now)
        if gone_for >= policy.member_loss_grace_s:
            why, trigger = f"every member of {rec.region} is gone", "member_loss"
        else:
            return None, (f"{rec.region} active (epoch {rec.epoch}): no members for "
                          f"{gone_for:.1f}s, within member_loss_grace_s")

    here = f"{rec.region} active (epoch {rec.epoch})"
    if why is None:
        status = "ok" if health.verdict == "unprobed" else health.verdict
        if power.state not in {"normal", "unknown"} or view.power:
            status += f", power {power.state}"
            if power.runtime_s is not None:
                status += f" ({power.runtime_s:.0f}s left)"
        return _consider_failback(view, policy, group, rec, now, auto_budget,
                                  f"{here}, {status}")

    best = candidates(view, policy, group, exclude=rec.region, now=now)
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
    # A power event is a planned switchover: the old site still runs.
    return (SetActive(group.name, best[0], rec.epoch + 1, trigger,
                      f"{trigger}: {why}", rec, planned=trigger == "power"),
            f"failover {rec.region} -> {best[0]}: {why}")


def _consider_failback(view: ClusterView, policy: Policy, group: GroupPolicy,
                       rec: ActiveRecord, now: float, auto_budget: int,
                       here: str) -> tuple[Intent | None, str]:
    if policy.failback != "auto" or view.control.paused or auto_budget <= 0:
        return None, here
    best = candidates(view, policy, group, exclude=None, now=now)
    if not best or best[0] == rec.region or policy.priority(best[0]) <= policy.priority(
            rec.region):
        return None, here
    target = best[0]
    since = region_health(view, policy, target).up_since or _region_stable_since(view, target)
    if since is None or now - since < policy.failback_stable_s:
        return None, f"{here}; {target} preferred but not stable yet"
    if now - rec.since < policy.cooldown_s:
        return None, f"{here}; failback to {target} waits for cooldown"
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


# -- operator requests --------------------------------------------------------

def _retry(view: ClusterView, group: str, req: OperatorRequest) -> RequestOutcome:
    """Run a failed saga again from its failed step: only the saga of the
    current epoch, only when it failed (a running one needs no help)."""
    wf = view.workflows.get(group)
    rec = view.active.get(group)
    if wf is None or rec is None or wf.epoch != rec.epoch:
        return RequestOutcome(req, False, f"{group} has no saga for its current epoch")
    if wf.state != "failed":
        return RequestOutcome(req, False, f"the {group} saga is {wf.state}, not failed")
    step = next((s.name for s in wf.steps if s.state == "failed"), "?")
    return RequestOutcome(req, True, f"saga {wf.id} retried at {step} by {req.by}",
                          control="retry")


@dataclass(frozen=True)
class RequestOutcome:
    """What the coordinator does with one operator request."""

    request: OperatorRequest
    accepted: bool
    reason: str
    change: SetActive | None = None
    # pause / resume / drain / undrain: the control change to make.
    control: str | None = None


def handle_request(view: ClusterView, policy: Policy, req: OperatorRequest,
                   now: float) -> RequestOutcome:
    """Accept or refuse an operator request.  Pause never blocks these.

    A switchover (planned) or an unforced failover must go to a valid
    candidate; ``force`` skips the candidate rules (the operator owns the
    risk) but never leaves the group's own regions.
    """
    regions = {r for r, _ in policy.priorities}
    if req.action in {"pause", "resume"}:
        return RequestOutcome(req, True, f"{req.action}d by {req.by}", control=req.action)
    if req.action in {"drain", "undrain"}:
        if req.region not in regions:
            return RequestOutcome(req, False, f"unknown region {req.region!r}")
        return RequestOutcome(req, True, f"{req.region} {req.action}ed by {req.by}",
                              control=req.action)
    if req.action not in {"switchover", "failover", "retry"}:
        return RequestOutcome(req, False, f"unknown action {req.action!r}")
    group = next((g for g in policy.groups if g.name == req.group), None)
    if group is None:
        return RequestOutcome(req, False, f"unknown group {req.group!r}")
    if req.action == "retry":
        return _retry(view, group.name, req)
    if req.region not in group.regions:
        return RequestOutcome(req, False, f"{req.region!r} is not a region of {group.name}")
    rec = view.active.get(group.name)
    if rec is None:
        return RequestOutcome(req, False, f"{group.name} has no active region yet")
    if rec.region == req.region:
        return RequestOutcome(req, False, f"{req.region} is already active for {group.name}")
    if not req.force and req.region not in candidates(view, policy, group, rec.region, now):
        return RequestOutcome(req, False, f"{req.region} is not a candidate: "
                              f"{_why_not(view, policy, req.region, now)}")
    verb = "switchover" if req.action == "switchover" else (
        "forced failover" if req.force else "failover")
    change = SetActive(group.name, req.region, rec.epoch + 1, "operator",
                       f"operator {verb} by {req.by}", rec,
                       planned=req.action == "switchover")
    return RequestOutcome(req, True, change.reason, change=change)


def _why_not(view: ClusterView, policy: Policy, region: str, now: float) -> str:
    if region not in view.regions_with_members():
        return "no live members"
    if region in view.control.drained:
        return "drained"
    h = region_health(view, policy, region)
    if h.verdict not in {"up", "unprobed"}:
        return f"health {h.describe()}"
    if not h.ready:
        return "readiness probes failing"
    return f"power {power_of(view, policy, region, now).state}"
