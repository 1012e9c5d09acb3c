"""``next_decision_at``: the coordinator re-decides an unchanged view only
when a time-based rule may flip.  Property: deciding at any instant before
the deadline decides what deciding now does; table: each kind of deadline."""

from __future__ import annotations

import math
from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from failoverd.core.engine import Alert, Decision, GroupPolicy, Policy, decide, next_decision_at
from failoverd.core.model import (
    ActiveRecord,
    ClusterView,
    ControlState,
    Drain,
    Incident,
    MemberRecord,
    Observation,
)
from failoverd.core.power import Reading

NOW = 1_000_000.0
REGIONS = ("east", "west", "central")
STATES = ("normal", "utility_lost", "on_battery", "on_generator", "low_battery",
          "generator_failed", "offline")
OUTAGES = ("utility_lost", "on_battery") * 3  # the ones with a grace, weighted
GROUPS = (GroupPolicy("app", REGIONS), GroupPolicy("db", ("east", "west")))


def _policy(**kw: object) -> Policy:
    base = Policy(priorities=(("east", 100), ("west", 50), ("central", 25)), groups=GROUPS,
                  cooldown_s=300, max_evacuations_per_hour=3, failback="manual",
                  failback_stable_s=60, bootstrap_grace_s=10, member_loss_grace_s=5,
                  probed_regions=frozenset(REGIONS))
    return replace(base, **kw)  # type: ignore[arg-type]


policies = st.builds(
    lambda fb, cd, ml, bg, grace, stale, silence, margin: _policy(
        failback=fb, cooldown_s=cd, member_loss_grace_s=ml, bootstrap_grace_s=bg,
        power_grace_s=grace, sensor_stale_s=stale, power_silence_during_outage_s=silence,
        power_runtime_margin_s=margin),
    st.sampled_from(["manual", "auto"]), st.floats(0, 600), st.floats(0, 30),
    st.floats(0, 60), st.floats(1, 120), st.floats(1, 120), st.floats(1, 120),
    st.floats(0, 300)).flatmap(
        lambda p: st.sampled_from([p, replace(p, probed_regions=frozenset())]))
# Mostly near now, where the deadlines are; sometimes long ago.
ago = st.one_of(st.floats(0, 200), st.floats(0, 4000)).map(lambda s: NOW - s)
recent = st.one_of(st.floats(0, 60), st.floats(0, 400)).map(lambda s: NOW - s)


@st.composite
def readings(draw: st.DrawFn, region: str) -> list[Reading]:
    out = []
    for i in range(draw(st.integers(0, 2))):
        received = draw(recent)
        out.append(Reading(region, f"s{i}", draw(st.sampled_from(STATES + OUTAGES)), received,
                           received, draw(st.none() | st.floats(0, 600)), None,
                           since=received - draw(st.floats(0, 60)),
                           lwt_at=draw(st.none() | st.just(received))))
    return out


@st.composite
def views(draw: st.DrawFn) -> ClusterView:
    present = draw(st.sampled_from([frozenset(REGIONS)]) | st.frozensets(
        st.sampled_from(REGIONS)))
    members = {f"{r[0]}{i}": MemberRecord(f"{r[0]}{i}", r, "0", "", draw(ago))
               for r in present
               for i in range(draw(st.integers(1, 2)))}
    active = {}
    for g in GROUPS:
        if draw(st.integers(0, 3)):
            active[g.name] = ActiveRecord(
                draw(st.sampled_from(g.regions)), draw(st.integers(1, 9)), draw(ago), "", 1,
                draw(st.sampled_from(["bootstrap", "member_loss", "health", "power",
                                      "operator", "failback"])),
                auto_moves=tuple(draw(st.lists(ago, max_size=3))))
    observations = {
        (m, target): Observation(m, target, draw(st.sampled_from(["up", "up", "down",
                                                                  "unknown"])),
                                 draw(st.booleans()), draw(ago), NOW)
        for m in members for target in REGIONS if draw(st.integers(0, 3))}
    power = {(r, "s"): rs for r in REGIONS if (rs := draw(readings(r)))}
    drains = tuple(Drain(r, "op", draw(ago), draw(st.none() | st.floats(NOW - 10, NOW + 4000)))
                   for r in draw(st.frozensets(st.sampled_from(REGIONS))))
    incidents = tuple(Incident("evacuation", draw(st.sampled_from(REGIONS)),
                               draw(st.sampled_from(["power", "health", "member_loss"])), t)
                      for t in draw(st.lists(ago, max_size=4)))
    gone = [r for r in REGIONS if not any(m.region == r for m in members.values())]
    return ClusterView(
        revision=1, coordinator=None, members=members, active=active,
        control=ControlState(paused=draw(st.integers(0, 9)) == 0, drains=drains,
                             incidents=incidents),
        observations=observations, power=power,
        learned_failover_s=draw(st.none() | st.floats(1, 300)),
        absent_since={r: draw(recent) for r in gone if draw(st.booleans())})


