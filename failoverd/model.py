"""The keyspace of DESIGN.md and the immutable records read from it.

Pure: parsing a raw :class:`~failoverd.store.Snapshot` into a
:class:`ClusterView` does no I/O.  A value that is not what we wrote (hand
edits, a newer version) is skipped and reported, never fatal.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Literal, Protocol, TypeVar

from failoverd.power import Reading, reading_from_json
from failoverd.store import KeyValue, Snapshot
from failoverd.workflow import Workflow, parse_workflow

T = TypeVar("T")

Trigger = Literal[
    "bootstrap", "member_loss", "health", "power", "operator", "config", "failback"
]
AUTOMATIC_TRIGGERS: frozenset[str] = frozenset(
    {"member_loss", "health", "power", "config", "failback"}
)


@dataclass(frozen=True)
class Keyspace:
    """Keys under ``/failoverd/<cluster>/``."""

    cluster: str

    @property
    def prefix(self) -> str:
        return f"/failoverd/{self.cluster}/"

    @property
    def coordinator(self) -> str:
        return self.prefix + "coordinator"

    def member(self, member: str) -> str:
        return f"{self.prefix}members/{member}"

    def observation(self, member: str, target: str) -> str:
        return f"{self.prefix}observations/{member}/{target}"

    def power(self, region: str, sensor: str, member: str) -> str:
        return f"{self.prefix}power/{region}/{sensor}/{member}"

    def workflow(self, group: str) -> str:
        return f"{self.prefix}groups/{group}/workflow"

    def ack(self, group: str, member: str) -> str:
        return f"{self.prefix}groups/{group}/applied/{member}"

    def active(self, group: str) -> str:
        return f"{self.prefix}groups/{group}/active"

    @property
    def groups(self) -> str:
        return self.prefix + "groups/"

    @property
    def paused(self) -> str:
        return self.prefix + "control/paused"

    def drained(self, region: str) -> str:
        return f"{self.prefix}control/drained/{region}"

    def request(self, request_id: str) -> str:
        return f"{self.prefix}control/requests/{request_id}"

    def result(self, request_id: str) -> str:
        return f"{self.prefix}control/results/{request_id}"

    @property
    def results(self) -> str:
        return self.prefix + "control/results/"

    @property
    def storm(self) -> str:
        """The cluster-wide storm guard: recent incidents (evacuations)."""
        return self.prefix + "control/storm"

    @property
    def history(self) -> str:
        return self.prefix + "history/"

    def history_event(self, ts_ns: int, member: str) -> str:
        # Zero-padded so lexical order is time order.
        return f"{self.prefix}history/{ts_ns:020d}-{member}"


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

    def to_value(self) -> str:
        d = asdict(self)
        d.pop("lease")
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
class ControlState:
    paused: bool = False
    drained: frozenset[str] = frozenset()
    # Recent incidents (evacuations, failback waves): the cluster-wide guard.
    incidents: tuple[Incident, ...] = ()
    storm_mod_revision: int = 0


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
    workflows: Mapping[str, Workflow] = field(default_factory=dict)
    # (group, member) -> (epoch, role) the member has applied (its hooks ran).
    acks: Mapping[tuple[str, str], tuple[int, str]] = field(default_factory=dict)
    # When each memberless region was first seen without members, as tracked
    # by the coordinator across cycles (a member restart is not a loss).
    absent_since: Mapping[str, float] = field(default_factory=dict)

    def regions_with_members(self) -> frozenset[str]:
        return frozenset(m.region for m in self.members.values())

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
    )


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
    return to_json({"incidents": [asdict(i) for i in incidents]})


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


def parse_request(request_id: str, kv: KeyValue) -> OperatorRequest:
    d = _obj(kv)
    return OperatorRequest(
        id=request_id, action=_str(d, "action"), by=_str(d, "by"), at=_num(d, "at"),
        group=_opt_str(d, "group"), region=_opt_str(d, "region"),
        force=d.get("force") is True, revision=kv.mod_revision)


def _parse_reading(region: str, sensor: str, kv: KeyValue) -> Reading:
    return reading_from_json(region, sensor, kv.value)


def _parse_workflow(kv: KeyValue) -> Workflow:
    return parse_workflow(kv.value, kv.mod_revision)


class _Cache(Protocol):
    def parsed(self, kv: KeyValue, parse: Callable[[KeyValue], T]) -> T: ...


def _no_cache(kv: KeyValue, parse: Callable[[KeyValue], T]) -> T:
    return parse(kv)


def parse_view(keys: Keyspace, snap: Snapshot, cache: _Cache | None = None) -> ClusterView:
    """The raw keys as a :class:`ClusterView`.  With ``cache`` (the mirror),
    a key is parsed again only when its ``mod_revision`` changed."""
    parsed = cache.parsed if cache is not None else _no_cache
    coordinator: CoordinatorRecord | None = None
    members: dict[str, MemberRecord] = {}
    active: dict[str, ActiveRecord] = {}
    paused = False
    drained: set[str] = set()
    incidents: tuple[Incident, ...] = ()
    storm_rev = 0
    observations: dict[tuple[str, str], Observation] = {}
    relays: dict[str, list[Reading]] = {}
    requests: list[OperatorRequest] = []
    workflows: dict[str, Workflow] = {}
    acks: dict[tuple[str, str], tuple[int, str]] = {}
    problems: list[str] = []
    p = keys.prefix
    for kv in snap.kvs:
        rel = kv.key[len(p):] if kv.key.startswith(p) else ""
        try:
            if rel.startswith("groups/"):
                # Most keys (three or more per group): one split, not a chain.
                group, _, rest = rel[len("groups/"):].partition("/")
                if rest == "active":
                    active[group] = parsed(kv, parse_active)
                elif rest == "workflow":
                    workflows[group] = parsed(kv, _parse_workflow)
                elif rest.startswith("applied/"):
                    acks[(group, rest[len("applied/"):])] = parsed(kv, parse_ack)
            elif rel == "coordinator":
                coordinator = CoordinatorRecord(
                    member=_str(_obj(kv), "member"), term=kv.create_revision, lease=kv.lease
                )
            elif rel.startswith("members/"):
                rec = parsed(kv, parse_member)
                members[rec.member] = rec
            elif rel.startswith("observations/"):
                member, _, target = rel[len("observations/"):].partition("/")
                observations[(member, target)] = parsed(
                    kv, partial(parse_observation, member, target))
            elif rel.startswith("power/"):
                region, sensor, member = rel[len("power/"):].split("/", 2)
                if not member:
                    raise ValueError("power key without a relaying member")
                relays.setdefault(member, []).append(parsed(
                    kv, partial(_parse_reading, region, sensor)))
            elif rel == "control/paused":
                paused = bool(_obj(kv).get("paused", False))
            elif rel.startswith("control/requests/"):
                requests.append(parse_request(rel[len("control/requests/"):], kv))
            elif rel.startswith("control/drained/"):
                drained.add(rel[len("control/drained/"):])
            elif rel == "control/storm":
                incidents = parse_incidents(kv)
                storm_rev = kv.mod_revision
        except (ValueError, KeyError, TypeError) as exc:
            problems.append(f"{kv.key}: {exc}")
    return ClusterView(
        revision=snap.revision,
        coordinator=coordinator,
        members=members,
        active=active,
        control=ControlState(
            paused=paused, drained=frozenset(drained), incidents=incidents,
            storm_mod_revision=storm_rev,
        ),
        problems=tuple(problems),
        # An observation counts only while its member is alive.
        observations={k: o for k, o in observations.items() if k[0] in members},
        power=_live_power(relays, members),
        requests=tuple(sorted(requests, key=lambda r: r.id)),
        workflows=workflows,
        acks={k: v for k, v in acks.items() if k[1] in members},
    )


def _live_power(relays: Mapping[str, list[Reading]], members: Mapping[str, MemberRecord]
                ) -> dict[tuple[str, str], list[Reading]]:
    out: dict[tuple[str, str], list[Reading]] = {}
    for member, readings in relays.items():
        if member in members:
            for r in readings:
                out.setdefault((r.region, r.sensor), []).append(r)
    return out
