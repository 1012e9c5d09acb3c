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

from failoverd.core.store import LeaseNotFound, Store, StoreError

log = structlog.get_logger("failoverd.etcd.lease")


# Bounds of one keep-alive attempt (see KeptLease.run).
ATTEMPT_MIN_S = 0.2
ATTEMPT_MAX_S = 0.5
# etcd's default election: 1 s timeout, randomised up to 2 s, plus the vote
# and a restarted member catching up.
ELECTION_ALLOWANCE_S = 2.4
RENEW_MIN_S = 0.25
RETRY_S = 0.05


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

    def renew_every(self, ttl: float) -> float:
        """How long after a renewal the next one is sent: at most ttl/3, and
        early enough that an etcd leader election (ELECTION_ALLOWANCE_S)
        starting right after a renewal still ends before our deadline — a
        leader kill must not cost a lease (etcd itself extends leases
        across an election; only our local deadline can run out)."""
        return max(min(ttl / 3.0, ttl - self._margin - ELECTION_ALLOWANCE_S), RENEW_MIN_S)

    async def run(self) -> None:
        """Renew (see :meth:`renew_every`; faster after a failure) until the
        lease is lost.

        An attempt that gets no answer within a quarter of what is left
        (0.2-0.5 s) is not abandoned: a new one goes out (round robin: to
        another endpoint, past a dead or leaderless etcd member) while the
        first may still answer.  A late answer renews from its own send time
        — a daemon whose event loop is starved of CPU by its own hooks must
        not lose a lease that etcd renewed.  Each attempt is bounded by the
        store's own timeout, so at most a few are ever in flight."""
        interval = self.renew_every(self.ttl)
        inflight: dict[asyncio.Task[int], float] = {}
        try:
            while True:
                # Sleep to the next renewal, but never past the deadline: we
                # must notice expiry on time even when nothing else wakes us.
                await self._sleep(max(min(interval, self.remaining()), 0))
                if not self.valid():
                    raise LeaseLost(f"lease {self.id:x} passed its local deadline")
                attempt = min(max(self.remaining() / 4, ATTEMPT_MIN_S), ATTEMPT_MAX_S,
                              max(self.remaining(), 0.01))
                inflight[asyncio.create_task(self._store.keepalive(self.id),
                                             name=f"keepalive-{self.id:x}")] = self._clock()
                done, _ = await asyncio.wait(inflight, timeout=attempt,
                                             return_when=asyncio.FIRST_COMPLETED)
                renewed = self._answers(done, inflight)
                if renewed is None:
                    interval = RETRY_S  # at once, to another endpoint
                    continue
                for task in inflight:
                    task.cancel()
                inflight.clear()
                sent, ttl = renewed
                self.deadline = max(self.deadline, sent + ttl - self._margin)
                self.renewals += 1
                log.debug("lease renewed", lease=f"{self.id:x}", ttl=ttl,
                          remaining_s=round(self.remaining(), 3))
                interval = self.renew_every(ttl)
        finally:
            for task in inflight:
                task.cancel()

    def _answers(self, done: set[asyncio.Task[int]], inflight: dict[asyncio.Task[int], float]
                 ) -> tuple[float, int] | None:
        """The newest successful answer among ``done`` as (send time, ttl);
        None if none succeeded.  Raises :class:`LeaseLost` if etcd says the
        lease is gone."""
        best: tuple[float, int] | None = None
        for task in done:
            sent = inflight.pop(task)
            try:
                ttl = task.result()
            except LeaseNotFound as exc:
                raise LeaseLost(str(exc)) from exc
            except (StoreError, TimeoutError) as exc:
                log.warning("lease keepalive failed", lease=f"{self.id:x}",
                            error=str(exc) or type(exc).__name__,
                            remaining_s=round(self.remaining(), 3))
                continue
            if best is None or sent > best[0]:
                best = (sent, ttl)
        if best is None and not done:
            log.warning("lease keepalive not answered yet; sending another",
                        lease=f"{self.id:x}", in_flight=len(inflight),
                        remaining_s=round(self.remaining(), 3))
        return best
