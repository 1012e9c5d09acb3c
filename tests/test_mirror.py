"""The watch-fed key mirror, pure: load, apply, exclude, parse cache, waits."""

from __future__ import annotations

import asyncio

from failoverd.mirror import KeyMirror
from failoverd.store import KeyValue, Snapshot, WatchEvent

P = "/failoverd/c/"


def kv(key: str, value: str, rev: int) -> KeyValue:
    return KeyValue(P + key, value, rev, rev, 0)


def ev(key: str, value: str, rev: int, deleted: bool = False, lease: int = 0) -> WatchEvent:
    return WatchEvent(P + key, value, rev, deleted, create_revision=rev, lease=lease)


async def test_load_then_events_equal_the_store_at_that_revision() -> None:
    m = KeyMirror(P, exclude=("history/",))
    m.load(Snapshot(10, (kv("a", "1", 5), kv("history/x", "h", 6))))
    assert set(m.kvs) == {P + "a"} and m.revision == 10
    changed = m.apply([ev("a", "2", 11), ev("b", "3", 11, lease=7),
                       ev("history/y", "h", 11)])
    assert sorted(changed) == [P + "a", P + "b"]
    assert m.kvs[P + "a"].value == "2" and m.kvs[P + "b"].lease == 7
    assert m.apply([ev("a", "", 12, deleted=True)]) == [P + "a"]
    assert P + "a" not in m.kvs and m.revision == 12
    # An event already in the loaded snapshot is ignored.
    assert m.apply([ev("b", "old", 9)]) == []
    # History-only events advance the revision (our own writes are waited on).
    m.apply([ev("history/z", "h", 13)])
    assert m.revision == 13 and m.snapshot().revision == 13


async def test_parsed_values_are_cached_until_the_key_changes() -> None:
    m = KeyMirror(P)
    m.load(Snapshot(1, (kv("a", "1", 1),)))
    calls = []

    def parse(x: KeyValue) -> int:
        calls.append(x.mod_revision)
        return int(x.value)
    assert m.parsed(m.kvs[P + "a"], parse) == 1
    assert m.parsed(m.kvs[P + "a"], parse) == 1
    m.apply([ev("a", "5", 2)])
    assert m.parsed(m.kvs[P + "a"], parse) == 5
    assert calls == [1, 2]


async def test_wait_revision_wakes_on_apply_and_times_out() -> None:
    m = KeyMirror(P)
    m.load(Snapshot(1, ()))
    assert not await m.wait_revision(5, 0.05)
    waiter = asyncio.create_task(m.wait_revision(5, 2.0))
    await asyncio.sleep(0)
    m.apply([ev("a", "1", 5)])
    assert await waiter
