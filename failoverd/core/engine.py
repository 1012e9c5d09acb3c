"""The decision engine: ``decide(view, policy, now) -> Decision``.

Pure: no I/O, no asyncio, no clock reads — ``now`` is an argument.  It is the
only place that decides *whether* and *where* a group moves; the coordinator
(imperative shell) only commits what it returns, fenced.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from failoverd.core.data import DataState, data_state, format_bytes, loss_estimate
from failoverd.core.durations import format_duration
from failoverd.core.model import (
    AUTOMATIC_TRIGGERS,
    ActiveRecord,
    ClusterView,
    Drain,
    Incident,
    LiveDrill,
    OperatorRequest,
)
from failoverd.core.power import DEGRADED, RegionPower, region_power

HOUR_S = 3600.0
# Region conditions that evacuate every group active there, whatever the
# storm guards say (rule 6): holding a group in a dying region is an outage.
URGENT_TRIGGERS = frozenset({"power", "member_loss"})


@dataclass(frozen=True)
class GroupPolicy:
    name: str
    regions: tuple[str, ...]
    # A group with a database: regions whose copy is further behind than
    # this are no candidates (None: no database, no data guard).
    max_lag_bytes: int | None = None


@dataclass(frozen=True)
class Policy:
    priorities: tuple[tuple[str, int], ...]  # region -> priority
    groups: tuple[GroupPolicy, ...]
    cooldown_s: float
    # Cluster-wide storm guard: region incidents (evacuations) per hour.
    max_evacuations_per_hour: int
    failback: str  # "manual" | "auto"
    failback_stable_s: float
    # One group's flapping limit: its automatic moves per hour.
    max_auto_failovers_per_group_per_hour: int = 3
    bootstrap_grace_s: float = 0.0
    member_loss_grace_s: float = 0.0
    probed_regions: frozenset[str] = frozenset()  # regions with health probes
    health_quorum: int = 0  # 0 = majority of the observer regions
    power_grace_s: float = 30.0
    power_runtime_margin_s: float = 120.0
    sensor_stale_s: float = 30.0
    # An outage state followed by this much silence counts as critical.
    power_silence_during_outage_s: float = 30.0
    expected_failover_s: float = 60.0
    power_quorums: tuple[tuple[str, int], ...] = ()  # region -> sensors needed (default 1)
    drain_default_s: float = 4 * 3600.0
    drain_max_s: float = 72 * 3600.0

    def group(self, name: str | None) -> GroupPolicy | None:
        return next((g for g in self.groups if g.name == name), None)

    def priority(self, region: str) -> int:
        return dict(self.priorities).get(region, 0)

    def power_quorum(self, region: str) -> int:
        return dict(self.power_quorums).get(region, 1)


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
    # The region whose evacuation this move is part of (None: a move of its own).
    evacuation: str | None = None
    # Storm guards that would have held this group, overridden because its
    # region is dying (rule 6).
    overrode: tuple[str, ...] = ()
    # The group's automatic moves within the last hour, this one included
    # (kept in its record: the per-group limit).
    auto_moves: tuple[float, ...] = ()
    # A forced move into a region whose data was behind: the operator's
    # accepted loss, in WAL bytes (None: nothing known to be lost).
    data_loss_bytes: int | None = None

    @property
    def automatic(self) -> bool:
        return self.trigger in AUTOMATIC_TRIGGERS


@dataclass(frozen=True)
class Alert:
    """Something an operator must look at; no change is made."""

    group: str
    reason: str


@dataclass(frozen=True)
class Evacuation:
    """Every group active in ``region`` moved (or held) in one decision
    cycle, for one region-level reason: one incident."""

    region: str
    trigger: str  # power | member_loss | health
    reason: str
    evidence: tuple[str, ...]
    moves: tuple[SetActive, ...]
    held: tuple[tuple[str, str], ...] = ()  # (group, why) not moved
    overridden: tuple[tuple[str, str], ...] = ()  # (group, guard) moved despite a guard
    # False when it continues an incident of the same region and trigger
    # recorded within the last cooldown_s (stragglers, a batch that raced):
    # it is not counted again.
    new_incident: bool = True


Intent = SetActive | Alert


@dataclass(frozen=True)
class Decision:
    intents: tuple[Intent, ...]
    reason: str  # one line, logged each cycle
    evacuations: tuple[Evacuation, ...] = ()
    # Incidents this decision starts, for the cluster-wide storm guard:
    # (what, region or "", time).  The coordinator stores them with the moves.
    incidents: tuple[Incident, ...] = ()
    # Every region as judged for this decision (metrics read these).
    regions: tuple[RegionState, ...] = ()

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
    """The region's power from every sensor any live member relays."""
    return region_power(view.power_by_region.get(region, []), now, grace_s=policy.power_grace_s,
                        stale_s=policy.sensor_stale_s,
                        silence_s=policy.power_silence_during_outage_s,
                        quorum=policy.power_quorum(region))


