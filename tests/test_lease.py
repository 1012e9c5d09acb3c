"""The lease keeper's clock logic, with a scripted store and a fake clock."""

from __future__ import annotations

import asyncio

import pytest

from failoverd.core.store import LeaseNotFound, StoreError
from failoverd.etcd.lease import KeptLease, LeaseLost


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def fake_sleep(clock: Clock):
    async def sleep(seconds: float) -> None:
        clock.t += seconds
        await asyncio.sleep(0)
    return sleep


class SlowStore:
    """keepalive takes ``delay`` fake seconds, then answers ``ttl`` or raises."""

    def __init__(self, clock: Clock, answers: list[int | Exception], delay: float) -> None:
        self.clock, self.answers, self.delay = clock, answers, delay
        self.sent_at: list[float] = []

    async def keepalive(self, lease: int) -> int:
        self.sent_at.append(self.clock.t)
        self.clock.t += self.delay
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


async def test_deadline_counts_from_send_not_from_answer() -> None:
    clock = Clock()
    store = SlowStore(clock, [10, LeaseNotFound("gone")], delay=3.0)
    lease = KeptLease(store, 1, 10, granted_at=clock.t, margin_s=0.5, clock=clock,  # type: ignore[arg-type]
                       sleep=fake_sleep(clock))
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(lease.run(), 5)
    # First renewal sent at sent_at[0], answered 3 s later: the deadline is
    # sent_at[0] + ttl - margin, not answer time + ttl - margin.
    assert lease.deadline == store.sent_at[0] + 10 - 0.5


async def test_failed_keepalives_end_the_lease_at_the_deadline() -> None:
    clock = Clock()
    store = SlowStore(clock, [StoreError("down")] * 100, delay=1.0)
    lease = KeptLease(store, 1, 3, granted_at=clock.t, margin_s=0.5, clock=clock,  # type: ignore[arg-type]
                       sleep=fake_sleep(clock))
    with pytest.raises(LeaseLost, match="local deadline"):
        await asyncio.wait_for(lease.run(), 5)
    assert not lease.valid()
    assert clock.t >= 100 + 3 - 0.5


async def test_a_late_answer_still_renews_from_its_send_time() -> None:
    """A keep-alive whose answer comes after the attempt's bound (a daemon
    starved of CPU by its own hooks, a slow etcd) is not thrown away: while
    a second attempt goes out, the first one's answer renews the lease from
    the first one's send time (rule 3 holds).  Real time, TTL 3 s."""
    import time  # noqa: PLC0415

    class LateThenSilent:
        def __init__(self) -> None:
            self.calls = 0

        async def keepalive(self, lease: int) -> int:
            self.calls += 1
            if self.calls == 1:
                await asyncio.sleep(0.7)  # past the 0.5 s bound of an attempt
                return 3
            await asyncio.sleep(30)  # every later attempt hangs
            return 3

    store = LateThenSilent()
    granted = time.monotonic()
    lease = KeptLease(store, 1, 3, granted_at=granted, margin_s=0.3)  # type: ignore[arg-type]
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(lease.run(), 10)
    assert lease.renewals == 1 and store.calls >= 2
    # Renewed from the first attempt's send time (0.3 s after the grant), so
    # the lease outlived the grant's own deadline (granted + 2.7 s).
    assert lease.deadline > granted + 3 - 0.3


async def test_the_isolation_guard_sleeps_to_the_lease_deadline_and_wakes_on_a_drop() -> None:
    """At rest the rule-4 guard does not check every second: while the
    lease is held it sleeps to the lease's local deadline (or its next peer
    refresh), and wakes at once when the session drops the lease (etcd said
    it expired before that deadline); once the lease is gone, every second."""
    from failoverd.daemon.isolation import CHECK_EVERY_S, IsolationGuard  # noqa: PLC0415

    dropped = asyncio.Event()
    alive = [True]
    guard = IsolationGuard(None, None, None, None, lambda: alive[0],  # type: ignore[arg-type]
                           lease_left=lambda: 60.0, lease_dropped=dropped)
    guard._next_refresh = guard._clock() + 60.0
    nap = asyncio.ensure_future(guard._nap())
    await asyncio.sleep(CHECK_EVERY_S * 1.5)
    assert not nap.done()  # no tick a second while the lease is held
    alive[0] = False
    dropped.set()  # the session ended: its lease is gone
    await asyncio.wait_for(nap, 0.5)
    started = asyncio.get_running_loop().time()
    await asyncio.wait_for(guard._nap(), CHECK_EVERY_S + 0.5)
    assert asyncio.get_running_loop().time() - started >= CHECK_EVERY_S * 0.9
