"""The etcd adapter and the safety rules it underpins, against a real etcd."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest
from etcd3aio import Etcd3Client, EtcdError

from devstack.stack import EtcdCluster, free_port, wait_until
from failoverd.config import EtcdSettings, Settings
from failoverd.core.engine import Decision, Evacuation, GroupPolicy, Policy, SetActive
from failoverd.core.model import Incident, Keyspace, parse_view
from failoverd.core.store import Compare, Get, LeaseNotFound, Put, StoreError
from failoverd.daemon.coordinator import Coordinator, NotCoordinator
from failoverd.etcd.client import EtcdStore
from failoverd.etcd.election import campaign, resign
from failoverd.etcd.history import History, read_history
from failoverd.etcd.lease import KeptLease, LeaseLost


@pytest.fixture
async def store(etcd: EtcdCluster):
    s = EtcdStore(EtcdSettings(endpoints=etcd.endpoints, timeout_s=1.0))
    yield s
    await s.close()


async def _lease(store: EtcdStore, ttl: int = 2) -> KeptLease:
    sent = time.monotonic()
    lease_id, granted = await store.grant(ttl)
    return KeptLease(store, lease_id, granted, sent, margin_s=0.2)


async def test_snapshot_reads_one_revision_and_skips_history(store: EtcdStore,
                                                             cluster_name: str) -> None:
    keys = Keyspace(cluster_name)
    await store.put(keys.member("a"), '{"x":1}')
    await store.put(keys.history + "0001", "{}")
    rev = await store.put(keys.active("app"), "{}")
    snap = await store.snapshot(keys.prefix, exclude=("history/",))
    assert snap.revision >= rev
    got = sorted(kv.key for kv in snap.kvs)
    assert got == sorted([keys.member("a"), keys.active("app")])
    assert all(kv.mod_revision <= snap.revision for kv in snap.kvs)


async def test_unreachable_store_raises_store_error_within_deadline() -> None:
    s = EtcdStore(EtcdSettings(endpoints=[f"127.0.0.1:{free_port()}"], timeout_s=0.3))
    try:
        with pytest.raises(StoreError):
            await asyncio.wait_for(s.get("/x"), 5)
        with pytest.raises(StoreError):
            await asyncio.wait_for(s.txn([], [Put("/x", "1")]), 5)
    finally:
        await s.close()


async def test_keepalive_on_a_revoked_lease_is_lease_not_found(store: EtcdStore) -> None:
    lease_id, _ = await store.grant(5)
    await store.revoke(lease_id)
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease_id)
    await store.revoke(lease_id)  # revoking twice is fine


async def test_watch_resumes_from_last_revision_after_etcd_restart(
        tmp_path: Path, cluster_name: str) -> None:
    """Events written while the watch's server was down are all delivered, in
    order, once it returns: the watch resumes from its last revision."""
    etcd = EtcdCluster(tmp_path / "w", size=1)
    etcd.start()
    s = EtcdStore(EtcdSettings(endpoints=etcd.endpoints, timeout_s=1.0))
    w = EtcdStore(EtcdSettings(endpoints=etcd.endpoints, timeout_s=1.0))
    keys = Keyspace(cluster_name)
    seen: list[str] = []
    try:
        start = await s.put(keys.prefix + "k0", "0")

        async def consume() -> None:
            async for batch in w.watch(keys.prefix, start):
                seen.extend(ev.value for ev in batch)
        task = asyncio.create_task(consume())
        await wait_until(lambda: _ready(seen, 1), 5, "first event")
        etcd.kill(etcd.members[0])
        etcd.start_member(etcd.members[0], state="new")
        etcd.wait_healthy()

        async def put_first() -> bool:
            try:
                await s.put(keys.prefix + "k1", "1")
            except StoreError:
                return False
            return True
        await wait_until(put_first, 10, "etcd reachable again")
        for i in range(2, 6):
            await s.put(keys.prefix + f"k{i}", str(i))
        await wait_until(lambda: _ready(seen, 6), 15, "events after restart")
        assert seen == ["0", "1", "2", "3", "4", "5"]
        task.cancel()
    finally:
        await s.close()
        await w.close()
        etcd.stop()


async def _ready(seen: list[str], n: int) -> bool:
    return len(seen) >= n


async def test_campaign_one_winner_and_term_is_create_revision(store: EtcdStore,
                                                               cluster_name: str) -> None:
    keys = Keyspace(cluster_name)
    a, b = await _lease(store), await _lease(store)
    term_a = await campaign(store, keys, "a", a)
    term_b = await campaign(store, keys, "b", b)
    assert term_a is not None and term_b is None
    seat = await store.get(keys.coordinator)
    assert seat is not None and seat.create_revision == term_a and seat.lease == a.id
    assert await resign(store, keys, term_a)
    term_b = await campaign(store, keys, "b", b)
    assert term_b is not None and term_b > term_a


async def test_campaign_with_an_expired_lease_never_leads(store: EtcdStore,
                                                          cluster_name: str) -> None:
    """No phantom leadership: a lease that is gone (or past its local
    deadline) cannot produce a win."""
    keys = Keyspace(cluster_name)
    lease = await _lease(store)
    await store.revoke(lease.id)
    with pytest.raises(LeaseNotFound):
        await campaign(store, keys, "a", lease)
    stale = await _lease(store)
    stale.deadline = 0  # local deadline passed
    assert await campaign(store, keys, "a", stale) is None
    assert await store.get(keys.coordinator) is None


def _one(change: SetActive) -> Decision:
    return Decision((change,), change.reason)


def _coordinator(store: EtcdStore, keys: Keyspace, member: str, term: int,
                 lease: KeptLease) -> Coordinator:
    p = Policy(priorities=(("east", 100), ("west", 50)),
               groups=(GroupPolicy("app", ("east", "west")),), cooldown_s=0,
               max_evacuations_per_hour=10, failback="manual", failback_stable_s=0)
    settings = Settings.model_validate({
        "cluster": keys.cluster, "member": member, "region": "east",
        "regions": [{"name": "east"}, {"name": "west"}],
        "groups": [{"name": "app", "regions": ["east", "west"]}]})
    return Coordinator(store, keys, member, term, lease, History(store, keys, member, "x"),
                       policy=lambda: p, tick_s=lambda: 0.1, history_limit=lambda: 100,
                       wake=asyncio.Event(), settings=lambda: settings)


async def test_safety_rule_1_deposed_coordinator_write_fails(store: EtcdStore,
                                                            cluster_name: str) -> None:
    """The active record only changes under the current term: once the seat
    passes to a new term, the old coordinator's txn is rejected by etcd."""
    keys = Keyspace(cluster_name)
    old_lease = await _lease(store, ttl=5)
    old_term = await campaign(store, keys, "old", old_lease)
    assert old_term is not None
    old = _coordinator(store, keys, "old", old_term, old_lease)
    view = parse_view(keys, await store.snapshot(keys.prefix, ("history/",)))
    await old._commit(_one(SetActive("app", "east", 1, "bootstrap", "test", None)), view)
    rec = parse_view(keys, await store.snapshot(keys.prefix, ("history/",))).active["app"]
    assert (rec.region, rec.epoch, rec.term) == ("east", 1, old_term)

    # The seat changes hands (the old lease is revoked, as on expiry).
    await store.revoke(old_lease.id)
    new_lease = await _lease(store, ttl=5)
    new_term = await campaign(store, keys, "new", new_lease)
    assert new_term is not None and new_term > old_term

    view = parse_view(keys, await store.snapshot(keys.prefix, ("history/",)))
    with pytest.raises(NotCoordinator):
        await old._commit(_one(SetActive("app", "west", 2, "member_loss", "stale", rec)), view)
    after = parse_view(keys, await store.snapshot(keys.prefix, ("history/",))).active["app"]
    assert after == rec  # unchanged
    events = [e for e in await _history(store, keys) if e["kind"] == "write_rejected"]
    assert events and events[0]["term"] == old_term


