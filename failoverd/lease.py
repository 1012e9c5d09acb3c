"""A lease kept alive, with a local deadline that errs on the safe side.

Safety rule 3: the deadline is measured from the *send* time of the last
keep-alive that succeeded, minus a margin.  etcd starts the new TTL when it
*receives* the request, which is later, so our deadline always falls before
the server's; a holder past its deadline stops acting at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import structlog

from failoverd.store import LeaseNotFound, Store, StoreError

log = structlog.get_logger("failoverd.lease")


class LeaseLost(Exception):
    """The lease is gone or its local deadline passed."""


class KeptLease:
    """Keeps one lease alive; :meth:`run` raises :class:`LeaseLost` at the end."""

    def __init__(self, store: Store, lease_id: int, ttl: int, granted_at: float,
                 margin_s: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.id = lease_id
        self.ttl = ttl
        self._store = store
        self._margin = margin_s
        self._clock = clock
        self._sleep = sleep
        self.deadline = granted_at + ttl - margin_s
        self.renewals = 0

    def valid(self) -> bool:
        return self._clock() < self.deadline

    def remaining(self) -> float:
        return self.deadline - self._clock()

    async def run(self) -> None:
        """Refresh every ttl/3 s (faster after a failure) until the lease is lost."""
        interval = max(self.ttl / 3.0, 0.2)
        while True:
            # Sleep to the next renewal, but never past the deadline: we must
            # notice expiry on time even when nothing else wakes us.
            await self._sleep(max(min(interval, self.remaining()), 0))
            if not self.valid():
                raise LeaseLost(f"lease {self.id:x} passed its local deadline")
            sent = self._clock()
            try:
                async with asyncio.timeout(max(self.remaining(), 0.01)):
                    ttl = await self._store.keepalive(self.id)
            except LeaseNotFound as exc:
                raise LeaseLost(str(exc)) from exc
            except (StoreError, TimeoutError) as exc:
                log.warning("lease keepalive failed", lease=f"{self.id:x}",
                            error=str(exc), remaining_s=round(self.remaining(), 3))
                interval = max(self.ttl / 10.0, 0.1)
                continue
            self.deadline = sent + ttl - self._margin
            self.renewals += 1
            log.debug("lease renewed", lease=f"{self.id:x}", ttl=ttl,
                      remaining_s=round(self.remaining(), 3))
            interval = max(ttl / 3.0, 0.2)