def failover_budget_s(view: ClusterView, policy: Policy) -> float:
    """Battery runtime below which we must leave: the time a failover takes
    (learned from history, else configured) plus the margin."""
    expected = view.learned_failover_s or policy.expected_failover_s
    return expected + policy.power_runtime_margin_s


@dataclass(frozen=True)
class RegionState:
    """One region judged once per cycle: what every group decision reads."""

    name: str
    health: RegionHealth
    power: RegionPower
    members: int
    # Why this region may not take load ("" = it may).
    not_candidate: str
    # A region-level reason to leave it: (trigger, why, evidence) or None.
    condition: tuple[str, str, tuple[str, ...]] | None
    # Why groups stay although something is off (member loss within grace, ...).
    hold: str = ""


def is_drained(view: ClusterView, policy: Policy, region: str, now: float) -> bool:
    """A drain counts until it ends (``drain_max_s`` after it began for one
    written without a deadline); the coordinator deletes it then."""
    return any(d.region == region and now < d.ends(policy.drain_max_s)
               for d in view.control.drains)


def expired_drains(view: ClusterView, policy: Policy, now: float) -> list[Drain]:
    """Drains past their end, for the coordinator to delete (and record)."""
    return [d for d in view.control.drains if now >= d.ends(policy.drain_max_s)]


def _judge_region(view: ClusterView, policy: Policy, region: str, alive: frozenset[str],
                  now: float) -> RegionState:
    health = region_health(view, policy, region)
    power = power_of(view, policy, region, now)
    members = len(view.members_in(region))
    budget = failover_budget_s(view, policy)
    not_candidate = (
        "no live members" if region not in alive
        else "drained" if is_drained(view, policy, region, now)
        else f"health {health.describe()}" if health.verdict not in {"up", "unprobed"}
        else "readiness probes failing" if not health.ready
        else f"power {power.state}" if power.state in DEGRADED
        else "")
    condition: tuple[str, str, tuple[str, ...]] | None = None
    hold = ""
    if power.state == "critical":
        condition = ("power", f"{region} power critical ({power.detail})", power.evidence)
    elif (power.state == "on_battery" and power.runtime_s is not None
          and power.runtime_s < budget):
        condition = ("power", f"{region} on battery with {power.runtime_s:.0f}s left, "
                     f"under the {budget:.0f}s failover budget",
                     (f"runtime {power.runtime_s:.0f}s < budget {budget:.0f}s",))
    elif not members and health.verdict == "up":
        # Only the failoverd daemons are gone; the region itself answers.
        hold = f"no members, but {health.describe()}; holding"
    elif not members and region in view.absent_answering:
        # Gone from etcd is not gone: observers must confirm it (DESIGN's
        # member-loss trigger; rule 4 has a cut-off member hold).
        hold = f"no members in etcd, but {view.absent_answering[region]}; holding"
    elif not members:
        gone_for = now - view.absent_since.get(region, now)
        if gone_for >= policy.member_loss_grace_s:
            condition = ("member_loss", f"every member of {region} is gone",
                         (f"no members for {gone_for:.1f}s", f"health {health.verdict}"))
        else:
            hold = f"no members for {gone_for:.1f}s, within member_loss_grace_s"
    elif health.verdict == "down":
        condition = ("health", f"{region} is {health.describe()}",
                     tuple(f"{r}:{v}" for r, v in health.votes))
    return RegionState(region, health, power, members, not_candidate, condition, hold)