async def test_safety_rule_1_epoch_only_grows_and_stale_record_is_refused(
        store: EtcdStore, cluster_name: str) -> None:
    """A write based on an out-of-date record (its mod_revision moved) fails
    even under the right term: two writers can never both advance the epoch."""
    keys = Keyspace(cluster_name)
    c, _ = await _seated(store, keys, "c")

    async def view():
        return await _view(store, keys)
    await c._commit(_one(SetActive("app", "east", 1, "bootstrap", "t", None)), await view())
    r1 = (await view()).active["app"]
    await c._commit(_one(SetActive("app", "west", 2, "operator", "t", r1)), await view())
    r2 = (await view()).active["app"]
    assert r2.epoch == 2
    # Replaying the epoch-2 write based on r1 is refused: r1 is stale.
    await c._commit(_one(SetActive("app", "east", 2, "operator", "replay", r1)), await view())
    assert (await view()).active["app"] == r2
    # Bootstrapping again over an existing record is refused too.
    await c._commit(_one(SetActive("app", "east", 1, "bootstrap", "again", None)), await view())
    assert (await view()).active["app"] == r2


async def test_safety_rule_1_deposed_coordinators_evacuation_batch_is_refused_whole(
        store: EtcdStore, cluster_name: str) -> None:
    """200 groups move in one decision: the commit is split into txns within
    etcd's --max-txn-ops (128), each fenced by the term and every record it
    touches.  Once the seat has passed, the old coordinator's evacuation is
    refused as a whole: no record, no evacuation event, no incident."""
    keys = Keyspace(cluster_name)
    old, old_lease = await _seated(store, keys, "old")

    async def view():
        return await _view(store, keys)
    names = [f"g{i:03d}" for i in range(200)]
    boot = tuple(SetActive(g, "east", 1, "bootstrap", "b", None) for g in names)
    await old._commit(Decision(boot, "bootstrap 200"), await view())
    before = (await view()).active
    assert sorted(before) == names  # 200 x 3 puts: several txns, all applied

    await store.revoke(old_lease.id)
    new_lease = await _lease(store, ttl=5)
    assert await campaign(store, keys, "new", new_lease) is not None
    v = await view()
    moves = tuple(SetActive(g, "west", 2, "power", "p", before[g], planned=True,
                            evacuation="east") for g in names)
    evac = Evacuation("east", "power", "east power critical", ("gen:generator_failed",), moves)
    decision = Decision(moves, "evacuate", (evac,),
                        (Incident("evacuation", "east", "power", 1.0, "x", 200),))
    with pytest.raises(NotCoordinator):
        await old._commit(decision, v)
    after = await view()
    assert after.active == before
    assert after.control.incidents == ()
    assert not [e for e in await _history(store, keys) if e["kind"] == "evacuation"]


