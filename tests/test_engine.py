"""The pure decision engine: table-driven rules and hypothesis properties."""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from failoverd.core.engine import Alert, GroupPolicy, Policy, decide
from failoverd.core.model import (
    ActiveRecord,
    ClusterView,
    ControlState,
    Drain,
    Incident,
    MemberRecord,
)

NOW = 1_000_000.0
REGIONS = ("east", "west", "central")


def policy(**kw: object) -> Policy:
    base = Policy(
        priorities=(("east", 100), ("west", 50), ("central", 50)),
        groups=(GroupPolicy("app", ("east", "west", "central")),),
        cooldown_s=300, max_evacuations_per_hour=3, failback="manual",
        failback_stable_s=60, bootstrap_grace_s=10, member_loss_grace_s=0,
    )
    return replace(base, **kw)  # type: ignore[arg-type]


def view(members: dict[str, str], active: dict[str, tuple[str, int, float, str]] | None = None,
         *, paused: bool = False, drained: frozenset[str] = frozenset(),
         incidents: tuple[float, ...] = (), started: float = NOW - 3600,
         absent_since: dict[str, float] | None = None,
         absent_answering: dict[str, str] | None = None) -> ClusterView:
    return ClusterView(
        revision=1, coordinator=None,
        members={m: MemberRecord(m, r, "0", "", started) for m, r in members.items()},
        active={g: ActiveRecord(region=r, epoch=e, since=s, reason="", term=1, trigger=t,
                                mod_revision=7)
                for g, (r, e, s, t) in (active or {}).items()},
        control=ControlState(paused=paused, drains=tuple(
            Drain(r, "op", NOW - 60, NOW + 3600) for r in sorted(drained)), incidents=tuple(
            Incident("evacuation", "elsewhere", "health", t) for t in incidents)),
        absent_since=absent_since or {},
        absent_answering=absent_answering or {},
    )


ALL = {"e1": "east", "w1": "west", "c1": "central"}
EAST_ACTIVE = {"app": ("east", 4, NOW - 10_000, "bootstrap")}
NO_EAST = {"w1": "west", "c1": "central"}


def changes(v: ClusterView, p: Policy | None = None) -> list[tuple[str, str, int, str]]:
    d = decide(v, p or policy(), NOW)
    return [(c.group, c.region, c.epoch, c.trigger) for c in d.changes]


def alerts(v: ClusterView, p: Policy | None = None) -> list[str]:
    return [i.group for i in decide(v, p or policy(), NOW).intents if isinstance(i, Alert)]


CASES: list[tuple[str, ClusterView, Policy, list[tuple[str, str, int, str]], list[str]]] = [
    ("bootstrap picks the highest priority region with members",
     view(ALL), policy(), [("app", "east", 1, "bootstrap")], []),
    ("bootstrap skips a drained region",
     view(ALL, drained=frozenset({"east"})), policy(), [("app", "central", 1, "bootstrap")], []),
    ("bootstrap ties on priority break by name",
     view(NO_EAST, started=NOW - 60), policy(), [("app", "central", 1, "bootstrap")], []),
    ("bootstrap waits for missing regions within the grace",
     view(NO_EAST, started=NOW - 2), policy(), [], []),
    ("bootstrap does not wait when every region is present",
     view(ALL, started=NOW - 1), policy(), [("app", "east", 1, "bootstrap")], []),
    ("bootstrap with no candidate alerts once the grace is over",
     view({"w1": "west"}, drained=frozenset({"west"})), policy(), [], ["app"]),
    ("bootstrap does not alert within the grace",
     view({"w1": "west"}, drained=frozenset({"west"}), started=NOW - 1), policy(), [], []),
    ("paused: no bootstrap", view(ALL, paused=True), policy(), [], []),
    ("healthy active region: nothing to do", view(ALL, EAST_ACTIVE), policy(), [], []),
    ("member loss fails over to the best candidate",
     view(NO_EAST, EAST_ACTIVE), policy(), [("app", "central", 5, "member_loss")], []),
    ("member loss within its grace holds",
     view(NO_EAST, EAST_ACTIVE, absent_since={"east": NOW - 3}),
     policy(member_loss_grace_s=5), [], []),
    ("member loss past its grace fails over",
     view(NO_EAST, EAST_ACTIVE, absent_since={"east": NOW - 6}),
     policy(member_loss_grace_s=5), [("app", "central", 5, "member_loss")], []),
    ("a memberless region whose members still answer their API holds (rule 4)",
     view(NO_EAST, EAST_ACTIVE, absent_since={"east": NOW - 60},
          absent_answering={"east": "e1 still answers"}),
     policy(member_loss_grace_s=5), [], []),
    ("a memberless region not yet asked holds until it is",
     view(NO_EAST, EAST_ACTIVE, absent_answering={"east": "not yet asked"}), policy(), [], []),
    ("member loss while paused holds",
     view(NO_EAST, EAST_ACTIVE, paused=True), policy(), [], []),
    ("member loss in cooldown still moves: never held in a dead region (rule 6)",
     view(NO_EAST, {"app": ("east", 4, NOW - 100, "member_loss")}), policy(),
     [("app", "central", 5, "member_loss")], ["app"]),
    ("cooldown does not apply after a bootstrap or operator change",
     view(NO_EAST, {"app": ("east", 4, NOW - 100, "operator")}), policy(),
     [("app", "central", 5, "member_loss")], []),
    ("cooldown over: fail over",
     view(NO_EAST, {"app": ("east", 4, NOW - 301, "member_loss")}), policy(),
     [("app", "central", 5, "member_loss")], []),
    ("cluster-wide limit reached: a dead region is still evacuated, with an alert",
     view(NO_EAST, EAST_ACTIVE, incidents=(NOW - 10, NOW - 20, NOW - 30)), policy(),
     [("app", "central", 5, "member_loss")], ["app"]),
    ("the limit counts only the last hour",
     view(NO_EAST, EAST_ACTIVE, incidents=(NOW - 4000, NOW - 5000, NOW - 30)), policy(),
     [("app", "central", 5, "member_loss")], []),
    ("no candidate: alert and stay",
     view({"w1": "west"}, EAST_ACTIVE, drained=frozenset({"west"})), policy(), [], ["app"]),
    ("a drained region is never a candidate",
     view(NO_EAST, EAST_ACTIVE, drained=frozenset({"central"})), policy(),
     [("app", "west", 5, "member_loss")], []),
    ("active region removed from the group by config moves",
     view(ALL, EAST_ACTIVE), policy(groups=(GroupPolicy("app", ("west", "central")),)),
     [("app", "central", 5, "config")], []),
    ("failback manual: stay on the lower-priority region",
     view(ALL, {"app": ("west", 5, NOW - 10_000, "member_loss")}), policy(), [], []),
    ("failback auto: back to the preferred region once stable",
     view(ALL, {"app": ("west", 5, NOW - 10_000, "member_loss")}),
     policy(failback="auto"), [("app", "east", 6, "failback")], []),
    ("failback auto: not before the preferred region is stable",
     view(ALL, {"app": ("west", 5, NOW - 10_000, "member_loss")}, started=NOW - 30),
     policy(failback="auto"), [], []),
    ("failback auto: not while paused",
     view(ALL, {"app": ("west", 5, NOW - 10_000, "member_loss")}, paused=True),
     policy(failback="auto"), [], []),
]


