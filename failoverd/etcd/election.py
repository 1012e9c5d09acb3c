"""Coordinator election: one key, created under a lease by a txn.

The algorithm of etcd's ``concurrency.Election`` reduced to one seat: put the
``coordinator`` key iff its ``create_revision == 0``.  The winner's term is
that key's ``create_revision``; every coordinator write is guarded by it, so
a deposed coordinator's write fails in etcd whatever its own clock believes.
"""

from __future__ import annotations

import structlog

from failoverd.core.model import Keyspace, to_json
from failoverd.core.store import Compare, Delete, Get, Put, Store
from failoverd.etcd.lease import KeptLease

log = structlog.get_logger("failoverd.etcd.election")


async def campaign(store: Store, keys: Keyspace, member: str, lease: KeptLease) -> int | None:
    """Try once to take the seat; the term if won, else None.

    Raises StoreError when etcd cannot be asked.  A win is only returned after
    re-reading our own key and checking the lease is still within its local
    deadline — a campaign that completes after the lease expired must not
    produce a phantom leader (etcd issue #19597).
    """
    if not lease.valid():
        return None
    result = await store.txn(
        [Compare(keys.coordinator, "create", 0)],
        [Put(keys.coordinator, to_json({"member": member}), lease=lease.id)],
        [Get(keys.coordinator)],
    )
    if not result.succeeded:
        seat = result.gets[0] if result.gets else None
        if seat is not None and seat.lease == lease.id and lease.valid():
            # Still ours from a term we stepped down from (a stale read):
            # take it up again under the same term rather than sit it out
            # until the lease expires.
            return seat.create_revision
        return None
    term = result.revision  # the put's revision is the key's create_revision
    mine = await store.get(keys.coordinator)
    if (mine is None or mine.create_revision != term or mine.lease != lease.id
            or not lease.valid()):
        log.warning("campaign won but seat not held; not leading", term=term)
        return None
    return term


async def resign(store: Store, keys: Keyspace, term: int, *extra: Put) -> bool:
    """Give up the seat if it is still ours (guarded by the term)."""
    result = await store.txn(
        [Compare(keys.coordinator, "create", term)],
        [Delete(keys.coordinator), *extra],
    )
    return result.succeeded