async def _seated(store: EtcdStore, keys: Keyspace, member: str
                  ) -> tuple[Coordinator, KeptLease]:
    """A coordinator that won the seat, and its lease."""
    lease = await _lease(store, ttl=5)
    term = await campaign(store, keys, member, lease)
    assert term is not None
    return _coordinator(store, keys, member, term, lease), lease


async def _view(store: EtcdStore, keys: Keyspace):
    return parse_view(keys, await store.snapshot(keys.prefix, ("history/",)))


async def _history(store: EtcdStore, keys: Keyspace) -> list[dict]:
    return await read_history(store, keys, 100)


async def test_safety_rule_3_lease_deadline_from_send_time(store: EtcdStore) -> None:
    """The local deadline is the send time of the last successful keep-alive
    plus the TTL minus the margin, so it always falls before etcd's expiry."""
    lease = await _lease(store, ttl=2)
    before = time.monotonic()
    task = asyncio.create_task(lease.run())
    await wait_until(lambda: _renewed(lease), 3, "one renewal")
    # Renewed at some send time >= before: deadline <= now + ttl - margin.
    assert before + 2 - 0.2 <= lease.deadline <= time.monotonic() + 2 - 0.2
    # Without renewals (lease revoked) the keeper raises at once.
    await store.revoke(lease.id)
    with pytest.raises(LeaseLost):
        await asyncio.wait_for(task, 5)


async def _renewed(lease: KeptLease) -> bool:
    return lease.renewals >= 1



async def test_expired_auth_token_is_renewed(tmp_path: Path, cluster_name: str) -> None:
    """With user/password auth, etcd's simple tokens expire (--auth-token-ttl);
    the store logs in again and carries on, and a txn is not lost to it."""
    etcd = EtcdCluster(tmp_path / "auth", size=1, extra_args=["--auth-token-ttl", "2"])
    etcd.start()
    admin = Etcd3Client(etcd.endpoints)
    await admin.connect()
    try:
        await admin.auth.user_add("root", "root-password")
        await admin.auth.user_grant_role("root", "root")
        await admin.auth.auth_enable()
        (tmp_path / "pw").write_text("root-password\n")
        settings = EtcdSettings(endpoints=etcd.endpoints, timeout_s=1.0, username="root",
                                password_file=tmp_path / "pw")
        store = EtcdStore(settings)
        keys = Keyspace(cluster_name)
        await store.put(keys.prefix + "k", "1")  # logs in on first use
        first = store._metadata
        lease, ttl = await store.grant(60)
        assert await store.keepalive(lease) == ttl  # its stream opened under the first token

        async def first_token_refused() -> bool:
            probe = Etcd3Client(etcd.endpoints, token=dict(first)["token"])
            await probe.connect()
            try:
                await probe.kv.get("/x", timeout=1)
                return False
            except EtcdError:
                return True
            finally:
                await probe.close()
        # etcd renews a simple token's TTL on every use, so look less often
        # than the TTL: the token is idle in between and expires.
        await wait_until(first_token_refused, 15, "the first token to expire", interval=3.0)
        result = await store.txn([Compare(keys.prefix + "k", "create", 0)],
                                 [Put(keys.prefix + "t", "x")],
                                 [Put(keys.prefix + "t", "y")])
        assert not result.succeeded and store._metadata != first
        assert (await store.get(keys.prefix + "t")).value == "y"
        # Renewals go on, on a stream under the new token.
        assert await store.keepalive(lease) == ttl
        assert store._keepalive_tokens[lease] == store._metadata
        await store.close()
        (tmp_path / "bad").write_text("wrong\n")
        bad = EtcdStore(settings.model_copy(update={"password_file": tmp_path / "bad"}))
        with pytest.raises(StoreError):
            await bad.get(keys.prefix + "k")
        await bad.close()
    finally:
        await admin.close()
        etcd.stop()