@pytest.mark.parametrize(("name", "v", "p", "want", "want_alerts"), CASES,
                         ids=[c[0] for c in CASES])
def test_rule(name: str, v: ClusterView, p: Policy, want: list[tuple[str, str, int, str]],
              want_alerts: list[str]) -> None:
    assert changes(v, p) == want
    assert alerts(v, p) == want_alerts


def test_reason_is_one_line_naming_every_group() -> None:
    p = policy(groups=(GroupPolicy("a", ("east", "west")), GroupPolicy("b", ("west",))))
    d = decide(view(NO_EAST, {"a": ("east", 1, NOW - 10_000, "bootstrap")}), p, NOW)
    assert "\n" not in d.reason
    assert d.reason.startswith("a: failover east -> west") and "b: bootstrap -> west" in d.reason


# -- properties -----------------------------------------------------------

region_sets = st.frozensets(st.sampled_from(REGIONS))
members_st = st.dictionaries(st.sampled_from(["m1", "m2", "m3", "m4"]),
                             st.sampled_from(REGIONS), max_size=4)
active_st = st.none() | st.tuples(
    st.sampled_from(REGIONS), st.integers(1, 50), st.floats(NOW - 5000, NOW),
    st.sampled_from(["bootstrap", "member_loss", "operator", "failback"]))
policy_st = st.builds(
    lambda cd, mx, fb, bg: policy(cooldown_s=cd, max_evacuations_per_hour=mx, failback=fb,
                                  bootstrap_grace_s=bg),
    st.floats(0, 1000), st.integers(0, 5), st.sampled_from(["manual", "auto"]),
    st.floats(0, 100))


@st.composite
def views(draw: st.DrawFn) -> ClusterView:
    act = draw(active_st)
    return view(draw(members_st), {"app": act} if act else {}, paused=draw(st.booleans()),
                drained=draw(region_sets),
                incidents=tuple(draw(st.lists(st.floats(NOW - 7200, NOW), max_size=5))),
                started=draw(st.floats(NOW - 5000, NOW)))


@given(views(), policy_st)
def test_property_chosen_region_is_a_valid_candidate(v: ClusterView, p: Policy) -> None:
    for c in decide(v, p, NOW).changes:
        assert c.region in p.groups[0].regions
        assert c.region in v.regions_with_members()
        assert c.region not in v.control.drained
        assert not v.control.paused
        prev = v.active.get(c.group)
        if prev is not None:
            assert c.region != prev.region
            assert c.epoch == prev.epoch + 1
        else:
            assert c.epoch == 1


@given(views(), policy_st)
def test_property_decision_is_a_function_of_its_inputs(v: ClusterView, p: Policy) -> None:
    assert decide(v, p, NOW) == decide(v, p, NOW)


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(1, 120), region_sets), min_size=1, max_size=40),
       st.floats(0, 600), st.integers(0, 4))
def test_property_never_held_in_a_dead_region(
        steps: list[tuple[float, frozenset[str]]], cooldown: float, per_hour: int) -> None:
    """Simulate membership churn over time, committing every decision as the
    coordinator would: whatever the guards, a group whose region has no
    members is moved as soon as another region has some (rule 6)."""
    p = policy(cooldown_s=cooldown, max_evacuations_per_hour=per_hour,
               max_auto_failovers_per_group_per_hour=per_hour, bootstrap_grace_s=0)
    now = NOW
    rec: ActiveRecord | None = None
    incidents: list[Incident] = []
    for dt, up in steps:
        now += dt
        v = view({f"m-{r}": r for r in up}, {}, started=now - 10_000)
        v = replace(v, control=replace(v.control, incidents=tuple(incidents)))
        if rec is not None:
            v = replace(v, active={"app": rec})
        d = decide(v, p, now)
        if rec is not None and rec.region not in up and up:
            assert [c.region for c in d.changes] == [max(up, key=lambda r: (
                p.priority(r), [-ord(ch) for ch in r]))]
        for c in d.changes:
            rec = ActiveRecord(c.region, c.epoch, now, c.reason, 1, c.trigger,
                               auto_moves=c.auto_moves)
        incidents += d.incidents


@settings(max_examples=200)
@given(st.lists(st.tuples(st.floats(1, 400), st.sampled_from(REGIONS)), min_size=1,
                max_size=30),
       st.floats(0, 600), st.integers(0, 4), st.integers(0, 4))
