"""The coordinator cycle: snapshot -> decide -> fenced commit.

Level-triggered: it wakes on any watch event under the cluster prefix (or a
slow tick), re-reads the whole cluster at one revision and decides afresh, so
a lost or compacted watch event can delay a decision but never corrupt one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import operator
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import replace

import structlog
from dns.exception import DNSException

from failoverd import metrics
from failoverd.config import DnsRoute, Settings
from failoverd.core.drill import DRILL_ACTIONS, advance_live_drill, handle_drill_request
from failoverd.core.engine import (
    Alert,
    Decision,
    Policy,
    SetActive,
    decide,
    expired_drains,
    handle_request,
    next_decision_at,
)
from failoverd.core.model import (
    ActiveRecord,
    ClusterView,
    Drain,
    Keyspace,
    MemberRecord,
    OperatorRequest,
    incidents_value,
    parse_view,
    to_json,
)
from failoverd.core.power import Reading
from failoverd.core.store import (
    MAX_TXN_OPS,
    Compare,
    Delete,
    Get,
    Op,
    Put,
    Store,
    StoreError,
    TxnResult,
)
from failoverd.core.workflow import Workflow
from failoverd.daemon.isolation import ask_healthz, peer_source
from failoverd.daemon.saga import (
    Saga,
    SagaFenced,
    SagaRunner,
    fast_forward,
    fence_wait_until,
    old_acks_wanted,
)
from failoverd.etcd.history import History, read_history
from failoverd.etcd.lease import KeptLease
from failoverd.etcd.mirror import KeyMirror
from failoverd.faults import async_fault_point, fault_point
from failoverd.traffic.routers import DnsRouter, RouterError

_REGION_OF = operator.attrgetter("region")

log = structlog.get_logger("failoverd.daemon.coordinator")

HOUR_S = 3600.0
PRUNE_EVERY_S = 60.0
# The newest events the failover duration is learned from.
LEARN_FROM_EVENTS = 2000
MAX_LOGGED_CHANGES = 10
# Commit txns of one decision in flight at once (after the first).
PARALLEL_BATCHES = 8
# How long the watch may take to show our own write before we re-read etcd.
MIRROR_LAG_S = 2.0
# How often the members of a memberless region are asked whether they live.
ASK_ABSENT_EVERY_S = 1.0
# An unchanged view is decided on again when a time-based rule may flip
# (plus this, so that it has), and at least this often: the coordinator's
# gauges (a battery's runtime counting down) stay this fresh.
DEADLINE_SLACK_S = 0.01
REDECIDE_MAX_S = 10.0
# Key prefixes (under the cluster's) that decide() reads, besides active records.
DECISION_INPUTS = ("members/", "observations/", "power/", "control/", "coordinator")
# Cycles take at most 1 / (1 + PACE) of the loop when events pour in.
PACE = 6.0
MAX_PACE_S = 0.25
# Work a cycle may cost unpaced: a few milliseconds (a small cluster under a
# sensor flood) paced 6x would delay the next power event by as much, and
# protects nothing; an evacuation's cycles cost hundreds.
PACE_FREE_S = 0.005


class NotCoordinator(Exception):
    """This member must stop acting as coordinator now."""


class Coordinator:
    """The decision loop of the member that holds the coordinator seat.

    Owns, for one term: the cycle (read the mirror's view, ``engine.decide``
    — pure —, commit the changes), the operator requests' answers, the ask
    of memberless regions' APIs and the :class:`~failoverd.daemon.saga.SagaRunner`.
    Runs as the ``election`` task's child while the term lasts and raises
    :class:`NotCoordinator` when the lease or the seat is gone.  Every write
    is one etcd txn fenced by the term and the touched records'
    ``mod_revision`` (rule 1); a refused txn is re-read, never forced.
    Errors: a store error holds (the next cycle reads again); a malformed
    key is ignored and logged once.
    """

    def __init__(self, store: Store, keys: Keyspace, member: str, term: int,
                 lease: KeptLease, history: History, policy: Callable[[], Policy],
                 tick_s: Callable[[], float], history_limit: Callable[[], int],
                 wake: asyncio.Event, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time, mirror: KeyMirror | None = None,
                 resync: Callable[[], Awaitable[None]] | None = None,
                 local_power: Callable[[], Mapping[tuple[str, str], Reading]] = dict,
                 ) -> None:
        self._store = store
        self._keys = keys
        self._member = member
        self.term = term
        self._lease = lease
        self._history = history
        self._policy = policy
        self._tick_s = tick_s
        self._history_limit = history_limit
        self._wake = wake
        # Power news the engine acts on (our own member heard it): cuts a
        # pacing pause short.
        self._urgent = asyncio.Event()
        self._heard: asyncio.Event | None = None
        self._cycle_decided = False
        self._local_power = local_power
        self._clock = clock
        self._last_reason = ""
        self._problems_logged: frozenset[str] = frozenset()
        self._alerts: dict[str, str] = {}
        self._next_prune = 0.0
        self._absent_since: dict[str, float] = {}
        # Every member seen this term (its API is asked when it vanishes),
        # and per memberless region: when its members were last asked and
        # which of them answered.
        self._known: dict[str, MemberRecord] = {}
        # DNS epoch fences read back before groups' first epochs (rule 11).
        self._fences: dict[str, int] = {}
        self._fence_errors: set[str] = set()
        self._fence_errors_recorded: set[str] = set()
        self._floors: dict[str, int] = {}
        self._unread: frozenset[str] = frozenset()
        self._fences_settled: Settings | None = None  # every group read for these settings
        self._asked: dict[str, tuple[float, tuple[str, ...]]] = {}
        self._settings = settings
        self._work_s = 0.0
        self._parsed: ClusterView | None = None
        self._sagas_at = -1
        self._inputs_changed = True
        # When an unchanged view must be decided on again (a time-based
        # rule may flip: ``next_decision_at``), and under which policy the
        # last decision was taken (a reload decides again at once).
        self._decide_due = 0.0
        self._absent_seen = asyncio.Event()
        self._decided_policy: Policy | None = None
        self._cycle_ended = 0.0
        self._fast_forwarded: dict[tuple[str, int], tuple[str, list[str]]] = {}
        self._saga = Saga(store, keys, term, history, settings, clock)
        self.sagas = SagaRunner(self._saga, settings, clock)
        self._mirror = mirror
        self._resync = resync
        self.learned_failover_s: float | None = None
        # The etcd revision of our last successful commit: the next decision
        # must see at least this (the mirror catches up by watch).  Our seat
        # was written at the term's revision: never decide on a view older.
        self.committed_revision = term
        # When the current cycle began, and when the sleep after the last one
        # ends (monotonic): the systemd watchdog stops pinging when the later
        # of the two is too long ago (a resting coordinator sleeps until its
        # next decision is due: up to REDECIDE_MAX_S).
        self.cycle_started = time.monotonic()
        self.wake_due = 0.0

    def _ensure_leading(self, view: ClusterView | None = None) -> None:
        if not self._lease.valid():
            raise NotCoordinator("lease passed its local deadline")
        if view is not None:
            seat = view.coordinator
            if seat is None or seat.term != self.term or seat.member != self._member:
                raise NotCoordinator("coordinator key is no longer ours")

    async def run(self) -> None:
        """Lead until :class:`NotCoordinator` (or cancellation).  The sagas
        of this term run beside the decision loop, in one TaskGroup: they
        stop with it."""
        try:
            async with asyncio.TaskGroup() as tg:
                asker = tg.create_task(self._ask_absent(), name="coordinator-ask-absent")
                try:
                    await self._loop(tg)
                finally:
                    asker.cancel()
        except* SagaFenced as eg:
            raise NotCoordinator(str(eg.exceptions[0])) from None
        except* NotCoordinator as eg:
            raise eg.exceptions[0] from None

    async def _read(self) -> ClusterView | None:
        """The cluster as of one revision: from the mirror once it has seen
        our own last write, else from etcd (and the mirror is reloaded)."""
        mirror = self._mirror
        if mirror is None:
            return parse_view(self._keys, await self._store.snapshot(
                self._keys.prefix, exclude=("history/",)))
        await mirror.ready.wait()
        wanted = max(self.committed_revision, self._saga.revision)
        if not await mirror.wait_revision(wanted, MIRROR_LAG_S):
            log.warning("watch behind our own writes; re-reading", wanted=wanted,
                        mirror=mirror.revision)
            if self._resync is not None:
                await self._resync()
            if mirror.revision < wanted:
                return None
        if self._parsed is not None and self._parsed.revision == mirror.revision:
            return self._parsed  # nothing changed since the last cycle (a tick)
        started = time.thread_time()
        view = mirror.view()
        self._work_s += time.thread_time() - started
        self._parsed = view
        return view

    async def _loop(self, tg: asyncio.TaskGroup) -> None:
        while True:
            await self._pace()
            # Power news our member heard before this cycle began: its relay
            # waits for this cycle's decision (and commit) — or the next
            # cycle's, when this one only answered requests or drills.
            heard, self._heard = self._heard, None
            self._cycle_decided = False
            try:
                pause = await self._cycle(tg)
            finally:
                if heard is not None:
                    if self._cycle_decided or self._heard is not None:
                        heard.set()
                    else:
                        self._heard = heard
            if pause is not None:
                await self._sleep(pause)

    async def _cycle(self, tg: asyncio.TaskGroup) -> float | None:
        """Read, answer requests, decide, apply; how long to sleep after
        (None: go round again at once)."""
        self.cycle_started, self.wake_due = time.monotonic(), 0.0
        self._work_s = 0.0
        await async_fault_point("coordinator-cycle")
        self._wake.clear()
        self._ensure_leading()
        inputs_changed, self._inputs_changed = self._inputs_changed, False
        try:
            parsed = await self._read()
        except StoreError as exc:
            parsed = None
            log.warning("cannot read cluster state; holding", error=str(exc))
        if parsed is None:
            # Static stability: no store, no change.  The lease keeper ends
            # our term if this lasts past the deadline.
            self._inputs_changed |= inputs_changed  # still to be decided on
            return min(self._tick_s(), 0.5)
        now = self._clock()
        view = await self._with_fences(self._track_absence(
            with_local_power(parsed, self._local_power()), now))
        self._ensure_leading(view)
        if view.requests:
            # Operator requests first; then decide on what they changed.
            for req in view.requests:
                await self._answer(req, view, now)
            await asyncio.sleep(0)
            return None
        for drain in expired_drains(view, self._policy(), now):
            await self._expire(drain)
        for drain in view.control.drains:
            if drain.until is None:
                await self._give_an_end(drain, now)
        if await self._drive_drills(view, now):
            return None  # decide on the view that shows what the drills wrote
        decision = await self._decide(view, now, inputs_changed)
        self._cycle_decided = True
        if not decision.changes and view.revision != self._sagas_at:
            started = time.thread_time()
            self.sagas.update(view, tg)
            self._sagas_at = view.revision
            self._work_s += time.thread_time() - started
        self._cycle_ended = time.monotonic()
        await self._maybe_prune()
        return 0 if decision.changes else self._pause(view)

    async def _decide(self, view: ClusterView, now: float, inputs_changed: bool) -> Decision:
        """Decide on ``view`` and apply the changes, unless nothing decide()
        reads changed (at rest; or only acks and saga records moved, an
        evacuation's sagas at work) and no time-based rule can flip before
        the due time: then an empty decision, at no cost."""
        policy = self._policy()
        if (not inputs_changed and self._mirror is not None
                and policy is self._decided_policy and time.monotonic() < self._decide_due):
            return Decision((), self._last_reason)
        started = time.thread_time()
        decision = decide(view, policy, now)
        _export(decision)
        _export_view(view, decision, policy, now)
        self._log(decision, view)
        self._decided_policy = policy
        self._decide_due = 0.0 if decision.changes else time.monotonic() + min(
            max(next_decision_at(view, policy, now) - now, 0.0) + DEADLINE_SLACK_S,
            REDECIDE_MAX_S)  # with changes: decide at once on what was committed
        self._work_s += time.thread_time() - started
        await self._apply(decision, view)
        return decision

    def note_local_power(self) -> asyncio.Event:
        """Our own member heard a power reading: decide on it now.  The
        event returned is set once a cycle that saw it has decided (and
        committed what it decided): the member relays the reading after
        that, so that neither this loop nor etcd's queue puts our own copy
        in front of the commit it leads to."""
        self._inputs_changed = True
        self._urgent.set()
        self._wake.set()
        if self._heard is None:
            self._heard = asyncio.Event()
        return self._heard

    def stop_holding_relays(self) -> None:
        """The term ended: relays waiting for a decision go now."""
        if self._heard is not None:
            self._heard.set()
            self._heard = None

    def note_changes(self, keys: list[str] | None) -> None:
        """From the watch: did anything decide() reads change?  (Members,
        observations, power, control, the seat, active records, database
        reports; not acks or workflows.)"""
        if keys is None:
            self._inputs_changed = True
            return
        cut = len(self._keys.prefix)
        for key in keys:
            rel = key[cut:]
            if rel.startswith(DECISION_INPUTS) or rel.endswith("/active") or (
                    "/data/" in rel and rel.startswith("groups/")):
                self._inputs_changed = True
                return

    async def _pace(self) -> None:
        """Keep cycles to a share of the event loop: a cycle that cost c
        seconds of work is followed by at least PACE x (c - PACE_FREE_S) of
        other work.  The work is the thread's CPU time, not the wall
        clock's: on a saturated machine the wall clock counts the time the
        OS gave other processes, and pacing on it delayed a power event by
        up to MAX_PACE_S.  At rest, and on a small cluster under a sensor
        flood, cycles cost a few milliseconds at most (no added latency);
        during an evacuation of 1,000 groups, when every ack wakes us, it
        keeps the loop free for the lease keep-alive, the sagas and the hooks.
        """
        gap = min(PACE * max(self._work_s - PACE_FREE_S, 0.0), MAX_PACE_S) - (
            time.monotonic() - self._cycle_ended)  # the last cycle's work
        if gap > 0 and not self._urgent.is_set():
            # A power event is not held back by the pause (it is rare: a
            # new state or a Last Will, not a flood of runtime ticks).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(gap):
                    await self._urgent.wait()
        self._urgent.clear()

    def _track_absence(self, view: ClusterView, now: float) -> ClusterView:
        present = view.regions_with_members()
        self._known.update(view.members)
        for region in list(self._absent_since):
            if region in present:
                del self._absent_since[region]
                self._asked.pop(region, None)
        for region in set(map(_REGION_OF, view.active.values())) - present:
            if region not in self._absent_since:
                self._absent_since[region] = now
                self._absent_seen.set()  # ask its members now
        return replace(view, absent_since=dict(self._absent_since),
                       absent_answering=self._absent_answering(),
                       learned_failover_s=self.learned_failover_s)

    async def _with_fences(self, view: ClusterView) -> ClusterView:
        """Read back each group's DNS epoch records (fences that outlive
        etcd, rule 11) once per term, before the term's first new epoch for
        the group: a rebuilt or restored etcd must not reuse an epoch a
        resource has seen.  The reads run concurrently (a round trip for
        the lot).  A group with no record waits until its fence is read
        (``fences_unread``, tried again each cycle); a recorded group whose
        fence cannot be read goes on (its reroute is fenced by DNS anyway)."""
        settings = self._settings()
        if self._fences_settled is not settings:  # not every group read yet
            todo = []
            for group in settings.groups:
                if group.name in self._fences or group.name in self._fence_errors_recorded:
                    continue
                dns = [r for r in group.routes if isinstance(r, DnsRoute)]
                if not dns:
                    self._fences[group.name] = 0
                    continue
                todo.append((group.name, dns))
            await self._read_fences(todo)
            for name, _ in todo:
                if name not in self._fences and name in view.active:
                    self._fence_errors_recorded.add(name)
            self._unread = frozenset(n for n, _ in todo
                                     if n not in self._fences and n not in view.active)
            self._floors = {g: e for g, e in self._fences.items() if e}
            if not self._unread:
                self._fences_settled = settings  # a cycle costs nothing more
        if not self._unread and not self._floors:
            return view
        return replace(view, fence_epochs=self._floors, fences_unread=self._unread)

    async def _read_fences(self, todo: list[tuple[str, list[DnsRoute]]]) -> None:
        if todo:
            slots = asyncio.Semaphore(32)

            async def read(name: str, routes: list[DnsRoute]) -> None:
                try:
                    async with slots:
                        epochs = [await DnsRouter(r).fence_epoch() for r in routes]
                    self._fences[name] = max((e or 0 for e in epochs), default=0)
                except (RouterError, DNSException, OSError, TimeoutError, ValueError) as exc:
                    if name not in self._fence_errors:
                        log.warning("cannot read the DNS epoch fence; not bootstrapping "
                                    "below it", group=name, error=str(exc))
                    self._fence_errors.add(name)
            await asyncio.gather(*(read(n, r) for n, r in todo))

    def _absent_answering(self) -> dict[str, str]:
        """Memberless regions not confirmed unreachable (see
        :meth:`_ask_absent`): their members answer, or were not asked yet."""
        out = {}
        for region, since in self._absent_since.items():
            if not any(m.region == region and m.api_url for m in self._known.values()):
                continue  # never seen this term: nothing to ask
            asked = self._asked.get(region)
            if asked is None or asked[0] < since:
                out[region] = f"not yet asked whether {region}'s members answer"
            elif asked[1]:
                out[region] = (f"{', '.join(asked[1])} still answer(s) their API "
                               "(alive, cut off from etcd)")
        return out

    async def _ask_absent(self) -> None:
        """Observers confirm a region unreachable before member loss moves
        it (DESIGN's trigger): every second, ask the APIs of the members of
        each memberless region.  One that answers is alive but cut off from
        etcd, and rule 4 has it hold its groups: so do we."""
        while True:
            if not self._absent_since:  # nobody to ask until a region empties
                self._absent_seen.clear()
                await self._absent_seen.wait()
            for region in list(self._absent_since):
                known = [m for m in self._known.values() if m.region == region and m.api_url]
                if not known:
                    continue
                started = self._clock()
                s = self._settings()
                answers = await ask_healthz([m.api_url for m in known], s.peer_timeout_s,
                                            peer_source(s))
                alive = tuple(m.member for m, a in zip(known, answers, strict=True)
                              if a is not None and a.get("member", m.member) == m.member)
                before = self._asked.get(region)
                self._asked[region] = (started, alive)
                if before is None or before[1] != alive or before[0] < self._absent_since.get(
                        region, started):
                    if alive:
                        log.warning("memberless region still answers; holding its groups",
                                    region=region, members=list(alive))
                    self._inputs_changed = True
                    self._wake.set()
            await asyncio.sleep(ASK_ABSENT_EVERY_S)

    def _pause(self, view: ClusterView) -> float:
        """How long a cycle that changed nothing sleeps unless woken: until
        the next decision is due; a tick while a live drill runs (its phases
        follow the clock) or without the watch's copy to wake us."""
        if self._mirror is None or any(d.running for d in view.live_drills.values()):
            return self._tick_s()
        return max(self._decide_due - time.monotonic(), 0.0)

    async def _sleep(self, seconds: float) -> None:
        # Wake early on a watch event, but never sleep past the lease deadline.
        timeout = max(min(seconds, self._lease.remaining()), 0)
        self.wake_due = time.monotonic() + timeout
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _log(self, decision: Decision, view: ClusterView) -> None:
        # Each malformed key is logged once (again if it goes and comes back),
        # not at every cycle; the gauge says how many there are now.
        problems = frozenset(view.problems)
        for problem in sorted(problems - self._problems_logged):
            log.warning("ignoring malformed key", problem=problem)
        self._problems_logged = problems
        metrics.MALFORMED_KEYS.set(len(problems))
        if decision.reason != self._last_reason:
            log.info("decision", reason=decision.reason, revision=view.revision)
            self._last_reason = decision.reason
        else:
            log.debug("decision", reason=decision.reason, revision=view.revision)

    async def _apply(self, decision: Decision, view: ClusterView) -> None:
        await self._alert(decision)
        if decision.changes:
            await self._commit(decision, view)

    async def _alert(self, decision: Decision) -> None:
        """One history event per distinct alert reason (an evacuation that
        holds 500 groups for the same reason is one alert, not 500)."""
        by_reason: dict[str, list[str]] = {}
        for intent in decision.intents:
            if isinstance(intent, Alert):
                by_reason.setdefault(intent.reason, []).append(intent.group)
        alerted = {g for groups in by_reason.values() for g in groups}
        for reason, groups in by_reason.items():
            fresh = [g for g in groups if self._alerts.get(g) != reason]
            if not fresh:
                continue
            for g in fresh:
                self._alerts[g] = reason
                metrics.ALERTS.labels(g).inc()
            log.error("alert", groups=fresh[:20], count=len(fresh), reason=reason)
            fields: dict[str, object] = {"reason": reason, "term": self.term}
            if len(fresh) == 1:
                fields["group"] = fresh[0]
            else:
                fields["groups"] = fresh
            await self._history.record("alert", **fields)
        for group in set(self._alerts) - alerted:
            del self._alerts[group]

    def _change_ops(self, intent: SetActive, view: ClusterView, now: float
                    ) -> tuple[list[Compare], list[Op]]:
        """The guard and writes of one active-record change (rule 1); the
        caller adds the term guard once per txn."""
        key = self._keys.active(intent.group)
        # A group's first epoch, or the same region re-asserted above a fence
        # (rule 11), has no old region to fence or demote.
        # A rollback returns to the fenced primary that has every write:
        # nothing to fence or catch up (the failed target never promoted).
        mode = ("planned" if intent.planned
                else "bootstrap" if intent.prev is None or intent.prev.region == intent.region
                or intent.trigger == "rollback"
                else "forced")
        prev = intent.prev
        # The per-group limit's memory travels with the record; an operator
        # move carries the group's automatic moves forward.
        moves = intent.auto_moves or tuple(
            t for t in (prev.auto_moves if prev else ()) if now - t < HOUR_S)
        record = ActiveRecord(region=intent.region, epoch=intent.epoch, since=now,
                              reason=intent.reason, term=self.term, trigger=intent.trigger,
                              mode=mode, auto_moves=moves)
        compares = [Compare(key, "mod", prev.mod_revision if prev else 0)]
        event: dict[str, object] = {
            "group": intent.group, "region": intent.region, "epoch": intent.epoch,
            "previous_region": prev.region if prev else None,
            "previous_epoch": prev.epoch if prev else 0, "trigger": intent.trigger,
            "reason": intent.reason, "term": self.term, "mode": mode}
        if intent.evacuation:
            event["evacuation"] = intent.evacuation
        if intent.overrode:
            event["overrode"] = list(intent.overrode)
        if intent.data_loss_bytes is not None:
            event["data_loss_bytes"] = intent.data_loss_bytes  # the operator accepted it
        # The saga that carries the change out, durable with the decision;
        # what needs no I/O is done in this txn (members promote at once).
        s = self._settings()
        group = s.group_by_name(intent.group)
        wf = Workflow.new(intent.group, intent.epoch, prev.region if prev else None,
                          intent.region, mode, now,
                          data=group is not None and group.database is not None)
        if group is not None:
            wf = fast_forward(wf, group, now, fence_wait_until(
                wf, view, s.policy.isolation_grace_s, s.peer_timeout_s),
                old_acks_wanted(wf, view, s.policy.fence_ack_wait_s))
            done = [st.name for st in wf.steps if st.state == "done"]
            event["steps_done"] = done
            self._fast_forwarded[(intent.group, intent.epoch)] = (mode, done)
        success: list[Op] = [Put(key, record.to_value()),
                             self._history.put_op("epoch_changed", **event),
                             Put(self._keys.workflow(intent.group), wf.to_value())]
        old = view.workflows.get(intent.group)
        if old is not None and old.state == "running":
            # A newer epoch takes over: say so, never drop a saga silently.
            step = old.current()
            success.append(self._history.put_op(
                "workflow_superseded", group=intent.group, epoch=old.epoch,
                at_step=step.name if step else None, by_epoch=intent.epoch, term=self.term))
        return compares, success

    def _incident_ops(self, decision: Decision, view: ClusterView, now: float
                      ) -> tuple[list[Compare], list[Op]]:
        """The evacuation events and the storm guard's new incidents: written
        with the first batch of the moves they describe."""
        ops: list[Op] = []
        for ev in decision.evacuations:
            if not ev.moves:
                continue
            ops.append(self._history.put_op(
                "evacuation", region=ev.region, trigger=ev.trigger, reason=ev.reason,
                evidence=list(ev.evidence), new_incident=ev.new_incident,
                groups={m.group: m.region for m in ev.moves},
                held=dict(ev.held), overridden=dict(ev.overridden),
                term=self.term))
        if not decision.incidents:
            return [], ops
        kept = tuple(i for i in view.control.incidents if now - i.at < HOUR_S)
        ops.append(Put(self._keys.storm, incidents_value(kept + decision.incidents)))
        return [Compare(self._keys.storm, "mod", view.control.storm_mod_revision)], ops

    def _after_fast_forward(self, intent: SetActive) -> None:
        """Test fault points of steps done at creation fire once committed."""
        mode, done = self._fast_forwarded.pop((intent.group, intent.epoch), ("", []))
        for step in done:
            fault_point(f"after-{mode}-{step}")

    async def _drive_drills(self, view: ClusterView, now: float) -> bool:
        """Advance each running live drill one phase when it is time (its
        saga ended, its hold ran out, an operator aborted it), in one txn
        fenced by the term, the drill's key and, for a switch, the record.
        True when something was written."""
        wrote = False
        for d in view.live_drills.values():
            if not d.running:
                continue
            new, change = advance_live_drill(d, view, self._policy(), now)
            if new == d and change is None:
                continue
            key = self._keys.live_drill(d.group)
            compares = [Compare(key, "mod", d.mod_revision)]
            ops: list[Op] = [Put(key, new.to_value())]
            if change is not None:
                more, change_ops = self._change_ops(change, view, now)
                compares += more
                ops += change_ops
            if not new.running:
                ok = new.phase == "done"
                ops.append(self._history.put_op(
                    "drill", group=new.group, to=new.to, ok=ok, live=True, by=new.by,
                    drill=new.id, phase=new.phase, home=new.home, hold_s=new.hold_s,
                    out_s=new.out_s, back_s=new.back_s, reason=new.reason,
                    took_s=round(now - new.started, 3), term=self.term))
                ops.append(Put(self._keys.drill(new.group), to_json(
                    {"at": now, "ok": ok, "to": new.to, "by": new.by, "live": True,
                     "phase": new.phase, "failed": [] if ok else [new.reason]})))
            txn = await self._fenced_txn(compares, ops, "cannot advance a live drill; "
                                         "retrying", group=d.group, drill=d.id)
            if txn is None or not txn.succeeded:
                continue
            wrote = True
            if change is not None:
                self._after_fast_forward(change)
            (log.info if new.phase != "failed" else log.error)(
                "live drill", group=new.group, drill=new.id, phase=new.phase,
                reason=new.reason, epoch=change.epoch if change else None)
        return wrote

    async def _expire(self, drain: Drain) -> None:
        """Delete a drain past its end, with its history event, fenced by the
        term and the drain key (an operator's new drain wins the race).  The
        engine already stopped counting it; this makes etcd and the audit
        trail say so.  A store error is retried next cycle."""
        key = self._keys.drained(drain.region)
        txn = await self._fenced_txn(
            [Compare(key, "mod", drain.mod_revision)],
            [Delete(key), self._history.put_op(
                "drain_expired", region=drain.region, by=drain.by, drained_at=drain.at or 0.0,
                until=drain.ends(self._policy().drain_max_s), term=self.term)],
            "cannot expire a drain; retrying", drained_region=drain.region)
        if txn is not None and txn.succeeded:
            log.warning("drain expired", drained_region=drain.region, by=drain.by)

    async def _give_an_end(self, drain: Drain, now: float) -> None:
        """A drain without an end (an older failoverd's, or one written by
        hand) gets one: drain_max_s after it began, or from now."""
        key = self._keys.drained(drain.region)
        at = drain.at if drain.at is not None else now
        await self._fenced_txn(
            [Compare(key, "mod", drain.mod_revision)],
            [Put(key, to_json({"by": drain.by, "at": at,
                               "until": at + self._policy().drain_max_s}))],
            "cannot give a drain its end; retrying", drained_region=drain.region)

    async def _fenced_txn(self, compares: list[Compare], ops: list[Op], unknown: str,
                          **context: object) -> TxnResult | None:
        """One txn fenced by our term; None (logged as ``unknown``) when its
        outcome is unknown — the next cycle re-reads.  A success advances
        :attr:`committed_revision`."""
        try:
            txn = await self._store.txn(
                [Compare(self._keys.coordinator, "create", self.term), *compares], ops,
                [Get(self._keys.coordinator)])
        except StoreError as exc:
            log.warning(unknown, error=str(exc), **context)
            return None
        if txn.succeeded:
            self.committed_revision = max(self.committed_revision, txn.revision)
        return txn

    async def _answer(self, req: OperatorRequest, view: ClusterView, now: float) -> None:
        """Carry out or refuse one operator request, with its audit event and
        its result, in one txn fenced by the term (and the record)."""
        outcome = (handle_drill_request if req.action in DRILL_ACTIONS else handle_request)(
            view, self._policy(), req, now)
        compares = [Compare(self._keys.request(req.id), "mod", req.revision)]
        ops: list[Op] = []
        if outcome.drill is not None:
            old = view.live_drills.get(outcome.drill.group)
            compares.append(Compare(self._keys.live_drill(outcome.drill.group), "mod",
                                    old.mod_revision if old else 0))
            ops.append(Put(self._keys.live_drill(outcome.drill.group),
                           outcome.drill.to_value()))
        if outcome.change is not None:
            more, change_ops = self._change_ops(outcome.change, view, now)
            compares += more
            ops += change_ops
        elif outcome.control in {"pause", "resume"}:
            ops.append(Put(self._keys.paused, to_json(
                {"paused": outcome.control == "pause", "by": req.by, "at": now})))
        elif outcome.control == "drain" and req.region:
            ops.append(Put(self._keys.drained(req.region),
                           to_json({"by": req.by, "at": now, "until": outcome.until})))
        elif outcome.control == "undrain" and req.region:
            ops.append(Delete(self._keys.drained(req.region)))
        elif outcome.control == "retry" and (wf := view.workflows.get(req.group or "")):
            compares.append(Compare(self._keys.workflow(wf.group), "mod", wf.mod_revision))
            ops.append(Put(self._keys.workflow(wf.group), wf.retried(now).to_value()))
        result = {"id": req.id, "status": "accepted" if outcome.accepted else "refused",
                  "reason": outcome.reason, "at": now, "term": self.term,
                  "epoch": outcome.change.epoch if outcome.change else None}
        ops += [
            Put(self._keys.result(req.id), to_json(result)),
            Delete(self._keys.request(req.id)),
            self._history.put_op("operator_request", request=req.id, action=req.action,
                                 group=req.group, region=req.region, force=req.force,
                                 by=req.by, result=result["status"], reason=outcome.reason,
                                 term=self.term),
        ]
        txn = await self._fenced_txn(compares, ops, "operator request outcome unknown; "
                                     "re-reading", request=req.id)
        if txn is None:
            return
        if txn.succeeded:
            if outcome.change is not None:
                self._after_fast_forward(outcome.change)
            log.info("operator request", request=req.id, action=req.action, by=req.by,
                     status=result["status"], reason=outcome.reason)
            return
        seat = txn.gets[0] if txn.gets else None
        if seat is None or seat.create_revision != self.term:
            raise NotCoordinator("fenced write rejected: a newer term holds the seat")

    async def _commit(self, decision: Decision, view: ClusterView) -> None:
        """Commit every change of one decision in as few txns as etcd allows
        (``MAX_TXN_OPS``), each fenced by the term and every touched record's
        ``mod_revision`` (rule 1): a deposed coordinator's batch is refused
        as a whole.  Batches go in order; the first failure stops the rest
        (the next cycle re-reads and decides again)."""
        self._ensure_leading()
        now = self._clock()
        extra_compares, extra_ops = self._incident_ops(decision, view, now)
        batches: list[tuple[list[SetActive], list[Compare], list[Op]]] = []
        current: tuple[list[SetActive], list[Compare], list[Op]] = (
            [], list(extra_compares), list(extra_ops))
        for intent in decision.changes:
            compares, ops = self._change_ops(intent, view, now)
            if current[0] and (len(current[1]) + len(compares) + 1 > MAX_TXN_OPS
                               or len(current[2]) + len(ops) + 1 > MAX_TXN_OPS):
                batches.append(current)
                current = ([], [], [])
            current[0].append(intent)
            current[1].extend(compares)
            current[2].extend(ops)
        batches.append(current)
        fault_point("before-commit")
        started = time.monotonic()
        done: set[str] = set()
        term_guard = Compare(self._keys.coordinator, "create", self.term)

        async def send(intents: list[SetActive], compares: list[Compare], ops: list[Op]
                       ) -> bool:
            ok = await self._commit_batch(intents, [term_guard, *compares], ops)
            if ok:
                done.update(i.group for i in intents)
                for intent in intents:
                    self._after_fast_forward(intent)
            return ok

        # The first batch (it carries the incident and the evacuation event)
        # alone; the others, independent of each other, a few at a time.
        if await send(*batches[0]) and len(batches) > 1:
            self._ensure_leading()
            slots = asyncio.Semaphore(PARALLEL_BATCHES)

            async def bounded(batch: tuple[list[SetActive], list[Compare], list[Op]]) -> bool:
                async with slots:
                    return await send(*batch)
            results = await asyncio.gather(*(bounded(b) for b in batches[1:]),
                                           return_exceptions=True)
            # Every batch resolved (history says which landed); then, if our
            # term ended meanwhile, step down.
            for r in results:
                if isinstance(r, BaseException):
                    raise r
        committed = len(done)
        for ev in decision.evacuations:
            moved = sum(1 for m in ev.moves if m.group in done)
            if moved and ev.new_incident:
                metrics.EVACUATIONS.labels(ev.region, ev.trigger).inc()
            if ev.moves:
                log.warning("evacuation", evacuated_region=ev.region, trigger=ev.trigger,
                            reason=ev.reason, groups=len(ev.moves), committed=moved,
                            held=len(ev.held), overridden=len(ev.overridden),
                            took_ms=round((time.monotonic() - started) * 1000, 1))
        if committed < len(decision.changes) and any(e.moves for e in decision.evacuations):
            await self._history.record("evacuation_incomplete", committed=committed,
                                       planned=len(decision.changes), term=self.term)

    async def _commit_batch(self, intents: list[SetActive], compares: list[Compare],
                            ops: list[Op]) -> bool:
        """One fenced txn; True if it applied.  A commit in flight when our
        term ends is always resolved, so history says whether it landed."""
        txn = asyncio.create_task(
            self._store.txn(compares, ops, [Get(self._keys.coordinator)]),
            name=f"commit-{intents[0].group}-{intents[0].epoch}+{len(intents) - 1}",
        )
        try:
            await asyncio.shield(txn)
        except asyncio.CancelledError:
            # Our term is ending (lease deadline).  The request may already be
            # on the wire: learn and record its outcome before unwinding, so
            # the audit trail says truthfully whether it landed.
            with contextlib.suppress(StoreError, NotCoordinator):
                await self._outcome(intents, await txn)
            raise
        except StoreError:
            pass
        try:
            result = txn.result()
        except StoreError as exc:
            # Ambiguous: it may or may not have applied.  The next cycle
            # re-reads and sees which.
            log.warning("commit outcome unknown; re-reading", groups=len(intents),
                        group=intents[0].group, error=str(exc))
            for intent in intents:
                metrics.FAILOVERS.labels(intent.trigger, "unknown").inc()
            return False
        await self._outcome(intents, result)
        if result.succeeded:
            self.committed_revision = max(self.committed_revision, result.revision)
        return result.succeeded

    async def _outcome(self, intents: list[SetActive], result: TxnResult) -> None:
        outcome = "committed" if result.succeeded else "rejected"
        for intent in intents:
            metrics.FAILOVERS.labels(intent.trigger, outcome).inc()
        if result.succeeded:
            for intent in intents[:MAX_LOGGED_CHANGES]:
                log.info("active region committed", group=intent.group, epoch=intent.epoch,
                         to_region=intent.region, trigger=intent.trigger,
                         reason=intent.reason, term=self.term)
            if len(intents) > MAX_LOGGED_CHANGES:
                log.info("active regions committed", count=len(intents), term=self.term,
                         revision=result.revision)
            return
        seat = result.gets[0] if result.gets else None
        still_ours = seat is not None and seat.create_revision == self.term
        log.warning("fenced write rejected", groups=[i.group for i in intents[:20]],
                    count=len(intents), term=self.term, still_coordinator=still_ours)
        fields: dict[str, object] = {"term": self.term, "still_coordinator": still_ours}
        if len(intents) == 1:
            fields |= {"group": intents[0].group, "region": intents[0].region,
                       "epoch": intents[0].epoch}
        else:
            fields["groups"] = {i.group: i.epoch for i in intents}
        await self._history.record("write_rejected", **fields)
        if not still_ours:
            raise NotCoordinator("fenced write rejected: a newer term holds the seat")

    async def _maybe_prune(self) -> None:
        now = self._clock()
        if now < self._next_prune:
            return
        self._next_prune = now + PRUNE_EVERY_S
        try:
            await self._history.prune(self._history_limit())
            for kv in (await self._store.get_prefix(self._keys.results)).kvs:
                if kv.mod_revision and _older_than(kv.value, now - HOUR_S):
                    await self._store.delete(kv.key)
            events = await read_history(self._store, self._keys,
                                        min(self._history_limit(), LEARN_FROM_EVENTS))
        except StoreError as exc:
            log.warning("history prune failed", error=str(exc))
            return
        learned = learn_failover_s(events)
        if learned is not None and learned != self.learned_failover_s:
            log.info("learned failover duration", seconds=round(learned, 3))
        self.learned_failover_s = learned


def _older_than(value: str, cutoff: float) -> bool:
    try:
        at = json.loads(value).get("at", 0)
    except (ValueError, AttributeError):
        return True
    return isinstance(at, int | float) and at < cutoff


def _export(decision: Decision) -> None:
    """The coordinator's judgement of every region, as metrics (judged once,
    by the decision)."""
    for r in decision.regions:
        metrics.set_one_of(metrics.REGION_VERDICT, metrics.VERDICTS,
                           r.health.verdict, r.name)
        metrics.set_one_of(metrics.POWER_STATE, metrics.POWER_STATES,
                           r.power.state, r.name)


def _export_view(view: ClusterView, decision: Decision, policy: Policy, now: float) -> None:
    """What alerts need from the coordinator's view (every decided cycle)."""
    for g in policy.groups:
        rec = view.active.get(g.name)
        metrics.set_labelled(metrics.GROUP_ACTIVE, 1 if rec is not None else 0, g.name)
        wf = view.workflows.get(g.name)
        failed = (rec is not None and wf is not None and wf.epoch == rec.epoch
                  and wf.state == "failed")
        metrics.set_labelled(metrics.SAGA_FAILED, 1 if failed else 0, g.name)
        metrics.set_labelled(metrics.LAST_DRILL, view.drills.get(g.name, 0.0), g.name)
    for region, _ in policy.priorities:
        metrics.set_labelled(metrics.REGION_MEMBERS, len(view.members_in(region)), region)
        stale = sum(1 for (r, _), readings in view.power.items() if r == region and readings
                    and now - max(x.received for x in readings) > policy.sensor_stale_s)
        metrics.set_labelled(metrics.POWER_SENSORS_STALE, stale, region)
        drain = next((d for d in view.control.drains if d.region == region), None)
        metrics.set_labelled(metrics.DRAIN_SECONDS_LEFT,
                             max(drain.ends(policy.drain_max_s) - now, 0.0) if drain else 0.0,
                             region)
    metrics.GROUPS_HELD.set(sum(1 for i in decision.intents if isinstance(i, Alert)
                                and "moved despite" not in i.reason))


def with_local_power(view: ClusterView,
                     local: Mapping[tuple[str, str], Reading]) -> ClusterView:
    """``view`` with this member's own readings that etcd does not show yet
    (heard, relay in flight) as one more copy of their sensor: the newest
    copy is what counts (``core.power.merge``), so a reading etcd already
    has, or has newer, changes nothing.  On the power path this saves the
    relay's etcd write and watch hop (~8 ms of ~22 ms)."""
    power: dict[tuple[str, str], list[Reading]] | None = None
    for key, r in local.items():
        copies = view.power.get(key, [])
        mine = (r.ts, r.received, r.lwt_at or 0.0)
        if any((c.ts, c.received, c.lwt_at or 0.0) >= mine for c in copies):
            continue
        if power is None:
            power = dict(view.power)
        power[key] = [*copies, r]
    return view if power is None else replace(view, power=power)


def learn_failover_s(events: list[dict[str, object]], last: int = 10) -> float | None:
    """How long failovers take: from each epoch change to the first promote
    done for it, the slowest of the ``last`` measured (conservative); None
    until three have been measured.  Events are newest first."""
    changed = {(e.get("group"), e.get("epoch")): e.get("ts") for e in events
               if e.get("kind") == "epoch_changed" and e.get("previous_epoch")}
    done: dict[tuple[object, object], float] = {}
    for e in events:
        key = (e.get("group"), e.get("epoch"))
        ts = e.get("ts")
        if e.get("kind") == "promote_done" and key in changed and isinstance(ts, float):
            done[key] = min(ts, done.get(key, ts))
    durations = []
    for key, end in done.items():
        start = changed[key]
        if isinstance(start, float) and end >= start:
            durations.append((start, end - start))
    # A completed saga measures the whole failover (reroute and verify too).
    for e in events:
        start, took = e.get("ts"), e.get("duration_s")
        if (e.get("kind") == "workflow_done" and e.get("previous_region")
                and isinstance(start, float) and isinstance(took, int | float)):
            durations.append((start, float(took)))
    recent = [d for _, d in sorted(durations, reverse=True)[:last]]
    return max(recent) if len(recent) >= 3 else None