async def test_concurrent_saga_records_share_txns_and_a_stale_one_fails_alone(
        store: EtcdStore, cluster_name: str) -> None:
    """50 sagas recording at once cost a few txns, each record still fenced by
    its own workflow's mod_revision: one stale record is refused, the 49
    others apply."""
    from failoverd.daemon.saga import RecordWriter  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    await _seated(store, keys, "c")
    seat = await store.get(keys.coordinator)
    assert seat is not None
    revs = {}
    for i in range(50):
        revs[i] = await store.put(keys.workflow(f"g{i}"), "v0")
    writer = RecordWriter(store, Compare(keys.coordinator, "create", seat.create_revision),
                          Get(keys.coordinator))

    async def record(i: int, value: str, stale: bool = False):
        mod = revs[i] - 1 if stale else revs[i]
        return await writer.write([Compare(keys.workflow(f"g{i}"), "mod", mod)],
                                  [Put(keys.workflow(f"g{i}"), value)])
    results = await asyncio.gather(*(record(i, "v1") for i in range(50)))
    assert all(r.succeeded for r in results)
    assert len({r.revision for r in results}) <= 3  # shared txns, not 50

    for i in range(50):
        revs[i] = (await store.get(keys.workflow(f"g{i}"))).mod_revision
    results = await asyncio.gather(*(record(i, "v2", stale=i == 7) for i in range(50)))
    assert [i for i, r in enumerate(results) if not r.succeeded] == [7]
    values = {i: (await store.get(keys.workflow(f"g{i}"))).value for i in range(50)}
    assert values.pop(7) == "v1" and set(values.values()) == {"v2"}
    assert (await store.get(keys.workflow("g7"))).mod_revision == revs[7]  # untouched


@pytest.mark.parametrize("text,reason", [
    ("etcd lease grant: UNAVAILABLE (failed to connect to all addresses; Connection refused)",
     "unreachable"),
    ("etcd get: etcdserver: authentication failed, invalid user ID or password",
     "authentication failed"),
    ("etcd get: etcdserver: permission denied", "permission denied"),
    ("etcd get: SSL_ERROR_SSL: error:1000007d:SSL routines:OPENSSL_internal:"
     "CERTIFICATE_VERIFY_FAILED: certificate verify failed", "TLS verify failed"),
    ("etcd get: TimeoutError", "unreachable (timed out)"),
])
def test_etcd_errors_are_named_for_the_operator(text: str, reason: str) -> None:
    from failoverd.etcd.client import etcd_failure  # noqa: PLC0415
    assert etcd_failure(text).startswith(reason)


async def test_a_lagging_view_never_restarts_a_saga_that_ended(
        store: EtcdStore, cluster_name: str, tmp_path: Path) -> None:
    """The coordinator's mirror can lag its own writes: a view that still
    shows an ended saga as running must not start it again (it would run the
    routes a second time and then fail on the fence)."""
    from failoverd.core.model import ActiveRecord, MemberRecord  # noqa: PLC0415
    from failoverd.core.workflow import Workflow  # noqa: PLC0415
    from failoverd.daemon.saga import Saga, SagaRunner  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    coord, lease = await _seated(store, keys, "c")
    runs = tmp_path / "route-runs"
    route = tmp_path / "route.sh"
    route.write_text(f"#!/bin/sh\necho $FAILOVERD_EPOCH >> {runs}\n")
    route.chmod(0o755)
    settings = Settings.model_validate({
        "cluster": keys.cluster, "member": "c", "region": "east",
        "regions": [{"name": "east"}, {"name": "west"}],
        "groups": [{"name": "app", "regions": ["east", "west"],
                    "routes": [{"kind": "exec", "command": [str(route)]}]}]})
    now = time.time()
    await store.put(keys.member("east-1"), MemberRecord("east-1", "east", "0", "", now).to_value(),
                    lease=lease.id)
    await store.put(keys.active("app"),
                    ActiveRecord("east", 1, now, "bootstrap", coord.term, "bootstrap").to_value())
    await store.put(keys.workflow("app"),
                    Workflow.new("app", 1, None, "east", "bootstrap", now).to_value())
    await store.put(keys.ack("app", "east-1"), '{"epoch": 1, "role": "active"}')
    stale = await _view(store, keys)
    assert stale.workflows["app"].state == "running"

    saga = Saga(store, keys, coord.term, History(store, keys, "c", "x"), lambda: settings)
    runner = SagaRunner(saga, lambda: settings)
    async with asyncio.TaskGroup() as tg:
        runner.update(stale, tg)
        first = runner._tasks["app"]

        async def ended() -> bool:
            kv = await store.get(keys.workflow("app"))
            return kv is not None and '"state":"done"' in kv.value and first.done()
        await wait_until(ended, 20, "the saga done")
        runner.update(stale, tg)  # the watch has not caught up yet
        assert runner._tasks["app"] is first, "an ended saga was started again"
        runner.update(await _view(store, keys), tg)  # caught up: ended, nothing to run
        assert runner._tasks["app"] is first
    assert runs.read_text().split() == ["1"]
    await store.revoke(lease.id)