def test_property_health_moves_respect_cooldown_and_limits(
        steps: list[tuple[float, str]], cooldown: float, per_group: int, per_hour: int
) -> None:
    """Health is the flapping kind: a region judged down by quorum at random
    times.  Moves it triggers respect the per-group cooldown and hourly
    limit, and the cluster-wide evacuation limit."""
    p = replace(PROBED, cooldown_s=cooldown, max_evacuations_per_hour=per_hour,
                max_auto_failovers_per_group_per_hour=per_group)
    now = NOW
    rec = ActiveRecord("east", 1, NOW - 10_000, "", 1, "bootstrap")
    moves: list[float] = []
    incidents: list[Incident] = []
    for dt, down in steps:
        now += dt
        v = all_up(view(OBSERVERS, {}, started=now - 10_000))
        v = seen(v, down, {m: "down" for m in OBSERVERS})
        v = replace(v, active={"app": rec},
                    control=replace(v.control, incidents=tuple(incidents)))
        d = decide(v, p, now)
        for c in d.changes:
            assert c.trigger == "health"
            assert not moves or now - moves[-1] >= cooldown
            assert sum(1 for t in moves if now - t < 3600) < per_group
            assert sum(1 for i in incidents if now - i.at < 3600) < per_hour
            moves.append(now)
            rec = ActiveRecord(c.region, c.epoch, now, c.reason, 1, c.trigger,
                               auto_moves=c.auto_moves)
        incidents += d.incidents


# -- health: quorum verdicts, trigger, candidacy -----------------------------

from failoverd.core.engine import region_health  # noqa: E402
from failoverd.core.model import Observation  # noqa: E402

OBSERVERS = {"e1": "east", "w1": "west", "w2": "west", "c1": "central"}
PROBED = policy(probed_regions=frozenset(REGIONS), bootstrap_grace_s=0)


def seen(v: ClusterView, target: str, verdicts: dict[str, str],
         ready: dict[str, bool] | None = None) -> ClusterView:
    obs = dict(v.observations)
    for member, verdict in verdicts.items():
        obs[(member, target)] = Observation(member, target, verdict,
                                            (ready or {}).get(member, True), NOW - 100, NOW)
    return replace(v, observations=obs)


def all_up(v: ClusterView) -> ClusterView:
    for r in REGIONS:
        v = seen(v, r, dict.fromkeys(v.members, "up"))
    return v


QUORUM_CASES = [
    ("every observer region sees it up", {"e1": "up", "w1": "up", "w2": "up", "c1": "up"},
     "up"),
    ("one remote region down is outvoted", {"e1": "up", "w1": "down", "w2": "down",
                                           "c1": "up"}, "up"),
    ("both remote regions down", {"e1": "up", "w1": "down", "w2": "down", "c1": "down"},
     "down"),
    ("one remote region plus the target's own view make a quorum",
     {"e1": "down", "w1": "down", "w2": "down", "c1": "up"}, "down"),
    ("the target's own view never decides alone", {"e1": "down"}, "unknown"),
    ("a split region casts no vote", {"e1": "up", "w1": "down", "w2": "up", "c1": "down"},
     "unknown"),
    ("unknown observers leave it unknown", {"w1": "unknown", "w2": "unknown", "c1": "down"},
     "unknown"),
]


@pytest.mark.parametrize(("name", "verdicts", "want"), QUORUM_CASES,
                         ids=[c[0] for c in QUORUM_CASES])
def test_quorum_verdict(name: str, verdicts: dict[str, str], want: str) -> None:
    v = seen(view(OBSERVERS), "east", verdicts)
    assert region_health(v, PROBED, "east").verdict == want


def test_two_regions_one_remote_observer_is_a_quorum() -> None:
    v = seen(view({"e1": "east", "w1": "west"}), "east", {"w1": "down", "e1": "up"})
    h = region_health(v, PROBED, "east")
    assert (h.verdict, h.quorum) == ("down", 1)


def test_explicit_quorum_counts_the_targets_own_view_once() -> None:
    v = seen(view(OBSERVERS), "east", dict.fromkeys(OBSERVERS, "down"))
    assert region_health(v, replace(PROBED, health_quorum=3), "east").verdict == "down"
    assert region_health(v, replace(PROBED, health_quorum=4), "east").verdict == "unknown"


def test_observations_of_dead_members_do_not_vote() -> None:
    v = seen(view({"e1": "east"}), "east", {"w1": "down", "c1": "down"})
    assert region_health(v, PROBED, "east").verdict == "unknown"


def test_unprobed_region_is_judged_by_membership_only() -> None:
    assert region_health(view(OBSERVERS), policy(), "east").verdict == "unprobed"


def test_health_trigger_fails_over_to_the_best_healthy_candidate() -> None:
    v = all_up(view(OBSERVERS, EAST_ACTIVE))
    v = seen(v, "east", {"w1": "down", "w2": "down", "c1": "down"})
    v = seen(v, "west", {"e1": "down", "c1": "down", "w1": "down", "w2": "down"})
    d = decide(v, PROBED, NOW)
    assert [(c.region, c.trigger) for c in d.changes] == [("central", "health")]
    assert "east is down (quorum 2 of 2 remote regions" in d.changes[0].reason


def test_not_ready_region_is_no_candidate() -> None:
    v = all_up(view(OBSERVERS, EAST_ACTIVE))
    v = seen(v, "east", {"w1": "down", "w2": "down", "c1": "down"})
    v = seen(v, "west", dict.fromkeys(OBSERVERS, "up"), ready=dict.fromkeys(OBSERVERS, False))
    assert [c.region for c in decide(v, PROBED, NOW).changes] == ["central"]


def test_no_healthy_candidate_alerts_and_stays() -> None:
    v = all_up(view(OBSERVERS, EAST_ACTIVE))
    for r in REGIONS:
        v = seen(v, r, dict.fromkeys(OBSERVERS, "down"))
    d = decide(v, PROBED, NOW)
    assert d.changes == () and [type(i) for i in d.intents] == [Alert]


def test_members_gone_but_region_answers_holds() -> None:
    v = all_up(view({"w1": "west", "c1": "central"}, EAST_ACTIVE))
    d = decide(v, PROBED, NOW)
    assert d.changes == () and "holding" in d.reason


def test_bootstrap_waits_for_probed_regions_to_be_judged() -> None:
    v = all_up(view(OBSERVERS, started=NOW - 1))
    v = replace(v, observations={k: o for k, o in v.observations.items() if k[1] != "east"})
    p = replace(PROBED, bootstrap_grace_s=10)
    assert decide(v, p, NOW).changes == ()
    assert [c.region for c in decide(all_up(view(OBSERVERS, started=NOW - 1)), p,
                                     NOW).changes] == ["east"]


verdict_st = st.sampled_from(["up", "down", "unknown"])


