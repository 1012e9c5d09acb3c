"""Timing a group's commits the way the daemons see them: by a watch."""

from __future__ import annotations

import asyncio
import json
import time

from devstack.stack import LocalCluster


class CommitWatch:
    """When each epoch of the active record was committed, as a watcher sees
    it — the daemons learn of it the same way.  One watch stream: timing by
    polling etcd every few milliseconds loaded etcd (a linearizable read is
    a leadership round) at the very instant being timed."""

    def __init__(self, c: LocalCluster, group: str) -> None:
        self._c, self._key = c, c.keys.active(group)
        self.seen: dict[int, tuple[float, str]] = {}
        self._changed = asyncio.Event()

    async def run(self) -> None:
        start = (await self._c.store.get_prefix(self._key)).revision + 1
        async for batch in self._c.store.watch(self._key, start):
            now = time.time()
            for ev in batch:
                if ev.key == self._key and not ev.deleted:
                    self.seen[json.loads(ev.value)["epoch"]] = (now, ev.value)
            self._changed.set()
            self._changed = asyncio.Event()

    async def after(self, epoch: int, within_s: float) -> tuple[float, str] | None:
        """The first commit of an epoch above ``epoch`` (time seen, value);
        None if none came within ``within_s``."""
        try:
            async with asyncio.timeout(within_s):
                while True:
                    newer = [e for e in self.seen if e > epoch]
                    if newer:
                        return self.seen[min(newer)]
                    await self._changed.wait()
        except TimeoutError:
            return None
