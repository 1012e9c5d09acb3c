"""The coordinator cycle: snapshot -> decide -> fenced commit.

Level-triggered: it wakes on any watch event under the cluster prefix (or a
slow tick), re-reads the whole cluster at one revision and decides afresh, so
a lost or compacted watch event can delay a decision but never corrupt one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import replace

import structlog

from failoverd import metrics
from failoverd.config import Settings
from failoverd.engine import (
    Alert,
    Decision,
    Policy,
    SetActive,
    decide,
    handle_request,
    power_of,
    region_health,
)
from failoverd.faults import async_fault_point, fault_point
from failoverd.history import History, read_history
from failoverd.lease import KeptLease
from failoverd.model import (
    ActiveRecord,
    ClusterView,
    Keyspace,
    OperatorRequest,
    parse_view,
    to_json,
)
from failoverd.saga import Saga, SagaFenced
from failoverd.store import Compare, Delete, Get, Op, Put, Store, StoreError, TxnResult
from failoverd.workflow import Workflow

log = structlog.get_logger("failoverd.coordinator")

HOUR_S = 3600.0
PRUNE_EVERY_S = 60.0


class NotCoordinator(Exception):
    """This member must stop acting as coordinator now."""


class Coordinator:
    def __init__(self, store: Store, keys: Keyspace, member: str, term: int,
                 lease: KeptLease, history: History, policy: Callable[[], Policy],
                 tick_s: Callable[[], float], history_limit: Callable[[], int],
                 wake: asyncio.Event, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time) -> None:
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
        self._clock = clock
        self._last_reason = ""
        self._alerts: dict[str, str] = {}
        self._next_prune = 0.0
        self._absent_since: dict[str, float] = {}
        self._saga = Saga(store, keys, term, history, settings, clock)
        self.learned_failover_s: float | None = None
        # When the current cycle began (monotonic); the systemd watchdog
        # stops pinging when it is too old.
        self.cycle_started = time.monotonic()

    def _ensure_leading(self, view: ClusterView | None = None) -> None:
        if not self._lease.valid():
            raise NotCoordinator("lease passed its local deadline")
        if view is not None:
            seat = view.coordinator
            if seat is None or seat.term != self.term or seat.member != self._member:
                raise NotCoordinator("coordinator key is no longer ours")

    async def run(self) -> None:
        """Lead until :class:`NotCoordinator` (or cancellation)."""
        while True:
            self.cycle_started = time.monotonic()
            await async_fault_point("coordinator-cycle")
            self._wake.clear()
            self._ensure_leading()
            try:
                snap = await self._store.snapshot(self._keys.prefix, exclude=("history/",))
            except StoreError as exc:
                # Static stability: no store, no change.  The lease keeper ends
                # our term if this lasts past the deadline.
                log.warning("cannot read cluster state; holding", error=str(exc))
                await self._sleep(min(self._tick_s(), 0.5))
                continue
            now = self._clock()
            view = self._track_absence(parse_view(self._keys, snap), now)
            self._ensure_leading(view)
            if view.requests:
                # Operator requests first; then decide on what they changed.
                for req in view.requests:
                    await self._answer(req, view, now)
                await asyncio.sleep(0)
                continue
            policy = self._policy()
            decision = decide(view, policy, now)
            _export(view, policy, now)
            self._log(decision, view)
            await self._apply(decision, view)
            progressed = False
            if not decision.changes:
                try:
                    progressed = await self._saga.advance(view)
                except SagaFenced as exc:
                    raise NotCoordinator(str(exc)) from exc
                except StoreError as exc:
                    log.warning("saga paused: store error", error=str(exc))
            await self._maybe_prune()
            # A saga that moved goes on at once, after a fresh look at the
            # cluster; one that waits (drain, retry) wakes when it is due.
            pause = self._tick_s()
            if self._saga.due_at is not None:
                pause = min(pause, max(self._saga.due_at - self._clock(), 0.0))
            await self._sleep(0 if progressed else pause)

    def _track_absence(self, view: ClusterView, now: float) -> ClusterView:
        present = view.regions_with_members()
        for region in list(self._absent_since):
            if region in present:
                del self._absent_since[region]
        for region in {r.region for r in view.active.values()} - present:
            self._absent_since.setdefault(region, now)
        return replace(view, absent_since=dict(self._absent_since),
                       learned_failover_s=self.learned_failover_s)

    async def _sleep(self, seconds: float) -> None:
        # Wake early on a watch event, but never sleep past the lease deadline.
        timeout = max(min(seconds, self._lease.remaining()), 0)
        try:
            async with asyncio.timeout(timeout):
                await self._wake.wait()
        except TimeoutError:
            pass

    def _log(self, decision: Decision, view: ClusterView) -> None:
        for problem in view.problems:
            log.warning("ignoring malformed key", problem=problem)
        if decision.reason != self._last_reason:
            log.info("decision", reason=decision.reason, revision=view.revision)
            self._last_reason = decision.reason
        else:
            log.debug("decision", reason=decision.reason, revision=view.revision)

    async def _apply(self, decision: Decision, view: ClusterView) -> None:
        alerted = set()
        for intent in decision.intents:
            if isinstance(intent, Alert):
                alerted.add(intent.group)
                if self._alerts.get(intent.group) != intent.reason:
                    self._alerts[intent.group] = intent.reason
                    metrics.ALERTS.labels(intent.group).inc()
                    log.error("alert", group=intent.group, reason=intent.reason)
                    await self._history.record("alert", group=intent.group,
                                               reason=intent.reason, term=self.term)
            else:
                await self._commit(intent, view)
        for group in set(self._alerts) - alerted:
            del self._alerts[group]

    def _change_ops(self, intent: SetActive, view: ClusterView, now: float
                    ) -> tuple[list[Compare], list[Op]]:
        """The guards and writes of one active-record change (rule 1)."""
        key = self._keys.active(intent.group)
        mode = "planned" if intent.planned else "bootstrap" if intent.prev is None else "forced"
        record = ActiveRecord(region=intent.region, epoch=intent.epoch, since=now,
                              reason=intent.reason, term=self.term, trigger=intent.trigger,
                              mode=mode)
        prev = intent.prev
        compares = [
            Compare(self._keys.coordinator, "create", self.term),
            Compare(key, "mod", prev.mod_revision if prev else 0),
        ]
        success: list[Op] = [
            Put(key, record.to_value()),
            self._history.put_op(
                "epoch_changed", group=intent.group, region=intent.region,
                epoch=intent.epoch, previous_region=prev.region if prev else None,
                previous_epoch=prev.epoch if prev else 0, trigger=intent.trigger,
                reason=intent.reason, term=self.term, mode=mode,
            ),
        ]
        # The saga that carries the change out, durable with the decision.
        wf = Workflow.new(intent.group, intent.epoch, prev.region if prev else None,
                          intent.region, mode, now)
        success.append(Put(self._keys.workflow(intent.group), wf.to_value()))
        old = view.workflows.get(intent.group)
        if old is not None and old.state == "running":
            # A newer epoch takes over: say so, never drop a saga silently.
            step = old.current()
            success.append(self._history.put_op(
                "workflow_superseded", group=intent.group, epoch=old.epoch,
                at_step=step.name if step else None, by_epoch=intent.epoch, term=self.term))
        if intent.automatic:
            times = [t for t in view.control.auto_failovers if now - t < HOUR_S] + [now]
            compares.append(Compare(self._keys.auto_failovers, "mod",
                                    view.control.auto_failovers_mod_revision))
            success.append(Put(self._keys.auto_failovers, to_json({"times": times})))
        return compares, success

    async def _answer(self, req: OperatorRequest, view: ClusterView, now: float) -> None:
        """Carry out or refuse one operator request, with its audit event and
        its result, in one txn fenced by the term (and the record)."""
        outcome = handle_request(view, self._policy(), req, now)
        compares = [Compare(self._keys.coordinator, "create", self.term),
                    Compare(self._keys.request(req.id), "mod", req.revision)]
        ops: list[Op] = []
        if outcome.change is not None:
            more, ops = self._change_ops(outcome.change, view, now)
            compares += more[1:]
        elif outcome.control in {"pause", "resume"}:
            ops.append(Put(self._keys.paused, to_json(
                {"paused": outcome.control == "pause", "by": req.by, "at": now})))
        elif outcome.control == "drain" and req.region:
            ops.append(Put(self._keys.drained(req.region), to_json({"by": req.by, "at": now})))
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
        try:
            txn = await self._store.txn(compares, ops, [Get(self._keys.coordinator)])
        except StoreError as exc:
            log.warning("operator request outcome unknown; re-reading", request=req.id,
                        error=str(exc))
            return
        if txn.succeeded:
            log.info("operator request", request=req.id, action=req.action, by=req.by,
                     status=result["status"], reason=outcome.reason)
            return
        seat = txn.gets[0] if txn.gets else None
        if seat is None or seat.create_revision != self.term:
            raise NotCoordinator("fenced write rejected: a newer term holds the seat")

    async def _commit(self, intent: SetActive, view: ClusterView) -> None:
        self._ensure_leading()
        now = self._clock()
        compares, success = self._change_ops(intent, view, now)
        fault_point("before-commit")
        txn = asyncio.create_task(
            self._store.txn(compares, success, [Get(self._keys.coordinator)]),
            name=f"commit-{intent.group}-{intent.epoch}",
        )
        try:
            await asyncio.shield(txn)
        except asyncio.CancelledError:
            # Our term is ending (lease deadline).  The request may already be
            # on the wire: learn and record its outcome before unwinding, so
            # the audit trail says truthfully whether it landed.
            with contextlib.suppress(StoreError, NotCoordinator):
                await self._outcome(intent, await txn)
            raise
        except StoreError:
            pass
        try:
            result = txn.result()
        except StoreError as exc:
            # Ambiguous: it may or may not have applied.  The next cycle
            # re-reads and sees which.
            log.warning("commit outcome unknown; re-reading", group=intent.group,
                        epoch=intent.epoch, error=str(exc))
            metrics.FAILOVERS.labels(intent.trigger, "unknown").inc()
            return
        await self._outcome(intent, result)

    async def _outcome(self, intent: SetActive, result: TxnResult) -> None:
        bound = log.bind(group=intent.group, epoch=intent.epoch, term=self.term)
        metrics.FAILOVERS.labels(intent.trigger,
                                 "committed" if result.succeeded else "rejected").inc()
        if result.succeeded:
            bound.info("active region committed", to_region=intent.region,
                       trigger=intent.trigger, reason=intent.reason)
            return
        seat = result.gets[0] if result.gets else None
        still_ours = seat is not None and seat.create_revision == self.term
        bound.warning("fenced write rejected", to_region=intent.region,
                      still_coordinator=still_ours)
        await self._history.record(
            "write_rejected", group=intent.group, region=intent.region, epoch=intent.epoch,
            term=self.term, still_coordinator=still_ours,
        )
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
            events = await read_history(self._store, self._keys, self._history_limit())
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


def _export(view: ClusterView, policy: Policy, now: float) -> None:
    """The coordinator's judgement of every region, as metrics."""
    for region, _ in policy.priorities:
        metrics.set_one_of(metrics.REGION_VERDICT, "verdict", metrics.VERDICTS,
                           region_health(view, policy, region).verdict, region=region)
        metrics.set_one_of(metrics.POWER_STATE, "state", metrics.POWER_STATES,
                           power_of(view, policy, region, now).state, region=region)


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
