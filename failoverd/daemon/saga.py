"""Running the failover saga (the coordinator's imperative half).

Every running workflow whose epoch is still the group's epoch has a task
(:class:`SagaRunner`) that executes its steps (idempotent, carrying the
epoch) and records done / retry / failed — each record fenced by the
coordinator term and the workflow's own ``mod_revision``.  A successor
coordinator finds the recorded step and runs it again.  Waiting steps (drain
time, members' acks, verification) say when they are due, and are woken by
the changes they wait for.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import structlog

from failoverd import metrics
from failoverd.config import DnsRoute, GroupSettings, HaproxyRoute, Settings
from failoverd.core.data import newest_report
from failoverd.core.model import ClusterView, Keyspace
from failoverd.core.store import MAX_TXN_OPS, Compare, Get, Op, Put, Store, StoreError, TxnResult
from failoverd.core.workflow import Step, Workflow
from failoverd.daemon.isolation import self_fence_deadline
from failoverd.etcd.history import History
from failoverd.faults import fault_point
from failoverd.traffic.routers import (
    Change,
    DnsRouter,
    FencedOut,
    HaproxyRouter,
    RouterError,
    make_router,
    route_timeout_s,
)

log = structlog.get_logger("failoverd.daemon.saga")

ACK_SLACK_S = 15.0
# A verify that does not see the new region yet looks again this soon.
VERIFY_RECHECK_S = 0.1
# Steps members watch for: recorded as running before they execute.  Other
# steps are idempotent and recorded once, with their outcome.
GATES = frozenset({"promote_new", "demote_old"})


class StepFailed(Exception):
    """This attempt of the step failed; it may be retried."""


class StepAborted(StepFailed):
    """The step cannot succeed by retrying (a catch-up past its bound): the
    saga fails at once, for the coordinator's compensation."""


class SagaFenced(Exception):
    """The coordinator lost its term while recording a step."""


# What one step may take at worst, per route: a call is bounded by the
# router's timeout and a step makes at most three (apply, read back, fence).
CALLS_PER_STEP = 3
VERIFY_HTTP_S = 2.0


def worst_step_s(group: GroupSettings) -> float:
    """The longest one saga step of ``group`` can block the coordinator's
    cycle with every resource hanging to its timeout (the watchdog's bound)."""
    total = VERIFY_HTTP_S
    for route in group.routes:
        total += CALLS_PER_STEP * route_timeout_s(route)
    return total


def precheck(wf: Workflow, group: GroupSettings) -> str:
    """Routes exist for the target (pure: config only).  ``FencedOut`` if not:
    a configuration problem, not retried."""
    for route in group.routes:
        if isinstance(route, HaproxyRoute) and wf.to_region not in route.servers:
            raise FencedOut(f"no haproxy server for {wf.to_region}")
        if isinstance(route, DnsRoute) and not route.addresses.get(wf.to_region):
            raise FencedOut(f"no DNS addresses for {wf.to_region}")
    return f"{len(group.routes)} route(s) ready for {wf.to_region}"


def fence_wait_until(wf: Workflow, view: ClusterView, grace_s: float,
                     peer_timeout_s: float) -> float | None:
    """When the old region of an unplanned move has no member in etcd, the
    time its members have at the latest fenced themselves (they cannot see
    the new epoch in etcd; they learn it from their peers, or fence when no
    peer answers): promoting before it could make two regions active.
    None when its members are in etcd (they demote on the watch)."""
    old = wf.from_region
    if wf.mode != "forced" or old is None or old in view.regions_with_members():
        return None
    return self_fence_deadline(view.absent_since.get(old, wf.created), wf.created, grace_s,
                               peer_timeout_s)


def old_acks_wanted(wf: Workflow, view: ClusterView, wait_s: float) -> bool:
    """Does fence_old wait for the old region's members to report standby?
    Yes in an unplanned move out of a region with members in etcd: they
    demote when their watch shows the new epoch, and a member whose watch
    lags (a paused etcd member under its stream) must not still be active
    when the new region promotes."""
    return (wf.mode == "forced" and wait_s > 0 and wf.from_region is not None
            and wf.from_region in view.regions_with_members())


