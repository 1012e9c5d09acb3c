"""The coordinator's step slots: steps up to a promote are served first."""

from __future__ import annotations

import asyncio
from dataclasses import replace

from failoverd.core.workflow import Workflow
from failoverd.daemon.saga import RankedSlots, step_rank


async def _queue(slots: RankedSlots, order: list[str], name: str, rank: int,
                 release: asyncio.Event) -> None:
    async with slots.slot(rank):
        order.append(name)
        await release.wait()


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


async def test_waiters_are_served_by_rank_then_by_arrival():
    slots = RankedSlots(1)
    order: list[str] = []
    go = asyncio.Event()
    go.set()  # every holder lets go at once
    hold = asyncio.Event()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_queue(slots, order, "holder", 1, hold))
        await _settle()
        for name, rank in (("late-1a", 1), ("early-0a", 0), ("late-1b", 1), ("early-0b", 0)):
            tg.create_task(_queue(slots, order, name, rank, go))
            await _settle()
        assert order == ["holder"]  # one slot: everyone else queues
        hold.set()
    assert order == ["holder", "early-0a", "early-0b", "late-1a", "late-1b"]


async def test_a_cancelled_waiter_does_not_lose_a_slot():
    slots = RankedSlots(1)
    order: list[str] = []
    hold, go = asyncio.Event(), asyncio.Event()
    go.set()
    async with asyncio.TaskGroup() as tg:
        tg.create_task(_queue(slots, order, "holder", 0, hold))
        await _settle()
        doomed = tg.create_task(_queue(slots, order, "doomed", 0, go))
        tg.create_task(_queue(slots, order, "next", 1, go))
        await _settle()
        doomed.cancel()
        await _settle()
        hold.set()
    assert order == ["holder", "next"]
    # Both slots' worth of work finished: the slot is free again.
    async with asyncio.timeout(1):
        async with slots.slot(1):
            pass


def test_a_saga_ranks_first_until_its_promote_gate_is_recorded():
    for mode in ("planned", "forced", "bootstrap"):
        wf = Workflow.new("app", 2, "east" if mode != "bootstrap" else None, "west", mode, 0.0)
        assert step_rank(wf) == 0, mode
        promote = next(s for s in wf.steps if s.name == "promote_new")
        running = wf.with_step(replace(promote, state="running", started=1.0), 1.0)
        assert step_rank(running) == 1, mode
