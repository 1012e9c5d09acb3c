"""The keyspace of DESIGN.md and the immutable records read from it.

Pure: parsing a raw :class:`~failoverd.core.store.Snapshot` into a
:class:`ClusterView` does no I/O.  A value that is not what we wrote (hand
edits, a newer version) is skipped and reported, never fatal.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Literal, NamedTuple

from failoverd.core.data import DataReport, parse_data_report
from failoverd.core.power import Reading, merge, reading_from_json
from failoverd.core.store import KeyValue, Snapshot
from failoverd.core.workflow import Workflow, parse_workflow

Trigger = Literal[
    "bootstrap", "member_loss", "health", "power", "operator", "config", "failback",
    "restore", "drill", "rollback",
]
AUTOMATIC_TRIGGERS: frozenset[str] = frozenset(
    {"member_loss", "health", "power", "config", "failback"}
)


# The keyspace of DESIGN.md, one table for both directions: :class:`Keyspace`
# builds keys from it and :meth:`Keyspace.parse` reads them back, so a key
# is spelled in one place.  ``{name}`` is a field (one path segment).
KEY_SHAPES: dict[str, str] = {
    "coordinator": "coordinator",
    "member": "members/{member}",
    "observation": "observations/{member}/{target}",
    "power": "power/{region}/{sensor}/{member}",
    "active": "groups/{group}/active",
    "workflow": "groups/{group}/workflow",
    "ack": "groups/{group}/applied/{member}",
    "data": "groups/{group}/data/{member}",
    "paused": "control/paused",
    "drained": "control/drained/{region}",
    "request": "control/requests/{request}",
    "result": "control/results/{request}",
    "storm": "control/storm",
    "drill": "control/drills/{group}",
    "live_drill": "control/live-drills/{group}",
    "history_event": "history/{event}",
}
# First segments that only hold the shapes above: anything else under them
# is malformed (reported), not merely unknown (ignored).
KEY_FAMILIES = frozenset(shape.split("/", 1)[0] for shape in KEY_SHAPES.values())


# (number of segments, first segment) -> [(kind, literal positions, field positions)]
_Shape = tuple[str, tuple[tuple[int, str], ...], tuple[tuple[int, str], ...]]


def _shape_index() -> dict[tuple[int, str], list[_Shape]]:
    index: dict[tuple[int, str], list[_Shape]] = {}
    for kind, shape in KEY_SHAPES.items():
        parts = shape.split("/")
        literals = tuple((i, p) for i, p in enumerate(parts) if p[0] != "{")
        fields = tuple((i, p[1:-1]) for i, p in enumerate(parts) if p[0] == "{")
        index.setdefault((len(parts), parts[0]), []).append((kind, literals, fields))
    return index


_SHAPES_BY_HEAD = _shape_index()


class ParsedKey(NamedTuple):
    kind: str
    fields: dict[str, str]


@dataclass(frozen=True)
class Keyspace:
    """Keys under ``/failoverd/<cluster>/``, built from and parsed back by
    :data:`KEY_SHAPES`."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"/failoverd/{self.cluster}/"

    def key(self, kind: str, **fields: str) -> str:
        return self.prefix + KEY_SHAPES[kind].format(**fields)

    def parse(self, key: str) -> ParsedKey | None:
        """Which key of the table ``key`` is, with its fields (None: not one
        of ours, or a field is empty)."""
        if not key.startswith(self.prefix):
            return None
        parts = key[len(self.prefix):].split("/")
        for kind, literals, fields in _SHAPES_BY_HEAD.get((len(parts), parts[0]), ()):
            for i, lit in literals:
                if parts[i] != lit:
                    break
            else:
                values = {name: parts[i] for i, name in fields}
                if "" not in values.values():
                    return ParsedKey(kind, values)
        return None

    @property
    def coordinator(self) -> str:
        return self.key("coordinator")

    def member(self, member: str) -> str:
        return self.key("member", member=member)

    def observation(self, member: str, target: str) -> str:
        return self.key("observation", member=member, target=target)

    def power(self, region: str, sensor: str, member: str) -> str:
        return self.key("power", region=region, sensor=sensor, member=member)

    def workflow(self, group: str) -> str:
        return self.key("workflow", group=group)

    def ack(self, group: str, member: str) -> str:
        return self.key("ack", group=group, member=member)

    def active(self, group: str) -> str:
        return self.key("active", group=group)

    def data(self, group: str, member: str) -> str:
        return self.key("data", group=group, member=member)

    @property
    def members(self) -> str:
        return self.prefix + "members/"

    @property
    def groups(self) -> str:
        return self.prefix + "groups/"

    @property
    def paused(self) -> str:
        return self.key("paused")

    def drained(self, region: str) -> str:
        return self.key("drained", region=region)

    def drill(self, group: str) -> str:
        return self.key("drill", group=group)

    def live_drill(self, group: str) -> str:
        return self.key("live_drill", group=group)

    def request(self, request_id: str) -> str:
        return self.key("request", request=request_id)

    def result(self, request_id: str) -> str:
        return self.key("result", request=request_id)

    @property
    def results(self) -> str:
        return self.prefix + "control/results/"

    @property
    def storm(self) -> str:
        """The cluster-wide storm guard: recent incidents (evacuations)."""
        return self.key("storm")

    @property
    def history(self) -> str:
        return self.prefix + "history/"

    def history_event(self, ts_ns: int, member: str) -> str:
        # Zero-padded so lexical order is time order.
        return self.key("history_event", event=f"{ts_ns:020d}-{member}")