def fast_forward(wf: Workflow, group: GroupSettings, now: float,
                 fence_until: float | None = None, old_acks_wanted: bool = False
                 ) -> Workflow:
    """A new workflow with the steps that need no I/O already done, and the
    first gate already running, so that it is written in the very txn of the
    epoch change: members start promoting on the record's watch event, with
    no saga write in between (1,000 sagas need no 1,000 writes first).

    No I/O: precheck (config); drain_old when ``drain_s`` is 0 (no drain
    period: reroute moves the traffic); fence_old when no route can fence
    (only HAProxy does) and no old member's demote is awaited
    (``old_acks_wanted``).  The first step that needs I/O stops it.
    """
    for step in wf.steps:
        if step.name == "precheck":
            try:
                detail = precheck(wf, group)
            except FencedOut:
                return wf  # the saga records the failure
        elif step.name == "drain_old" and (group.drain_s == 0 or not wf.from_region):
            detail = "no drain period (drain_s = 0)"
        elif step.name == "fence_old" and (fence_until is not None and fence_until > now):
            return wf  # waits for the old region's self-fence (the saga's step)
        elif step.name == "fence_old" and wf.has("catchup"):
            # A database's old primary is fenced by its demote hook, which
            # starts on this record: running, in the txn of the change.
            return wf.with_step(replace(step, state="running", started=now), now)
        elif step.name == "fence_old" and (old_acks_wanted or any(
                isinstance(r, HaproxyRoute) for r in group.routes)):
            return wf  # the saga fences, or waits for the old members' demote
        elif step.name == "fence_old":
            detail = "no route that fences"
        elif step.name in GATES:
            return wf.with_step(replace(step, state="running", started=now), now)
        else:
            return wf
        wf = wf.with_step(replace(step, state="done", started=now, finished=now,
                                  detail=detail, attempts=1), now)
    return wf


@dataclass
class _Record:
    compares: list[Compare]
    ops: list[Op]
    done: asyncio.Future[TxnResult]
    alone: bool = False


class RecordWriter:
    """Workflow records of concurrent sagas, written together.

    Each record is fenced by the term (added here, once per txn) and its own
    workflow's ``mod_revision``.  Records that queue up while a txn is in
    flight go out in the next one, within ``MAX_TXN_OPS``: 1,000
    sagas advancing together cost tens of txns, not thousands.  A shared txn
    that fails under our term (some workflow changed under us) is retried
    one record per txn, so one stale record never fails the others; under a
    newer term every record gets the refusal.  Atomicity per record is
    unchanged: a record applies entirely or not at all.
    """

    def __init__(self, store: Store, term_guard: Compare, seat: Get) -> None:
        self._store = store
        self._term_guard = term_guard
        self._seat = seat
        self._queue: list[_Record] = []
        self._lock = asyncio.Lock()

    async def write(self, compares: list[Compare], ops: list[Op]) -> TxnResult:
        """The txn's result as if this record had been sent alone; raises
        :class:`StoreError` when its outcome is unknown.

        Writers take turns (FIFO): whoever holds the turn sends one txn with
        every record queued by then, its own among them; a writer whose
        record went out in someone else's txn just returns."""
        record = _Record(compares, ops, asyncio.get_running_loop().create_future())
        self._queue.append(record)
        try:
            await asyncio.sleep(0)  # let the records of this moment join
            while not record.done.done():
                async with self._lock:
                    if not record.done.done():
                        await self._send()
        except asyncio.CancelledError:
            if record in self._queue:
                self._queue.remove(record)
            raise
        return record.done.result()

    def _take(self) -> list[_Record]:
        batch: list[_Record] = []
        n_cmp = n_ops = 1
        while self._queue:
            nxt = self._queue[0]
            if batch and (nxt.alone or batch[0].alone
                          or n_cmp + len(nxt.compares) > MAX_TXN_OPS
                          or n_ops + len(nxt.ops) > MAX_TXN_OPS):
                break
            batch.append(self._queue.pop(0))
            n_cmp += len(nxt.compares)
            n_ops += len(nxt.ops)
        return batch

    async def _send(self) -> None:
        batch = self._take()
        if not batch:
            return
        try:
            result = await self._store.txn(
                [self._term_guard, *(c for r in batch for c in r.compares)],
                [op for r in batch for op in r.ops], [self._seat])
        except StoreError as exc:
            for r in batch:
                if not r.done.done():
                    r.done.set_exception(StoreError(f"record outcome unknown: {exc}"))
            return
        except asyncio.CancelledError:
            for r in batch:
                if not r.done.done():
                    r.done.set_exception(StoreError("record outcome unknown: cancelled"))
                    r.done.exception()  # retrieved: the cancelled writer never looks
            raise
        seat = result.gets[0] if result.gets else None
        ours = seat is not None and seat.create_revision == self._term_guard.value
        if result.succeeded or len(batch) == 1 or not ours:
            for r in batch:
                if not r.done.done():
                    r.done.set_result(result)
        else:
            # Someone's workflow changed under us: find whose, one by one.
            self._queue[:0] = [_Record(r.compares, r.ops, r.done, alone=True) for r in batch]