@given(views(), st.dictionaries(st.tuples(st.sampled_from(["m1", "m2", "m3", "m4"]),
                                          st.sampled_from(REGIONS)),
                                st.tuples(verdict_st, st.booleans()), max_size=12))
def test_property_chosen_region_is_healthy_by_quorum(
        v: ClusterView, obs: dict[tuple[str, str], tuple[str, bool]]) -> None:
    v = replace(v, observations={k: Observation(k[0], k[1], vd, rd, NOW - 10, NOW)
                                 for k, (vd, rd) in obs.items()})
    for c in decide(v, PROBED, NOW).changes:
        h = region_health(v, PROBED, c.region)
        assert h.verdict == "up" and h.ready


# -- power: trigger, budget, candidacy ----------------------------------------

from failoverd.core.power import Reading  # noqa: E402
from failoverd.daemon.coordinator import learn_failover_s  # noqa: E402

POWERED = policy(power_grace_s=30, power_runtime_margin_s=120, sensor_stale_s=30,
                 expected_failover_s=60)


def powered(v: ClusterView, region: str, *states: tuple[str, float | None, float]
            ) -> ClusterView:
    """Relay (state, runtime, seconds in that state) readings for ``region``."""
    p = dict(v.power)
    for i, (state, runtime, age) in enumerate(states):
        p[(region, f"s{i}")] = [Reading(region, f"s{i}", state, NOW - age, NOW, runtime, None,
                                        NOW - age)]
    return replace(v, power=p)


POWER_CASES = [
    ("generator failed: planned failover", [("generator_failed", None, 5)], "central", True),
    ("utility lost within grace: hold", [("utility_lost", None, 5)], None, False),
    ("utility lost past grace with no generator: fail over", [("utility_lost", None, 40)],
     "central", True),
    ("on generator: hold", [("utility_lost", None, 40), ("on_generator", None, 30)], None,
     False),
    ("on battery above the budget: hold", [("on_battery", 900, 5)], None, False),
    ("on battery under the budget (60 + 120 s): fail over", [("on_battery", 170, 5)], "central",
     True),
    ("stale sensor: unknown, hold", [], None, False),
]


@pytest.mark.parametrize(("name", "states", "to", "planned"), POWER_CASES,
                         ids=[c[0] for c in POWER_CASES])
def test_power_trigger(name: str, states: list[tuple[str, float | None, float]],
                       to: str | None, planned: bool) -> None:
    v = powered(view(ALL, EAST_ACTIVE), "east", *states)
    d = decide(v, POWERED, NOW)
    assert [c.region for c in d.changes] == ([to] if to else [])
    if to:
        assert d.changes[0].trigger == "power" and d.changes[0].planned is planned


def test_learned_duration_shrinks_the_budget() -> None:
    v = powered(view(ALL, EAST_ACTIVE), "east", ("on_battery", 170, 5))
    assert decide(replace(v, learned_failover_s=10), POWERED, NOW).changes == ()


def test_power_degraded_region_is_no_candidate() -> None:
    v = view(NO_EAST, EAST_ACTIVE)
    v = powered(v, "west", ("on_generator", None, 5))
    assert [c.region for c in decide(v, POWERED, NOW).changes] == ["central"]


def test_learn_failover_duration_from_history() -> None:
    events = []
    for epoch, (start, took) in enumerate([(100.0, 4.0), (200.0, 6.5), (300.0, 5.0)], 2):
        events += [{"kind": "epoch_changed", "group": "app", "epoch": epoch, "ts": start,
                    "previous_epoch": epoch - 1},
                   {"kind": "promote_done", "group": "app", "epoch": epoch, "ts": start + took},
                   {"kind": "promote_done", "group": "app", "epoch": epoch,
                    "ts": start + took + 3}]
    assert learn_failover_s(events[:4]) is None  # fewer than three measured
    assert learn_failover_s(events) == 6.5


# -- safety rule 4: self-fencing decision ---------------------------------------

from failoverd.daemon.isolation import isolation_decision  # noqa: E402


def test_isolation_decision() -> None:
    active = {"app": 3, "db": 5}
    assert set(isolation_decision(active, [])) == {"app", "db"}  # nobody answers: fence
    assert isolation_decision(active, [{"app": 3, "db": 5}]) == {}  # peers agree: hold
    assert isolation_decision(active, [{"app": 3}, {"app": 4, "db": 5}]) == {
        "app": "a peer reports epoch 4 > our 3"}


# -- retry of a failed saga ------------------------------------------------------
from failoverd.core.engine import handle_request  # noqa: E402
from failoverd.core.model import OperatorRequest  # noqa: E402
from failoverd.core.workflow import Step, Workflow  # noqa: E402


def _saga(epoch: int, state: str, failed_at: str | None = None) -> Workflow:
    """A forced saga: every step before ``failed_at`` done, that one failed."""
    wf = Workflow.new("app", epoch, "east", "west", "forced", NOW - 60)
    names = [s.name for s in wf.steps]
    cut = names.index(failed_at) if failed_at else 0
    steps = [replace(s, state="done") if i < cut else s for i, s in enumerate(wf.steps)]
    if failed_at:
        steps[cut] = replace(steps[cut], state="failed", attempts=3, error="exec: exit 1")
    return replace(wf, steps=tuple(steps), state=state, mod_revision=11)


@pytest.mark.parametrize(("name", "wf", "accepted", "reason"), [
    ("failed saga of the current epoch", _saga(5, "failed", "reroute"), True,
     "saga app-5 retried at reroute by ops"),
    ("running saga", _saga(5, "running"), False, "the app saga is running, not failed"),
    ("saga of an older epoch", _saga(4, "failed", "reroute"), False,
     "app has no saga for its current epoch"),
    ("no saga", None, False, "app has no saga for its current epoch"),
])
def test_retry_request(name: str, wf: Workflow | None, accepted: bool, reason: str) -> None:
    v = replace(view(ALL, {"app": ("west", 5, NOW - 60, "health")}),
                workflows={"app": wf} if wf else {})
    req = OperatorRequest("r1", "retry", "ops", NOW, group="app")
    out = handle_request(v, policy(), req, NOW)
    assert (out.accepted, out.reason) == (accepted, reason), name
    assert out.change is None  # a retry never changes the active record