async def test_leased_publisher_writes_changes_refreshes_and_follows_a_new_lease(
        store: EtcdStore, cluster_name: str) -> None:
    """One rule for every fact a member publishes under its lease (probe
    observations, power relays): write on change, rewrite when older than
    the refresh period, write everything again under a new lease."""
    from failoverd.publishing import LeasedPublisher  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    now = [1000.0]
    lease = [(await store.grant(5))[0]]
    held: list[float] = []
    pub = LeasedPublisher(store, lambda: lease[0], lambda: now[0],
                          on_pending=held.append)
    a, b = keys.observation("m1", "east"), keys.observation("m1", "west")
    assert await pub.publish(a, "up-1", "up", refresh_s=10)
    assert await pub.publish(b, "down-1", "down", refresh_s=10)
    first = (await store.get(a)).mod_revision
    assert not await pub.publish(a, "up-2", "up", refresh_s=10)  # same fact, fresh
    assert (await store.get(a)).mod_revision == first
    assert await pub.publish(a, "down-2", "down", refresh_s=10)  # changed
    now[0] += 11
    assert await pub.publish(a, "down-3", "down", refresh_s=10)  # stale: refreshed
    assert pub.identity(a) == "down"

    # A minor change within its interval is held, and its owner told when
    # it is due (the relay task sleeps until then, not on a timer).
    assert pub.next_due() is None and not held
    assert not await pub.publish(a, "down-4", "down", refresh_s=10, minor=7,
                                 min_interval_s=2)
    assert held and pub.next_due() == now[0] + 2
    now[0] += 2
    assert await pub.flush() == 1 and pub.next_due() is None

    assert not pub.behind_lease()
    lease[0] = (await store.grant(5))[0]  # a new session
    assert pub.behind_lease()
    assert await pub.resync() == 2
    assert not pub.behind_lease()
    assert {(await store.get(k)).lease for k in (a, b)} == {lease[0]}
    assert (await store.get(b)).value == "down-1"
    assert await pub.resync() == 0
    lease[0] = None
    assert not await pub.publish(a, "x", "gone", refresh_s=10)  # no lease: nothing


async def test_a_flush_in_flight_never_lands_after_a_newer_direct_write(
        store: EtcdStore, cluster_name: str) -> None:
    """A sensor's first "all is well" is held for the next flush; its "on
    battery" a moment later is written at once.  When the flush is already
    on its way, the newer word must still be what etcd ends with (without
    the lock, etcd and the publisher both ended with "all is well")."""
    from failoverd.publishing import LeasedPublisher  # noqa: PLC0415

    key = Keyspace(cluster_name).power("east", "ups1", "m1")
    lease = (await store.grant(5))[0]
    pub = LeasedPublisher(store, lambda: lease)
    assert not await pub.publish(key, "utility_ok", "ok", refresh_s=10, batch=True)
    # Either order: the direct write on its way when the flush starts (the
    # flush must not send the older word after it), and the reverse.
    writing = asyncio.ensure_future(pub.publish(key, "on_battery", "battery", refresh_s=10))
    await asyncio.sleep(0)  # the put is on its way
    assert await pub.flush() == 0
    assert await writing
    assert (await store.get(key)).value == "on_battery"
    assert pub.identity(key) == "battery" and pub.next_due() is None

    assert not await pub.publish(key, "utility_ok", "ok", refresh_s=10, batch=True)
    flushing = asyncio.ensure_future(pub.flush())
    await asyncio.sleep(0)  # the flush's txn is on its way
    assert await pub.publish(key, "on_battery", "battery2", refresh_s=10)
    await flushing
    assert (await store.get(key)).value == "on_battery"
    assert pub.identity(key) == "battery2" and pub.next_due() is None