class Saga:
    """Runs one step of a workflow at a time, recording each (fenced).

    Owns nothing but the term it writes under; must not decide anything —
    which workflow runs, and when, is :class:`SagaRunner`'s business.
    """

    def __init__(self, store: Store, keys: Keyspace, term: int, history: History,
                 settings: Callable[[], Settings], clock: Callable[[], float] = time.time
                 ) -> None:
        self._store = store
        self._keys = keys
        self._term = term
        self._history = history
        self._settings = settings
        self._clock = clock
        # When a waiting step (a drain, a retry, a verify re-check) of each
        # group is next due, so its runner wakes for it.
        self.due: dict[str, float] = {}
        # The etcd revision of our newest workflow write.
        self.revision = 0
        self._writer = RecordWriter(store, Compare(keys.coordinator, "create", term),
                                    Get(keys.coordinator))

    async def advance(self, wf: Workflow, group: GroupSettings, view: ClusterView
                      ) -> Workflow:
        """Run steps until one has to wait (or the saga ends); the workflow as
        recorded.

        Steps that finish at once are recorded together with what comes
        next (the next gate's ``running``, a waiting step's start, a
        failure, the end): a coordinator that dies in between is replaced
        and its successor re-runs them — every step is idempotent — so one
        write per wait instead of one per step, which is what lets 1,000
        sagas start together.
        """
        self.due.pop(wf.group, None)
        recorded = work = wf
        unrecorded: list[Step] = []
        while work.state == "running":
            now = self._clock()
            step = work.current()
            if step is None or step.state == "failed":
                break
            if now < step.retry_at:
                self._due(wf.group, step.retry_at)
                break
            was_pending = step.state == "pending"
            if was_pending:
                step = replace(step, state="running", started=now)
                if step.name in GATES:  # members act when they see it running
                    recorded = work = await self._record(recorded, [*unrecorded, step], now)
                    self._after(wf, unrecorded)
                    unrecorded = []
            fault_point(f"before-{wf.mode}-{step.name}")
            bound = log.bind(group=wf.group, epoch=wf.epoch, step=step.name)
            try:
                done, detail = await self._run_to_outcome(step, work, group, view, now, bound)
            except (FencedOut, StepFailed, RouterError, StoreError) as exc:
                step = self._failed(wf, group, step, exc, now, bound)
                recorded = await self._record(recorded, [*unrecorded, step], now)
                self._after(wf, unrecorded)
                return recorded
            if not done:
                if was_pending and step.name not in GATES:
                    # Keep its start time (drain, deadlines) and say what it
                    # waits for (status shows it).
                    unrecorded.append(replace(step, detail=detail))
                break  # waiting: looked at again when due or the view changes
            step = replace(step, state="done", finished=self._clock(), detail=detail,
                           error="", attempts=step.attempts + 1)
            unrecorded.append(step)
            work = work.with_step(step, now)
            bound.debug("saga step done", detail=detail)  # the saga's end is logged
        if unrecorded:
            recorded = await self._record(recorded, unrecorded, self._clock())
            self._after(wf, unrecorded)
        return recorded

    def _failed(self, wf: Workflow, group: GroupSettings, step: Step, exc: Exception,
                now: float, bound: Any) -> Step:
        """The step after a failed attempt: failed for good (fenced out, or
        out of attempts) or due again after a jittered backoff."""
        attempts = step.attempts + 1
        if isinstance(exc, StepAborted):
            bound.error("saga step aborted", error=str(exc))
            return replace(step, state="failed", error=str(exc), finished=now,
                           attempts=attempts)
        if isinstance(exc, FencedOut):
            bound.error("saga fenced out: a newer epoch owns the resource", error=str(exc))
            return replace(step, state="failed", error=str(exc), finished=now,
                           attempts=attempts)
        if attempts >= group.step_attempts:
            bound.error("saga step failed; giving up", error=str(exc), attempts=attempts)
            return replace(step, state="failed", error=str(exc), attempts=attempts,
                           finished=now)
        delay = min(0.5 * 2 ** attempts, 30.0) * random.uniform(0.5, 1.5)
        bound.warning("saga step failed; retrying", error=str(exc), attempts=attempts,
                      retry_in_s=round(delay, 2))
        self._due(wf.group, now + delay)
        return replace(step, attempts=attempts, error=str(exc), retry_at=now + delay,
                       started=now)

    @staticmethod
    def _after(wf: Workflow, recorded: list[Step]) -> None:
        """Test fault points after the record that holds each step's end."""
        for st in recorded:
            if st.state == "done":
                fault_point(f"after-{wf.mode}-{st.name}")

    async def _run_to_outcome(self, step: Step, wf: Workflow, group: GroupSettings,
                              view: ClusterView, now: float, bound: Any) -> tuple[bool, str]:
        """Run the step; if our term ends meanwhile, let a router change that
        is under way finish (a half-applied switch is worse than either
        state; the resource's fence stops a stale one) and log its outcome."""
        task = asyncio.create_task(self._run(step, wf, group, view, now),
                                   name=f"saga-{wf.group}-{step.name}")
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            try:
                await task
                bound.warning("saga step finished after our term ended")
            except FencedOut as exc:
                bound.error("saga fenced out: a newer epoch owns the resource", error=str(exc))
            except (StepFailed, RouterError, StoreError) as exc:
                bound.warning("saga step failed after our term ended", error=str(exc))
            raise

    async def _record(self, wf: Workflow, steps: list[Step], now: float) -> Workflow:
        """Write ``steps`` into ``wf`` (as recorded) in one txn fenced by the
        term and the workflow's ``mod_revision``, with their history."""
        new = wf
        ops: list[Op] = []
        for step in steps:
            new = new.with_step(step, now)
            if step.state in {"done", "failed"}:
                took = (step.finished or now) - (step.started or now)
                metrics.WORKFLOW_STEP.labels(step.name, step.state).observe(took)
            if step.state == "failed":
                # Done steps are summed up once, in workflow_done: an
                # evacuation of 1,000 groups must not write 6,000 events.
                ops.append(self._history.put_op_at(
                    "workflow_step", step.finished, group=wf.group, epoch=wf.epoch,
                    step=step.name, state=step.state, attempts=step.attempts,
                    duration_s=round(took, 3), detail=step.detail, error=step.error,
                    term=self._term))
        ops.insert(0, Put(self._keys.workflow(wf.group), new.to_value()))
        if new.state == "done":
            ops.append(self._history.put_op(
                "workflow_done", group=wf.group, epoch=wf.epoch, mode=wf.mode,
                previous_region=wf.from_region, region=wf.to_region,
                duration_s=round(now - wf.created, 3), term=self._term,
                steps=[_step_summary(st, now) for st in new.steps]))
        elif new.state == "failed":
            failed = next(st for st in steps if st.state == "failed")
            ops.append(self._history.put_op(
                "alert", group=wf.group, epoch=wf.epoch,
                reason=f"failover workflow failed at {failed.name}: {failed.error}",
                term=self._term))
        result = await self._writer.write(
            [Compare(self._keys.workflow(wf.group), "mod", wf.mod_revision)], ops)
        if not result.succeeded:
            seat = result.gets[0] if result.gets else None
            if seat is None or seat.create_revision != self._term:
                raise SagaFenced("workflow write rejected: a newer term holds the seat")
            raise StoreError("workflow changed under us; re-reading")
        self.revision = max(self.revision, result.revision)
        if new.state == "done":
            log.info("saga done", group=wf.group, epoch=wf.epoch, mode=wf.mode,
                     region=wf.to_region, duration_s=round(now - wf.created, 3))
        return replace(new, mod_revision=result.revision)

    # -- the steps ----------------------------------------------------------
    async def _run(self, step: Step, wf: Workflow, group: GroupSettings, view: ClusterView,
                   now: float) -> tuple[bool, str]:
        change = Change(wf.group, wf.from_region, wf.to_region, wf.epoch, step.name)
        started = step.started or now
        if step.name == "precheck":
            return True, precheck(wf, group)
        if step.name == "drain_old":
            if wf.from_region:  # idempotent: re-applied while the drain time runs
                await self._each_router(group, replace(change, step="drain"))
            if now - started < group.drain_s:
                self._due(wf.group, started + group.drain_s)
                return False, "draining"
            return True, f"drained for {group.drain_s:.0f}s"
        if step.name == "fence_old":
            s = self._settings()
            until = fence_wait_until(wf, view, s.policy.isolation_grace_s, s.peer_timeout_s)
            if until is not None and now < until:
                self._due(wf.group, until)
                at = time.strftime("%H:%M:%SZ", time.gmtime(until))
                return False, (f"waiting until {at} ({until - now:.1f}s) for "
                               f"{wf.from_region}'s self-fence deadline (its members are "
                               "not in etcd)")
            await self._each_router(group, replace(change, step="fence"))
            if until is not None:
                return True, f"{wf.from_region} past its self-fence deadline; fenced"
            if wf.mode == "planned" and wf.has("catchup"):
                # No loss: the old primary must be fenced (its demote hook
                # acked) before the new region catches up and promotes.
                assert wf.from_region is not None
                return self._acked(wf, group, view, wf.from_region, "standby", started, now,
                                   required=True)
            if old_acks_wanted(wf, view, s.policy.fence_ack_wait_s):
                assert wf.from_region is not None
                return self._acked(wf, group, view, wf.from_region, "standby", started, now,
                                   required=False, within_s=s.policy.fence_ack_wait_s)
            return True, f"{wf.from_region} fenced"
        if step.name == "catchup":
            return self._catchup(wf, group, view, started, now)
        if step.name == "promote_new":
            return self._acked(wf, group, view, wf.to_region, "active", started, now,
                               required=True)
        if step.name == "rejoin_old":
            return self._rejoined(wf, group, view, started, now)
        if step.name == "reroute":
            return True, await self._each_router(group, replace(change, step="reroute"))
        if step.name == "verify":
            return await self._verify(wf, group, started, now)
        if step.name == "demote_old":
            if wf.from_region is None:
                return True, "no old region"
            return self._acked(wf, group, view, wf.from_region, "standby", started, now,
                               required=False)
        raise StepFailed(f"unknown step {step.name}")

    def _catchup(self, wf: Workflow, group: GroupSettings, view: ClusterView, started: float,
                 now: float) -> tuple[bool, str]:
        """Has the new region replayed everything the fenced old primary
        wrote?  Bounded by ``catchup_timeout_s``: then aborted (the
        coordinator switches back to the old primary, which has it all)."""
        db = group.database
        if db is None:
            return True, "no database"
        target = old_primary_final_lsn(wf, view)
        mine = newest_report(view.data.get(wf.group, {}).values(), wf.to_region)
        at = f"{format_lsn(mine.lsn)}" if mine is not None and mine.lsn is not None else "?"
        if target is None:
            if wf.mode == "forced":
                return True, (f"{wf.from_region}'s final WAL position unknown (not fenced by "
                              "its hook); the loss is bounded by max_lag_bytes")
            if (mine is not None and mine.role == "standby" and not mine.streaming
                    and mine.lsn is not None and mine.lsn >= (mine.receive_lsn or 0)):
                return True, (f"{wf.to_region} replayed all it received ({at}); the old "
                              "primary reported no final position")
        elif mine is not None and mine.role == "standby" and (mine.lsn or 0) >= target:
            return True, f"{wf.to_region} replayed {at} >= {format_lsn(target)}"
        if now - started < db.catchup_timeout_s:
            self._due(wf.group, started + db.catchup_timeout_s)  # reports wake us sooner
            want = format_lsn(target) if target is not None else "what it received"
            return False, f"waiting for {wf.to_region} to replay {want} (at {at})"
        raise StepAborted(f"{wf.to_region} did not replay "
                          f"{format_lsn(target) if target is not None else 'its WAL'} within "
                          f"{db.catchup_timeout_s:.0f}s (at {at})")

    def _rejoined(self, wf: Workflow, group: GroupSettings, view: ClusterView,
                  started: float, now: float) -> tuple[bool, str]:
        """Did the old region's server come back as a standby of the new
        primary?  Never fails the saga (traffic has moved): a failed or
        missing rejoin is said loudly, for an operator."""
        old = wf.from_region
        members = [m.member for m in view.members_in(old)] if old else []
        if not members:
            return True, (f"NEEDS AN OPERATOR: no live member in {old} to rejoin its "
                          "server as a standby")
        outcomes = {m: view.acks.get((wf.group, m)) == (wf.epoch, "standby")
                    and view.ack_details.get((wf.group, m)) for m in members}
        done = {m: d for m, d in outcomes.items() if d and d.rejoined is not None}
        if len(done) == len(members):
            failed = [f"{m}: {d.rejoin_error}" for m, d in done.items() if not d.rejoined]
            if failed:
                return True, f"NEEDS AN OPERATOR: rejoin failed ({'; '.join(failed)})"[:500]
            return True, f"{old} rejoined as a standby of {wf.to_region}"
        deadline = group.hook_timeout_s + ACK_SLACK_S
        if now - started < deadline:
            self._due(wf.group, started + deadline)
            return False, f"waiting for {old} to rejoin"
        return True, f"NEEDS AN OPERATOR: {old} did not report its rejoin"

    def _due(self, group: str, at: float) -> None:
        self.due[group] = min(self.due.get(group, at), at)

    async def _each_router(self, group: GroupSettings, change: Change) -> str:
        done = []
        for route in group.routes:
            router = make_router(route)
            if change.step == "fence" and not isinstance(router, HaproxyRouter):
                continue  # only traffic switches fence; DNS moves (fenced) at reroute
            done.append(await router.apply(change))
        return "; ".join(done) or "no routes"

    def _acked(self, wf: Workflow, group: GroupSettings, view: ClusterView, region: str,
               role: str, started: float, now: float, *, required: bool,
               within_s: float | None = None) -> tuple[bool, str]:
        """Have ``region``'s members reported ``role`` at the saga's epoch?
        Waits up to ``within_s`` (default: the hooks' own bound)."""
        members = [m.member for m in view.members_in(region)]
        missing = [m for m in members if view.acks.get((wf.group, m)) != (wf.epoch, role)]
        if members and not missing:
            return True, f"{role} on {', '.join(members)}"
        if not members and not required:
            return True, f"no live member in {region} (fenced by routing)"
        deadline = (within_s if within_s is not None
                    else group.hook_timeout_s * group.hook_attempts + ACK_SLACK_S)
        if now - started < deadline:
            self._due(wf.group, started + deadline)  # acks wake us sooner
            return False, f"waiting for {', '.join(missing) or 'members'}"
        if required:
            raise StepFailed(f"{region} did not become {role}: "
                             f"{', '.join(missing) or 'no live member'}")
        return True, f"not confirmed by {', '.join(missing)}"

    async def _verify(self, wf: Workflow, group: GroupSettings, started: float, now: float
                      ) -> tuple[bool, str]:
        problems = []
        for route in group.routes:
            router = make_router(route)
            if isinstance(router, HaproxyRouter):
                states = await router.states()
                server = route.servers[wf.to_region]  # type: ignore[union-attr]
                if states.get(server, 1) & 0x09:
                    problems.append(f"haproxy {server} not ready")
            elif isinstance(router, DnsRouter):
                want = set(router.route.addresses[wf.to_region])
                if await router.addresses() != want:
                    problems.append("dns answer not updated")
        if group.verify_url and not problems:
            try:
                async with aiohttp.ClientSession(
                        timeout=aiohttp.ClientTimeout(total=VERIFY_HTTP_S)) as s, \
                        s.get(group.verify_url) as resp:
                    body = await resp.text()
                if wf.to_region not in body:
                    problems.append(f"{group.verify_url} answers {body.strip()[:60]!r}")
            except (aiohttp.ClientError, TimeoutError) as exc:
                problems.append(f"{group.verify_url}: {type(exc).__name__}")
        if not problems:
            return True, f"traffic reaches {wf.to_region}"
        if now - started < group.verify_timeout_s:
            self._due(wf.group, now + VERIFY_RECHECK_S)
            return False, "; ".join(problems)
        raise StepFailed("verify: " + "; ".join(problems))


