"""Audit events under ``history/``: who, what, why, epoch.

Events are appended best-effort — a history write must never block or fail a
safety action — except where the event is part of a fenced txn (an epoch
change), in which case it lands atomically with the change it records.

While :meth:`History.run` runs (the daemon's ``history`` task), ``record``
only queues: the writer sends what accumulated in one txn (up to
``MAX_TXN_OPS`` events), so 1,000 hooks finishing together cost a handful of etcd
writes, and a member cut off from etcd never waits on its audit trail.
Events wait (up to ``MAX_QUEUED``, oldest dropped and counted) while etcd is
unreachable.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable

import structlog

from failoverd.core.model import Keyspace, to_json
from failoverd.core.store import MAX_TXN_OPS, Delete, Op, Put, Store, StoreError

log = structlog.get_logger("failoverd.etcd.history")

MAX_QUEUED = 10_000
RETRY_S = 1.0


class History:
    """This member's audit trail under ``history/``.

    Owns a bounded queue of events and the ``history`` task that writes them
    in batched txns.  :meth:`record` never blocks a safety action and never
    raises; :meth:`put_op` gives an event as an op to ride inside a fenced
    txn.  Errors: a refused batch stays queued and is retried; past
    ``MAX_QUEUED`` the oldest events are dropped and counted.
    """

    def __init__(self, store: Store, keys: Keyspace, member: str, region: str,
                 clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._keys = keys
        self._member = member
        self._region = region
        self._clock = clock
        self._last_ns = 0
        self._queue: list[Put] = []
        self._queued = asyncio.Event()
        self._writer_running = False
        self.dropped = 0

    def put_op(self, kind: str, **fields: object) -> Put:
        """The event as a :class:`Put`, to ride inside a txn."""
        return self.put_op_at(kind, None, **fields)

    def put_op_at(self, kind: str, at: float | None, **fields: object) -> Put:
        """Likewise, for something that happened at ``at`` (earlier than now:
        a saga step recorded together with the next)."""
        now = self._clock()
        # Strictly increasing per member so two events never share a key.
        ns = max(int(now * 1e9), self._last_ns + 1)
        self._last_ns = ns
        body = {"member_region": self._region, **fields,
                "ts": now if at is None else min(at, now), "kind": kind,
                "member": self._member}
        return Put(self._keys.history_event(ns, self._member), to_json(body))

    async def record(self, kind: str, **fields: object) -> None:
        op = self.put_op(kind, **fields)
        if self._writer_running:
            if len(self._queue) >= MAX_QUEUED:
                del self._queue[0]
                self.dropped += 1
                log.warning("history queue full; oldest event dropped", dropped=self.dropped)
            self._queue.append(op)
            self._queued.set()
            return
        try:
            await self._store.put(op.key, op.value)
        except StoreError as exc:
            log.warning("history event not recorded", kind=kind, error=str(exc))

    async def run(self) -> None:
        """The writer: sends queued events in batches until cancelled."""
        self._writer_running = True
        try:
            while True:
                await self._queued.wait()
                self._queued.clear()
                if not await self.flush():
                    await asyncio.sleep(RETRY_S)
                    self._queued.set()
        finally:
            self._writer_running = False

    async def flush(self) -> bool:
        """Write everything queued; False if etcd refused (kept for later)."""
        while self._queue:
            batch: list[Op] = list(self._queue[:MAX_TXN_OPS])
            try:
                await self._store.txn([], batch)
            except StoreError as exc:
                log.warning("history events not recorded yet", queued=len(self._queue),
                            error=str(exc))
                return False
            del self._queue[:len(batch)]
        return True

    async def prune(self, limit: int) -> int:
        """Keep the newest ``limit`` events; returns how many were deleted.
        One range delete (keys sort by time), not one request per event."""
        excess = await self._store.count(self._keys.history) - limit
        if excess <= 0:
            return 0
        oldest = await self._store.get_prefix(self._keys.history, limit=excess + 1,
                                              keys_only=True)
        keep_from = oldest.kvs[-1].key
        await self._store.txn([], [Delete(self._keys.history, end=keep_from)])
        return len(oldest.kvs) - 1


async def read_history(store: Store, keys: Keyspace, limit: int) -> list[dict[str, object]]:
    """Events newest first; malformed ones are skipped."""
    snap = await store.get_prefix(keys.history, limit=limit, newest_first=True)
    out: list[dict[str, object]] = []
    for kv in snap.kvs:
        try:
            data = json.loads(kv.value)
        except ValueError:
            continue
        if isinstance(data, dict):
            out.append(data)
    return out