class Assessment:
    """Every region judged once, and candidate lists memoised, for one cycle:
    the work of a decision grows with regions, not with regions x groups."""

    def __init__(self, view: ClusterView, policy: Policy, now: float) -> None:
        self.view = view
        self.policy = policy
        self.now = now
        alive = view.regions_with_members()
        names = {r for r, _ in policy.priorities} | {g for gp in policy.groups
                                                     for g in gp.regions}
        names |= {rec.region for rec in view.active.values()}
        self.regions = {r: _judge_region(view, policy, r, alive, now) for r in sorted(names)}
        self._candidates: dict[tuple[tuple[str, ...], str | None], list[str]] = {}

    def region(self, name: str) -> RegionState:
        state = self.regions.get(name)
        if state is None:
            state = _judge_region(self.view, self.policy, name,
                                  self.view.regions_with_members(), self.now)
            self.regions[name] = state
        return state

    def candidates(self, group: GroupPolicy, exclude: str | None) -> list[str]:
        key = (group.regions, exclude)
        found = self._candidates.get(key)
        if found is None:
            found = sorted((r for r in group.regions
                            if r != exclude and not self.region(r).not_candidate),
                           key=lambda r: (-self.policy.priority(r), r))
            self._candidates[key] = found
        if group.max_lag_bytes is None:
            return found
        return [r for r in found if self.data(group, r).ok]

    def data(self, group: GroupPolicy, region: str) -> DataState:
        """``region``'s copy of ``group``'s data (ok when the group has no
        database)."""
        if group.max_lag_bytes is None:
            return DataState(region, True, "")
        rec = self.view.active.get(group.name)
        return data_state(self.view.data.get(group.name, {}), region,
                          rec.region if rec is not None else None, group.max_lag_bytes)

    def not_candidate(self, group: GroupPolicy, region: str) -> str:
        """Why ``region`` may not take ``group`` ("" = it may)."""
        return self.region(region).not_candidate or self.data(group, region).why

    def skipped_for_data(self, group: GroupPolicy, exclude: str | None) -> list[str]:
        """The regions otherwise eligible that the data guard refused, with why."""
        if group.max_lag_bytes is None:
            return []
        found = self._candidates.get((group.regions, exclude), [])
        return [why for r in found if (why := self.data(group, r).why)]


def _region_stable_since(view: ClusterView, region: str) -> float | None:
    started = [m.started for m in view.members_in(region)]
    return min(started) if started else None


@dataclass
class _Guards:
    """Storm guard state for one cycle (rule 6)."""

    policy: Policy
    now: float
    incidents_left: int
    # (region, trigger) of evacuations recorded within the last cooldown_s:
    # moving a straggler continues that incident rather than starting one.
    open: frozenset[tuple[str, str]] = frozenset()

    def continues(self, region: str, trigger: str) -> bool:
        return (region, trigger) in self.open

    def group_guards(self, rec: ActiveRecord) -> list[str]:
        """The per-group guards that would hold ``rec``'s group now."""
        held = []
        if rec.trigger in AUTOMATIC_TRIGGERS and self.now - rec.since < self.policy.cooldown_s:
            left = self.policy.cooldown_s - (self.now - rec.since)
            held.append(f"cooldown ({left:.0f}s left)")
        recent = [t for t in rec.auto_moves if self.now - t < HOUR_S]
        if len(recent) >= self.policy.max_auto_failovers_per_group_per_hour:
            held.append(f"max_auto_failovers_per_group_per_hour "
                        f"({len(recent)} moves in the last hour)")
        return held

    def moves_with(self, rec: ActiveRecord) -> tuple[float, ...]:
        return (*(t for t in rec.auto_moves if self.now - t < HOUR_S), self.now)