def test_retried_saga_resumes_at_the_failed_step_keeping_the_done_ones() -> None:
    wf = _saga(5, "failed", "reroute")
    again = wf.retried(NOW)
    assert again.state == "running" and again.error == ""
    assert [(s.name, s.state, s.attempts) for s in again.steps] == [
        ("precheck", "done", 0), ("fence_old", "done", 0), ("promote_new", "done", 0),
        ("reroute", "pending", 0), ("verify", "pending", 0), ("demote_old", "pending", 0)]
    assert again.current() == Step("reroute")


# -- region evacuation (rule 6) ---------------------------------------------------

MANY = tuple(GroupPolicy(f"g{i:02d}", ("east", "west", "central")) for i in range(10))


def many_active(region: str = "east", since: float = NOW - 10_000, trigger: str = "bootstrap",
                n: int = 10) -> dict[str, tuple[str, int, float, str]]:
    return {f"g{i:02d}": (region, 3, since, trigger) for i in range(n)}


def test_power_event_evacuates_every_group_in_one_cycle_as_one_incident() -> None:
    v = powered(view(ALL, many_active()), "east", ("generator_failed", None, 1))
    d = decide(v, replace(POWERED, groups=MANY), NOW)
    assert sorted(c.group for c in d.changes) == [g.name for g in MANY]
    assert {c.region for c in d.changes} == {"central"}  # best candidate (name breaks tie)
    assert all(c.planned and c.evacuation == "east" for c in d.changes)
    assert len(d.evacuations) == 1 and d.evacuations[0].trigger == "power"
    assert "s0:generator_failed" in d.evacuations[0].evidence
    assert [(i.kind, i.region, i.groups) for i in d.incidents] == [("evacuation", "east", 10)]


def test_cluster_limit_counts_evacuations_not_group_moves() -> None:
    """Two evacuations an hour allowed, 10 groups each: both move whole."""
    p = replace(POWERED, groups=MANY, max_evacuations_per_hour=2)
    v = powered(view(ALL, many_active()), "east", ("generator_failed", None, 1))
    assert len(decide(v, p, NOW).changes) == 10
    v2 = replace(v, control=replace(v.control, incidents=(
        Incident("evacuation", "west", "power", NOW - 100),)))
    assert len(decide(v2, p, NOW).changes) == 10


def test_dying_region_is_evacuated_despite_every_guard_and_says_so() -> None:
    """Cooldown, per-group limit and cluster-wide limit all exhausted: the
    groups still leave a power-critical region, and an alert says why."""
    recent = (NOW - 50, NOW - 40, NOW - 30)
    active = {f"g{i:02d}": ("east", 3, NOW - 10, "power") for i in range(10)}
    v = powered(view(ALL, active, incidents=recent), "east", ("generator_failed", None, 1))
    v = replace(v, active={g: replace(r, auto_moves=recent) for g, r in v.active.items()})
    d = decide(v, replace(POWERED, groups=MANY), NOW)
    assert len(d.changes) == 10
    ev = d.evacuations[0]
    assert len(ev.overridden) == 10
    assert all("cooldown" in c.overrode[0] for c in d.changes)
    assert any("max_evacuations_per_hour" in o for c in d.changes for o in c.overrode)
    assert {i.group for i in d.intents if isinstance(i, Alert)} == {g.name for g in MANY}


def test_dead_region_evacuated_past_member_loss_grace_even_after_a_power_evacuation() -> None:
    """east lost power (3 groups moved earlier), then its daemons died with
    it: the 7 groups left there move now, whatever the guards."""
    active = {f"g{i:02d}": ("east", 3, NOW - 5, "bootstrap") for i in range(3, 10)}
    v = view(NO_EAST, active, incidents=(NOW - 20, NOW - 15, NOW - 5),
             absent_since={"east": NOW - 30})
    d = decide(v, replace(policy(member_loss_grace_s=5), groups=MANY[3:]), NOW)
    assert sorted(c.group for c in d.changes) == [f"g{i:02d}" for i in range(3, 10)]
    assert d.evacuations[0].trigger == "member_loss"


def test_health_evacuation_is_held_by_the_cluster_limit_with_one_alert_reason() -> None:
    p = replace(PROBED, groups=MANY, max_evacuations_per_hour=1)
    v = all_up(view(OBSERVERS, many_active(), incidents=(NOW - 100,)))
    v = seen(v, "east", {m: "down" for m in OBSERVERS})
    d = decide(v, p, NOW)
    assert d.changes == ()
    reasons = {i.reason for i in d.intents if isinstance(i, Alert)}
    assert len(reasons) == 1 and "max_evacuations_per_hour" in reasons.pop()


def test_flapping_health_target_is_held_by_the_per_group_cooldown() -> None:
    v = all_up(view(OBSERVERS, {"app": ("east", 4, NOW - 100, "health")}))
    v = seen(v, "east", {m: "down" for m in OBSERVERS})
    d = decide(v, PROBED, NOW)
    assert d.changes == ()
    assert "cooldown" in d.reason


def test_per_group_hourly_limit_holds_a_health_move() -> None:
    v = all_up(view(OBSERVERS, {"app": ("east", 4, NOW - 1000, "health")}))
    v = seen(v, "east", {m: "down" for m in OBSERVERS})
    moves = (NOW - 3000, NOW - 2000, NOW - 1000)
    v = replace(v, active={"app": replace(v.active["app"], auto_moves=moves)})
    d = decide(v, replace(PROBED, cooldown_s=0), NOW)
    assert d.changes == ()
    assert any("per_group_per_hour" in i.reason for i in d.intents if isinstance(i, Alert))


def test_stragglers_continue_the_open_incident() -> None:
    """Groups held by their cooldown leave later as part of the same
    evacuation: the incident is not counted twice."""
    p = replace(PROBED, max_evacuations_per_hour=1)
    v = all_up(view(OBSERVERS, {"app": ("east", 4, NOW - 1000, "health")}))
    v = seen(v, "east", {m: "down" for m in OBSERVERS})
    v = replace(v, control=replace(v.control, incidents=(
        Incident("evacuation", "east", "health", NOW - 200),)))
    d = decide(v, replace(p, cooldown_s=300), NOW)
    assert [c.region for c in d.changes] == ["central"]  # not held by the limit
    assert d.incidents == () and not d.evacuations[0].new_incident