def to_json(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)


@dataclass(frozen=True)
class MemberRecord:
    member: str
    region: str
    version: str
    api_url: str
    started: float
    lease: int = 0
    # The epoch this member last applied per group (its state file, which
    # outlives etcd): floors for the epochs of a rebuilt or restored etcd
    # (rule 11).
    epochs: Mapping[str, int] = field(default_factory=dict)

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("lease")
        d["epochs"] = dict(self.epochs)
        return to_json(d)


@dataclass(frozen=True)
class ActiveRecord:
    region: str
    epoch: int
    since: float
    reason: str
    term: int
    trigger: str
    mod_revision: int = 0
    # "planned" (graceful switchover while the old site still runs) or
    # "forced" (fence first); what the reroute workflow follows.
    mode: str = "forced"
    # This group's automatic moves in the last hour (the per-group limit
    # travels with the record it guards).
    auto_moves: tuple[float, ...] = ()

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("mod_revision")
        d["auto_moves"] = list(self.auto_moves)
        return to_json(d)


@dataclass(frozen=True)
class Observation:
    """What one member's probes say about one region."""

    member: str
    target: str
    verdict: str  # "up" | "down" | "unknown"
    ready: bool
    since: float  # when this member's verdict last changed
    checked_at: float
    latency_ms: float = 0.0
    detail: str = ""

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("member")
        d.pop("target")
        return to_json(d)


@dataclass(frozen=True)
class OperatorRequest:
    """An operator's action, handed to the coordinator through etcd."""

    id: str
    action: str  # switchover | failover | retry | pause | resume | drain | undrain
    by: str  # token name
    at: float
    group: str | None = None
    region: str | None = None
    force: bool = False
    # failover --force into a region whose data is behind (or unknown): the
    # operator accepts losing what it has not replayed.
    accept_data_loss: bool = False
    # drain: how long (None: the configured default); drill: the hold.
    for_s: float | None = None
    revision: int = 0  # the request key's mod_revision (0 before it is written)

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("revision")
        return to_json(d)


@dataclass(frozen=True)
class Incident:
    """One entry of the cluster-wide storm guard: an evacuation of a region,
    or one cycle's failbacks (rule 6 counts incidents, not group moves)."""

    kind: str  # evacuation | failback
    region: str
    trigger: str
    at: float
    reason: str = ""
    groups: int = 0  # groups moved
    held: int = 0  # groups that stayed (no candidate, paused, guarded)


@dataclass(frozen=True)
class CoordinatorRecord:
    member: str
    term: int  # the coordinator key's create_revision
    lease: int