def _what(d: Decision) -> list[tuple[str, ...]]:
    """What a decision does: its moves, and which groups it alerts on
    (alert texts count down with the clock; their groups do not)."""
    return [("alert", i.group) if isinstance(i, Alert)
            else (i.group, i.region, str(i.epoch), i.trigger, str(i.planned))
            for i in d.intents]


@settings(max_examples=1000, deadline=None)
@given(views(), policies, st.floats(0, 1))
def test_property_nothing_changes_before_the_deadline(v: ClusterView, p: Policy,
                                                       frac: float) -> None:
    due = next_decision_at(v, p, NOW)
    assert due >= NOW
    span = min(due - NOW, 5000.0) - 1e-3  # float rounding aside
    if span > 0:
        now = _what(decide(v, p, NOW))
        assert _what(decide(v, p, NOW + span)) == now  # just before the deadline
        assert _what(decide(v, p, NOW + span * frac)) == now


READING = Reading("east", "ups", "utility_lost", NOW - 10, NOW - 10, since=NOW - 10)
ALIVE = {"e1": MemberRecord("e1", "east", "0", "", NOW - 100),
         "w1": MemberRecord("w1", "west", "0", "", NOW - 100)}
EAST = ActiveRecord("east", 3, NOW - 10_000, "", 1, "bootstrap")


def _view(**kw: object) -> ClusterView:
    base = ClusterView(revision=1, coordinator=None, members=ALIVE, active={"app": EAST,
                       "db": EAST}, control=ControlState())
    return replace(base, **kw)  # type: ignore[arg-type]


def test_a_steady_cluster_has_no_deadline() -> None:
    assert next_decision_at(_view(), _policy(), NOW) == math.inf


def test_each_kind_of_deadline() -> None:
    p = _policy(power_grace_s=30, sensor_stale_s=20, power_silence_during_outage_s=45)
    power = {("east", "ups"): [READING]}
    # The grace ends first (stale at 10, silence at 35 s from now: later).
    assert next_decision_at(_view(power=power), p, NOW) == NOW + 10
    on_battery = replace(READING, state="on_battery", runtime_s=400.0, since=NOW - 100)
    # 400 s reported 10 s ago, budget 60 + 120 s: under it 210 s from now;
    # the grace (30 s from NOW - 100) is over, the stale point 10 s ahead.
    assert next_decision_at(_view(power={("east", "ups"): [on_battery]}),
                            replace(p, sensor_stale_s=500, power_silence_during_outage_s=500),
                            NOW) == NOW + 210
    assert next_decision_at(_view(control=ControlState(drains=(
        Drain("west", "op", NOW - 5, NOW + 77),))), p, NOW) == NOW + 77
    assert next_decision_at(_view(absent_since={"west": NOW - 2}), p, NOW) == NOW + 3
    cooling = replace(EAST, since=NOW - 100, trigger="health")
    assert next_decision_at(_view(active={"app": cooling, "db": EAST}), p, NOW) == NOW + 200
    assert next_decision_at(_view(control=ControlState(incidents=(
        Incident("evacuation", "west", "power", NOW - 3500),))), p, NOW) == NOW + 100
    assert next_decision_at(_view(active={"app": EAST}), p, NOW) == math.inf  # grace over
    young = {m: replace(r, started=NOW - 4) for m, r in ALIVE.items()}
    assert next_decision_at(_view(members=young, active={"app": EAST}), p, NOW) == NOW + 6
    moved = replace(EAST, auto_moves=(NOW - 3000,))
    assert next_decision_at(_view(active={"app": moved, "db": EAST}), p, NOW) == NOW + 600
    # Failback: the preferred region stable failback_stable_s after it came up.
    west = replace(EAST, region="west", trigger="operator")
    seen = {("e1", "east"): Observation("e1", "east", "up", True, NOW - 45, NOW)}
    assert next_decision_at(_view(active={"app": west, "db": west}, observations=seen),
                            replace(p, failback="auto", failback_stable_s=60), NOW) == NOW + 15
    quiet = replace(READING, since=NOW - 1000, received=NOW - 1000 + 300)
    # An outage heard 700 s ago: critical already; silent 45 s after it: done.
    assert next_decision_at(_view(power={("east", "ups"): [quiet]}), p, NOW) == math.inf


def test_the_deadline_is_when_the_decision_flips() -> None:
    """The grace deadline is not only an upper bound: just after it, the
    region is left for power."""
    p = _policy(power_grace_s=30, sensor_stale_s=60, power_silence_during_outage_s=60,
                probed_regions=frozenset())
    v = _view(power={("east", "ups"): [READING]})
    due = next_decision_at(v, p, NOW)
    assert not decide(v, p, due - 0.01).changes
    assert {c.trigger for c in decide(v, p, due + 0.01).changes} == {"power"}