def test_power_quorum_in_the_policy() -> None:
    v = powered(view(ALL, EAST_ACTIVE), "east", ("generator_failed", None, 1),
                ("utility_ok", None, 1))
    p = replace(POWERED, power_quorums=(("east", 2),))
    assert decide(v, p, NOW).changes == ()
    v2 = powered(view(ALL, EAST_ACTIVE), "east", ("generator_failed", None, 1),
                 ("transfer_failed", None, 1))
    assert len(decide(v2, p, NOW).changes) == 1


def test_on_battery_runtime_counting_down_crosses_the_budget() -> None:
    """300 s left when said, silent on the runtime since: under the 180 s
    budget 121 s later, with no new message."""
    v = view(ALL, EAST_ACTIVE)
    v = replace(v, power={("east", "ups"): [Reading("east", "ups", "on_battery", NOW, NOW, 300,
                                                    None, NOW)]})
    p = replace(POWERED, power_grace_s=10_000, power_silence_during_outage_s=10_000)
    assert decide(v, p, NOW + 119).changes == ()
    assert [c.trigger for c in decide(v, p, NOW + 121).changes] == ["power"]


@given(st.integers(1, 30), st.sampled_from(["power", "member_loss"]),
       st.lists(st.floats(NOW - 4000, NOW), max_size=6), st.floats(0, 600))
def test_property_urgent_evacuation_moves_every_group_with_a_candidate(
        n: int, trigger: str, recent: list[float], cooldown: float) -> None:
    groups = tuple(GroupPolicy(f"g{i}", ("east", "west")) for i in range(n))
    active = {f"g{i}": ("east", 2, NOW - 5, "health") for i in range(n)}
    if trigger == "power":
        v = powered(view(ALL, active, incidents=tuple(recent)), "east",
                    ("shutdown_imminent", None, 1))
    else:
        v = view(NO_EAST, active, incidents=tuple(recent))
    v = replace(v, active={g: replace(r, auto_moves=tuple(recent))
                           for g, r in v.active.items()})
    p = replace(POWERED, groups=groups, cooldown_s=cooldown, max_evacuations_per_hour=1,
                max_auto_failovers_per_group_per_hour=1)
    d = decide(v, p, NOW)
    assert len(d.changes) == n and {c.region for c in d.changes} == {"west"}
    assert len(d.evacuations) == 1 and len(d.evacuations[0].moves) == n


def test_the_keyspace_table_builds_and_parses_every_key() -> None:
    """One table spells the keyspace both ways: every key Keyspace builds
    parses back to its kind and fields; keys outside the table do not."""
    from failoverd.core.model import KEY_SHAPES, Keyspace  # noqa: PLC0415

    keys = Keyspace("c1")
    built = {
        "coordinator": (keys.coordinator, {}),
        "member": (keys.member("east-1"), {"member": "east-1"}),
        "observation": (keys.observation("east-1", "west"),
                        {"member": "east-1", "target": "west"}),
        "power": (keys.power("east", "ups1", "west-1"),
                  {"region": "east", "sensor": "ups1", "member": "west-1"}),
        "active": (keys.active("app"), {"group": "app"}),
        "workflow": (keys.workflow("app"), {"group": "app"}),
        "ack": (keys.ack("app", "west-1"), {"group": "app", "member": "west-1"}),
        "data": (keys.data("app", "west-1"), {"group": "app", "member": "west-1"}),
        "paused": (keys.paused, {}),
        "drained": (keys.drained("west"), {"region": "west"}),
        "request": (keys.request("r1"), {"request": "r1"}),
        "result": (keys.result("r1"), {"request": "r1"}),
        "storm": (keys.storm, {}),
        "drill": (keys.drill("app"), {"group": "app"}),
        "live_drill": (keys.live_drill("app"), {"group": "app"}),
        "history_event": (keys.history_event(5, "m"), {"event": f"{5:020d}-m"}),
    }
    assert set(built) == set(KEY_SHAPES)
    for kind, (key, fields) in built.items():
        parsed = keys.parse(key)
        assert parsed is not None and (parsed.kind, dict(parsed.fields)) == (kind, fields), key
    for stray in ("/failoverd/c1/groups/app/fence", "/failoverd/c1/power/east/ups1/",
                  "/failoverd/c1/members/a/b", "/failoverd/c2/coordinator", "elsewhere"):
        assert keys.parse(stray) is None, stray


# -- drains expire -------------------------------------------------------------
from failoverd.core.durations import format_duration, parse_duration  # noqa: E402
from failoverd.core.engine import expired_drains, is_drained  # noqa: E402


@pytest.mark.parametrize(("for_s", "accepted", "reason", "until"), [
    (None, True, "west drained by ops for 4h", NOW + 4 * 3600),  # the configured default
    (900.0, True, "west drained by ops for 15m", NOW + 900),
    (72 * 3600.0, True, "west drained by ops for 3d", NOW + 72 * 3600),
    (72 * 3600.0 + 1, False, "a drain lasts at most drain_max_s (3d), not 3d1s", None),
])
def test_drain_request_takes_the_default_and_refuses_past_the_maximum(
        for_s: float | None, accepted: bool, reason: str, until: float | None) -> None:
    req = OperatorRequest("r1", "drain", "ops", NOW, region="west", for_s=for_s)
    out = handle_request(view(ALL), policy(), req, NOW)
    assert (out.accepted, out.reason, out.until) == (accepted, reason, until)


def _drains(*drains: Drain) -> ClusterView:
    v = view(ALL)
    return replace(v, control=replace(v.control, drains=drains))