async def test_refreshes_of_keys_written_together_spread_out(
        store: EtcdStore, cluster_name: str) -> None:
    """Sixty keys written in the same instant (a bridge coming up) are not
    all rewritten in the same instant a refresh period later: each write
    refreshes somewhere in the last quarter of its period, so the burst
    that would queue in etcd in front of a power event is spread."""
    import random  # noqa: PLC0415

    from failoverd.publishing import REFRESH_SPREAD, LeasedPublisher  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    now = [1000.0]
    lease = (await store.grant(5))[0]
    pub = LeasedPublisher(store, lambda: lease, lambda: now[0], random.Random(7))
    names = [keys.power("east", f"s{i}", "m1") for i in range(60)]
    for k in names:
        assert await pub.publish(k, "ok", "ok", refresh_s=10)
    now[0] += 10 * REFRESH_SPREAD - 0.01  # before any may refresh
    assert not any([await pub.publish(k, "ok", "ok", refresh_s=10) for k in names])
    now[0] += 1.25  # three quarters of the way through the spread window
    refreshed = [await pub.publish(k, "ok", "ok", refresh_s=10) for k in names]
    assert 20 < sum(refreshed) < 60, sum(refreshed)
    now[0] += 1.5  # past the whole period: every key is refreshed
    assert all([await pub.publish(k, "ok", "ok", refresh_s=10)
                for k, done in zip(names, refreshed, strict=True) if not done])


async def test_minor_changes_are_coalesced_to_one_write_per_interval(
        store: EtcdStore, cluster_name: str) -> None:
    """A battery runtime changing on every message costs one etcd write per
    min_interval_s, and the newest value is written when due even if no
    further message comes; a change of state is written at once."""
    from failoverd.publishing import LeasedPublisher  # noqa: PLC0415

    key = Keyspace(cluster_name).power("east", "ups1", "m1")
    now = [1000.0]
    lease = (await store.grant(5))[0]
    pub = LeasedPublisher(store, lambda: lease, lambda: now[0])
    assert await pub.publish(key, "ob-600", "on_battery", 10, minor=600, min_interval_s=1)
    written = (await store.get(key)).mod_revision
    for runtime in range(599, 500, -1):  # 99 messages within 0.99 s
        now[0] += 0.01
        assert not await pub.publish(key, f"ob-{runtime}", "on_battery", 10, minor=runtime,
                                     min_interval_s=1)
    assert (await store.get(key)).mod_revision == written  # nothing written yet
    assert await pub.flush() == 0  # not due: 0.99 s since the write
    now[0] += 0.02
    assert await pub.flush() == 1
    assert (await store.get(key)).value == "ob-501"  # the newest, once
    assert await pub.flush() == 0
    # A state change is news: written at once, inside the interval.
    now[0] += 0.1
    assert await pub.publish(key, "lb-500", "low_battery", 10, minor=500, min_interval_s=1)
    assert (await store.get(key)).value == "lb-500"


async def test_minor_changes_of_many_sensors_are_flushed_in_one_transaction(
        store: EtcdStore, cluster_name: str) -> None:
    """Sixty sensors whose runtimes all change: once due, they are written
    by one flush in one transaction (one etcd entry, one revision), not
    sixty puts queueing in etcd in front of a power event."""
    from failoverd.publishing import LeasedPublisher  # noqa: PLC0415

    keys = [Keyspace(cluster_name).power("east", f"ups{i}", "m1") for i in range(60)]
    now = [1000.0]
    lease = (await store.grant(5))[0]
    pub = LeasedPublisher(store, lambda: lease, lambda: now[0])
    for k in keys:
        assert await pub.publish(k, "ol-900", "utility_ok", 10, minor=900, min_interval_s=1)
    now[0] += 2.0  # past the interval: still held for the flush
    for k in keys:
        assert not await pub.publish(k, "ol-890", "utility_ok", 10, minor=890,
                                     min_interval_s=1)
    assert await pub.flush() == 60
    written = [await store.get(k) for k in keys]
    assert {kv.value for kv in written} == {"ol-890"}
    assert len({kv.mod_revision for kv in written}) == 1
    assert {kv.lease for kv in written} == {lease}
    assert await pub.flush() == 0


async def test_quiet_news_waits_for_the_batch_and_urgent_news_overtakes_it(
        store: EtcdStore, cluster_name: str) -> None:
    """A new sensor saying all is well is written with the next flush (one
    txn for a bridge's worth of sensors); if it turns critical before that,
    the critical reading is written at once and the held one never is."""
    from failoverd.publishing import LeasedPublisher  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    ok, bad = keys.power("east", "ups1", "m1"), keys.power("east", "ups2", "m1")
    lease = (await store.grant(5))[0]
    pub = LeasedPublisher(store, lambda: lease)
    assert not await pub.publish(ok, "ol", "utility_ok", 10, batch=True)
    assert not await pub.publish(bad, "ol", "utility_ok", 10, batch=True)
    assert await store.get(ok) is None
    assert await pub.publish(bad, "gen-failed", "generator_failed", 10)
    assert (await store.get(bad)).value == "gen-failed"
    assert await pub.flush() == 1
    assert (await store.get(ok)).value == "ol"
    assert (await store.get(bad)).value == "gen-failed"  # not overwritten by the held one


