"""Whose copy of a group's data is current enough to take over (pure).

A group with a database (``[groups.database]``) is promoted only into a
region whose copy of the data is within ``max_lag_bytes`` of the primary's:
an asynchronous standby that is far behind loses acknowledged writes when
it is promoted (Patroni's ``maximum_lag_on_failover``).  The member of each
region checks its own region's database and publishes a :class:`DataReport`
(``groups/<group>/data/<member>``, under its lease); this module judges
those reports.  No I/O, no clock: the caller passes everything in.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass

ROLES = ("primary", "standby", "down")


@dataclass(frozen=True)
class DataReport:
    """One member's look at its own region's database for one group.

    LSNs are byte positions in the WAL (``pg_lsn - '0/0'``).  A primary
    reports ``lsn`` = its current WAL position; a standby reports ``lsn`` =
    what it has replayed, ``receive_lsn`` = what it has received, and
    ``primary_lsn`` = the primary's WAL end as the primary last told it (the
    WAL receiver's ``latest_end_lsn``): a consistent pair from one query, so
    the standby's own lag estimate needs no clock shared with the primary.
    """

    group: str
    member: str
    region: str
    role: str  # primary | standby | down
    at: float
    lsn: int | None = None
    receive_lsn: int | None = None
    primary_lsn: int | None = None
    streaming: bool = False
    paused: bool = False  # standby replay paused (pg_wal_replay_pause)
    lag_s: float | None = None  # seconds since the last replayed commit, 0 when caught up
    error: str = ""

    @property
    def own_lag_bytes(self) -> int | None:
        """A standby's lag by its own numbers (None: not a standby, or unknown)."""
        if self.role != "standby" or self.lsn is None:
            return None
        ahead = max(self.primary_lsn or 0, self.receive_lsn or 0)
        return max(ahead - self.lsn, 0)

    def to_value(self) -> str:
        # Empty fields left out; 0 and 0.0 kept (a caught-up standby's
        # lag_s is 0, not unknown — `0 in (False,)` is true in Python).
        d = asdict(self)
        return json.dumps({k: v for k, v in d.items()
                           if not (v is None or v is False or v == "")
                           or k in {"group", "member", "region", "role", "at"}},
                          separators=(",", ":"), sort_keys=True)


def parse_data_report(value: str) -> DataReport:
    d = json.loads(value)
    if not isinstance(d, dict):
        raise ValueError("data report is not a JSON object")
    report = DataReport(**d)
    if report.role not in ROLES:
        raise ValueError(f"unknown database role {report.role!r}")
    for lsn in (report.lsn, report.receive_lsn, report.primary_lsn):
        if lsn is not None and (not isinstance(lsn, int) or lsn < 0):
            raise ValueError(f"bad LSN {lsn!r}")
    return report


@dataclass(frozen=True)
class DataState:
    """A region's copy of one group's data, as judged for candidacy."""

    region: str
    ok: bool
    # Why it may not take over ("" when ok), for status, drills and history.
    why: str
    lag_bytes: int | None = None
    role: str = ""


def format_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    if n < 1024 * 1024:
        return f"{n / 1024:.1f} KiB"
    if n < 1024 ** 3:
        return f"{n / 1024 / 1024:.1f} MiB"
    return f"{n / 1024 ** 3:.1f} GiB"


def newest_report(reports: Iterable[DataReport], region: str) -> DataReport | None:
    """``region``'s newest report (several members of a region check the
    same server)."""
    return max((r for r in reports if r.region == region), key=lambda r: r.at, default=None)


def data_state(reports: Mapping[str, DataReport], region: str, active: str | None,
               max_lag_bytes: int) -> DataState:
    """Can ``region`` take over the group whose primary is in ``active``?

    ``reports`` are the live members' reports for the group (by member).
    The region's lag is the larger of its own estimate and, when the active
    region's primary reports, that primary's WAL position minus what the
    region replayed (a standby cut off from its primary underestimates its
    own lag).  No report is no evidence: not a candidate.  With no active
    region yet (``active`` None: bootstrap), only a primary qualifies."""
    mine = newest_report(reports.values(), region)
    if mine is not None and mine.role == "primary" and active in (region, None):
        # The region that serves, or (no active region yet: bootstrap)
        # wherever the database's primary already is.
        return DataState(region, True, "", 0, "primary")
    if active is None and mine is not None and mine.role == "standby":
        return DataState(region, False, f"{region}'s database is a standby; the group starts "
                         "where its primary is", role="standby")
    if mine is None:
        return DataState(region, False, f"no database report from {region}")
    if mine.role == "down":
        return DataState(region, False, f"{region}'s database is down ({mine.error or '?'})",
                         role="down")
    if mine.role == "primary":
        # Two primaries: promoting this one would keep a split brain going.
        return DataState(region, False, f"{region}'s database is a primary too", role="primary")
    lag = mine.own_lag_bytes or 0
    primary = newest_report(reports.values(), active) if active is not None else None
    if primary is not None and primary.role == "primary" and primary.lsn is not None \
            and mine.lsn is not None:
        lag = max(lag, primary.lsn - mine.lsn)
    if lag > max_lag_bytes:
        paused = ", replay paused" if mine.paused else ""
        return DataState(region, False, f"{region} is {format_bytes(lag)} behind (max "
                         f"{format_bytes(max_lag_bytes)}{paused})", lag, "standby")
    return DataState(region, True, "", lag, "standby")


def loss_estimate(reports: Mapping[str, DataReport], region: str, active: str | None
                  ) -> int | None:
    """Bytes of WAL the old primary had that ``region`` has not replayed
    (None when nothing is known): what a forced move there may lose."""
    state = data_state(reports, region, active, max_lag_bytes=2 ** 62)
    return state.lag_bytes