def test_a_drain_counts_until_it_ends_and_is_then_listed_for_expiry() -> None:
    timed = Drain("west", "ops", NOW - 100, NOW + 50)
    legacy = Drain("central", "ops", NOW - 72 * 3600 + 10, None)  # written before expiry
    v = _drains(timed, legacy)
    p = policy()
    assert is_drained(v, p, "west", NOW) and is_drained(v, p, "central", NOW)
    assert expired_drains(v, p, NOW) == []
    assert not is_drained(v, p, "central", NOW + 10)  # drain_max_s after it began
    assert expired_drains(v, p, NOW + 10) == [legacy]
    assert not is_drained(v, p, "west", NOW + 50)
    assert expired_drains(v, p, NOW + 50) == [timed, legacy]


def test_a_region_whose_drain_ended_is_a_candidate_again() -> None:
    east_gone = {"w1": "west", "c1": "central"}
    v = replace(_drains(Drain("west", "ops", NOW - 100, NOW + 50)),
                members={m: MemberRecord(m, r, "0", "", NOW - 3600) for m, r in east_gone.items()})
    p = policy(priorities=(("east", 100), ("west", 50), ("central", 10)))
    assert [(c.region, c.epoch) for c in decide(v, p, NOW).changes] == [("central", 1)]
    assert [(c.region, c.epoch) for c in decide(v, p, NOW + 60).changes] == [("west", 1)]