def epoch_floor(view: ClusterView, group: str) -> tuple[int, str]:
    """The highest epoch any fence that outlives etcd has seen for
    ``group``, and which: the members' applied epochs (published with their
    registration and in their acks) and the DNS epoch records (rule 11)."""
    best, by = view.fence_epochs.get(group, 0), "the DNS epoch record"
    for m in view.members.values():
        applied = m.epochs.get(group, 0)
        if applied > best:
            best, by = applied, f"{m.member}'s applied epoch"
        ack = view.acks.get((group, m.member))
        if ack is not None and ack[0] > best:
            best, by = ack[0], f"{m.member}'s applied epoch"
    return best, by


def _bootstrap(view: ClusterView, policy: Policy, a: Assessment, group: GroupPolicy,
               now: float, epoch: int) -> tuple[Intent | None, str]:
    if view.control.paused:
        return None, "no active region; paused, not bootstrapping"
    # At a cold start daemons come up, and probes settle, in any order:
    # give every region a moment to register and be judged before
    # picking one, so the preferred region is not passed over.
    pending = [r for r in group.regions if not a.region(r).members
               or a.region(r).health.verdict == "unknown"]
    oldest = min((m.started for m in view.members.values()), default=now)
    if pending and now - oldest < policy.bootstrap_grace_s:
        return None, (f"waiting up to {policy.bootstrap_grace_s - (now - oldest):.0f}s "
                      f"for {', '.join(pending)} before bootstrapping")
    best = a.candidates(group, None)
    if not best:
        return Alert(group.name, "no region can be made active"), "no candidate to bootstrap"
    above = f" (above an earlier epoch {epoch - 1})" if epoch > 1 else ""
    return (SetActive(group.name, best[0], epoch, "bootstrap",
                      f"bootstrap: {best[0]} is the best region with live members{above}",
                      None),
            f"bootstrap -> {best[0]}")


def _status_line(a: Assessment, rec: ActiveRecord) -> str:
    r = a.region(rec.region)
    status = "ok" if r.health.verdict == "unprobed" else r.health.verdict
    if r.power.state not in {"normal", "unknown"} or a.view.power:
        status += f", power {r.power.state}"
        if r.power.runtime_s is not None:
            status += f" ({r.power.runtime_s:.0f}s left)"
        if r.power.minority:
            status += (f"; {len(r.power.minority)} of {r.power.quorum} sensors needed say "
                       f"critical ({', '.join(r.power.minority)})")
    return f"{rec.region} active (epoch {rec.epoch}), {status}"


@dataclass
class _Plan:
    """What one cycle decides, built group by group."""

    intents: list[Intent] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    # region -> (trigger, why, evidence, moves, held, overridden)
    evac: dict[str, tuple[list[SetActive], list[tuple[str, str]], list[tuple[str, str]]]] = (
        field(default_factory=dict))
    # region -> its evacuation would exceed max_evacuations_per_hour (judged
    # at its first group, before this cycle's own incidents are counted).
    over_limit: dict[str, bool] = field(default_factory=dict)