@dataclass(frozen=True)
class Drain:
    """An operator's drain of a region, until a deadline.  ``until`` None: a
    drain written before drains expired (it ends drain_max_s after ``at``)
    or by hand (no ``at`` either: it lasts until the coordinator gives it an
    end, drain_max_s from when it first sees it)."""

    region: str
    by: str
    at: float | None
    until: float | None
    mod_revision: int = 0

    def ends(self, max_s: float) -> float:
        if self.until is not None:
            return self.until
        return self.at + max_s if self.at is not None else math.inf


@dataclass(frozen=True)
class ControlState:
    paused: bool = False
    # Every drain key, expired or not: the engine judges expiry with ``now``.
    drains: tuple[Drain, ...] = ()
    # Recent incidents (evacuations, failback waves): the cluster-wide guard.
    incidents: tuple[Incident, ...] = ()
    storm_mod_revision: int = 0

    @property
    def drained(self) -> frozenset[str]:
        """Regions with a drain key (expired or not)."""
        return frozenset(d.region for d in self.drains)


@dataclass(frozen=True)
class ClusterView:
    """Everything the coordinator decides from, as of one etcd revision."""

    revision: int
    coordinator: CoordinatorRecord | None
    members: Mapping[str, MemberRecord]
    active: Mapping[str, ActiveRecord]
    control: ControlState
    problems: tuple[str, ...] = field(default=())
    # (observer member, target region) -> what that member's probes say.
    observations: Mapping[tuple[str, str], Observation] = field(default_factory=dict)
    # (region, sensor) -> the copies of that sensor's reading relayed by
    # live members; the engine merges them (newest wins).
    power: Mapping[tuple[str, str], list[Reading]] = field(default_factory=dict)
    # How long failovers took lately (from history); None until measured.
    learned_failover_s: float | None = None
    # Operator requests waiting for the coordinator, oldest first.
    requests: tuple[OperatorRequest, ...] = ()
    # group -> when its last drill ran (control/drills/<group>).
    drills: Mapping[str, float] = field(default_factory=dict)
    # group -> its live drill, running or the last one (control/live-drills/).
    live_drills: Mapping[str, LiveDrill] = field(default_factory=dict)
    workflows: Mapping[str, Workflow] = field(default_factory=dict)
    # (group, member) -> (epoch, role) the member has applied (its hooks ran).
    acks: Mapping[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    # When each memberless region was first seen without members, as tracked
    # by the coordinator across cycles (a member restart is not a loss).
    absent_since: Mapping[str, float] = field(default_factory=dict)
    # group -> the highest epoch a fence outside etcd holds (DNS epoch TXT
    # records, read by the coordinator before a group's first epoch), and
    # the groups whose fences could not be read yet (rule 11).
    fence_epochs: Mapping[str, int] = field(default_factory=dict)
    fences_unread: frozenset[str] = frozenset()
    # Memberless regions not (yet) confirmed unreachable, with why: their
    # members' APIs still answer (alive, cut off from etcd: rule 4 says
    # hold), or nobody has asked them yet.  Member loss waits for these.
    absent_answering: Mapping[str, str] = field(default_factory=dict)
    # group -> the newest revision that changed one of its keys (active,
    # workflow, acks; deletions too when folded from the watch): a change
    # marker, so not part of equality.
    group_revisions: Mapping[str, int] = field(default_factory=dict, compare=False)
    # group -> member -> that live member's look at its region's database.
    data: Mapping[str, Mapping[str, DataReport]] = field(default_factory=dict)
    # (group, member) -> what its ack says of a database (the old primary's
    # final WAL position, the rejoin's outcome).
    ack_details: Mapping[tuple[str, str], AckDetail] = field(default_factory=dict)

    def regions_with_members(self) -> frozenset[str]:
        return frozenset(m.region for m in self.members.values())

    @cached_property
    def power_by_region(self) -> Mapping[str, list[Reading]]:
        """Per region, the newest reading of each sensor, whoever relayed it
        (:func:`~failoverd.core.power.merge`): merged once per view, not once
        per region judged (a flood's 64 sensors x 3 members, every cycle)."""
        return merge(self.power)

    def members_in(self, region: str) -> list[MemberRecord]:
        return sorted(
            (m for m in self.members.values() if m.region == region), key=lambda m: m.member
        )


def _obj(kv: KeyValue) -> dict[str, object]:
    data = json.loads(kv.value)
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    return data


def _str(d: Mapping[str, object], k: str) -> str:
    v = d[k]
    if not isinstance(v, str):
        raise ValueError(f"{k} is not a string")
    return v


def _opt_str(d: Mapping[str, object], k: str) -> str | None:
    v = d.get(k)
    return v if isinstance(v, str) else None


def _opt_num(d: Mapping[str, object], k: str) -> float | None:
    return _num(d, k) if d.get(k) is not None else None


def _num(d: Mapping[str, object], k: str) -> float:
    v = d[k]
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise ValueError(f"{k} is not a number")
    return float(v)


def parse_member(kv: KeyValue) -> MemberRecord:
    d = _obj(kv)
    return MemberRecord(
        member=_str(d, "member"), region=_str(d, "region"), version=_str(d, "version"),
        api_url=_str(d, "api_url"), started=_num(d, "started"), lease=kv.lease,
        epochs=_epochs(d.get("epochs", {})),
    )


def _epochs(v: object) -> dict[str, int]:
    if not isinstance(v, dict):
        raise ValueError("epochs is not an object")
    out = {}
    for group, epoch in v.items():
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise ValueError(f"epochs[{group}] is not a non-negative integer")
        out[str(group)] = epoch
    return out


def parse_active(kv: KeyValue) -> ActiveRecord:
    d = _obj(kv)
    epoch = d["epoch"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 1:
        raise ValueError("epoch is not a positive integer")
    return ActiveRecord(
        region=_str(d, "region"), epoch=epoch, since=_num(d, "since"),
        reason=_str(d, "reason"), term=int(_num(d, "term")), trigger=_str(d, "trigger"),
        mod_revision=kv.mod_revision, mode=str(d.get("mode", "forced")),
        auto_moves=_floats(d.get("auto_moves", [])),
    )


def _floats(v: object) -> tuple[float, ...]:
    if not isinstance(v, list):
        raise ValueError("not a list of numbers")
    return tuple(float(t) for t in v)


def parse_incidents(kv: KeyValue) -> tuple[Incident, ...]:
    items = _obj(kv).get("incidents", [])
    if not isinstance(items, list):
        raise ValueError("incidents is not a list")
    return tuple(Incident(kind=_str(i, "kind"), region=_str(i, "region"),
                          trigger=_str(i, "trigger"), at=_num(i, "at"),
                          reason=str(i.get("reason", "")), groups=int(_num(i, "groups")),
                          held=int(_num(i, "held")))
                 for i in items if isinstance(i, dict))


def incidents_value(incidents: tuple[Incident, ...]) -> str:
    # By hand: dataclasses.asdict deep-copies every field, and the storm key
    # is written with every evacuation's commit.
    return to_json({"incidents": [
        {"kind": i.kind, "region": i.region, "trigger": i.trigger, "at": i.at,
         "reason": i.reason, "groups": i.groups, "held": i.held} for i in incidents]})


def parse_observation(member: str, target: str, kv: KeyValue) -> Observation:
    d = _obj(kv)
    verdict = _str(d, "verdict")
    if verdict not in {"up", "down", "unknown"}:
        raise ValueError(f"unknown verdict {verdict!r}")
    return Observation(
        member=member, target=target, verdict=verdict, ready=bool(d.get("ready", False)),
        since=_num(d, "since"), checked_at=_num(d, "checked_at"),
        latency_ms=float(d.get("latency_ms", 0.0) or 0.0),  # type: ignore[arg-type]
        detail=str(d.get("detail", "")),
    )


def parse_ack(kv: KeyValue) -> tuple[int, str]:
    d = _obj(kv)
    return int(_num(d, "epoch")), _str(d, "role")


@dataclass(frozen=True)
class AckDetail:
    """What a member's ack says beyond (epoch, role), for a database group:
    the WAL position its demote hook reported when it fenced the old
    primary, and how its rejoin hook ended (None: not run for that epoch)."""

    final_lsn: int | None = None
    rejoined: bool | None = None
    rejoin_error: str = ""


def ack_detail(kv: KeyValue) -> AckDetail | None:
    """None for the usual ack (no database detail: no second parse)."""
    if '"final_lsn"' not in kv.value and '"rejoined"' not in kv.value:
        return None
    d = _obj(kv)
    lsn = d.get("final_lsn")
    if lsn is not None and (not isinstance(lsn, int) or isinstance(lsn, bool) or lsn < 0):
        raise ValueError(f"bad final_lsn {lsn!r}")
    rejoined = d.get("rejoined")
    if rejoined is not None and not isinstance(rejoined, bool):
        raise ValueError(f"bad rejoined {rejoined!r}")
    return AckDetail(lsn, rejoined, str(d.get("rejoin_error", ""))[:500])


LIVE_DRILL_PHASES = ("switching", "holding", "returning", "done", "failed", "aborted")
LIVE_DRILL_RUNNING = frozenset({"switching", "holding", "returning"})


@dataclass(frozen=True)
class LiveDrill:
    """A live drill of one group (``control/live-drills/<group>``): a planned
    switchover to ``to``, a hold, and a planned switchover back ``home``,
    driven by the coordinator (:func:`failoverd.core.drill.advance_live_drill`)
    so that it survives a change of coordinator."""

    id: str
    group: str
    home: str
    to: str
    hold_s: float
    by: str
    started: float
    phase: str  # see LIVE_DRILL_PHASES
    out_epoch: int
    back_epoch: int | None = None
    switched_at: float | None = None  # the switch out's saga done
    returned_at: float | None = None  # the switch back's saga done
    out_s: float | None = None  # the switch out's saga, created -> done
    back_s: float | None = None
    ended: float | None = None
    reason: str = ""
    abort_by: str | None = None  # an operator asked to end the drill now
    mod_revision: int = 0

    @property
    def running(self) -> bool:
        return self.phase in LIVE_DRILL_RUNNING

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("mod_revision")
        return to_json(d)


def parse_live_drill(kv: KeyValue) -> LiveDrill:
    d = _obj(kv)
    phase = _str(d, "phase")
    if phase not in LIVE_DRILL_PHASES:
        raise ValueError(f"unknown live drill phase {phase!r}")
    back = d.get("back_epoch")
    if back is not None and not isinstance(back, int):
        raise ValueError("back_epoch is not an integer")
    out = d.get("out_epoch")
    if not isinstance(out, int):
        raise ValueError("out_epoch is not an integer")
    return LiveDrill(
        id=_str(d, "id"), group=_str(d, "group"), home=_str(d, "home"), to=_str(d, "to"),
        hold_s=_num(d, "hold_s"), by=_str(d, "by"), started=_num(d, "started"), phase=phase,
        out_epoch=out, back_epoch=back, switched_at=_opt_num(d, "switched_at"),
        returned_at=_opt_num(d, "returned_at"), out_s=_opt_num(d, "out_s"),
        back_s=_opt_num(d, "back_s"), ended=_opt_num(d, "ended"),
        reason=_opt_str(d, "reason") or "", abort_by=_opt_str(d, "abort_by"),
        mod_revision=kv.mod_revision)


def parse_request(request_id: str, kv: KeyValue) -> OperatorRequest:
    d = _obj(kv)
    return OperatorRequest(
        id=request_id, action=_str(d, "action"), by=_str(d, "by"), at=_num(d, "at"),
        group=_opt_str(d, "group"), region=_opt_str(d, "region"),
        force=d.get("force") is True, accept_data_loss=d.get("accept_data_loss") is True,
        for_s=_opt_num(d, "for_s"), revision=kv.mod_revision)


class ViewIndex:
    """The keys of a :class:`ClusterView`, folded in one key at a time.

    :meth:`put` and :meth:`delete` only note the raw key (cheap: the watch
    calls them for every event); :meth:`view` parses what changed since the
    last view and assembles the rest from what it parsed before.  A cycle of
    the coordinator during an evacuation of 1,000 groups therefore costs the
    few keys that changed, not the 5,000 that exist.  Pure: no I/O.
    """

    def __init__(self, keys: Keyspace) -> None:
        self._keys = keys
        self._prefix = keys.prefix
        self._reset()

    def _reset(self) -> None:
        self._pending: dict[str, KeyValue | None] = {}
        self._coordinator: CoordinatorRecord | None = None
        self._members: dict[str, MemberRecord] = {}  # by key
        self._active: dict[str, ActiveRecord] = {}
        self._workflows: dict[str, Workflow] = {}
        self._acks: dict[tuple[str, str], tuple[int, str]] = {}
        self._ack_count: dict[str, int] = {}
        self._data: dict[str, dict[str, DataReport]] = {}
        self._ack_details: dict[tuple[str, str], AckDetail] = {}
        self._observations: dict[tuple[str, str], Observation] = {}
        self._relays: dict[str, Reading] = {}  # by key
        self._relay_member: dict[str, str] = {}
        self._requests: dict[str, OperatorRequest] = {}
        self._drained: dict[str, Drain] = {}
        self._paused = False
        self._incidents: tuple[Incident, ...] = ()
        self._storm_rev = 0
        self._drills: dict[str, float] = {}
        self._live_drills: dict[str, LiveDrill] = {}
        self._problems: dict[str, str] = {}
        # Per group: the newest revision of any of its keys (active, workflow,
        # acks) — what a saga waiting on the group compares.
        self.group_revision: dict[str, int] = {}

    def load(self, kvs: Iterable[KeyValue]) -> None:
        """Forget everything; ``kvs`` is the whole state."""
        self._reset()
        for kv in kvs:
            self.put(kv)

    def put(self, kv: KeyValue) -> None:
        self._pending[kv.key] = kv
        self._touch(kv.key, kv.mod_revision)

    def delete(self, key: str, revision: int) -> None:
        self._pending[key] = None
        self._touch(key, revision)

    def _touch(self, key: str, revision: int) -> None:
        rel = key[len(self._prefix):]
        if rel.startswith("groups/"):
            group = rel[len("groups/"):].partition("/")[0]
            if revision > self.group_revision.get(group, 0):
                self.group_revision[group] = revision

    def view(self, revision: int) -> ClusterView:
        pending, self._pending = self._pending, {}
        for key, kv in pending.items():
            parsed = self._keys.parse(key)
            self._forget(key, parsed)
            if kv is not None:
                try:
                    self._fold(kv, parsed)
                except (ValueError, KeyError, TypeError) as exc:
                    self._problems[key] = f"{key}: {exc}"
        members = {m.member: m for m in self._members.values()}
        return ClusterView(
            revision=revision,
            coordinator=self._coordinator,
            members=members,
            active=dict(self._active),
            control=ControlState(
                paused=self._paused,
                drains=tuple(self._drained[r] for r in sorted(self._drained)),
                incidents=self._incidents, storm_mod_revision=self._storm_rev,
            ),
            problems=tuple(sorted(self._problems.values())),
            # An observation counts only while its member is alive.
            observations={k: o for k, o in self._observations.items() if k[0] in members},
            power=_live_power(self._relays, self._relay_member, members),
            requests=tuple(sorted(self._requests.values(), key=lambda r: r.id)),
            drills=dict(self._drills),
            live_drills=dict(self._live_drills),
            workflows=dict(self._workflows),
            acks=(dict(self._acks) if self._ack_members() <= members.keys()
                  else {k: v for k, v in self._acks.items() if k[1] in members}),
            group_revisions=dict(self.group_revision),
            data={g: {m: r for m, r in by.items() if m in members}
                  for g, by in self._data.items()},
            ack_details=dict(self._ack_details),
        )

    def _ack_members(self) -> set[str]:
        """Members with acks (counted as they come and go: no scan)."""
        return {m for m, n in self._ack_count.items() if n}

    def _forget(self, key: str, parsed: ParsedKey | None) -> None:
        """Drop what ``key`` contributed (it changed or went away)."""
        self._problems.pop(key, None)
        if parsed is None:
            return
        f = parsed.fields
        match parsed.kind:
            case "active":
                self._active.pop(f["group"], None)
            case "workflow":
                self._workflows.pop(f["group"], None)
            case "ack":
                if self._acks.pop((f["group"], f["member"]), None) is not None:
                    self._ack_count[f["member"]] -= 1
                self._ack_details.pop((f["group"], f["member"]), None)
            case "data":
                by = self._data.get(f["group"])
                if by is not None:
                    by.pop(f["member"], None)
                    if not by:
                        del self._data[f["group"]]
            case "coordinator":
                self._coordinator = None
            case "member":
                self._members.pop(key, None)
            case "observation":
                self._observations.pop((f["member"], f["target"]), None)
            case "power":
                self._relays.pop(key, None)
                self._relay_member.pop(key, None)
            case "paused":
                self._paused = False
            case "request":
                self._requests.pop(f["request"], None)
            case "drained":
                self._drained.pop(f["region"], None)
            case "storm":
                self._incidents, self._storm_rev = (), 0
            case "drill":
                self._drills.pop(f["group"], None)
            case "live_drill":
                self._live_drills.pop(f["group"], None)

    def _fold(self, kv: KeyValue, parsed: ParsedKey | None) -> None:
        """Parse ``kv`` into its place; raises on a malformed value, or on a
        key under one of our families that has none of our shapes."""
        if parsed is None:
            rel = kv.key[len(self._prefix):] if kv.key.startswith(self._prefix) else ""
            if rel.split("/", 1)[0] in KEY_FAMILIES and "/" in rel:
                raise ValueError("not a key of the keyspace")
            return
        f = parsed.fields
        match parsed.kind:
            case "active":
                self._active[f["group"]] = parse_active(kv)
            case "workflow":
                self._workflows[f["group"]] = parse_workflow(kv.value, kv.mod_revision)
            case "ack":
                self._acks[(f["group"], f["member"])] = parse_ack(kv)
                self._ack_count[f["member"]] = self._ack_count.get(f["member"], 0) + 1
                if (detail := ack_detail(kv)) is not None:
                    self._ack_details[(f["group"], f["member"])] = detail
            case "data":
                report = parse_data_report(kv.value)
                if (report.group, report.member) != (f["group"], f["member"]):
                    raise ValueError("report names another group or member than its key")
                self._data.setdefault(f["group"], {})[f["member"]] = report
            case "coordinator":
                self._coordinator = CoordinatorRecord(
                    member=_str(_obj(kv), "member"), term=kv.create_revision, lease=kv.lease)
            case "member":
                self._members[kv.key] = parse_member(kv)
            case "observation":
                self._observations[(f["member"], f["target"])] = parse_observation(
                    f["member"], f["target"], kv)
            case "power":
                self._relays[kv.key] = reading_from_json(f["region"], f["sensor"], kv.value)
                self._relay_member[kv.key] = f["member"]
            case "paused":
                self._paused = bool(_obj(kv).get("paused", False))
            case "request":
                self._requests[f["request"]] = parse_request(f["request"], kv)
            case "drained":
                d = _obj(kv)
                self._drained[f["region"]] = Drain(
                    region=f["region"], by=_opt_str(d, "by") or "?",
                    at=_opt_num(d, "at"), until=_opt_num(d, "until"),
                    mod_revision=kv.mod_revision)
            case "storm":
                self._incidents = parse_incidents(kv)
                self._storm_rev = kv.mod_revision
            case "drill":
                self._drills[f["group"]] = _num(_obj(kv), "at")
            case "live_drill":
                self._live_drills[f["group"]] = parse_live_drill(kv)


def parse_view(keys: Keyspace, snap: Snapshot) -> ClusterView:
    """The raw keys of one snapshot as a :class:`ClusterView`."""
    index = ViewIndex(keys)
    index.load(snap.kvs)
    return index.view(snap.revision)


def _live_power(relays: Mapping[str, Reading], relay_member: Mapping[str, str],
                members: Mapping[str, MemberRecord]) -> dict[tuple[str, str], list[Reading]]:
    out: dict[tuple[str, str], list[Reading]] = {}
    for key, r in relays.items():
        if relay_member[key] in members:
            out.setdefault((r.region, r.sensor), []).append(r)
    return out