@pytest.mark.parametrize(("text", "seconds"), [
    ("90s", 90), ("15m", 900), ("4h", 14400), ("3d", 259200), ("1h30m", 5400),
    ("3600", 3600), ("0.5h", 1800), (" 2H ", 7200)])
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "4x", "h", "-5m", "0", "4h junk", "1e999", "nan"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10 ** 8))
def test_formatted_durations_parse_back(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


# -- drills (dry run) ----------------------------------------------------------
from failoverd.core.drill import drill_checks  # noqa: E402


def _failed(checks: list) -> dict[str, str]:
    return {c.name: c.detail for c in checks if not c.ok}


def test_a_drill_to_the_engines_choice_passes_the_pure_checks() -> None:
    v = view(ALL, EAST_ACTIVE)
    p = policy(priorities=(("east", 100), ("west", 50), ("central", 10)))
    checks, move = drill_checks(v, p, "app", "west", NOW)
    assert _failed(checks) == {}
    assert move is not None and (move.region, move.epoch, move.planned) == ("west", 5, True)
    assert "a power failure of east moves app to west (planned, epoch 5)" in [
        c.detail for c in checks]
    assert v.power == {}  # the simulated sensor stays in the drill


@pytest.mark.parametrize(("name", "v", "to", "learned", "failed"), [
    ("the target is drained: not a candidate, the engine picks another",
     view(ALL, EAST_ACTIVE, drained=frozenset({"west"})), "west", None,
     {"west drain", "engine"}),
    ("the target has no members",
     view({"e1": "east", "c1": "central"}, EAST_ACTIVE), "west", None,
     {"west members", "engine"}),
    ("paused: a real event would move nothing",
     view(ALL, EAST_ACTIVE, paused=True), "west", None, {"automatic actions", "engine"}),
    ("the target is already active", view(ALL, EAST_ACTIVE), "east", None,
     {"active region", "engine"}),
    ("failovers take longer than the budget assumes", view(ALL, EAST_ACTIVE), "west", 95.0,
     {"failover budget"}),
])
def test_a_drill_says_what_would_fail(name: str, v: ClusterView, to: str,
                                      learned: float | None, failed: set[str]) -> None:
    p = policy(priorities=(("east", 100), ("west", 50), ("central", 10)),
               expected_failover_s=60.0)
    checks, move = drill_checks(v, p, "app", to, NOW, learned)
    assert set(_failed(checks)) == failed, (name, _failed(checks))
    assert (move is None) == ("engine" in failed), name


def test_a_drill_of_an_unknown_group_or_region_is_one_failed_check() -> None:
    v = view(ALL, EAST_ACTIVE)
    assert [c.name for c in drill_checks(v, policy(), "nope", "west", NOW)[0]] == ["group"]
    assert [c.name for c in drill_checks(v, policy(), "app", "mars", NOW)[0]] == ["target"]


# -- live drills (the coordinator's state machine) -------------------------------
from failoverd.core.drill import (  # noqa: E402
    advance_live_drill,
    handle_drill_request,
    live_drill_refusal,
)
from failoverd.core.model import LiveDrill  # noqa: E402


def _drill_request(action: str = "drill", to: str = "west", hold: float | None = 30.0
                   ) -> OperatorRequest:
    return OperatorRequest("r1", action, "ops", NOW, group="app", region=to, for_s=hold)


def _with(v: ClusterView, *, region: str, epoch: int, trigger: str = "drill",
          since: float = NOW, saga: str | None = None, drill: LiveDrill | None = None,
          error: str = "") -> ClusterView:
    """``v`` with app active in ``region`` at ``epoch``, its saga in state
    ``saga`` (created 2 s before it was last updated) and the live drill."""
    rec = ActiveRecord(region=region, epoch=epoch, since=since, reason="", term=1,
                       trigger=trigger, mod_revision=epoch * 10)
    workflows = dict(v.workflows)
    if saga is not None:
        wf = Workflow.new("app", epoch, "east", region, "planned", NOW - 2)
        workflows["app"] = replace(wf, state=saga, updated=NOW, error=error)
    drills = dict(v.live_drills)
    if drill is not None:
        drills["app"] = drill
    return replace(v, active={**v.active, "app": rec}, workflows=workflows,
                   live_drills=drills)


def test_a_live_drill_switches_out_holds_and_comes_back() -> None:
    p = policy()
    v = view(ALL, EAST_ACTIVE)
    out = handle_drill_request(v, p, _drill_request(), NOW)
    assert out.accepted and out.change is not None and out.drill is not None
    assert (out.change.region, out.change.epoch, out.change.planned, out.change.trigger) == (
        "west", 5, True, "drill")
    d = out.drill
    assert (d.phase, d.home, d.to, d.out_epoch, d.hold_s) == ("switching", "east", "west", 5,
                                                                30.0)
    # The switchover's saga still runs: nothing to do.
    running = _with(v, region="west", epoch=5, saga="running", drill=d)
    assert advance_live_drill(d, running, p, NOW) == (d, None)
    # Its saga is done: hold (and the engine's failback waits for the drill).
    done = _with(v, region="west", epoch=5, saga="done", drill=d)
    held, change = advance_live_drill(d, done, p, NOW)
    assert change is None and (held.phase, held.switched_at, held.out_s) == ("holding", NOW, 2.0)
    assert advance_live_drill(held, done, p, NOW + 29.9) == (held, None)
    # The hold is over: back to east, planned, at the next epoch.
    back, change = advance_live_drill(held, done, p, NOW + 30)
    assert change is not None and (change.region, change.epoch, change.planned) == (
        "east", 6, True)
    assert (back.phase, back.back_epoch) == ("returning", 6)
    home = _with(v, region="east", epoch=6, saga="done", drill=back)
    end, change = advance_live_drill(back, home, p, NOW + 40)
    assert change is None and (end.phase, end.back_s, end.reason, end.ended) == (
        "done", 2.0, "", NOW + 40)
    assert advance_live_drill(end, home, p, NOW + 50) == (end, None)  # over


def test_a_failed_switchover_rolls_back_and_a_foreign_move_aborts() -> None:
    p = policy()
    v = view(ALL, EAST_ACTIVE)
    d = handle_drill_request(v, p, _drill_request(), NOW).drill
    assert d is not None
    failed = _with(v, region="west", epoch=5, saga="failed", drill=d, error="verify: 503")
    back, change = advance_live_drill(d, failed, p, NOW + 5)
    assert change is not None and (change.region, change.epoch) == ("east", 6)
    assert back.phase == "returning" and "failed: verify: 503; rolled back" in back.reason
    end, _ = advance_live_drill(back, _with(v, region="east", epoch=6, saga="done"), p, NOW + 9)
    assert end.phase == "failed"
    # A power event moved the group elsewhere mid-drill: nothing is switched back.
    moved = _with(v, region="central", epoch=6, trigger="power", saga="running", drill=d)
    end, change = advance_live_drill(d, moved, p, NOW + 5)
    assert change is None and end.phase == "aborted" and "by power" in end.reason


def test_an_aborted_live_drill_comes_back_and_says_aborted() -> None:
    p = policy()
    v = view(ALL, EAST_ACTIVE)
    d = handle_drill_request(v, p, _drill_request(hold=3600), NOW).drill
    assert d is not None
    held, _ = advance_live_drill(d, _with(v, region="west", epoch=5, saga="done", drill=d), p,
                                 NOW)
    in_hold = _with(v, region="west", epoch=5, saga="done", drill=held)
    out = handle_drill_request(in_hold, p, _drill_request("drill_abort"), NOW + 1)
    assert out.accepted and out.drill is not None and out.drill.abort_by == "ops"
    back, change = advance_live_drill(out.drill, in_hold, p, NOW + 1)
    assert change is not None and change.region == "east" and back.phase == "returning"
    end, _ = advance_live_drill(back, _with(v, region="east", epoch=6, saga="done"), p, NOW + 5)
    assert end.phase == "aborted" and "aborted by ops" in end.reason
    # Nothing to abort any more.
    assert not handle_drill_request(_with(v, region="east", epoch=6, drill=end), p,
                                    _drill_request("drill_abort"), NOW + 6).accepted


def test_a_live_drill_that_cannot_come_back_fails_and_stays() -> None:
    p = policy()
    v = view(ALL, EAST_ACTIVE)
    d = handle_drill_request(v, p, _drill_request(), NOW).drill
    assert d is not None
    held, _ = advance_live_drill(d, _with(v, region="west", epoch=5, saga="done", drill=d), p,
                                 NOW)
    east_drained = replace(_with(v, region="west", epoch=5, saga="done", drill=held),
                           control=ControlState(drains=(Drain("east", "op", NOW, NOW + 3600),)))
    end, change = advance_live_drill(held, east_drained, p, NOW + 30)
    assert change is None and end.phase == "failed"
    assert "cannot switch back: east is not a candidate" in end.reason
    assert "app stays in west" in end.reason


@pytest.mark.parametrize(("name", "v", "to", "refusal"), [
    ("paused", view(ALL, EAST_ACTIVE, paused=True), "west", "paused"),
    ("a recent evacuation", view(ALL, EAST_ACTIVE, incidents=(NOW - 60,)), "west",
     "elsewhere was evacuated 1m ago"),
    ("a saga runs", _with(view(ALL, EAST_ACTIVE), region="east", epoch=4, saga="running",
                          trigger="operator", since=NOW - 10_000),
     "west", "a failover is under way (1 saga(s) running: app)"),
    ("a failed saga", _with(view(ALL, EAST_ACTIVE), region="east", epoch=4, saga="failed",
                            trigger="operator", since=NOW - 10_000),
     "west", "failed (failoverctl retry first)"),
    ("the group moved just now", _with(view(ALL, EAST_ACTIVE), region="east", epoch=4,
                                       trigger="health", since=NOW - 30),
     "west", "app moved 30s ago"),
    ("the target has no member", view({"e1": "east", "c1": "central"}, EAST_ACTIVE), "west",
     "west is not a candidate"),
    ("already there", view(ALL, EAST_ACTIVE), "east", "east is already active"),
    ("not a region of the group", view(ALL, EAST_ACTIVE), "mars", "not a region of app"),
])
def test_a_live_drill_is_refused_when_it_would_compete(name: str, v: ClusterView, to: str,
                                                       refusal: str) -> None:
    why = live_drill_refusal(v, policy(), "app", to, NOW)
    assert why is not None and refusal in why, (name, why)
    out = handle_drill_request(v, policy(), _drill_request(to=to), NOW)
    assert not out.accepted and out.change is None and out.drill is None


def test_no_failback_during_a_live_drill() -> None:
    p = policy(failback="auto", failback_stable_s=0)
    v = view(ALL, EAST_ACTIVE)
    d = handle_drill_request(v, p, _drill_request(), NOW).drill
    assert d is not None
    holding = replace(d, phase="holding", switched_at=NOW - 100)
    in_west = _with(v, region="west", epoch=5, saga="done", drill=holding, since=NOW - 100)
    assert changes(in_west, p) == []
    ended = _with(v, region="west", epoch=5, saga="done", since=NOW - 100,
                  drill=replace(holding, phase="failed"))
    assert changes(ended, p) == [("app", "east", 6, "failback")]
