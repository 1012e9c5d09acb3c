"""This member's look at its own region's database, for each group that has
one (``[groups.database]``): role, WAL positions and lag, published under
the member's lease at ``groups/<group>/data/<member>``.

Each region's member checks only its own region's server: the data's
currency is judged where the data is, and the coordinator (which may sit in
a third region without database credentials) only reads the reports.  The
judging is pure (:mod:`failoverd.core.data`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import asyncpg
import structlog

from failoverd import metrics
from failoverd.config import GroupSettings, PostgresDatabase, Settings
from failoverd.core.data import DataReport
from failoverd.core.model import Keyspace
from failoverd.core.store import Store, StoreError
from failoverd.publishing import LeasedPublisher

log = structlog.get_logger("failoverd.sensing.database")

# One round trip.  LSNs as byte positions (bigint), so JSON carries them as
# numbers; pg_stat_wal_receiver's columns need pg_monitor (or superuser).
QUERY = """
SELECT pg_is_in_recovery() AS standby,
       CASE WHEN NOT pg_is_in_recovery()
            THEN (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint END AS current_lsn,
       (pg_last_wal_receive_lsn() - '0/0'::pg_lsn)::bigint AS receive_lsn,
       (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint AS replay_lsn,
       CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() END AS paused,
       EXTRACT(epoch FROM now() - pg_last_xact_replay_timestamp())::float8 AS replay_age_s,
       (SELECT status = 'streaming' FROM pg_stat_wal_receiver) AS streaming,
       (SELECT (latest_end_lsn - '0/0'::pg_lsn)::bigint FROM pg_stat_wal_receiver)
           AS primary_lsn
"""
# A report whose news is unchanged is re-written this often (readers judge
# freshness by its time); LSNs moving alone are written once per interval.
REFRESH_S = 30.0
# While a switchover waits for this region to catch up, its server is
# looked at this often (the wait is the write outage).
CATCHUP_CHECK_S = 0.02


def report_from_row(group: str, member: str, region: str, row: Any, now: float
                    ) -> DataReport:
    """One query's row as a report (pure)."""
    if not row["standby"]:
        return DataReport(group, member, region, "primary", now, lsn=row["current_lsn"])
    replay = row["replay_lsn"]
    ahead = max(row["receive_lsn"] or 0, row["primary_lsn"] or 0)
    caught_up = replay is not None and replay >= ahead
    age = row["replay_age_s"]
    return DataReport(group, member, region, "standby", now, lsn=replay,
                      receive_lsn=row["receive_lsn"], primary_lsn=row["primary_lsn"],
                      streaming=bool(row["streaming"]), paused=bool(row["paused"]),
                      lag_s=0.0 if caught_up else (round(age, 3) if age is not None else None))


def _read_secret(path: Path) -> str:
    return path.read_text().strip()


class DatabaseChecker:
    """Checks this member's region's database of every group that has one
    (the ``databases`` task) and publishes what it saw.

    Keeps one connection per server (reopened after any error).  Errors: a
    server that refuses, times out or answers garbage is reported as
    ``down`` with the error (and counted), never raised; without a lease or
    with etcd out of reach nothing is published (the report expires with
    the lease: this member's view is unknown).
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 lease_id: Callable[[], int | None],
                 clock: Callable[[], float] = time.time,
                 catchup_targets: Callable[[], Mapping[str, int]] = dict) -> None:
        self._keys = keys
        # group -> WAL position a switchover waits for this region to replay.
        self._catchup_targets = catchup_targets
        self._wake = asyncio.Event()
        self._settings = settings
        self._clock = clock
        self._published = LeasedPublisher(store, lease_id, clock)
        self._connections: dict[str, Any] = {}
        self.reports: dict[str, DataReport] = {}  # by group: the last look

    def _mine(self) -> list[tuple[GroupSettings, PostgresDatabase, str]]:
        s = self._settings()
        return [(g, g.database, g.database.dsn[s.region]) for g in s.groups
                if g.database is not None and s.region in g.database.dsn]

    def keys_changed(self, keys: list[str] | None) -> None:
        """From the watch (``groups/``): a change of one of our database
        groups may start a catch-up — look now.  Other groups' changes (an
        evacuation of 1,000 of them) do not wake us."""
        names = {g.name for g, _, _ in self._mine()}
        if not names:
            return
        cut = len(self._keys.groups)
        if keys is None or any(k[cut:].split("/", 1)[0] in names for k in keys):
            self._wake.set()

    def reload(self) -> None:
        """The settings changed: our database groups may have (a member
        with none sleeps until this)."""
        self._wake.set()

    async def _until(self, due: float, names: set[str]) -> None:
        """Sleep until ``due``, or until a wake finds a catch-up waiting on
        one of ``names`` or a reload changed them (other wakes — every group
        change — sleep on)."""
        while (left := due - time.monotonic()) > 0:
            self._wake.clear()
            try:
                async with asyncio.timeout(left if math.isfinite(left) else None):
                    await self._wake.wait()
            except TimeoutError:
                return
            if names and names & self._catchup_targets().keys():
                return
            if {g.name for g, _, _ in self._mine()} != names:
                return

    async def run(self) -> None:
        try:
            while True:
                mine = self._mine()
                started = time.monotonic()
                targets = self._catchup_targets()
                if mine:
                    await self.check_all(mine, targets)
                # No database group here: nothing to do until a reload.
                interval = min((db.check_interval_s for _, db, _ in mine), default=math.inf)
                names = {g.name for g, _, _ in mine}
                if names & targets.keys():
                    interval = CATCHUP_CHECK_S
                await self._until(started + interval, names)
        finally:
            for conn in self._connections.values():
                with contextlib.suppress(Exception):
                    await conn.close(timeout=1)

    async def check_all(self, mine: list[tuple[GroupSettings, PostgresDatabase, str]],
                        targets: Mapping[str, int] | None = None) -> None:
        """Check every group's server at once, then publish what changed."""
        s = self._settings()
        reports = await asyncio.gather(*(self._check(g.name, db, dsn, s.member, s.region)
                                         for g, db, dsn in mine))
        for (_, db, _), report in zip(mine, reports, strict=True):
            await self._publish(report, db, (targets or {}).get(report.group))
        try:
            await self._published.flush()
        except StoreError as exc:
            log.warning("cannot publish database reports", error=str(exc))

    async def _check(self, group: str, db: PostgresDatabase, dsn: str, member: str,
                     region: str) -> DataReport:
        try:
            async with asyncio.timeout(db.timeout_s):
                conn = await self._connection(dsn, db)
                row = await conn.fetchrow(QUERY)
            report = report_from_row(group, member, region, row, self._clock())
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                asyncpg.InternalClientError) as exc:
            await self._drop(dsn)
            error = f"{type(exc).__name__}: {exc}"[:200] if str(exc) else type(exc).__name__
            metrics.DATABASE_CHECK_FAILURES.labels(group).inc()
            report = DataReport(group, member, region, "down", self._clock(), error=error)
        before = self.reports.get(group)
        if before is None or (before.role, before.error == "") != (report.role,
                                                                   report.error == ""):
            log.info("database state", group=group, role=report.role, error=report.error,
                     lsn=report.lsn, lag_bytes=report.own_lag_bytes)
        self.reports[group] = report
        if report.own_lag_bytes is not None:
            metrics.set_labelled(metrics.DATABASE_LAG_BYTES, report.own_lag_bytes, group)
        return report

    async def _connection(self, dsn: str, db: PostgresDatabase) -> Any:
        conn = self._connections.get(dsn)
        if conn is None or conn.is_closed():
            password = (await asyncio.to_thread(_read_secret, db.password_file)
                        if db.password_file is not None else None)
            conn = await asyncpg.connect(dsn, password=password, timeout=db.timeout_s,
                                         statement_cache_size=0)
            self._connections[dsn] = conn
        return conn

    async def _drop(self, dsn: str) -> None:
        conn = self._connections.pop(dsn, None)
        if conn is not None:
            conn.terminate()

    async def _publish(self, report: DataReport, db: PostgresDatabase,
                       target: int | None = None) -> None:
        lag = report.own_lag_bytes
        # Reaching a switchover's catch-up target is news: written at once.
        caught_up = target is not None and (report.lsn or 0) >= target
        news = (report.role, report.streaming, report.paused,
                lag is not None and lag > db.max_lag_bytes, report.error, caught_up)
        minor = (report.lsn, report.receive_lsn, report.primary_lsn, report.lag_s)
        try:
            await self._published.publish(
                self._keys.data(report.group, report.member), report.to_value, news,
                REFRESH_S, minor=minor, min_interval_s=db.check_interval_s)
        except StoreError as exc:
            log.warning("cannot publish database report", group=report.group, error=str(exc))
