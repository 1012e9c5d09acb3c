"""This member's own keys in etcd, kept under its lease.

Observations (probes) and power relays (MQTT) are facts this member
publishes about what it sees: each lives under the member's lease, so it
disappears with the member.  :class:`LeasedPublisher` writes a key when what
it says changes, when it is older than its refresh period (readers judge
freshness), and again under a new lease after a new session — one rule for
every kind of fact, instead of one hand-rolled copy per sensor kind.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass

from failoverd.core.store import Put, Store


@dataclass
class _Published:
    identity: Hashable
    value: str
    at: float
    lease: int
    minor: Hashable = None
    # This write's share of the refresh period (REFRESH_SPREAD..1): keys
    # first written together (a bridge coming up, a new session) must not
    # refresh together forever, each burst a queue in etcd in front of a
    # power event.
    spread: float = 1.0


REFRESH_SPREAD = 0.75
# Puts per transaction when flushing (etcd's --max-txn-ops defaults to 128).
FLUSH_TXN_OPS = 100
# A value, or how to render it: a flood of held-back minor changes should
# not render a document per message that is never written.
Value = str | Callable[[], str]


@dataclass
class _Pending:
    """A minor change held back by ``min_interval_s``: written when due."""

    value: Value
    identity: Hashable
    minor: Hashable
    due: float


class LeasedPublisher:
    """Writes keys under the current lease, skipping unchanged rewrites.

    Shared by the tasks of one adapter (not thread-safe; one event loop).
    Errors: :meth:`publish` and :meth:`resync` let the store's
    :class:`~failoverd.core.store.StoreError` through, for the caller to log
    with its own context; what was not written is written on the next call.
    """

    def __init__(self, store: Store, lease_id: Callable[[], int | None],
                 clock: Callable[[], float] = time.time,
                 rng: random.Random | None = None,
                 on_pending: Callable[[float], None] = lambda due: None) -> None:
        self._rng = rng or random.Random()
        self._on_pending = on_pending  # a write was held for flush(), due then
        self._store = store
        self._lease_id = lease_id
        self._clock = clock
        self._last: dict[str, _Published] = {}
        self._pending: dict[str, _Pending] = {}
        self._writing = asyncio.Lock()

    def minor(self, key: str) -> Hashable:
        """The ``minor`` part last written for ``key`` (None: never)."""
        last = self._last.get(key)
        return last.minor if last is not None else None

    def identity(self, key: str) -> Hashable | None:
        """What ``key`` said when it was last written (None: never)."""
        last = self._last.get(key)
        return last.identity if last is not None else None

    async def publish(self, key: str, value: Value, identity: Hashable, refresh_s: float,
                      minor: Hashable = None, min_interval_s: float = 0.0,
                      batch: bool = False) -> bool:
        """Write ``value`` (a string, or a function that renders it when it
        is written) unless the same ``identity`` was written under the
        current lease less than ``refresh_s`` ago (less a random quarter at
        most, so that refreshes spread out); True if written.

        ``minor`` is what may change without counting as news (a battery
        runtime ticking down): with ``min_interval_s``, a change of it alone
        is written by :meth:`flush` — the newest value, at most once per
        interval, batched with the other keys due — so a flood of minor
        changes costs one write per interval and few etcd entries.  With
        ``batch``, news that is not urgent (a new sensor saying all is well)
        waits for the next :meth:`flush` too.  Nothing is written without a
        lease (a new session re-publishes)."""
        lease = self._lease_id()
        if lease is None:
            return False
        now = self._clock()
        last = self._last.get(key)
        if batch and (last is None or last.lease != lease or last.identity != identity):
            self._pending[key] = _Pending(value, identity, minor, now)
            self._on_pending(now)
            return False
        if last is not None and last.lease == lease and last.identity == identity:
            if last.minor == minor and now - last.at < refresh_s * last.spread:
                self._pending.pop(key, None)  # back to what etcd holds
                return False
            if last.minor != minor and min_interval_s > 0:
                # Held for flush(), which writes every due one in one txn: a
                # flood of runtimes over many sensors is a few etcd entries
                # a second, not one per sensor.
                due = max(last.at + min_interval_s, now)
                self._pending[key] = _Pending(value, identity, minor, due)
                self._on_pending(due)
                return False
        await self._write(key, value, identity, minor, lease)
        return True

    def next_due(self) -> float | None:
        """When the earliest held-back write is due (this publisher's
        clock), or None when nothing is held."""
        return min((p.due for p in self._pending.values()), default=None)

    def behind_lease(self) -> bool:
        """Some key was last written under an older lease (a new session:
        :meth:`resync` has work)."""
        lease = self._lease_id()
        return lease is not None and any(last.lease != lease for last in self._last.values())

    async def flush(self) -> int:
        """Write the held-back minor changes that are due, FLUSH_TXN_OPS to
        a transaction; how many."""
        lease = self._lease_id()
        if lease is None or not self._pending:
            return 0
        now = self._clock()
        due = [(key, p) for key, p in self._pending.items() if p.due <= now]
        written = 0
        for i in range(0, len(due), FLUSH_TXN_OPS):
            async with self._writing:
                # Still the newest word (a direct write may have gone first).
                chunk = [(key, p, p.value if isinstance(p.value, str) else p.value())
                         for key, p in due[i:i + FLUSH_TXN_OPS] if self._pending.get(key) is p]
                if not chunk:
                    continue
                await self._store.txn([], [Put(key, text, lease) for key, _, text in chunk])
                at = self._clock()
                for key, p, text in chunk:
                    self._last[key] = _Published(p.identity, text, at, lease, p.minor,
                                                 self._rng.uniform(REFRESH_SPREAD, 1.0))
                    if self._pending.get(key) is p:  # not replaced meanwhile
                        del self._pending[key]
                written += len(chunk)
        return written

    async def _write(self, key: str, value: Value, identity: Hashable, minor: Hashable,
                     lease: int) -> None:
        # One write at a time: a flush in flight must not land after a newer
        # direct write of the same key (a batched "all is well" after the
        # "on battery" that followed it).  A word held after this call
        # began is newer than it, and stays held.
        held = self._pending.get(key)
        async with self._writing:
            text = value if isinstance(value, str) else value()
            await self._store.put(key, text, lease)
            self._last[key] = _Published(identity, text, self._clock(), lease, minor,
                                         self._rng.uniform(REFRESH_SPREAD, 1.0))
            if self._pending.get(key) is held:
                self._pending.pop(key, None)

    async def resync(self) -> int:
        """Write every key again whose last write was under an older lease
        (a new session); how many were written."""
        lease = self._lease_id()
        if lease is None:
            return 0
        written = 0
        for key, last in list(self._last.items()):
            if last.lease != lease:
                pending = self._pending.get(key)
                if pending is not None:  # the newest word, not the last written
                    await self._write(key, pending.value, pending.identity, pending.minor, lease)
                else:
                    await self._write(key, last.value, last.identity, last.minor, lease)
                written += 1
        return written