def old_primary_final_lsn(wf: Workflow, view: ClusterView) -> int | None:
    """The final WAL position the old region's demote hooks reported when
    they fenced its primary at the saga's epoch (None: none reported)."""
    found = [d.final_lsn for (g, m), d in view.ack_details.items()
             if g == wf.group and d.final_lsn is not None
             and view.acks.get((g, m)) == (wf.epoch, "standby")
             and (rec := view.members.get(m)) is not None and rec.region == wf.from_region]
    return max(found) if found else None


def catchup_targets(view: ClusterView, region: str) -> dict[str, int]:
    """Groups whose saga waits for ``region``'s database to catch up, with
    the WAL position to reach (its checker then looks often)."""
    out: dict[str, int] = {}
    for group, wf in view.workflows.items():
        if wf.state != "running" or wf.to_region != region:
            continue
        current = wf.current()
        if current is not None and current.name == "catchup":
            target = old_primary_final_lsn(wf, view)
            if target is not None:
                out[group] = target
    return out


def format_lsn(lsn: int | None) -> str:
    """Bytes as PostgreSQL writes an LSN (``0/3000060``)."""
    if lsn is None:
        return "?"
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def _step_summary(step: Step, now: float) -> dict[str, object]:
    """One done step as ``workflow_done`` lists it."""
    out: dict[str, object] = {
        "step": step.name, "finished": round(step.finished or now, 6),
        "duration_s": round((step.finished or now) - (step.started or now), 3)}
    if step.attempts > 1:
        out["attempts"] = step.attempts
    if step.detail:
        out["detail"] = step.detail
    return out


