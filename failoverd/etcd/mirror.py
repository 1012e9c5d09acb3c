"""A local mirror of the cluster's keys, kept current by the one watch.

Reading every key at every decision made the coordinator's work (and each
member's role reconciliation) grow with the number of groups at every watch
event.  The mirror is loaded once from a snapshot (one revision) and then
applies the watch's events in revision order, so it always equals etcd's
state as of :attr:`KeyMirror.revision` — a consistent snapshot, as before,
without the read.  Decisions made from it are still fenced in etcd by
``mod_revision`` (rule 1): a mirror that lags can delay a decision, never
corrupt one.

Parsed values are cached per key and ``mod_revision`` (:meth:`parsed`), and
the optional :class:`~failoverd.core.model.ViewIndex` is fed every change, so a
coordinator cycle re-parses and re-assembles only what changed.  Pure
bookkeeping plus asyncio waiting; the watch loop that feeds it lives in
:mod:`failoverd.daemon.wiring`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TypeVar

from failoverd.core.model import ClusterView, ViewIndex
from failoverd.core.store import KeyValue, Snapshot, WatchEvent

T = TypeVar("T")


class KeyMirror:
    """Every key under the prefix (but the excluded ones) at one revision."""

    def __init__(self, prefix: str, exclude: Iterable[str] = (),
                 index: ViewIndex | None = None) -> None:
        self.prefix = prefix
        self.index = index
        self._exclude = tuple(prefix + e for e in exclude)
        self.kvs: dict[str, KeyValue] = {}
        self.revision = 0
        self.ready = asyncio.Event()
        self._advanced = asyncio.Event()
        self._cache: dict[str, tuple[int, object]] = {}

    def load(self, snap: Snapshot) -> None:
        """Replace everything with ``snap`` (start, or after a compaction)."""
        self.kvs = {kv.key: kv for kv in snap.kvs if not kv.key.startswith(self._exclude)}
        self._cache = {k: v for k, v in self._cache.items() if k in self.kvs
                       and self.kvs[k].mod_revision == v[0]}
        if self.index is not None:
            self.index.load(self.kvs.values())
        self.revision = snap.revision
        self.ready.set()
        self._wake()

    def apply(self, events: Iterable[WatchEvent]) -> list[str]:
        """Fold in one watch response; the keys that changed."""
        changed = []
        top = self.revision
        for ev in events:
            top = max(top, ev.mod_revision)
            if ev.mod_revision <= self.revision or ev.key.startswith(self._exclude):
                continue  # already in the snapshot we loaded, or not mirrored
            if ev.deleted:
                self.kvs.pop(ev.key, None)
                self._cache.pop(ev.key, None)
                if self.index is not None:
                    self.index.delete(ev.key, ev.mod_revision)
            else:
                kv = KeyValue(ev.key, ev.value, ev.create_revision, ev.mod_revision, ev.lease)
                self.kvs[ev.key] = kv
                if self.index is not None:
                    self.index.put(kv)
            changed.append(ev.key)
        if top > self.revision:
            self.revision = top
            self._wake()
        return changed

    def snapshot(self) -> Snapshot:
        return Snapshot(self.revision, tuple(self.kvs.values()))

    def view(self) -> ClusterView:
        """The mirrored keys as a view at :attr:`revision` (needs an index)."""
        if self.index is None:
            raise RuntimeError("this mirror keeps no view index")
        return self.index.view(self.revision)

    def parsed(self, kv: KeyValue, parse: Callable[[KeyValue], T]) -> T:
        """``parse(kv)``, cached until the key changes."""
        hit = self._cache.get(kv.key)
        if hit is not None and hit[0] == kv.mod_revision:
            return hit[1]  # type: ignore[return-value]
        value = parse(kv)
        self._cache[kv.key] = (kv.mod_revision, value)
        return value

    def _wake(self) -> None:
        self._advanced.set()
        self._advanced = asyncio.Event()

    async def wait_revision(self, revision: int, within_s: float) -> bool:
        """Wait until the mirror has seen ``revision``; False on timeout."""
        try:
            async with asyncio.timeout(within_s):
                while self.revision < revision:
                    await self._advanced.wait()
        except TimeoutError:
            return False
        return True