def _one_member_settings(keys: Keyspace, tmp_path: Path, hook: Path) -> Settings:
    """e1 in east, group app in east and west, ``hook`` as promote and demote."""
    return Settings.model_validate({
        "cluster": keys.cluster, "member": "e1", "region": "east", "state_dir": str(tmp_path),
        "regions": [{"name": "east"}, {"name": "west"}],
        "groups": [{"name": "app", "regions": ["east", "west"], "promote": [str(hook)],
                    "demote": [str(hook)]}],
        "policy": {"tick_s": 0.2}})


async def test_an_ack_lost_to_an_etcd_error_is_sent_again(
        store: EtcdStore, cluster_name: str, tmp_path: Path) -> None:
    """A member's ack that etcd refuses (a timeout while the etcd leader
    changes) is sent again on the next tick: nothing else would resend it,
    and the saga waits for it (chaos seed 2010 waited 15 s, with HAProxy
    serving no region meanwhile).  Here: a new session re-acks every group
    under the new lease, and that txn times out."""
    from failoverd.core.model import ActiveRecord  # noqa: PLC0415
    from failoverd.core.store import StoreError  # noqa: PLC0415
    from failoverd.daemon.roles import RoleReconciler  # noqa: PLC0415

    class FlakyTxn:
        """The real store, whose next txn fails as a timeout would when asked."""

        def __init__(self) -> None:
            self.fail_next = False
            self.failed = 0

        def __getattr__(self, name: str):
            return getattr(store, name)

        async def txn(self, *args, **kwargs):
            if self.fail_next:
                self.fail_next = False
                self.failed += 1
                raise StoreError("etcd txn: TimeoutError")
            return await store.txn(*args, **kwargs)

    keys = Keyspace(cluster_name)
    hook = tmp_path / "hook.sh"
    hook.write_text("#!/bin/sh\nexit 0\n")
    hook.chmod(0o755)
    settings = _one_member_settings(keys, tmp_path, hook)
    await store.put(keys.active("app"),
                    ActiveRecord("east", 1, time.time(), "test", 1, "bootstrap").to_value())
    lease = [(await store.grant(10))[0]]
    flaky = FlakyTxn()
    wake = asyncio.Event()
    roles = RoleReconciler(flaky, keys, lambda: settings,  # type: ignore[arg-type]
                           History(store, keys, "e1", "east"), wake, lease_id=lambda: lease[0])
    task = asyncio.create_task(roles.run())
    try:
        async def acked_under(wanted: int) -> bool:
            kv = await store.get(keys.ack("app", "e1"))
            return kv is not None and kv.lease == wanted
        await wait_until(lambda: acked_under(lease[0]), 10, "the first ack")
        # A new session: the old lease (and the ack under it) is gone, and
        # the first txn that would publish the ack again times out.
        flaky.fail_next = True
        old, lease[0] = lease[0], (await store.grant(10))[0]
        await store.revoke(old)
        wake.set()
        await wait_until(lambda: acked_under(lease[0]), 10,
                         "the ack under the new lease, sent again after the refused txn")
        assert flaky.failed == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_a_self_fence_never_applies_an_older_epoch_than_a_running_demote(
        store: EtcdStore, cluster_name: str, tmp_path: Path) -> None:
    """Rule 11 on one member: a self-fence decided while the demote of a
    newer epoch is under way waits for it, then finds nothing to do.  Chaos
    seed 12 (CI): the fence's epoch-1 demote finished after the epoch-2
    demote, and the state file went back to epoch 1."""
    from failoverd.core.model import ActiveRecord  # noqa: PLC0415
    from failoverd.daemon.roles import Applied, RoleReconciler  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    runs = tmp_path / "runs.log"
    hook = tmp_path / "hook.sh"
    # A slow hook that says when it starts and when it ends.
    hook.write_text(f'#!/bin/sh\necho "start $FAILOVERD_ROLE $FAILOVERD_EPOCH" >> {runs}\n'
                    f'[ "$FAILOVERD_ROLE" = active ] || sleep 1\n'
                    f'echo "end $FAILOVERD_ROLE $FAILOVERD_EPOCH" >> {runs}\n')
    hook.chmod(0o755)
    settings = _one_member_settings(keys, tmp_path, hook)
    group = settings.groups[0]
    await store.put(keys.active("app"),
                    ActiveRecord("east", 1, time.time(), "test", 1, "bootstrap").to_value())
    wake = asyncio.Event()
    roles = RoleReconciler(store, keys, lambda: settings, History(store, keys, "e1", "east"),
                           wake)
    task = asyncio.create_task(roles.run())

    def lines() -> list[str]:
        return runs.read_text().splitlines() if runs.exists() else []
    try:
        await wait_until(lambda: roles.state.groups.get("app") == Applied(1, "active"), 10,
                         "promoted at epoch 1")
        await store.put(keys.active("app"),
                        ActiveRecord("west", 2, time.time(), "test", 1, "forced").to_value())
        wake.set()
        await wait_until(lambda: "start standby 2" in lines(), 10, "the epoch-2 demote started")
        # The lease is gone and a peer names a newer epoch: fence now.
        await roles.fence(group, "a peer reports a newer epoch")
        assert roles.state.groups["app"] == Applied(2, "standby")
        assert lines() == ["start active 1", "end active 1",
                           "start standby 2", "end standby 2"]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_batch_hooks_apply_hundreds_of_groups_in_a_few_runs(
        store: EtcdStore, cluster_name: str, tmp_path: Path) -> None:
    """``hook_batch``: 300 groups active in our region are promoted by
    ceil(300 / max_hook_batch) runs of the hook, each group acked; a group
    the batch says it failed is retried alone, and the others not again."""
    from failoverd.core.model import ActiveRecord  # noqa: PLC0415
    from failoverd.daemon.roles import Applied, RoleReconciler  # noqa: PLC0415

    keys = Keyspace(cluster_name)
    hook = tmp_path / "hook.sh"
    hook.write_text(f'''#!/bin/sh
n=0
while read -r g e; do
  n=$((n + 1))
  if [ -f "{tmp_path}/fail-$g" ]; then rm "{tmp_path}/fail-$g"; echo "failed $g busy"
  else echo "$FAILOVERD_ROLE $g $e" >> {tmp_path}/applied; fi
done
echo "$n" >> {tmp_path}/runs
''')
    hook.chmod(0o755)
    names = [f"g{i:03d}" for i in range(300)]
    settings = Settings.model_validate({
        "cluster": keys.cluster, "member": "e1", "region": "east", "state_dir": str(tmp_path),
        "regions": [{"name": "east"}, {"name": "west"}],
        "groups": [{"name": g, "regions": ["east", "west"], "promote": [str(hook)],
                    "demote": [str(hook)], "hook_batch": True, "hook_attempts": 1}
                   for g in names],
        "policy": {"tick_s": 0.2, "max_hook_batch": 128}})
    (tmp_path / "fail-g007").touch()
    for g in names:
        await store.put(keys.active(g),
                        ActiveRecord("east", 1, time.time(), "test", 1, "bootstrap").to_value())
    lease = (await store.grant(30))[0]
    wake = asyncio.Event()
    roles = RoleReconciler(store, keys, lambda: settings, History(store, keys, "e1", "east"),
                           wake, lease_id=lambda: lease)
    task = asyncio.create_task(roles.run())

    def runs() -> list[int]:
        path = tmp_path / "runs"
        return [int(n) for n in path.read_text().split()] if path.exists() else []
    try:
        await wait_until(lambda: all(roles.state.groups.get(g) == Applied(1, "active")
                                     for g in names), 20, "every group promoted")
        # 128 + 128 + 44 at once, then g007 alone after its backoff.
        assert sorted(runs()[:3]) == [44, 128, 128] and runs()[3:] == [1]
        applied = (tmp_path / "applied").read_text().splitlines()
        assert sorted(applied) == sorted(f"active {g} 1" for g in names)

        async def all_acked() -> bool:
            acked = {kv.key for kv in (await store.get_prefix(keys.groups)).kvs}
            return all(keys.ack(g, "e1") in acked for g in names)
        await wait_until(all_acked, 10, "an ack for every group")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_renewals_share_one_keepalive_stream_until_it_fails(store: EtcdStore) -> None:
    """A resting daemon renews on one open stream (a new gRPC stream per
    renewal was most of its etcd CPU); a renewal sent while another waits
    goes alone; a revoked lease ends the stream and is reported lost."""
    lease, ttl = await store.grant(10)
    assert [await store.keepalive(lease) for _ in range(5)] == [ttl] * 5
    streams = store._keepalive_streams  # white box: the point of the test
    first = streams[lease]
    assert await store.keepalive(lease) == ttl and streams[lease] is first
    # Two at once: the second does not wait behind the first.
    assert await asyncio.gather(store.keepalive(lease), store.keepalive(lease)) == [ttl, ttl]
    assert streams[lease] is first
    await store.revoke(lease)
    assert lease not in streams
    with pytest.raises(LeaseNotFound):
        await store.keepalive(lease)
    assert lease not in streams