class RankedSlots:
    """A semaphore that serves its waiters by rank, then by arrival.

    An evacuation starts one saga per group and they all compete for the
    coordinator's step slots; the steps up to a region's promote (precheck,
    drain, fence, the promote gate) rank before the ones after it (reroute,
    verify, demote), so that the new region starts every group's promote
    before the first groups' reroutes and demotes spend the slots (and the
    CPU their routes and hooks take).  Later steps wait only while earlier
    ones are queued, and those are finite: one per group per move."""

    def __init__(self, n: int) -> None:
        self._free = n
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._arrival = itertools.count()

    @contextlib.asynccontextmanager
    async def slot(self, rank: int) -> Any:
        await self._acquire(rank)
        try:
            yield
        finally:
            self._release()

    async def _acquire(self, rank: int) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (rank, next(self._arrival), fut))
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # granted as we were cancelled: pass it on
            raise

    def _release(self) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
                return
        self._free += 1


def step_rank(wf: Workflow) -> int:
    """0 for a saga whose promote gate is not recorded yet, else 1 (once its
    promote is acked, the same slot goes on to reroute)."""
    return 0 if not wf.reached("promote_new") else 1


class SagaRunner:
    """Drives every running workflow of the coordinator's term concurrently;
    at most ``max_concurrent_sagas`` of them execute a step at once (an
    evacuation starts one saga per group).

    Each workflow gets one task, started from :meth:`update` with the
    coordinator's newest view and woken only when what its step waits on
    changed (its workflow, its group's acks, the members) or when its step
    is due: waking 1,000 waiting sagas on every ack would make an
    evacuation quadratic.  Owns those tasks and nothing else: it never
    decides, and it stops with the coordinator's TaskGroup (a router change
    under way finishes first; see ``Saga._run_to_outcome``).
    """

    def __init__(self, saga: Saga, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time) -> None:
        self._saga = saga
        self._settings = settings
        self._clock = clock
        self._view: ClusterView | None = None
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._wakes: dict[str, asyncio.Event] = {}
        self._seen: dict[str, object] = {}
        # Per group, the mod_revision of the newest record our sagas wrote: a
        # view older than that (a lagging watch) must not restart a saga
        # that already ended — it would run its routers again.
        self._written: dict[str, int] = {}
        self._slots = RankedSlots(settings().policy.max_concurrent_sagas)
        self._members: tuple[str, ...] | None = None
        self._settings_seen: Settings | None = None
        self._revisions: Mapping[str, int] = {}

    def update(self, view: ClusterView, tg: asyncio.TaskGroup) -> None:
        self._view = view
        members = tuple(sorted(view.members))
        # Only the groups whose keys moved (a workflow, record or ack moves
        # its group's revision), found by a set difference done in C: this
        # runs at every ack of an evacuation, and a Python loop over 1,000
        # groups each time was a tenth of the coordinator's loop.
        revisions = view.group_revisions
        settings = self._settings()
        if members != self._members or settings is not self._settings_seen:
            # Every saga looks again: who can ack changed, or a reload
            # brought back a group whose saga had stopped.
            self._members, self._settings_seen = members, settings
            groups: Iterable[str] = view.workflows
        else:
            groups = [g for g, _ in revisions.items() - self._revisions.items()]
        self._revisions = revisions
        for group in groups:
            wf = view.workflows.get(group)
            if wf is None:
                continue
            rec = view.active.get(group)
            if wf.state != "running" or rec is None or rec.epoch != wf.epoch:
                wake = self._wakes.get(group)
                if wake is not None:
                    wake.set()  # superseded or ended: let its task see it
                continue
            # Its workflow, its record and its acks all move the group's revision.
            seen = (view.group_revisions.get(group, 0), wf.mod_revision, members)
            task = self._tasks.get(group)
            if task is None or task.done():
                if wf.mod_revision < self._written.get(group, 0):
                    continue  # we wrote past this already; the watch lags
                self._wakes[group] = asyncio.Event()
                self._tasks[group] = tg.create_task(self._drive(group), name=f"saga-{group}")
            elif self._seen.get(group) != seen:
                self._wakes[group].set()
            self._seen[group] = seen

    def _current(self, group: str, local: Workflow | None) -> tuple[Workflow | None, bool]:
        """The newest copy of ``group``'s workflow (ours, or the view's if it
        moved on) and whether it may still run."""
        view = self._view
        if view is None:
            return None, False
        wf = view.workflows.get(group)
        if local is not None and (wf is None or (local.epoch == wf.epoch
                                                 and local.mod_revision > wf.mod_revision)):
            wf = local
        rec = view.active.get(group)
        ok = (wf is not None and wf.state == "running" and rec is not None
              and rec.epoch == wf.epoch)
        return wf, ok

    async def _drive(self, group: str) -> None:
        local: Workflow | None = None
        while True:
            wf, ok = self._current(group, local)
            g = self._settings().group_by_name(group)
            if not ok or wf is None or g is None or self._view is None:
                return
            wake = self._wakes[group]
            wake.clear()
            # The bound is on steps executing at once (router calls, records),
            # not on sagas waiting for members' acks: a waiting saga must not
            # keep another group's saga from starting.
            async with self._slots.slot(step_rank(wf)):
                try:
                    local = await self._saga.advance(wf, g, self._view)
                    self._written[group] = max(self._written.get(group, 0), local.mod_revision)
                    if local.state != "running":
                        return  # ended (done or failed): nothing to wait for
                except StoreError as exc:
                    log.warning("saga paused: store error", group=group, error=str(exc))
                    local = None
                    self._saga.due[group] = self._clock() + 0.5
            due = self._saga.due.get(group)
            wait = max(due - self._clock(), 0.0) if due is not None else 60.0
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await wake.wait()
