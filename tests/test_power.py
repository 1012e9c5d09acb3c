"""Power telemetry, pure: parsing, ordering, freshness, region state."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from failoverd.core.power import (
    UPS_ALARMS_PRESENT,
    UPS_BATTERY_STATUS,
    UPS_CHARGE_REMAINING,
    UPS_MINUTES_REMAINING,
    UPS_OUTPUT_SOURCE,
    UPS_SECONDS_ON_BATTERY,
    OidTable,
    Reading,
    Rejected,
    RuntimeUpdate,
    SensorTable,
    TopicMapping,
    apply_mapping,
    explain_sensor,
    merge,
    nut_reading,
    nut_unknown_flags,
    oid_table_reading,
    parse_message,
    reading_from_json,
    reading_to_json,
    region_power,
    topic_matches,
    ups_mib_reading,
)
from failoverd.sensing.nut import NutError, _unquote

NOW = 1_800_000_000.0
REGIONS = ["east", "west"]


def parse(topic: str, payload: bytes | str, **kw: object):
    raw = payload.encode() if isinstance(payload, str) else payload
    return parse_message(topic, raw, now=NOW, regions=REGIONS, **kw)  # type: ignore[arg-type]


def msg(state: str, **kw: object) -> str:
    return json.dumps({"state": state, **kw})


def test_json_reading() -> None:
    r = parse("failoverd/power/east/ups1", msg("on_battery", runtime_s=540, charge_pct=87,
                                               ts=NOW - 1))
    assert r == Reading("east", "ups1", "on_battery", NOW - 1, NOW, 540.0, 87.0)


def test_missing_ts_uses_receive_time() -> None:
    r = parse("failoverd/power/east/ats", msg("utility_ok"))
    assert isinstance(r, Reading) and r.ts == NOW


@pytest.mark.parametrize(("topic", "payload", "reason"), [
    ("failoverd/power/east/ups1", b"x" * 5000, "oversized"),
    ("failoverd/power/east/ups1", b"{not json", "malformed"),
    ("failoverd/power/east/ups1", b"\xff\xfe", "malformed"),
    ("failoverd/power/east/ups1", b"[1, 2]", "malformed"),
    ("failoverd/power/east/ups1", msg("on_fire"), "unknown_state"),
    ("failoverd/power/east/ups1", b'{"runtime_s": 5}', "unknown_state"),
    ("failoverd/power/east/ups1", msg("on_battery", runtime_s=-1), "malformed"),
    ("failoverd/power/east/ups1", msg("on_battery", runtime_s="lots"), "malformed"),
    ("failoverd/power/east/ups1", b'{"state": "on_battery", "runtime_s": NaN}', "malformed"),
    ("failoverd/power/east/ups1", msg("utility_ok", ts=NOW + 3600), "future_timestamp"),
    ("failoverd/power/north/ups1", msg("utility_ok"), "unknown_region"),
    ("ups1", msg("utility_ok"), "bad_topic"),
    ("nut/east/ups1/ups.status", "BYPASS", "unknown_state"),
    ("nut/east/ups1/battery.runtime", "soon", "malformed"),
])
def test_rejections(topic: str, payload: bytes | str, reason: str) -> None:
    r = parse(topic, payload)
    assert isinstance(r, Rejected) and r.reason == reason


@pytest.mark.parametrize(("status", "state"), [
    ("OL", "utility_ok"), ("OL CHRG", "utility_ok"), ("OB DISCHRG", "on_battery"),
    ("OB LB", "low_battery"), ("FSD OB LB", "shutdown_imminent"),
    # Low battery on utility is a UPS recharging after an outage (upsmon
    # shuts down only for OB LB); bypass is utility passed through.
    ("OL CHRG LB", "utility_ok"), ("OL BYPASS", "utility_ok"), ("FSD OL", "shutdown_imminent"),
])
def test_nut_status(status: str, state: str) -> None:
    r = parse("nut/east/ups1/ups.status", status)
    assert isinstance(r, Reading) and (r.region, r.sensor, r.state) == ("east", "ups1", state)


def test_nut_runtime_attaches_to_the_sensor() -> None:
    t = SensorTable()
    assert t.apply(RuntimeUpdate("east", "ups1", 300, NOW)) is None  # no state yet
    t.apply(Reading("east", "ups1", "on_battery", NOW, NOW))
    r = t.apply(RuntimeUpdate("east", "ups1", 240, NOW + 1))
    assert r is not None and (r.state, r.runtime_s) == ("on_battery", 240)


def test_out_of_order_and_duplicates_are_ignored() -> None:
    t = SensorTable()
    assert t.apply(Reading("east", "u", "on_battery", 10, NOW)) is not None
    assert t.apply(Reading("east", "u", "utility_ok", 9, NOW)) is None  # older
    assert t.apply(Reading("east", "u", "utility_ok", 10, NOW)) is None  # duplicate ts
    r = t.apply(Reading("east", "u", "on_battery", 12, NOW))
    assert r is not None and r.since == 10  # same state continues: since kept
    r = t.apply(Reading("east", "u", "utility_ok", 13, NOW))
    assert r is not None and r.since == 13


def R(state: str, sensor: str = "u", since: float = NOW - 5, received: float = NOW,
      runtime: float | None = None) -> Reading:
    return Reading("east", sensor, state, since, received, runtime, None, since)


@pytest.mark.parametrize(("readings", "state"), [
    ([], "unknown"),
    ([R("utility_ok")], "normal"),
    ([R("utility_lost")], "utility_lost"),
    ([R("utility_lost", since=NOW - 31)], "critical"),
    ([R("on_battery", runtime=500)], "on_battery"),
    ([R("utility_lost", "ats"), R("on_generator", "gen")], "on_generator"),
    ([R("utility_lost", "ats", since=NOW - 60), R("on_generator", "gen")], "on_generator"),
    ([R("on_generator", "gen"), R("generator_failed", "gen2")], "critical"),
    ([R("transfer_failed")], "critical"),
    ([R("low_battery")], "critical"),
    ([R("shutdown_imminent")], "critical"),
    ([R("offline")], "unknown"),
    ([R("utility_ok", received=NOW - 31)], "unknown"),  # last seen normal, then silent
    # Rule 10: silence after an outage state keeps it, then counts as critical.
    ([R("utility_lost", since=NOW - 10, received=NOW - 10)], "utility_lost"),
    ([R("utility_lost", since=NOW - 25, received=NOW - 25)], "utility_lost"),
    ([R("on_generator", "gen", received=NOW - 31)], "critical"),
    ([R("utility_ok"), R("low_battery", "old", received=NOW - 100)], "critical"),
])
def test_region_power(readings: list[Reading], state: str) -> None:
    assert region_power(readings, NOW, grace_s=30, stale_s=30).state == state


def test_on_battery_reports_the_lowest_runtime() -> None:
    p = region_power([R("on_battery", "a", runtime=500), R("on_battery", "b", runtime=200)],
                     NOW, grace_s=30, stale_s=30)
    assert (p.state, p.runtime_s) == ("on_battery", 200)


def test_on_battery_runtime_counts_down_with_the_clock() -> None:
    """A UPS said 300 s left 20 s ago and nothing since: 280 s are left."""
    p = region_power([R("on_battery", runtime=300, since=NOW - 20, received=NOW - 20)], NOW,
                     grace_s=60, stale_s=30)
    assert (p.state, p.runtime_s) == ("on_battery", 280)
    later = region_power([R("on_battery", runtime=300, since=NOW - 20, received=NOW - 20)],
                         NOW + 5, grace_s=60, stale_s=30)
    assert later.runtime_s == 275


@pytest.mark.parametrize("state", ["generator_failed", "on_battery", "utility_lost",
                                   "on_generator", "transfer_failed"])
def test_silence_after_an_outage_state_is_critical_after_the_bound(state: str) -> None:
    silent = [R(state, since=NOW - 1, received=NOW - 1)]
    before = region_power(silent, NOW + 28, grace_s=600, stale_s=30, silence_s=30)
    after = region_power(silent, NOW + 31, grace_s=600, stale_s=30, silence_s=30)
    assert after.state == "critical", after
    assert "silent" in after.detail
    if state not in {"generator_failed", "transfer_failed"}:
        assert before.state != "critical"


def test_silence_after_utility_ok_is_unknown() -> None:
    p = region_power([R("utility_ok", received=NOW - 40)], NOW, grace_s=30, stale_s=30)
    assert p.state == "unknown"


def test_last_will_after_an_outage_keeps_the_state_then_critical() -> None:
    t = SensorTable()
    t.apply(Reading("east", "ups", "on_battery", NOW, NOW, 900))
    kept = t.apply(Reading("east", "ups", "offline", NOW + 1, NOW + 1))
    assert kept is not None and kept.state == "on_battery" and kept.lwt_at == NOW + 1
    assert t.apply(Reading("east", "ups", "offline", NOW + 2, NOW + 2)) is None  # once
    assert region_power([kept], NOW + 5, grace_s=600, stale_s=30).state == "on_battery"
    assert region_power([kept], NOW + 31, grace_s=600, stale_s=30).state == "critical"
    # The relay carries the Last Will across members.
    assert reading_from_json("east", "ups", reading_to_json(kept, "m1")) == kept


def test_last_will_after_utility_ok_is_unknown() -> None:
    t = SensorTable()
    t.apply(Reading("east", "ups", "utility_ok", NOW, NOW))
    r = t.apply(Reading("east", "ups", "offline", NOW + 1, NOW + 1))
    assert r is not None and r.state == "offline"
    assert region_power([r], NOW + 2, grace_s=30, stale_s=30).state == "unknown"


def test_power_quorum_one_lying_sensor_is_not_enough() -> None:
    readings = [R("generator_failed", "liar"), R("utility_ok", "b"), R("utility_ok", "c")]
    p = region_power(readings, NOW, grace_s=30, stale_s=30, quorum=2)
    assert p.state == "normal" and "1 of 2" in p.detail
    two = [R("generator_failed", "a"), R("transfer_failed", "b"), R("utility_ok", "c")]
    p2 = region_power(two, NOW, grace_s=30, stale_s=30, quorum=2)
    assert p2.state == "critical" and len(p2.evidence) == 2


def test_power_quorum_counts_silence_during_an_outage_as_a_vote() -> None:
    readings = [R("generator_failed", "a"), R("on_battery", "b", received=NOW - 40)]
    assert region_power(readings, NOW, grace_s=600, stale_s=30, quorum=2).state == "critical"


def test_power_quorum_runtime_is_the_quorum_th_lowest() -> None:
    readings = [R("on_battery", "a", runtime=10), R("on_battery", "b", runtime=900)]
    assert region_power(readings, NOW, grace_s=600, stale_s=30, quorum=2).runtime_s == 900


def test_relay_round_trip_and_merge_newest_wins() -> None:
    a = Reading("east", "u", "on_battery", 10, NOW, 300, 50, 9)
    back = reading_from_json("east", "u", reading_to_json(a, "m1"))
    assert back == a
    b = Reading("east", "u", "utility_ok", 11, NOW, None, None, 11)
    assert merge({("east", "u"): [a, b]}) == {"east": [b]}


@given(st.binary(max_size=300), st.sampled_from(["failoverd/power/east/u", "x/east/u/ups.status",
                                                 "x/east/u/battery.runtime", "east"]))
def test_property_parsing_never_raises(payload: bytes, topic: str) -> None:
    assert isinstance(parse(topic, payload), Reading | RuntimeUpdate | Rejected)


def test_nut_variables_give_state_runtime_charge_and_detail() -> None:
    r = nut_reading("east", "ups1", {"ups.status": "OB DISCHRG", "battery.runtime": "600",
                                     "battery.charge": "81", "input.voltage": "0.0",
                                     "ups.alarm": "Replace battery!"}, NOW)
    assert isinstance(r, Reading)
    assert (r.state, r.runtime_s, r.charge_pct, r.source) == ("on_battery", 600, 81, "nut")
    assert r.detail == "ups.status OB DISCHRG, input 0.0 V, alarm: Replace battery!"
    assert (r.ts, r.received) == (NOW, NOW)


@pytest.mark.parametrize(("variables", "reason"), [
    ({}, "malformed"),
    ({"ups.status": "WAIT"}, "unknown_state"),  # the driver is starting
    ({"ups.status": "OFF"}, "unknown_state"),  # says nothing about the utility
    ({"ups.status": "\x00garbage"}, "unknown_state"),
])
def test_nut_variables_that_say_nothing_are_rejected(variables: dict[str, str],
                                                      reason: str) -> None:
    r = nut_reading("east", "ups1", variables, NOW)
    assert isinstance(r, Rejected) and r.reason == reason


def test_nut_numbers_that_are_not_numbers_are_dropped_not_the_reading() -> None:
    r = nut_reading("east", "ups1", {"ups.status": "OB", "battery.runtime": "n/a",
                                     "battery.charge": "-5"}, NOW)
    assert isinstance(r, Reading) and r.runtime_s is None and r.charge_pct is None


def test_nut_unknown_flags_are_listed() -> None:
    assert nut_unknown_flags("OL CHRG") == []
    assert nut_unknown_flags("OL HE SOMETHINGNEW") == ["HE", "SOMETHINGNEW"]


def test_a_relayed_reading_keeps_its_source_and_detail() -> None:
    r = Reading("east", "ups1", "on_battery", NOW, NOW, 600.0, 80.0, NOW, None, "nut",
                "ups.status OB")
    assert reading_from_json("east", "ups1", reading_to_json(r, "e1")) == r
    # Relays written before sources existed read as MQTT.
    old = reading_from_json("east", "ups1", '{"state":"utility_ok","ts":1,"received":1,'
                            '"since":1}')
    assert (old.source, old.detail) == ("mqtt", "")


@pytest.mark.parametrize(("raw", "value"), [
    ('"OB DISCHRG"', "OB DISCHRG"), ('""', ""), (r'"say \"hi\" \\ bye"', r'say "hi" \ bye'),
])
def test_nut_values_are_unquoted(raw: str, value: str) -> None:
    assert _unquote(raw) == value


@pytest.mark.parametrize("raw", ["OB", '"open', "'single'"])
def test_nut_values_without_quotes_are_malformed(raw: str) -> None:
    with pytest.raises(NutError) as exc:
        _unquote(raw)
    assert exc.value.reason == "malformed"


@pytest.mark.parametrize(("pattern", "topic", "hit"), [
    ("a/b", "a/b", True), ("a/+", "a/b", True), ("a/+", "a/b/c", False),
    ("a/#", "a/b/c", True), ("a/#", "a", True), ("+/+/LWT", "tele/plug/LWT", True),
    ("a/b", "a/b/c", False), ("a/b/c", "a/b", False), ("#", "x/y", True),
])
def test_topic_filters_match_as_mqtt_does(pattern: str, topic: str, hit: bool) -> None:
    assert topic_matches(pattern, topic) is hit


HA = TopicMapping("homeassistant/sensor/ups1_status/state", "east", "ups1",
                  states=(("Online", "utility_ok"), ("On Battery", "on_battery"),
                          ("Low Battery", "low_battery")))
Z2M = TopicMapping("zigbee2mqtt/+", "east", "{1}", json_path="ac_power",
                   states=(("true", "utility_ok"), ("false", "utility_lost")),
                   charge_path="battery")
TASMOTA = TopicMapping("tele/+/LWT", "west", "{1}",
                       states=(("Online", "utility_ok"), ("Offline", "offline")))
HA_FLAGS = TopicMapping("homeassistant/sensor/ups1_status_data/state", "east", "ups1",
                        nut_status=True)
NUT_BRIDGE = TopicMapping("ups/+/state", "{1}", "ups", json_path="status",
                          nut_status=True, runtime_path="runtime_min", runtime_scale=60)


@pytest.mark.parametrize(("m", "topic", "payload", "want"), [
    (HA, "homeassistant/sensor/ups1_status/state", "On Battery", ("east", "ups1", "on_battery")),
    (HA, "homeassistant/sensor/ups1_status/state", "online", ("east", "ups1", "utility_ok")),
    (HA_FLAGS, "homeassistant/sensor/ups1_status_data/state", "OB DISCHRG LB",
     ("east", "ups1", "low_battery")),
    (Z2M, "zigbee2mqtt/hall_sensor", '{"ac_power": false, "battery": 97}',
     ("east", "hall_sensor", "utility_lost")),
    (TASMOTA, "tele/plug7/LWT", "Offline", ("west", "plug7", "offline")),
    (NUT_BRIDGE, "ups/east/state", '{"status": "OB DISCHRG", "runtime_min": 12}',
     ("east", "ups", "on_battery")),
])
def test_mappings_read_foreign_shapes(m: TopicMapping, topic: str, payload: str,
                                      want: tuple[str, str, str]) -> None:
    r = apply_mapping(m, topic, payload.encode(), now=NOW, regions=REGIONS)
    assert isinstance(r, Reading) and (r.region, r.sensor, r.state) == want
    assert (r.ts, r.received) == (NOW, NOW)


def test_a_mapping_reads_runtime_and_charge() -> None:
    r = apply_mapping(NUT_BRIDGE, "ups/east/state", b'{"status": "OB", "runtime_min": 12}',
                      now=NOW, regions=REGIONS)
    assert isinstance(r, Reading) and r.runtime_s == 720
    z = apply_mapping(Z2M, "zigbee2mqtt/s1", b'{"ac_power": true, "battery": 97}',
                      now=NOW, regions=REGIONS)
    assert isinstance(z, Reading) and z.charge_pct == 97 and z.runtime_s is None


@pytest.mark.parametrize(("m", "topic", "payload", "reason"), [
    (HA, "homeassistant/sensor/ups1_status/state", "Calibrating", "unmapped_value"),
    (Z2M, "zigbee2mqtt/s1", "not json", "malformed"),
    (Z2M, "zigbee2mqtt/s1", '{"battery": 50}', "malformed"),  # no ac_power
    (NUT_BRIDGE, "ups/north/state", '{"status": "OL"}', "unknown_region"),
    (NUT_BRIDGE, "ups/east/state", '{"status": "WAIT"}', "unmapped_value"),
    (HA, "homeassistant/sensor/ups1_status/state", b"\xff\xfe", "malformed"),
])
def test_mappings_reject_what_they_cannot_read(m: TopicMapping, topic: str,
                                               payload: str | bytes, reason: str) -> None:
    raw = payload if isinstance(payload, bytes) else payload.encode()
    r = apply_mapping(m, topic, raw, now=NOW, regions=REGIONS)
    assert isinstance(r, Rejected) and r.reason == reason


@given(st.binary(max_size=300))
def test_a_mapping_never_raises_on_any_payload(payload: bytes) -> None:
    for m in (HA, HA_FLAGS, Z2M, TASMOTA, NUT_BRIDGE):
        r = apply_mapping(m, "zigbee2mqtt/x", payload, now=NOW, regions=REGIONS)
        assert isinstance(r, Reading | Rejected)


def _seen(state: str, *, silent: float = 0.0, since_ago: float = 0.0,
          runtime: float | None = None, lwt: bool = False) -> Reading:
    at = NOW - silent
    return Reading("east", "s", state, at, at, runtime, None, NOW - since_ago,
                   at if lwt else None)


@pytest.mark.parametrize(("reading", "rule", "words"), [
    (_seen("utility_ok"), "normal", "on utility"),
    (_seen("utility_ok", silent=40), "stale", "says nothing"),
    (_seen("on_generator"), "generator", "generator carries"),
    (_seen("utility_lost", since_ago=5), "grace", "outage 5s of the 30s"),
    (_seen("utility_lost", since_ago=45), "grace", "past power_grace_s 30s: critical"),
    (_seen("on_battery", since_ago=5, runtime=100), "budget", "100s of battery left, under the "
                                                              "300s failover budget"),
    (_seen("on_battery", since_ago=5, runtime=900), "grace", "outage 5s"),
    (_seen("generator_failed"), "critical", "generator_failed: critical"),
    (_seen("on_battery", silent=70, since_ago=70, runtime=9000), "silence",
     "silent 70s in an outage state"),
    (_seen("on_generator", silent=5, lwt=True), "generator", "generator carries"),
])
def test_each_sensor_says_which_rule_applies(reading: Reading, rule: str, words: str) -> None:
    v = explain_sensor(reading, NOW, grace_s=30, stale_s=30, silence_s=60, budget_s=300)
    assert v.rule == rule and words in v.explanation, v


def _ups(source: int | None, battery: int | None = 2, minutes: int | None = 30,
         charge: int | None = 100, on_battery_s: int | None = 0, alarms: int = 0
         ) -> dict[str, int | None]:
    return {UPS_OUTPUT_SOURCE: source, UPS_BATTERY_STATUS: battery,
            UPS_MINUTES_REMAINING: minutes, UPS_CHARGE_REMAINING: charge,
            UPS_SECONDS_ON_BATTERY: on_battery_s, UPS_ALARMS_PRESENT: alarms}


ALARM = "1.3.6.1.2.1.33.1.6.3."


@pytest.mark.parametrize(("values", "alarms", "state"), [
    (_ups(3), [], "utility_ok"),
    (_ups(4), [], "utility_ok"),  # bypass: the utility feeds the load
    (_ups(6), [], "utility_ok"),  # booster (low input voltage, still mains)
    (_ups(5, on_battery_s=40), [ALARM + "2"], "on_battery"),
    (_ups(5, battery=3), [], "low_battery"),
    (_ups(5, battery=4), [], "low_battery"),
    (_ups(5, battery=2), [ALARM + "3"], "low_battery"),  # the alarm says so
    (_ups(3, battery=3), [], "utility_ok"),  # low battery, recharging on mains
    (_ups(5), [ALARM + "23"], "shutdown_imminent"),
    (_ups(3), [ALARM + "22"], "shutdown_imminent"),  # shutdown pending
])
def test_ups_mib_objects_give_a_state(values: dict[str, int | None], alarms: list[str],
                                      state: str) -> None:
    r = ups_mib_reading("east", "ups2", values, alarms, NOW)
    assert isinstance(r, Reading) and r.state == state and r.source == "snmp"


def test_ups_mib_runtime_charge_and_detail() -> None:
    r = ups_mib_reading("east", "ups2", _ups(5, minutes=12, charge=64, on_battery_s=95,
                                             alarms=1), [ALARM + "2", ALARM + "6"], NOW)
    assert isinstance(r, Reading) and (r.runtime_s, r.charge_pct) == (720, 64)
    assert r.detail == "upsOutputSource battery; 95s on battery; alarms: inputBad, onBattery"
    # Huawei's agent says -1 for estimates it does not have: left out.
    unknown = ups_mib_reading("east", "ups2", _ups(3, minutes=-1, charge=-1), [], NOW)
    assert isinstance(unknown, Reading) and unknown.runtime_s is None
    assert unknown.charge_pct is None


@pytest.mark.parametrize(("values", "reason"), [
    (_ups(None), "malformed"), (_ups(2), "unknown_state"), (_ups(1), "unknown_state"),
    (_ups(99), "unknown_state"),
])
def test_ups_mib_objects_that_say_nothing_are_rejected(values: dict[str, int | None],
                                                      reason: str) -> None:
    r = ups_mib_reading("east", "ups2", values, [], NOW)
    assert isinstance(r, Rejected) and r.reason == reason


# docs/power-sources.md's worked example: an APC UPS through PowerNet-MIB.
APC = OidTable(state="1.3.6.1.4.1.318.1.1.1.4.1.1.0",
               states=(("2", "utility_ok"), ("3", "on_battery"), ("4", "utility_ok"),
                       ("12", "utility_ok"), ("6", "utility_ok"), ("9", "utility_ok"),
                       ("11", "shutdown_imminent")),
               runtime="1.3.6.1.4.1.318.1.1.1.2.2.3.0", runtime_scale=0.01,
               charge="1.3.6.1.4.1.318.1.1.1.2.2.1.0")


def test_an_oid_table_reads_a_vendor_mib() -> None:
    r = oid_table_reading("east", "apc1", APC, {APC.state: "3", APC.runtime: "180000",
                                                APC.charge: "87"}, NOW)
    assert isinstance(r, Reading)
    assert (r.state, r.runtime_s, r.charge_pct) == ("on_battery", 1800, 87)
    assert r.detail == "1.3.6.1.4.1.318.1.1.1.4.1.1.0 = 3"
    unknown = oid_table_reading("east", "apc1", APC, {APC.state: "7"}, NOW)
    assert isinstance(unknown, Rejected) and unknown.reason == "unmapped_value"
    missing = oid_table_reading("east", "apc1", APC, {APC.state: None}, NOW)
    assert isinstance(missing, Rejected) and missing.reason == "malformed"


# -- the coordinator decides on what its own member heard ---------------------
from failoverd.core.model import ClusterView, ControlState  # noqa: E402
from failoverd.daemon.coordinator import with_local_power  # noqa: E402


def test_a_reading_heard_here_counts_before_etcd_shows_it() -> None:
    old = Reading("east", "gen", "utility_ok", 100.0, 100.1)
    heard = Reading("east", "gen", "generator_failed", 105.0, 105.1, since=105.0)
    view = ClusterView(revision=1, coordinator=None, members={}, active={},
                       control=ControlState(), power={("east", "gen"): [old]})
    # Heard here, relay in flight: the newest copy is ours.
    seen = with_local_power(view, {("east", "gen"): heard})
    assert [r.state for r in merge(seen.power)["east"]] == ["generator_failed"]
    assert view.power == {("east", "gen"): [old]}  # the view itself is untouched
    # etcd shows it (or something newer): nothing added, the same view.
    relayed = ClusterView(revision=2, coordinator=None, members={}, active={},
                          control=ControlState(), power={("east", "gen"): [heard]})
    assert with_local_power(relayed, {("east", "gen"): heard}) is relayed
    assert with_local_power(relayed, {("east", "gen"): old}) is relayed
    assert with_local_power(view, {}) is view
    # A sensor etcd has never shown.
    new = with_local_power(view, {("west", "ups"): heard})
    assert new.power[("west", "ups")] == [heard]
