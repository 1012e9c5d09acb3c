"""Local role reconciliation: converge this member to the active records.

When a group's record names our region at an epoch we have not yet applied,
run ``promote``; when it names another region and we do not know ourselves
to be standby already, run ``demote`` (so a member that crashed mid-promote,
or a new one, fences itself once).  What was applied is kept in a small state file so a restart
does not re-run a promote already done for the same epoch.  With etcd out of
reach nothing runs: the last applied role holds (static stability).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import structlog

from failoverd import metrics
from failoverd.config import GroupSettings, Settings
from failoverd.core.model import ActiveRecord, Keyspace, parse_ack, parse_active, to_json
from failoverd.core.store import MAX_TXN_OPS, KeyValue, Put, Store, StoreError
from failoverd.core.workflow import (
    Workflow,
    may_demote,
    may_promote,
    may_rejoin,
    parse_workflow,
)
from failoverd.etcd.history import History
from failoverd.etcd.mirror import KeyMirror
from failoverd.processes import BatchItem, HookResult, run_batch, run_hook

log = structlog.get_logger("failoverd.daemon.roles")

RETRY_MIN_S = 2.0
RETRY_MAX_S = 60.0
# At rest (nothing to retry), how often the groups are looked at unwoken.
IDLE_LOOK_S = 30.0
# What a database's demote hook prints when it has fenced the old primary:
# the WAL position the new region must replay before it is promoted.
_FINAL_LSN = re.compile(r"^final_lsn=([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})\s*$", re.MULTILINE)


def final_lsn(output: str) -> int | None:
    """The last ``final_lsn=X/Y`` line of a hook's output, in bytes."""
    found = _FINAL_LSN.findall(output)
    if not found:
        return None
    hi, lo = found[-1]
    return (int(hi, 16) << 32) | int(lo, 16)


T = TypeVar("T")
# Groups waiting for a batch hook, by (role, command, timeout, attempts).
_Batches = dict[tuple[str, tuple[str, ...], float, int], list[tuple[GroupSettings, int]]]


def _parse_workflow(kv: KeyValue) -> Workflow:
    return parse_workflow(kv.value, kv.mod_revision)


@dataclass(frozen=True)
class Applied:
    epoch: int
    role: str  # "active" | "standby"


class AppliedState:
    """``{group: {epoch, role}}`` in a JSON file, replaced atomically.

    Many hooks finishing together share one write (:meth:`commit`): a
    member of a region active for 1,000 groups must not rewrite and fsync
    the file 1,000 times in a row.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, Applied] = {}
        self._changes = 0
        self._written = 0
        self._lock = asyncio.Lock()
        self._rendered: dict[str, tuple[Applied, str]] = {}
        try:
            raw = json.loads(path.read_text())
            for g, v in raw.items():
                self.groups[str(g)] = Applied(int(v["epoch"]), str(v["role"]))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("state file unreadable; starting empty", path=str(path), error=str(exc))

    def _write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        with tmp.open("w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def _data(self) -> str:
        """The file's JSON, from each group's rendered entry (re-rendered
        only when it changed): a busy member rewrites the file often, and
        encoding 1,000 entries each time was most of a write's CPU."""
        parts = []
        for g, a in self.groups.items():
            known = self._rendered.get(g)
            if known is None or known[0] != a:
                known = (a, f'{json.dumps(g)}:{{"epoch":{a.epoch:d},'
                            f'"role":{json.dumps(a.role)}}}')
                self._rendered[g] = known
            parts.append(known[1])
        return "{" + ",".join(parts) + "}"

    def save(self, group: str, applied: Applied) -> None:
        """Record and write now (synchronously: the shutdown path)."""
        self.groups[group] = applied
        self._changes += 1
        self._write(self._data())
        self._written = self._changes

    async def commit(self, group: str, applied: Applied) -> None:
        """Record and return once a write that includes it is on disk."""
        await self.commit_many({group: applied})

    async def commit_many(self, applied: Mapping[str, Applied]) -> None:
        """Likewise for many groups at once (one write)."""
        if not applied:
            return
        self.groups.update(applied)
        self._changes += 1
        mine = self._changes
        async with self._lock:
            if self._written >= mine:
                return  # someone else's write carried ours
            upto, data = self._changes, self._data()
            await asyncio.to_thread(self._write, data)
            self._written = max(self._written, upto)