def _leave(plan: _Plan, a: Assessment, guards: _Guards, group: GroupPolicy,
           rec: ActiveRecord, trigger: str, why: str, region_wide: bool) -> None:
    """Move ``group`` out of its region (or say why it stays)."""
    here = f"{rec.region} active (epoch {rec.epoch})"
    view = a.view
    moves, held, overridden = (plan.evac.setdefault(rec.region, ([], [], []))
                               if region_wide else ([], [], []))

    def hold(reason: str, alert: str | None = None) -> None:
        held.append((group.name, reason))
        if alert is not None:
            plan.intents.append(Alert(group.name, f"{why}; {alert}"))
        plan.reasons.append(f"{group.name}: {here}: {why}; {reason}")

    if view.control.paused:
        hold("paused, holding")
        return
    best = a.candidates(group, rec.region)
    skipped = a.skipped_for_data(group, rec.region)
    if not best:
        hold("no candidate, staying", "no candidate region"
             + (f" ({'; '.join(skipped)})" if skipped else ""))
        return
    blocked = guards.group_guards(rec)
    new_incident = region_wide and not guards.continues(rec.region, trigger)
    if new_incident and plan.over_limit.setdefault(rec.region, not guards.incidents_left):
        # Judged once per region: the whole evacuation is over the limit.
        blocked.append("max_evacuations_per_hour reached")
    urgent = trigger in URGENT_TRIGGERS
    if blocked and not urgent:
        in_cooldown = all(b.startswith("cooldown") for b in blocked)
        hold(f"held by {'; '.join(blocked)}",
             None if in_cooldown else f"held by {'; '.join(blocked)}")
        return
    if blocked:
        # Rule 6: never held in a dying region; say so loudly.
        overridden.append((group.name, "; ".join(blocked)))
        plan.intents.append(Alert(group.name, f"{why}; moved despite {'; '.join(blocked)}"))
    skip_note = f" (skipped: {'; '.join(skipped)})" if skipped else ""
    change = SetActive(group.name, best[0], rec.epoch + 1, trigger,
                       f"{trigger}: {why}{skip_note}", rec, planned=trigger == "power",
                       evacuation=rec.region if region_wide else None,
                       overrode=tuple(blocked), auto_moves=guards.moves_with(rec))
    plan.intents.append(change)
    if new_incident and not moves:
        guards.incidents_left = max(guards.incidents_left - 1, 0)  # counted once
    moves.append(change)
    plan.reasons.append(f"{group.name}: failover {rec.region} -> {best[0]}: {why}{skip_note}")


def decide(view: ClusterView, policy: Policy, now: float) -> Decision:
    """What to change, and one line saying why, for every group.

    Region conditions (power critical or under the battery budget, dead,
    down by quorum) are judged once per region; every group active in such a
    region leaves in this same cycle: one evacuation.
    """
    a = Assessment(view, policy, now)
    recent = sum(1 for i in view.control.incidents if now - i.at < HOUR_S)
    guards = _Guards(policy, now, max(policy.max_evacuations_per_hour - recent, 0),
                     frozenset((i.region, i.trigger) for i in view.control.incidents
                               if i.kind == "evacuation" and now - i.at < policy.cooldown_s))
    plan = _Plan()
    failbacks: list[SetActive] = []
    for group in policy.groups:
        rec = view.active.get(group.name)
        floor, fenced_by = epoch_floor(view, group.name)
        if rec is None:
            if group.name in view.fences_unread:
                plan.reasons.append(f"{group.name}: reading its epoch fences before its "
                                    "first epoch (rule 11)")
                continue
            intent, reason = _bootstrap(view, policy, a, group, now, floor + 1)
            if intent is not None:
                plan.intents.append(intent)
            plan.reasons.append(f"{group.name}: {reason}")
            continue
        if floor > rec.epoch:
            # etcd was restored or rebuilt: its record is behind what a
            # resource has seen.  Every new epoch continues above the fence
            # (the record's mod_revision still guards the write); a region
            # that stays is re-asserted there.  Members hold rather than
            # apply a lower epoch meanwhile.
            behind, rec = rec.epoch, replace(rec, epoch=floor)
            if (not view.control.paused and rec.region in group.regions
                    and a.region(rec.region).condition is None):
                plan.intents.append(SetActive(
                    group.name, rec.region, floor + 1, "restore",
                    f"restore: epoch {behind} is behind {fenced_by} (epoch {floor}); "
                    f"re-asserting {rec.region} at epoch {floor + 1}", rec))
                plan.reasons.append(f"{group.name}: epoch behind a fence -> {floor + 1}")
                continue
        wf = view.workflows.get(group.name)
        caught = wf.step("catchup") if wf is not None else None
        if (wf is not None and caught is not None and caught.state == "failed"
                and wf.epoch == rec.epoch and wf.state == "failed" and wf.from_region
                and not view.control.paused):
            # The new region did not replay what the fenced old primary
            # wrote: unfence by switching back to that primary, which has
            # every write (never promote into a loss the guard did not allow).
            plan.intents.append(SetActive(
                group.name, wf.from_region, rec.epoch + 1, "rollback",
                f"rollback: {wf.to_region} did not catch up ({caught.error}); back to "
                f"{wf.from_region}, whose fenced primary has every write", rec))
            plan.reasons.append(f"{group.name}: rollback {rec.region} -> {wf.from_region}")
            continue
        if rec.region not in group.regions:
            _leave(plan, a, guards, group, rec, "config",
                   f"{rec.region} is no longer in the group", region_wide=False)
            continue
        region = a.region(rec.region)
        if region.condition is not None:
            trigger, why, _ = region.condition
            _leave(plan, a, guards, group, rec, trigger, why, region_wide=True)
            continue
        if region.hold:
            plan.reasons.append(f"{group.name}: {rec.region} active (epoch {rec.epoch}): "
                                f"{region.hold}")
            continue
        change, reason = _consider_failback(a, guards, group, rec, _status_line(a, rec))
        if change is not None:
            failbacks.append(change)
            plan.intents.append(change)
        plan.reasons.append(f"{group.name}: {reason}")
    evacuations, incidents = _incidents(plan, a, guards, failbacks, now)
    return Decision(tuple(plan.intents), "; ".join(plan.reasons) or "no groups configured",
                    evacuations, incidents, tuple(a.regions.values()))


