"""The watch-fed key mirror, pure: load, apply, exclude, parse cache, waits."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import asdict

from hypothesis import given
from hypothesis import strategies as st

from failoverd.core.model import (
    Incident,
    Keyspace,
    ViewIndex,
    incidents_value,
    parse_incidents,
    parse_view,
)
from failoverd.core.store import KeyValue, Snapshot, WatchEvent
from failoverd.etcd.mirror import KeyMirror

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


# Values of every kind the view reads, a malformed one among them.
def _j(**fields: object) -> str:
    return json.dumps(fields)


def _active(region: str, epoch: int) -> str:
    return _j(region=region, epoch=epoch, since=1, reason="r", term=1, trigger="power")


def _member(name: str) -> str:
    return _j(member=name, region="east", version="1", api_url="http://x", started=1)


_KEYS: dict[str, Callable[[int], str]] = {
    "coordinator": lambda i: _j(member=f"m{i % 2}"),
    "members/m0": lambda i: _member("m0"),
    "members/m1": lambda i: _member("m1"),
    "groups/g1/active": lambda i: _active("east" if i % 2 else "west", i + 1),
    "groups/g2/active": lambda i: "not json" if i % 3 == 0 else _active("east", i + 1),
    "groups/g1/applied/m0": lambda i: _j(epoch=i + 1, role="active"),
    "groups/g1/applied/m9": lambda i: _j(epoch=i + 1, role="standby"),
    "observations/m1/east": lambda i: _j(verdict="up" if i % 2 else "down", ready=True,
                                         since=1, checked_at=2),
    "power/east/ups/m0": lambda i: _j(state="on_battery", ts=i, received=i, since=1,
                                      runtime_s=60),
    "power/east/ups/m9": lambda i: _j(state="utility_ok", ts=i, received=i, since=1),
    "control/paused": lambda i: _j(paused=i % 2 == 1),
    "control/drained/west": lambda i: "{}",
    "control/requests/r1": lambda i: _j(action="pause", by="t", at=i),
    "control/storm": lambda i: _j(incidents=[{"kind": "evacuation", "region": "east",
                                              "trigger": "power", "at": i, "groups": 2,
                                              "held": 0}]),
}


@given(st.lists(st.tuples(st.sampled_from(sorted(_KEYS)), st.booleans(),
                          st.integers(0, 5)), max_size=40))
def test_the_incremental_view_equals_a_full_parse_after_any_changes(
        steps: list[tuple[str, bool, int]]) -> None:
    """The coordinator's view folded from the watch, one key at a time, is
    the view a full read at the same revision gives (problems included)."""
    keys = Keyspace("c")
    index = ViewIndex(keys)
    mirror = KeyMirror(P, index=index)
    mirror.load(Snapshot(1, tuple(kv(k, f(0), 1) for k, f in _KEYS.items())))
    for rev, (key, deleted, variant) in enumerate(steps, start=2):
        mirror.apply([ev(key, "" if deleted else _KEYS[key](variant), rev, deleted=deleted)])
        if rev % 3 == 0:
            mirror.view()  # views taken along the way must not change the end result
    full = parse_view(keys, mirror.snapshot())
    incremental = mirror.view()
    assert incremental == full
    assert sorted(incremental.problems) == sorted(full.problems)
    for group, rev in full.group_revisions.items():
        assert incremental.group_revisions[group] >= rev


@given(st.lists(st.builds(
    Incident, kind=st.sampled_from(["evacuation", "failback"]), region=st.text(max_size=8),
    trigger=st.sampled_from(["power", "health", "failback"]),
    at=st.floats(0, 2e9, allow_nan=False), reason=st.text(max_size=20),
    groups=st.integers(0, 5000), held=st.integers(0, 5000)), max_size=20))
def test_the_storm_key_round_trips_in_its_stored_shape(incidents: list[Incident]) -> None:
    text = incidents_value(tuple(incidents))
    # The shape older members read: every field of Incident, by name.
    assert json.loads(text) == {"incidents": [asdict(i) for i in incidents]}
    assert parse_incidents(KeyValue(P + "control/storm", text, 1, 1, 0)) == tuple(incidents)
