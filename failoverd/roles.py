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
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import structlog

from failoverd import metrics
from failoverd.config import GroupSettings, Settings
from failoverd.history import History
from failoverd.hooks import run_hook
from failoverd.model import ActiveRecord, Keyspace, parse_active, to_json
from failoverd.store import Store, StoreError
from failoverd.workflow import Workflow, may_demote, may_promote, parse_workflow

log = structlog.get_logger("failoverd.roles")

RETRY_MIN_S = 2.0
RETRY_MAX_S = 60.0


@dataclass(frozen=True)
class Applied:
    epoch: int
    role: str  # "active" | "standby"


class AppliedState:
    """``{group: {epoch, role}}`` in a JSON file, replaced atomically."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.groups: dict[str, Applied] = {}
        try:
            raw = json.loads(path.read_text())
            for g, v in raw.items():
                self.groups[str(g)] = Applied(int(v["epoch"]), str(v["role"]))
        except FileNotFoundError:
            pass
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.error("state file unreadable; starting empty", path=str(path), error=str(exc))

    def save(self, group: str, applied: Applied) -> None:
        self.groups[group] = applied
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        data = {g: {"epoch": a.epoch, "role": a.role} for g, a in self.groups.items()}
        with tmp.open("w") as f:
            json.dump(data, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)


class RoleReconciler:
    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 history: History, wake: asyncio.Event,
                 lease_id: Callable[[], int | None] = lambda: None) -> None:
        self._store = store
        self._lease_id = lease_id
        self._keys = keys
        self._settings = settings
        self._history = history
        self._wake = wake
        s = settings()
        self.state = AppliedState(s.state_dir / f"{s.cluster}-{s.member}.json")
        self._retry_at: dict[str, float] = {}
        self._retry_delay: dict[str, float] = {}
        # Epochs of the active records as last read from etcd (for peers).
        self.epochs: dict[str, int] = {}
        self.active_regions: dict[str, str] = {}

    async def run(self) -> None:
        while True:
            self._wake.clear()
            await self.reconcile_once()
            try:
                async with asyncio.timeout(self._settings().policy.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass

    async def reconcile_once(self) -> None:
        try:
            snap = await self._store.get_prefix(self._keys.groups)
        except StoreError as exc:
            log.warning("cannot read active records; holding local roles", error=str(exc))
            return
        records: dict[str, ActiveRecord] = {}
        workflows: dict[str, Workflow] = {}
        acks: dict[str, str] = {}
        me = self._settings().member
        for kv in snap.kvs:
            name = kv.key[len(self._keys.groups):].split("/", 1)[0]
            try:
                if kv.key.endswith("/active"):
                    records[name] = parse_active(kv)
                elif kv.key.endswith("/workflow"):
                    workflows[name] = parse_workflow(kv.value, kv.mod_revision)
                elif kv.key == self._keys.ack(name, me):
                    acks[name] = kv.value
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ignoring malformed key", key=kv.key, error=str(exc))
        s = self._settings()
        self.epochs = {name: r.epoch for name, r in records.items()}
        self.active_regions = {name: r.region for name, r in records.items()}
        for name, record in records.items():
            metrics.EPOCH.labels(name).set(record.epoch)
            for r in s.regions:
                metrics.ACTIVE_REGION.labels(name, r.name).set(
                    1 if r.name == record.region else 0)
        for group in s.groups:
            rec = records.get(group.name)
            if rec is not None and s.region in group.regions:
                await self._reconcile(s, group, rec, workflows.get(group.name))
                await self._ack(group.name, acks.get(group.name))

    async def _ack(self, group: str, seen: str | None) -> None:
        """Tell the coordinator (under our lease) which epoch/role we applied."""
        applied = self.state.groups.get(group)
        lease = self._lease_id()
        if applied is None or lease is None:
            return
        value = to_json({"epoch": applied.epoch, "role": applied.role})
        if value == seen:
            return
        try:
            await self._store.put(self._keys.ack(group, self._settings().member), value, lease)
        except StoreError as exc:
            log.warning("cannot acknowledge applied role", group=group, error=str(exc))

    async def _reconcile(self, s: Settings, group: GroupSettings, rec: ActiveRecord,
                         wf: Workflow | None) -> None:
        applied = self.state.groups.get(group.name)
        if rec.region == s.region:
            if applied == Applied(rec.epoch, "active") or not may_promote(wf, rec.epoch):
                return  # done already, or the saga has not reached promote_new
            role, argv = "active", group.promote
        else:
            # Fence on doubt: demote unless we *know* we are standby already.
            # A member that died mid-promote has no record of it and must not
            # come back half-active.
            if applied is not None and applied.role == "standby":
                return
            if not may_demote(wf, rec.epoch):
                return  # planned switchover: keep serving while traffic drains
            role, argv = "standby", group.demote
        await self._run_role(s, group, rec.epoch, role, argv)

    async def fence(self, group: GroupSettings, reason: str) -> None:
        """Self-fence (safety rule 4): demote now, without etcd, keeping the
        epoch we applied; if the record still names us when etcd returns we
        promote again."""
        applied = self.state.groups.get(group.name)
        if applied is None or applied.role != "active":
            return
        log.error("self-fencing: demoting without the store", group=group.name,
                  epoch=applied.epoch, reason=reason)
        await self._run_role(self._settings(), group, applied.epoch, "standby", group.demote)

    def active_groups(self) -> dict[str, int]:
        """Groups this member is active for, with the epoch it applied."""
        return {g: a.epoch for g, a in self.state.groups.items() if a.role == "active"}

    async def _run_role(self, s: Settings, group: GroupSettings, epoch: int, role: str,
                        argv: list[str]) -> None:
        now = time.monotonic()
        if now < self._retry_at.get(group.name, 0.0):
            return
        action = "promote" if role == "active" else "demote"
        bound = log.bind(group=group.name, epoch=epoch, role=role)
        bound.info(f"{action} starting", command=argv)
        await self._history.record(f"{action}_started", group=group.name, region=s.region,
                                   epoch=epoch)
        task = asyncio.create_task(
            run_hook(argv, group=group.name, region=s.region, epoch=epoch, role=role,
                     timeout_s=group.hook_timeout_s, attempts=group.hook_attempts),
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
        fields: dict[str, object] = {
            "group": group.name, "region": s.region, "epoch": epoch,
            "attempts": result.attempts,
            "duration_s": round(result.duration_s, 3), "returncode": result.returncode,
        }
        if result.ok:
            self.state.save(group.name, Applied(epoch, role))
            self._retry_at.pop(group.name, None)
            self._retry_delay.pop(group.name, None)
            bound.info(f"{action} done", attempts=result.attempts,
                       duration_s=fields["duration_s"])
            await self._history.record(f"{action}_done", **fields)
        else:
            delay = min(self._retry_delay.get(group.name, RETRY_MIN_S / 2) * 2, RETRY_MAX_S)
            self._retry_delay[group.name] = delay
            self._retry_at[group.name] = now + delay
            bound.error(f"{action} failed", attempts=result.attempts, output=result.output[-500:],
                        retry_in_s=delay)
            await self._history.record(f"{action}_failed", **fields, output=result.output[-500:])