def next_decision_at(view: ClusterView, policy: Policy, now: float) -> float:
    """The earliest time, at or after ``now``, at which a time-based rule may
    change what :func:`decide` returns for this same ``view``; ``math.inf``
    when none can.  Until then (float rounding aside) deciding again on an
    unchanged view decides the same, so the coordinator need not: it sleeps
    until this, or until the view changes.

    Conservative: every instant at which one of decide()'s comparisons with
    ``now`` can flip is a candidate, whether or not the flip matters.
    """
    due: list[float] = []
    budget = failover_budget_s(view, policy)
    for readings in view.power.values():
        for r in readings:
            due += (r.received, r.received + policy.sensor_stale_s,
                    r.received + policy.power_silence_during_outage_s,
                    r.since + policy.power_grace_s)
            if r.runtime_s is not None:
                due.append(r.received + r.runtime_s - budget)  # under the budget
    due += (d.ends(policy.drain_max_s) for d in view.control.drains)
    due += (t + policy.member_loss_grace_s for t in view.absent_since.values())
    for rec in view.active.values():
        due.append(rec.since + policy.cooldown_s)
        due += (t + HOUR_S for t in rec.auto_moves)
    for i in view.control.incidents:
        due += (i.at + HOUR_S, i.at + policy.cooldown_s)
    started = [m.started for m in view.members.values()]
    if any(g.name not in view.active for g in policy.groups) and started:
        due.append(min(started) + policy.bootstrap_grace_s)
    if policy.failback == "auto":
        due += (t + policy.failback_stable_s for t in started)
        due += (o.since + policy.failback_stable_s for o in view.observations.values())
    return min((t for t in due if t >= now), default=math.inf)


def _incidents(plan: _Plan, a: Assessment, guards: _Guards, failbacks: list[SetActive],
               now: float) -> tuple[tuple[Evacuation, ...], tuple[Incident, ...]]:
    """The cycle's evacuations (one per region leaving) and the incidents
    the storm guard counts: a new evacuation, or a wave of failbacks."""
    evacuations = []
    incidents = []
    for name, (moves, held, overridden) in plan.evac.items():
        cond = a.region(name).condition
        assert cond is not None
        trigger, why, evidence = cond
        new = not guards.continues(name, trigger)
        evacuations.append(Evacuation(name, trigger, why, evidence, tuple(moves), tuple(held),
                                      tuple(overridden), new_incident=new))
        if moves and new:
            incidents.append(Incident("evacuation", name, trigger, now, why, len(moves),
                                      len(held)))
    if failbacks:
        incidents.append(Incident("failback", "", "failback", now,
                                  f"{len(failbacks)} group(s) back to preferred regions",
                                  len(failbacks)))
    return tuple(evacuations), tuple(incidents)