class RoleReconciler:
    """Converges this member's promote/demote state to the active records.

    Owns the applied-epoch state file, the hook tasks (at most
    ``max_concurrent_hooks`` at once, one per group) and the acks it
    publishes.  Reads the records from the watch's mirror; never writes an
    active record or a workflow.
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 history: History, wake: asyncio.Event,
                 lease_id: Callable[[], int | None] = lambda: None,
                 mirror: KeyMirror | None = None) -> None:
        self._store = store
        self._lease_id = lease_id
        self._keys = keys
        self._settings = settings
        self._history = history
        self._wake = wake
        self._mirror = mirror
        s = settings()
        self.state = AppliedState(s.state_dir / f"{s.cluster}-{s.member}.json")
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        # Epochs of the active records as last read from etcd (for peers).
        self.epochs: dict[str, int] = {}
        self.active_regions: dict[str, str] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._behind: dict[str, int] = {}  # groups whose record is behind us (logged)
        self._not_from_us: dict[str, int] = {}  # group -> epoch whose saga is not from us
        # Database groups: per group, (epoch, what the ack adds) — the old
        # primary's final WAL position from the demote hook, the rejoin's end.
        self._details: dict[str, tuple[int, dict[str, object]]] = {}
        self._slots = asyncio.Semaphore(s.policy.max_concurrent_hooks)
        # One hook at a time per group: a self-fence and a reconciled demote
        # of a newer epoch must not run side by side (chaos seed 12: the
        # fence's epoch-1 demote finished after the epoch-2 one).
        self._group_locks: dict[str, asyncio.Lock] = {}
        self._tg: asyncio.TaskGroup | None = None
        # What we last published as our ack, per group (to skip rewrites).
        self._acked: dict[str, str] = {}
        self._ack_lease: int | None = None
        self._to_ack: set[str] = set()
        # Per group, the mod_revisions of (active, workflow, our ack) last
        # looked at, and the groups to look at again regardless.
        self._marks: dict[str, tuple[int, ...]] = {}
        self._dirty: set[str] = set()
        # With the mirror, only groups the watch names (or that are dirty)
        # are read; without it, or after a reload, all of them.
        self._look_at_all = True
        self._settings_seen: Settings | None = None
        self._ack_wanted = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tg = tg
            tg.create_task(self._ack_loop(), name="roles-acks")
            while True:
                self._wake.clear()
                await self.reconcile_once()
                try:
                    async with asyncio.timeout(self._pause()):
                        await self._wake.wait()
                except TimeoutError:
                    pass

    def _pause(self) -> float:
        """A tick while groups wait for a retry (a hook's backoff, an ack
        etcd refused) or without the watch's copy; at rest the watch wakes
        us (a record moved, an ack of ours vanished with its lease), and a
        reload does: the slow look only backs that up."""
        mirror = self._mirror
        if self._dirty or self._look_at_all or mirror is None or not mirror.ready.is_set():
            return self._settings().policy.tick_s
        return IDLE_LOOK_S

    def reload(self) -> None:
        """The settings changed: look at every group now."""
        self._wake.set()

    async def _read(self) -> dict[str, tuple[KeyValue | None, ...]] | None:
        """Per group to look at: its (active, workflow, our ack) keys."""
        me = self._settings().member
        kvs: dict[str, KeyValue]
        settings = self._settings()
        groups = settings.groups
        if settings is not self._settings_seen:  # started, or reloaded
            self._settings_seen = settings
            self._look_at_all = True
        if self._mirror is not None:
            if not self._mirror.ready.is_set():
                return None
            kvs = self._mirror.kvs
            if not self._look_at_all and len(self._dirty) < len(groups):
                groups = [g for name in sorted(self._dirty)
                          if (g := settings.group_by_name(name)) is not None]
            self._look_at_all = False
        else:
            try:
                kvs = {kv.key: kv for kv in (await self._store.get_prefix(
                    self._keys.groups)).kvs}
            except StoreError as exc:
                log.warning("cannot read active records; holding local roles",
                            error=str(exc))
                return None
        return {g.name: (kvs.get(self._keys.active(g.name)),
                         kvs.get(self._keys.workflow(g.name)),
                         kvs.get(self._keys.ack(g.name, me)))
                for g in groups}

    def keys_changed(self, keys: list[str] | None) -> None:
        """From the watch: which groups to look at (None: all of them)."""
        if keys is None:
            self._look_at_all = True
            return
        for key in keys:
            self._dirty.add(key[len(self._keys.groups):].split("/", 1)[0])

    def _parse(self, kv: KeyValue, parse: Callable[[KeyValue], T]) -> T:
        return self._mirror.parsed(kv, parse) if self._mirror is not None else parse(kv)

    async def reconcile_once(self) -> None:
        """Look at the groups whose keys changed (or that wait for a retry);
        a member of a region active for 1,000 groups must not re-examine all
        of them at every ack."""
        found = await self._read()
        if found is None:
            return
        s = self._settings()
        pending_acks: list[str] = []
        standby_at: dict[str, Applied] = {}
        seen: dict[str, tuple[int, str] | None] = {}
        batches: _Batches = {}
        for name, (active_kv, wf_kv, ack_kv) in found.items():
            group = s.group_by_name(name)
            if group is None:
                continue
            mark = tuple(kv.mod_revision if kv else 0 for kv in (active_kv, wf_kv, ack_kv))
            if self._marks.get(group.name) == mark and group.name not in self._dirty:
                continue
            self._marks[group.name] = mark
            self._dirty.discard(group.name)
            if active_kv is None:
                continue
            try:
                rec = self._parse(active_kv, parse_active)
                seen[group.name] = self._parse(ack_kv, parse_ack) if ack_kv else None
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed key", group=group.name, error=str(exc))
                continue
            if self.epochs.get(group.name) != rec.epoch or (
                    self.active_regions.get(group.name) != rec.region):
                metrics.set_labelled(metrics.EPOCH, rec.epoch, group.name)
                for r in s.regions:
                    metrics.set_labelled(metrics.ACTIVE_REGION, 1 if r.name == rec.region else 0,
                                         group.name, r.name)
            self.epochs[group.name] = rec.epoch
            self.active_regions[group.name] = rec.region
            if s.region not in group.regions:
                continue
            task = self._running.get(group.name)
            if task is not None and not task.done():
                continue  # its hook is running; it acks when done
            try:
                work = self._work(s, group, rec, wf_kv)
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed workflow", group=group.name, error=str(exc))
                continue
            if work is not None:
                self._start(s, group, *work, batches=batches)
            else:
                applied = self.state.groups.get(group.name)
                if (rec.region != s.region and applied is not None
                        and applied.role == "standby" and applied.epoch < rec.epoch
                        and self._moved_from_us(s, group.name, rec, wf_kv)):
                    # Standby already (a demote ran, or we fenced ourselves):
                    # nothing to run, but the saga moving the group away
                    # from our region waits for our demote: say so now.
                    standby_at[group.name] = Applied(rec.epoch, "standby")
                pending_acks.append(group.name)
        for (role, argv, _, _), waiting in batches.items():
            self._start_batches(s, role, list(argv), waiting)
        await self.state.commit_many(standby_at)
        await self._ack_all(pending_acks, seen)

    def _start_batches(self, s: Settings, role: str, argv: list[str],
                       work: list[tuple[GroupSettings, int]]) -> None:
        """Groups with ``hook_batch`` that need the same command now: one
        run per ``max_hook_batch`` of them, each holding one hook slot."""
        size = s.policy.max_hook_batch
        for i in range(0, len(work), size):
            chunk = work[i:i + size]
            coro = self._apply_batch(s, role, argv, chunk)
            task = (asyncio.ensure_future(coro) if self._tg is None
                    else self._tg.create_task(coro, name=f"hook-batch-{chunk[0][0].name}"))
            for group, _ in chunk:
                self._running[group.name] = task

    def _start(self, s: Settings, group: GroupSettings, epoch: int, role: str,
               argv: list[str], batches: _Batches) -> None:
        """Start the group's hook, or put it in ``batches`` (``hook_batch``:
        started together once the pass has seen every group)."""
        if time.monotonic() < self._retry_at.get(group.name, 0.0):
            self._dirty.add(group.name)  # looked at again on the next tick
            return
        if group.hook_batch and role != "rejoin":
            batches.setdefault((role, tuple(argv), group.hook_timeout_s, group.hook_attempts),
                               []).append((group, epoch))
            return
        coro = self._apply(s, group, epoch, role, argv)
        if self._tg is None:  # not running (tests call reconcile_once directly)
            self._running[group.name] = asyncio.ensure_future(coro)
        else:
            self._running[group.name] = self._tg.create_task(
                coro, name=f"hook-{group.name}")

    async def _apply(self, s: Settings, group: GroupSettings, epoch: int, role: str,
                     argv: list[str]) -> None:
        if await self._run_role(s, group, epoch, role, argv):
            self._to_ack.add(group.name)
            self._ack_wanted.set()
        self._dirty.add(group.name)  # look again: the record may have moved meanwhile
        self._wake.set()

    async def _apply_batch(self, s: Settings, role: str, argv: list[str],
                           work: list[tuple[GroupSettings, int]]) -> None:
        # Every group's lock, in name order (no two batches can deadlock; a
        # self-fence takes one lock).
        async with contextlib.AsyncExitStack() as locks:
            for group, _ in sorted(work, key=lambda w: w[0].name):
                await locks.enter_async_context(self._group_lock(group.name))
            done = await self._run_batch_locked(s, role, argv, work)
        if done:
            self._to_ack.update(done)
            self._ack_wanted.set()
        self._dirty.update(group.name for group, _ in work)  # the records may have moved
        self._wake.set()

    async def _run_batch_locked(self, s: Settings, role: str, argv: list[str],
                                work: list[tuple[GroupSettings, int]]) -> list[str]:
        """Run one batch of a ``hook_batch`` command (each group's lock
        held); the groups it applied, their state file written."""
        now = time.monotonic()
        todo = [(g, e) for g, e in work if self._may_run(g.name, e, role, now)]
        if not todo:
            return []
        first = todo[0][0]
        action = "promote" if role == "active" else "demote"
        log.info(f"{action} starting", groups=len(todo), first=first.name, role=role,
                 command=argv, batch=True)
        task = asyncio.create_task(self._bounded(run_batch(
            argv, [BatchItem(g.name, f"{g.name} {e}") for g, e in todo],
            env={"FAILOVERD_REGION": s.region, "FAILOVERD_ROLE": role},
            timeout_s=first.hook_timeout_s, attempts=first.hook_attempts)),
            name=f"hook-batch-{first.name}-{action}")
        try:
            results = await asyncio.shield(task)
        except asyncio.CancelledError:
            results = await task  # shutting down: record what the batch applied
            for g, e in todo:
                if results[g.name].ok:
                    self.state.save(g.name, Applied(e, role))
            log.info(f"{action} batch done during shutdown",
                     ok=sum(r.ok for r in results.values()), of=len(todo))
            raise
        ok = {g.name: Applied(e, role) for g, e in todo if results[g.name].ok}
        await self.state.commit_many(ok)
        for g, e in todo:
            await self._recorded(s, g, e, role, results[g.name], now, batch=len(todo))
        log.info(f"{action} batch done", groups=len(todo), failed=len(todo) - len(ok),
                 first=first.name, duration_s=round(max(
                     (r.duration_s for r in results.values()), default=0.0), 3))
        return list(ok)

    async def _ack_loop(self) -> None:
        """Acks of hooks that finished together go out in one txn."""
        while True:
            await self._ack_wanted.wait()
            self._ack_wanted.clear()
            groups, self._to_ack = sorted(self._to_ack), set()
            await self._ack_all(groups, {})

    async def _ack_all(self, groups: list[str],
                       seen: dict[str, tuple[int, str] | None]) -> None:
        """Tell the coordinator (under our lease) which epoch/role we applied,
        for every group whose published ack differs: batched in txns."""
        lease = self._lease_id()
        if lease is None:
            return
        if lease != self._ack_lease:
            self._acked = {}
            self._ack_lease = lease
            self._dirty.update(g.name for g in self._settings().groups)  # re-ack all
            self._wake.set()
        me = self._settings().member
        values: dict[str, str] = {}
        for group in groups:
            applied = self.state.groups.get(group)
            if applied is None:
                continue
            epoch, extra = self._details.get(group, (0, {}))
            if epoch != applied.epoch:
                extra = {}
            if not extra and seen.get(group) == (applied.epoch, applied.role):
                continue
            value = to_json({"epoch": applied.epoch, "role": applied.role, **extra})
            if value != self._acked.get(group):
                values[group] = value
        names = list(values)
        for i in range(0, len(names), MAX_TXN_OPS):
            batch = names[i:i + MAX_TXN_OPS]
            try:
                await self._store.txn([], [Put(self._keys.ack(g, me), values[g], lease)
                                           for g in batch])
            except StoreError as exc:
                # Looked at again on the next tick: nothing else would resend
                # them (the keys that changed did so already), and a saga
                # waits for these acks (chaos seed 2010: 15 s).
                self._dirty.update(names[i:])
                log.warning("cannot acknowledge applied roles; retrying",
                            groups=len(names) - i, error=str(exc))
                return
            self._acked.update((g, values[g]) for g in batch)

    def _work(self, s: Settings, group: GroupSettings, rec: ActiveRecord,
              wf_kv: KeyValue | None) -> tuple[int, str, list[str]] | None:
        """The hook this group needs now, if any.  The workflow is parsed
        only when it gates something (most changes need nothing of us)."""
        applied = self.state.groups.get(group.name)
        if applied is not None and applied.epoch > rec.epoch:
            # The record is behind what we applied: etcd was restored or
            # rebuilt.  Never apply a lower epoch (rule 11); our ack shows
            # the coordinator our epoch, and it re-asserts above it.
            if self._behind.get(group.name) != rec.epoch:
                self._behind[group.name] = rec.epoch
                log.warning("active record behind our applied epoch; holding",
                            group=group.name, record_epoch=rec.epoch, applied=applied.epoch)
            return None

        def wf() -> Workflow | None:
            return self._parse(wf_kv, _parse_workflow) if wf_kv is not None else None
        if rec.region == s.region:
            if applied == Applied(rec.epoch, "active") or not may_promote(wf(), rec.epoch):
                return None  # done already, or the saga has not reached promote_new
            return rec.epoch, "active", group.promote
        # Fence on doubt: demote unless we *know* we are standby already.
        # A member that died mid-promote has no record of it and must not
        # come back half-active.
        if applied is not None and applied.role == "standby":
            # A database: once the new primary serves, every other region's
            # server follows it (the old primary rewound, standbys re-pointed).
            det_epoch, det = self._details.get(group.name, (0, {}))
            if (group.database is not None and not (det_epoch == rec.epoch and "rejoined" in det)
                    and may_rejoin(wf(), rec.epoch)):
                return rec.epoch, "rejoin", group.rejoin
            return None
        if not may_demote(wf(), rec.epoch):
            return None  # planned switchover: keep serving while traffic drains
        return rec.epoch, "standby", group.demote

    def _moved_from_us(self, s: Settings, group: str, rec: ActiveRecord,
                       wf_kv: KeyValue | None) -> bool:
        """Does the saga of ``rec``'s epoch move the group out of our region?"""
        if wf_kv is None or self._not_from_us.get(group) == rec.epoch:
            return False
        try:
            wf = self._parse(wf_kv, _parse_workflow)
        except (ValueError, KeyError, TypeError):
            return False
        if wf.epoch != rec.epoch:
            return False
        if wf.from_region != s.region:
            # Fixed for the epoch: a member of an uninvolved region would
            # otherwise parse each of the saga's writes (1,000 groups moving).
            self._not_from_us[group] = rec.epoch
            return False
        return True

    async def fence(self, group: GroupSettings, reason: str) -> None:
        """Self-fence (safety rule 4): demote now, without etcd, keeping the
        epoch we applied; if the record still names us when etcd returns we
        promote again."""
        async with self._group_lock(group.name):
            # Read under the lock: a hook of this group that was running
            # may have moved us to a newer epoch meanwhile.
            applied = self.state.groups.get(group.name)
            if applied is None or applied.role != "active":
                return
            log.error("self-fencing: demoting without the store", group=group.name,
                      epoch=applied.epoch, reason=reason)
            await self._run_role_locked(self._settings(), group, applied.epoch, "standby",
                                        group.demote)

    async def _rejoin(self, s: Settings, group: GroupSettings, epoch: int, argv: list[str]
                      ) -> bool:
        """The old primary back as a standby of the new one (the rejoin
        hook: pg_rewind where needed).  Run once per epoch; its outcome goes
        into our ack either way — a failed rejoin needs an operator, and
        retrying a rewind on a loop helps nobody."""
        if not argv:
            extra: dict[str, object] = {"rejoined": False,
                                        "rejoin_error": "no rejoin hook configured"}
        else:
            extra = await self._run_rejoin(s, group, epoch, argv)
        before_epoch, before = self._details.get(group.name, (0, {}))
        self._details[group.name] = (epoch, {**(before if before_epoch == epoch else {}),
                                             **extra})
        return True

    async def _run_rejoin(self, s: Settings, group: GroupSettings, epoch: int,
                          argv: list[str]) -> dict[str, object]:
        bound = log.bind(group=group.name, epoch=epoch, role="rejoin")
        bound.info("rejoin starting", command=argv)
        result = await self._bounded(run_hook(
            argv, group=group.name, region=s.region, epoch=epoch, role="rejoin",
            timeout_s=group.hook_timeout_s, attempts=1,
            extra_env={"FAILOVERD_ACTIVE_REGION": self.active_regions.get(group.name, "")}))
        extra: dict[str, object] = {"rejoined": result.ok}
        if result.ok:
            bound.info("rejoin done", duration_s=round(result.duration_s, 3))
        else:
            extra["rejoin_error"] = (f"exit {result.returncode}: " if result.returncode
                                     is not None else "timed out: ") + result.output[-300:]
            bound.error("rejoin failed: the old primary needs an operator",
                        output=result.output[-500:])
        await self._history.record("rejoin_done" if result.ok else "rejoin_failed",
                                   group=group.name, region=s.region, epoch=epoch,
                                   duration_s=round(result.duration_s, 3),
                                   output=result.output[-500:])
        return extra

    def _group_lock(self, group: str) -> asyncio.Lock:
        lock = self._group_locks.get(group)
        if lock is None:
            lock = self._group_locks[group] = asyncio.Lock()
        return lock

    async def _bounded(self, hook: Coroutine[Any, Any, T]) -> T:
        """At most ``max_concurrent_hooks`` hook processes at once; the
        bookkeeping after a hook (state file, ack) does not hold a slot."""
        async with self._slots:
            return await hook

    def active_groups(self) -> dict[str, int]:
        """Groups this member is active for, with the epoch it applied."""
        return {g: a.epoch for g, a in self.state.groups.items() if a.role == "active"}

    async def _run_role(self, s: Settings, group: GroupSettings, epoch: int, role: str,
                        argv: list[str]) -> bool:
        """Run the hook; True once it succeeded and the state file says so."""
        async with self._group_lock(group.name):
            return await self._run_role_locked(s, group, epoch, role, argv)

    async def _run_role_locked(self, s: Settings, group: GroupSettings, epoch: int, role: str,
                               argv: list[str]) -> bool:
        if role == "rejoin":
            return await self._rejoin(s, group, epoch, argv)
        now = time.monotonic()
        if not self._may_run(group.name, epoch, role, now):
            return False
        if group.hook_batch:  # a self-fence of one group: a batch of one
            return bool(await self._run_batch_locked(s, role, argv, [(group, epoch)]))
        action = "promote" if role == "active" else "demote"
        bound = log.bind(group=group.name, epoch=epoch, role=role)
        # No history event here: ``_done``/``_failed`` carry the duration,
        # and 1,000 hooks must not cost 2,000 audit writes.
        bound.info(f"{action} starting", command=argv)
        task = asyncio.create_task(
            self._bounded(run_hook(argv, group=group.name, region=s.region, epoch=epoch,
                                   role=role, timeout_s=group.hook_timeout_s,
                                   attempts=group.hook_attempts)),
            name=f"hook-{group.name}-{action}")
        try:
            result = await asyncio.shield(task)
        except asyncio.CancelledError:
            # Shutting down: a hook under way finishes (bounded by its own
            # timeout) and is recorded, so a restart does not run it again.
            result = await task
            if result.ok:
                self.state.save(group.name, Applied(epoch, role))
                bound.info(f"{action} done during shutdown", attempts=result.attempts)
            raise
        if result.ok:
            if role == "standby" and group.database is not None:
                lsn = final_lsn(result.output)
                self._details[group.name] = (epoch, {} if lsn is None else {"final_lsn": lsn})
            await self.state.commit(group.name, Applied(epoch, role))
        await self._recorded(s, group, epoch, role, result, now)
        return result.ok

    def _may_run(self, group: str, epoch: int, role: str, now: float) -> bool:
        """Not while the group's last failure backs off, and never a hook
        for an epoch older than the one applied."""
        if now < self._retry_at.get(group, 0.0):
            return False
        applied = self.state.groups.get(group)
        if applied is not None and applied.epoch > epoch:
            # Decided before the group's last hook finished at a newer
            # epoch: never apply a lower one (rule 11).
            log.warning("skipping a hook for an older epoch", group=group, epoch=epoch,
                        role=role, applied=applied.epoch)
            return False
        return True

    async def _recorded(self, s: Settings, group: GroupSettings, epoch: int, role: str,
                        result: HookResult, started: float, batch: int = 0) -> None:
        """A finished hook's bookkeeping (its state is on disk if it
        succeeded): the retry backoff, the log line, the history event."""
        action = "promote" if role == "active" else "demote"
        fields: dict[str, object] = {
            "group": group.name, "region": s.region, "epoch": epoch,
            "attempts": result.attempts,
            "duration_s": round(result.duration_s, 3), "returncode": result.returncode,
            **({"batch": batch} if batch else {}),
        }
        bound = log.bind(group=group.name, epoch=epoch, role=role)
        if result.ok:
            self._retry_at.pop(group.name, None)
            self._retry_delay.pop(group.name, None)
            if not batch:  # a batch logs once for all its groups
                bound.info(f"{action} done", attempts=result.attempts,
                           duration_s=fields["duration_s"])
            await self._history.record(f"{action}_done", **fields)
            return
        delay = min(self._retry_delay.get(group.name, RETRY_MIN_S / 2) * 2, RETRY_MAX_S)
        self._retry_delay[group.name] = delay
        self._retry_at[group.name] = started + delay
        bound.error(f"{action} failed", attempts=result.attempts, output=result.output[-500:],
                    retry_in_s=delay)
        await self._history.record(f"{action}_failed", **fields, output=result.output[-500:])
