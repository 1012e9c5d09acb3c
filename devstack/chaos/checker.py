"""The invariants a chaos run must keep, judged from what was recorded (pure).

Every check returns violations as text; an empty list is a pass.  The
record is built by :mod:`devstack.chaos.runner` from the hook log, the history
events in etcd, samples of the DNS server and HAProxy taken during the run,
the final cluster view and the daemons' exits.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

SERVING = frozenset({"ready", "drain"})


@dataclass
class Record:
    """What one run left behind."""

    # Hook runs: {t, member, group, region, role ("active"|"standby"), epoch}.
    hooks: Sequence[Mapping[str, Any]] = ()
    # epoch_changed history events: {ts, group, epoch, region}.
    epoch_changes: Sequence[Mapping[str, Any]] = ()
    # DNS samples: (t, group, fence epoch or None, A addresses).
    dns: Sequence[tuple[float, str, int | None, frozenset[str]]] = ()
    # HAProxy samples: (t, {server: state}) (state: ready, drain, maint...),
    # servers named after regions, routing ``haproxy_group``.
    haproxy: Sequence[tuple[float, Mapping[str, str]]] = ()
    haproxy_group: str = "app"
    # After healing: group -> (region, epoch), regions with live members,
    # group -> its current saga's state, groups alerted for a failed saga.
    final_active: Mapping[str, tuple[str, int]] = field(default_factory=dict)
    live_regions: frozenset[str] = frozenset()
    final_sagas: Mapping[str, str] = field(default_factory=dict)
    alerted: frozenset[str] = frozenset()
    groups: Sequence[str] = ()
    # member -> exit code, for daemons that exited without a nemesis asking.
    crashed: Mapping[str, int | None] = field(default_factory=dict)
    # member -> {group: epoch} of its applied-epoch file at the end.
    state_files: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    # Daemons a nemesis took out: (member, "kill"|"pause", from, to).
    unavailable: Sequence[tuple[str, str, float, float]] = ()
    # After SIGCONT a daemon needs this long to learn what changed (its
    # lease is gone; it re-registers and reads the records).
    wake_s: float = 4.0


def one_region_per_epoch(r: Record) -> list[str]:
    """Two regions never run promote for one group at one epoch (rule 1)."""
    seen: dict[tuple[str, int], set[str]] = {}
    for h in r.hooks:
        if h["role"] == "active":
            seen.setdefault((h["group"], int(h["epoch"])), set()).add(h["region"])
    return [f"{g} epoch {e}: promoted in {sorted(regions)}"
            for (g, e), regions in sorted(seen.items()) if len(regions) > 1]


def no_lower_epoch_applied(r: Record) -> list[str]:
    """A member never runs a hook for an epoch lower than one it already
    applied for the group (rule 11)."""
    out = []
    last: dict[tuple[str, str], int] = {}
    for h in sorted(r.hooks, key=lambda h: float(h["t"])):
        key, epoch = (h["member"], h["group"]), int(h["epoch"])
        if epoch < last.get(key, 0):
            out.append(f"{h['member']} ran {h['role']} for {h['group']} at epoch {epoch} "
                       f"after epoch {last[key]}")
        last[key] = max(last.get(key, 0), epoch)
    return out


def epochs_never_go_backwards(r: Record) -> list[str]:
    """In etcd's history and in the DNS fence, each group's epoch only grows;
    no state file holds an epoch above what etcd reached."""
    out = []
    last: dict[str, int] = {}
    for ev in sorted(r.epoch_changes, key=lambda e: float(e["ts"])):
        g, e = str(ev["group"]), int(ev["epoch"])
        if e <= last.get(g, 0):
            out.append(f"etcd: {g} went to epoch {e} after {last[g]}")
        last[g] = max(last.get(g, 0), e)
    fence: dict[str, int] = {}
    for t, g, epoch, _ in sorted(r.dns, key=lambda s: s[0]):
        if epoch is None:
            continue
        if epoch < fence.get(g, 0):
            out.append(f"dns: {g}'s fence went from {fence[g]} to {epoch} at {t:.3f}")
        fence[g] = max(fence.get(g, 0), epoch)
    for member, epochs in r.state_files.items():
        for g, e in epochs.items():
            if g in r.final_active and e > r.final_active[g][1]:
                out.append(f"{member}'s state file has {g} at {e}, etcd at "
                           f"{r.final_active[g][1]}")
    return out


def never_routed_to_nowhere(r: Record, max_gap_s: float = 10.0) -> list[str]:
    """No empty DNS record set once a group has one (rule 8).  HAProxy: a
    forced move fences the old server before the new one is promoted, so
    a short window with no server taking traffic is the design; one longer
    than ``max_gap_s`` (a saga stuck between fence and reroute) is not."""
    out = []
    had: set[str] = set()
    for t, g, _, addrs in sorted(r.dns, key=lambda s: s[0]):
        if addrs:
            had.add(g)
        elif g in had:
            out.append(f"dns: {g} has no address at {t:.3f}")
    served, gap_from = False, None
    for t, states in sorted(r.haproxy, key=lambda s: s[0]):
        if any(st in SERVING for st in states.values()):
            served, gap_from = True, None
        elif served:
            gap_from = t if gap_from is None else gap_from
            if t - gap_from > max_gap_s:
                out.append(f"haproxy: no server takes traffic from {gap_from:.3f} to {t:.3f}")
                gap_from = t
    return out


def healed(r: Record) -> list[str]:
    """After the faults heal: every group active in a region with members,
    its saga done (or failed with an alert), and no daemon crashed."""
    out = []
    for g in r.groups:
        active = r.final_active.get(g)
        if active is None:
            out.append(f"{g} is not active anywhere")
            continue
        if active[0] not in r.live_regions:
            out.append(f"{g} is active in {active[0]}, which has no live member")
        saga = r.final_sagas.get(g)
        if saga == "running":
            out.append(f"{g}'s saga for epoch {active[1]} still runs")
        elif saga == "failed" and g not in r.alerted:
            out.append(f"{g}'s saga failed without an alert")
    if r.haproxy and r.haproxy_group in r.final_active:
        region = r.final_active[r.haproxy_group][0]
        states = dict(max(r.haproxy, key=lambda s: s[0])[1])
        if states.get(region) != "ready" or any(
                st in SERVING for s, st in states.items() if s != region):
            out.append(f"haproxy ends at {states}, {r.haproxy_group} is active in {region}")
    out += [f"{m} crashed (exit {code})" for m, code in sorted(r.crashed.items())]
    return out


def _active_intervals(r: Record) -> dict[tuple[str, str], list[tuple[float, float, str]]]:
    """(group, member) -> the times its region ran as active (promote hook
    to the next demote), cut where a nemesis killed the daemon and, for a
    pause, resumed only once it had time to learn the news."""
    out: dict[tuple[str, str], list[tuple[float, float, str]]] = {}
    open_at: dict[tuple[str, str], tuple[float, str]] = {}
    end = max((float(h["t"]) for h in r.hooks), default=0.0) + 3600
    for h in sorted(r.hooks, key=lambda h: float(h["t"])):
        key = (str(h["group"]), str(h["member"]))
        if h["role"] == "active" and key not in open_at:
            open_at[key] = (float(h["t"]), str(h["region"]))
        elif h["role"] != "active" and key in open_at:
            start, region = open_at.pop(key)
            out.setdefault(key, []).append((start, float(h["t"]), region))
    for key, (start, region) in open_at.items():
        out.setdefault(key, []).append((start, end, region))
    for member, kind, a, b in r.unavailable:
        for key, spans in out.items():
            if key[1] != member:
                continue
            cut = []
            for s, e, region in spans:
                if e <= a or s >= b:
                    cut.append((s, e, region))
                    continue
                if s < a:
                    cut.append((s, a, region))
                if kind == "pause" and e > b + r.wake_s:
                    cut.append((max(s, b + r.wake_s), e, region))
                # kill: the process is gone; a restart re-runs its hooks
            out[key] = cut
    return out


def no_two_regions_active(r: Record, tolerance_s: float = 1.0) -> list[str]:
    """After an unplanned (forced) move, the new region's promote never runs
    while a member of another region still runs as active (beyond the
    moment both see the same watch event): the partition of issue 12 had
    two regions active for 6-10 s."""
    forced = {(str(e["group"]), int(e["epoch"])) for e in r.epoch_changes
              if e.get("mode") == "forced"}
    spans = _active_intervals(r)
    out = []
    for h in r.hooks:
        g, epoch = str(h["group"]), int(h["epoch"])
        if h["role"] != "active" or (g, epoch) not in forced:
            continue
        promoted = float(h["t"])
        t = promoted + tolerance_s
        for (group, member), intervals in spans.items():
            for s, e, region in intervals:
                # Active before this promote and still active after the
                # tolerance; an interval that begins after it is a later
                # epoch's move, judged on its own.
                if group == g and region != h["region"] and s <= promoted and t < e:
                    out.append(f"{g} epoch {epoch}: {h['region']} promoted at {h['t']:.3f} "
                               f"while {member} ({region}) ran as active until {e:.3f}")
    return out


CHECKS = (one_region_per_epoch, no_two_regions_active, no_lower_epoch_applied,
          epochs_never_go_backwards, never_routed_to_nowhere, healed)


def violations(r: Record) -> list[str]:
    return [f"{check.__name__}: {v}" for check in CHECKS for v in check(r)]