def _consider_failback(a: Assessment, guards: _Guards, group: GroupPolicy,
                       rec: ActiveRecord, here: str) -> tuple[SetActive | None, str]:
    view, policy, now = a.view, a.policy, a.now
    if policy.failback != "auto" or view.control.paused:
        return None, here
    drill = view.live_drills.get(group.name)
    if drill is not None and drill.running:
        return None, f"{here}; no failback during live drill {drill.id}"
    best = a.candidates(group, None)
    if not best or best[0] == rec.region or policy.priority(best[0]) <= policy.priority(
            rec.region):
        return None, here
    target = best[0]
    since = a.region(target).health.up_since or _region_stable_since(view, target)
    if since is None or now - since < policy.failback_stable_s:
        return None, f"{here}; {target} preferred but not stable yet"
    blocked = guards.group_guards(rec)
    if not guards.incidents_left:
        blocked.append("max_evacuations_per_hour reached")
    if blocked:
        return None, f"{here}; failback to {target} waits: {'; '.join(blocked)}"
    return (SetActive(group.name, target, rec.epoch + 1, "failback",
                      f"failback: {target} has priority and is stable", rec,
                      auto_moves=guards.moves_with(rec)),
            f"failback {rec.region} -> {target}")


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
    # drain: when it ends.
    until: float | None = None
    # drill / drill_abort: the live drill's new state.
    drill: LiveDrill | None = None


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
        if req.action == "undrain":
            return RequestOutcome(req, True, f"{req.region} undrained by {req.by}",
                                  control="undrain")
        for_s = req.for_s if req.for_s is not None else policy.drain_default_s
        if not 0 < for_s <= policy.drain_max_s:
            return RequestOutcome(req, False, f"a drain lasts at most drain_max_s "
                                  f"({format_duration(policy.drain_max_s)}), not "
                                  f"{format_duration(for_s)}")
        return RequestOutcome(req, True, f"{req.region} drained by {req.by} for "
                              f"{format_duration(for_s)}", control="drain", until=now + for_s)
    if req.action not in {"switchover", "failover", "retry"}:
        return RequestOutcome(req, False, f"unknown action {req.action!r}")
    group = policy.group(req.group)
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
    a = Assessment(view, policy, now)
    if not req.force and req.region not in a.candidates(group, rec.region):
        return RequestOutcome(req, False, f"{req.region} is not a candidate: "
                              f"{a.not_candidate(group, req.region)}")
    verb = "switchover" if req.action == "switchover" else (
        "forced failover" if req.force else "failover")
    reason, loss = f"operator {verb} by {req.by}", None
    data = a.data(group, req.region)
    if not data.ok:
        # Only a forced failover gets here: the operator owns the risk, but
        # must say so for data (the estimate goes into the history).
        if not req.accept_data_loss:
            return RequestOutcome(req, False, f"{data.why}: a forced failover may lose "
                                  "acknowledged writes; repeat with accept_data_loss "
                                  "(failoverctl failover --force --accept-data-loss)")
        loss = loss_estimate(view.data.get(group.name, {}), req.region, rec.region)
        reason += (f", accepting data loss ({data.why}; about "
                   f"{format_bytes(loss)} not replayed)" if loss is not None
                   else f", accepting data loss ({data.why}; loss unknown)")
    change = SetActive(group.name, req.region, rec.epoch + 1, "operator", reason, rec,
                       planned=req.action == "switchover", data_loss_bytes=loss)
    return RequestOutcome(req, True, change.reason, change=change)
