"""The store contract: what failoverd needs from etcd, and nothing more.

The election, the fenced writes and the snapshot reads are written against
this ``Protocol``; :mod:`failoverd.etcd.client` implements it on etcd3aio.  Keys and
values are ``str`` (values are JSON text).
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

# etcd's --max-txn-ops default: the most compares, and the most operations in
# one branch, of one txn.  Every batching writer stays within it.
MAX_TXN_OPS = 128


class StoreError(Exception):
    """The store could not be reached or answered with an error.

    Raised by every :class:`Store` call on timeout, connection loss or a
    server-side error; the caller keeps its last good state and tries later.
    """


class LeaseNotFound(StoreError):
    """The lease expired or was revoked; keys attached to it are gone."""


@dataclass(frozen=True, slots=True)
class KeyValue:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int


@dataclass(frozen=True, slots=True)
class Compare:
    """``target(key) == value``; a key that does not exist has create/mod 0."""

    key: str
    target: Literal["create", "mod"]
    value: int


@dataclass(frozen=True, slots=True)
class Put:
    key: str
    value: str
    lease: int = 0


@dataclass(frozen=True, slots=True)
class Delete:
    key: str
    prefix: bool = False
    # Delete the range [key, end) instead (one op, however many keys).
    end: str | None = None


@dataclass(frozen=True, slots=True)
class Get:
    key: str


Op = Put | Delete | Get


@dataclass(frozen=True, slots=True)
class TxnResult:
    succeeded: bool
    revision: int
    # For each ``Get`` in the branch that ran, the key's value (or None).
    gets: tuple[KeyValue | None, ...]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every key under a prefix as of one store revision."""

    revision: int
    kvs: tuple[KeyValue, ...]


@dataclass(frozen=True, slots=True)
class WatchEvent:
    key: str
    value: str
    mod_revision: int
    deleted: bool
    create_revision: int = 0
    lease: int = 0


class Store(Protocol):
    """The etcd operations failoverd uses.

    Every call has a deadline and raises :class:`StoreError` when it cannot
    complete.  Reads and idempotent writes (put of a fixed value, delete,
    revoke) may be retried inside the call; :meth:`txn` and :meth:`grant` are
    sent at most once, because a retry after an ambiguous failure could apply
    them twice.
    """

    async def grant(self, ttl: int) -> tuple[int, int]:
        """A new lease: ``(lease id, granted ttl)``.  Not retried."""
        ...

    async def keepalive(self, lease: int) -> int:
        """Refresh ``lease`` once and return its new TTL.

        Raises :class:`LeaseNotFound` if the lease is gone.  The caller
        measures its deadline from the moment it *called* this method.
        """
        ...

    async def revoke(self, lease: int) -> None:
        """Revoke ``lease``, deleting its keys; a missing lease is not an error."""
        ...

    async def get(self, key: str) -> KeyValue | None: ...

    async def get_prefix(self, prefix: str, limit: int = 0, newest_first: bool = False,
                         keys_only: bool = False) -> Snapshot:
        """Every key under ``prefix`` at one revision, in key order (reversed
        with ``newest_first``), at most ``limit`` of them (0: all); values
        empty with ``keys_only``."""
        ...

    async def count(self, prefix: str) -> int:
        """How many keys are under ``prefix``."""
        ...

    async def snapshot(self, prefix: str, exclude: Sequence[str] = ()) -> Snapshot:
        """Every key under ``prefix`` except the sub-prefixes in ``exclude``,
        all read at one revision (one request)."""
        ...

    async def put(self, key: str, value: str, lease: int = 0) -> int:
        """Write ``key`` and return the revision.  Retried: idempotent."""
        ...

    async def delete(self, key: str, prefix: bool = False) -> int:
        """Delete ``key`` (or every key under it) and return how many went."""
        ...

    async def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Atomically: if every compare holds run ``success``, else ``failure``.

        Sent once, never retried; an ambiguous failure raises
        :class:`StoreError` and the caller must re-read before deciding again.
        """
        ...

    def watch(self, prefix: str, start_revision: int
              ) -> AsyncGenerator[list[WatchEvent], None]:
        """Batches of changes under ``prefix`` from ``start_revision`` on.

        Survives reconnects: resumes after the last revision it delivered.
        If that revision was compacted away it yields an empty batch, telling
        the caller to re-read state, and carries on from the compaction point.
        """
        ...

    async def close(self) -> None: ...
