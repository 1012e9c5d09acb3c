"""Power telemetry, pure: parse sensor messages, keep the latest per sensor,
and judge a region's power state.

No I/O and no clock reads: ``now`` is always an argument.  The MQTT shell
(:mod:`failoverd.sensing.mqtt`) feeds messages in; the engine calls
:func:`region_power` on the sensor records the members relay through etcd.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace

STATES = frozenset({
    "utility_ok", "utility_lost", "on_generator", "on_battery", "low_battery",
    "generator_failed", "transfer_failed", "shutdown_imminent", "offline",
})
CRITICAL_STATES = frozenset({"low_battery", "generator_failed", "transfer_failed",
                             "shutdown_imminent"})
OUTAGE_STATES = frozenset({"utility_lost", "on_battery"})
# Every state that is not "on utility": kept through silence (rule 10).
OUTAGE_ALL = CRITICAL_STATES | OUTAGE_STATES | {"on_generator"}
# Region power states that rule a region out as a failover candidate.
DEGRADED = frozenset({"utility_lost", "on_battery", "on_generator", "critical"})

MAX_PAYLOAD = 4096
MAX_FUTURE_S = 300.0


@dataclass(frozen=True)
class Reading:
    """One sensor's latest word.  ``ts`` is the sensor's own timestamp (or
    the receive time when it sends none); ``received`` is when we heard it."""

    region: str
    sensor: str
    state: str
    ts: float
    received: float
    runtime_s: float | None = None
    charge_pct: float | None = None
    since: float = 0.0  # ts at which ``state`` began (for the grace period)
    # When the sensor's Last Will arrived while it was in an outage state
    # (the state is kept; see rule 10).  None otherwise.
    lwt_at: float | None = None
    # Where it came from: mqtt | nut | snmp (failoverctl power shows it).
    source: str = "mqtt"
    # What the device said besides the state (NUT flags, input voltage,
    # alarms), for operators; never judged.
    detail: str = ""


@dataclass(frozen=True)
class Rejected:
    reason: str  # a short, fixed label: the metric's label value
    detail: str = ""


@dataclass(frozen=True)
class RuntimeUpdate:
    """NUT ``battery.runtime``: a runtime for a sensor, no state."""

    region: str
    sensor: str
    runtime_s: float
    received: float


# NUT's ups.status flags (NUT developer guide, "ups.status"); the first four
# decide the state, the others are shown but never judged.
NUT_DECISIVE_FLAGS = frozenset({"FSD", "OB", "OL", "LB"})
NUT_FLAGS = NUT_DECISIVE_FLAGS | frozenset({
    "HB", "RB", "CHRG", "DISCHRG", "BYPASS", "CAL", "OFF", "OVER", "TRIM", "BOOST",
    "ALARM", "WAIT", "TEST", "ECO", "NOCOMM"})


def _nut_state(status: str) -> str | None:
    """A state from NUT's flags, as upsmon reads them: FSD is a shutdown;
    low battery counts only on battery (``OL LB`` is a UPS recharging after
    an outage, on utility); no OL/OB/FSD (``OFF``, ``WAIT``, garbage) says
    nothing."""
    flags = set(status.upper().split())
    if "FSD" in flags:
        return "shutdown_imminent"
    if "OB" in flags:
        return "low_battery" if "LB" in flags else "on_battery"
    if "OL" in flags:
        return "utility_ok"
    return None


def nut_unknown_flags(status: str) -> list[str]:
    """Flags of ``ups.status`` we do not know (logged; they decide nothing)."""
    return [f for f in status.upper().split() if f not in NUT_FLAGS]


def _number(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value >= 0 else None


def nut_reading(region: str, sensor: str, variables: Mapping[str, str], now: float
                ) -> Reading | Rejected:
    """A NUT UPS's variables (``LIST VAR``) → a reading, or why not.

    ``ups.status`` gives the state (see :func:`_nut_state`);
    ``battery.runtime`` (s) and ``battery.charge`` (%) ride along; input
    voltage, alarms and the flags go into the detail.  NUT sends no clock:
    the reading is timed by when we polled it."""
    status = variables.get("ups.status")
    if status is None:
        return Rejected("malformed", "no ups.status")
    state = _nut_state(status)
    if state is None:
        return Rejected("unknown_state", f"ups.status {status[:40]!r}")
    detail = [f"ups.status {status}"]
    for var, label in (("input.voltage", "input {} V"), ("ups.alarm", "alarm: {}")):
        if variables.get(var):
            detail.append(label.format(variables[var][:80]))
    return Reading(region, sensor, state, now, now,
                   _number(variables.get("battery.runtime")),
                   _number(variables.get("battery.charge")),
                   source="nut", detail=", ".join(detail))


# RFC 1628 UPS-MIB (1.3.6.1.2.1.33): the objects a power verdict needs.
UPS_MIB = "1.3.6.1.2.1.33"
UPS_OUTPUT_SOURCE = f"{UPS_MIB}.1.4.1.0"
UPS_OUTPUT_SOURCES = {1: "other", 2: "none", 3: "normal", 4: "bypass", 5: "battery",
                      6: "booster", 7: "reducer"}
UPS_BATTERY_STATUS = f"{UPS_MIB}.1.2.1.0"  # unknown(1) normal(2) low(3) depleted(4)
UPS_SECONDS_ON_BATTERY = f"{UPS_MIB}.1.2.2.0"
UPS_MINUTES_REMAINING = f"{UPS_MIB}.1.2.3.0"
UPS_CHARGE_REMAINING = f"{UPS_MIB}.1.2.4.0"
UPS_ALARMS_PRESENT = f"{UPS_MIB}.1.6.1.0"
UPS_ALARM_DESCR = f"{UPS_MIB}.1.6.2.1.2"  # the alarm table's column of well-known alarm OIDs
UPS_MIB_OIDS = (UPS_OUTPUT_SOURCE, UPS_BATTERY_STATUS, UPS_SECONDS_ON_BATTERY,
                UPS_MINUTES_REMAINING, UPS_CHARGE_REMAINING, UPS_ALARMS_PRESENT)
# upsWellKnownAlarms (1.3.6.1.2.1.33.1.6.3.N): the ones that bear on power.
UPS_ALARMS = {1: "batteryBad", 2: "onBattery", 3: "lowBattery", 4: "depletedBattery",
              5: "tempBad", 6: "inputBad", 7: "outputBad", 8: "outputOverload",
              9: "onBypass", 10: "bypassBad", 11: "outputOffAsRequested",
              12: "upsOffAsRequested", 13: "chargerFailed", 14: "upsOutputOff",
              15: "upsSystemOff", 16: "fanFailure", 17: "fuseFailure", 18: "generalFault",
              19: "diagnosticTestFailed", 20: "communicationsLost", 21: "awaitingPower",
              22: "shutdownPending", 23: "shutdownImminent", 24: "testInProgress"}


def _alarm_name(oid: str) -> str:
    prefix = f"{UPS_MIB}.1.6.3."
    if oid.startswith(prefix) and oid[len(prefix):].isdigit():
        return UPS_ALARMS.get(int(oid[len(prefix):]), f"alarm {oid[len(prefix):]}")
    return oid


def ups_mib_reading(region: str, sensor: str, values: Mapping[str, int | None],
                    alarms: Iterable[str], now: float) -> Reading | Rejected:
    """RFC 1628 objects (``UPS_MIB_OIDS`` → integer or None when the agent
    has no such object) and the alarm table's well-known alarm OIDs → a
    reading.  upsOutputSource gives the state (battery → on battery; normal,
    bypass, booster, reducer → on utility); a low or depleted battery on
    battery, or an alarm saying so, is low battery; shutdownImminent /
    shutdownPending is an imminent shutdown.  Negative estimates (-1: the
    agent does not know) are left out."""
    source = values.get(UPS_OUTPUT_SOURCE)
    if source is None:
        return Rejected("malformed", "no upsOutputSource")
    named = sorted({_alarm_name(a) for a in alarms})
    battery = values.get(UPS_BATTERY_STATUS)
    if {"shutdownImminent", "shutdownPending"} & set(named):
        state = "shutdown_imminent"
    elif source == 5:
        low = battery in {3, 4} or {"lowBattery", "depletedBattery"} & set(named)
        state = "low_battery" if low else "on_battery"
    elif source in {3, 4, 6, 7}:
        state = "utility_ok"
    else:  # other(1), none(2: output off), or not in the MIB
        return Rejected("unknown_state", f"upsOutputSource {source}")
    minutes = values.get(UPS_MINUTES_REMAINING)
    charge = values.get(UPS_CHARGE_REMAINING)
    on_battery_s = values.get(UPS_SECONDS_ON_BATTERY)
    detail = [f"upsOutputSource {UPS_OUTPUT_SOURCES.get(source, source)}"]
    if on_battery_s:
        detail.append(f"{on_battery_s}s on battery")
    if named:
        detail.append("alarms: " + ", ".join(named))
    return Reading(region, sensor, state, now, now,
                   float(minutes * 60) if minutes is not None and minutes >= 0 else None,
                   float(charge) if charge is not None and 0 <= charge <= 100 else None,
                   source="snmp", detail="; ".join(detail))


@dataclass(frozen=True)
class OidTable:
    """A device outside the UPS-MIB (a generator controller, an ATS, a
    vendor MIB), declared in config: which OID holds the state and what
    each of its values means; optionally where the runtime and charge are."""

    state: str
    states: tuple[tuple[str, str], ...]
    runtime: str | None = None
    runtime_scale: float = 1.0
    charge: str | None = None


def oid_table_reading(region: str, sensor: str, table: OidTable,
                      values: Mapping[str, str | None], now: float) -> Reading | Rejected:
    """The declared OIDs' values (as text; None when absent) → a reading;
    a state value the table does not list is rejected, never guessed."""
    said = values.get(table.state)
    if said is None:
        return Rejected("malformed", f"no {table.state}")
    state = next((st for v, st in table.states if v.lower() == said.strip().lower()), None)
    if state is None:
        return Rejected("unmapped_value", f"{table.state} = {said[:40]}")
    runtime = _number(values.get(table.runtime)) if table.runtime else None
    charge = _number(values.get(table.charge)) if table.charge else None
    return Reading(region, sensor, state, now, now,
                   runtime * table.runtime_scale if runtime is not None else None, charge,
                   source="snmp", detail=f"{table.state} = {said[:60]}")


def _payload_text(region: str, regions: Iterable[str], payload: bytes) -> str | Rejected:
    """A message's text, if its region is one of ours and it is UTF-8."""
    if region not in set(regions):
        return Rejected("unknown_region", region)
    try:
        return payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Rejected("malformed", "not UTF-8")


NUT_LEAVES = ("/ups.status", "/battery.runtime")


def topic_sensor(topic: str) -> tuple[str, str] | None:
    """(region, sensor) named by a topic of our own shape —
    ``…/<region>/<sensor>`` or NUT's ``…/<region>/<sensor>/ups.status`` —
    or None when it has too few levels."""
    parts = topic.split("/")
    if topic.endswith(NUT_LEAVES):
        return (parts[-3], parts[-2]) if len(parts) >= 3 else None
    return (parts[-2], parts[-1]) if len(parts) >= 2 else None


def parse_message(topic: str, payload: bytes, *, now: float, regions: Iterable[str],
                  max_bytes: int = MAX_PAYLOAD, max_future_s: float = MAX_FUTURE_S
                  ) -> Reading | RuntimeUpdate | Rejected:
    """One MQTT message → a reading, a NUT runtime update, or a rejection.

    Topics: ``…/<region>/<sensor>`` with a JSON payload, or NUT's
    ``…/<region>/<sensor>/ups.status`` and ``…/battery.runtime``.
    """
    if len(payload) > max_bytes:
        return Rejected("oversized", f"{len(payload)} bytes")
    named = topic_sensor(topic)
    if named is None:
        return Rejected("bad_topic", topic)
    region, sensor = named
    nut = topic.endswith(NUT_LEAVES)
    text = _payload_text(region, regions, payload)
    if isinstance(text, Rejected):
        return text
    if nut:
        return _parse_nut(topic.rsplit("/", 1)[-1], text, region, sensor, now)
    try:
        data = json.loads(text)
    except ValueError:
        return Rejected("malformed", "not JSON")
    if not isinstance(data, dict):
        return Rejected("malformed", "not a JSON object")
    state = data.get("state")
    if state not in STATES:
        return Rejected("unknown_state", str(state)[:40])
    ts = data.get("ts", now)
    runtime = data.get("runtime_s")
    charge = data.get("charge_pct")
    for name, value in (("ts", ts), ("runtime_s", runtime), ("charge_pct", charge)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)
                                  or not math.isfinite(value) or value < 0):
            return Rejected("malformed", f"{name} is not a non-negative number")
    if ts > now + max_future_s:
        return Rejected("future_timestamp", f"ts {ts} is {ts - now:.0f}s ahead")
    return Reading(region, sensor, str(state), float(ts), now,
                   float(runtime) if runtime is not None else None,
                   float(charge) if charge is not None else None)


def _parse_nut(leaf: str, text: str, region: str, sensor: str, now: float
               ) -> Reading | RuntimeUpdate | Rejected:
    if leaf == "battery.runtime":
        try:
            runtime = float(text)
        except ValueError:
            return Rejected("malformed", "battery.runtime is not a number")
        if runtime < 0 or not math.isfinite(runtime):
            return Rejected("malformed", "battery.runtime is not a non-negative number")
        return RuntimeUpdate(region, sensor, runtime, now)
    state = _nut_state(text)
    if state is None:
        return Rejected("unknown_state", text[:40])
    return Reading(region, sensor, state, now, now)


@dataclass(frozen=True)
class TopicMapping:
    """How to read a power state out of an MQTT shape that is not ours
    (Home Assistant, Zigbee2MQTT, Tasmota, NUT bridges): which topics, which
    region and sensor (literal, or ``{n}``: the topic's n-th level), where
    the value is (a dotted path into a JSON payload, or the payload itself)
    and what it means (a value → state table, or NUT ``ups.status`` flags)."""

    topic: str
    region: str
    sensor: str
    json_path: str | None = None
    states: tuple[tuple[str, str], ...] = ()
    nut_status: bool = False
    runtime_path: str | None = None
    runtime_scale: float = 1.0
    charge_path: str | None = None


def topic_matches(pattern: str, topic: str) -> bool:
    """MQTT filter matching: ``+`` is one level, a final ``#`` the rest."""
    want, have = pattern.split("/"), topic.split("/")
    for i, level in enumerate(want):
        if level == "#":
            return True
        if i >= len(have) or (level != "+" and level != have[i]):
            return False
    return len(want) == len(have)


_MISSING = object()


def _at_path(data: object, path: str) -> object:
    for part in path.split("."):
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and part.isdigit() and int(part) < len(data):
            data = data[int(part)]
        else:
            return _MISSING
    return data


def _as_text(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value).strip()


def _filled(template: str, levels: list[str]) -> str | None:
    if template.startswith("{") and template.endswith("}") and template[1:-1].isdigit():
        n = int(template[1:-1])
        return levels[n] if n < len(levels) else None
    return template


def apply_mapping(m: TopicMapping, topic: str, payload: bytes, *, now: float,
                  regions: Iterable[str], max_bytes: int = MAX_PAYLOAD) -> Reading | Rejected:
    """One message on a mapped topic → a reading (timed by its arrival: these
    shapes carry no trustworthy clock), or why not.  A value the table does
    not know is a rejection, never a guess."""
    if len(payload) > max_bytes:
        return Rejected("oversized", f"{len(payload)} bytes")
    levels = topic.split("/")
    region, sensor = _filled(m.region, levels), _filled(m.sensor, levels)
    if region is None or sensor is None or not sensor:
        return Rejected("bad_topic", topic)
    text = _payload_text(region, regions, payload)
    if isinstance(text, Rejected):
        return text
    data: object = text
    if m.json_path is not None or m.runtime_path is not None or m.charge_path is not None:
        try:
            data = json.loads(text)
        except ValueError:
            return Rejected("malformed", "not JSON")
    value = _at_path(data, m.json_path) if m.json_path is not None else data
    if value is _MISSING:
        return Rejected("malformed", f"no {m.json_path} in the payload")
    said = _as_text(value)
    if m.nut_status:
        state = _nut_state(said)
    else:
        state = next((st for v, st in m.states if v.lower() == said.lower()), None)
    if state is None:
        return Rejected("unmapped_value", said[:40])
    numbers: dict[str, float | None] = {}
    for name, path, scale in (("runtime", m.runtime_path, m.runtime_scale),
                              ("charge", m.charge_path, 1.0)):
        raw = _at_path(data, path) if path is not None else None
        number = _number(_as_text(raw)) if raw is not None and raw is not _MISSING else None
        numbers[name] = number * scale if number is not None else None
    return Reading(region, sensor, state, now, now, numbers["runtime"], numbers["charge"],
                   source="mqtt", detail=f"{m.json_path or 'payload'} = {said[:60]}")


class SensorTable:
    """The latest reading per (region, sensor); out-of-order and duplicate
    messages (not newer than what we have) are ignored."""

    def __init__(self) -> None:
        self.readings: dict[tuple[str, str], Reading] = {}

    def apply(self, item: Reading | RuntimeUpdate) -> Reading | None:
        """Fold in a message; the sensor's new reading if it changed, else None."""
        key = (item.region, item.sensor)
        old = self.readings.get(key)
        if isinstance(item, RuntimeUpdate):
            if old is None:
                return None  # a runtime with no state yet says nothing
            new = replace(old, runtime_s=item.runtime_s, received=item.received)
        elif item.state == "offline" and old is not None and old.state in OUTAGE_ALL:
            # Silence during an outage is not good news: keep the outage
            # state, note the Last Will; the judge turns it critical.
            if old.lwt_at is not None:
                return None
            new = replace(old, lwt_at=item.received)
        else:
            if old is not None and item.ts <= old.ts:
                return None
            since = old.since if old is not None and old.state == item.state else item.ts
            runtime = item.runtime_s
            if runtime is None and old is not None and item.state == old.state:
                runtime = old.runtime_s  # NUT: runtime arrives on its own topic
            new = replace(item, since=since, runtime_s=runtime)
        self.readings[key] = new
        return new


@dataclass(frozen=True)
class RegionPower:
    state: str  # normal | utility_lost | on_generator | on_battery | critical | unknown
    runtime_s: float | None = None
    outage_since: float | None = None
    detail: str = ""
    # The sensors that voted "critical", as "sensor:state[, silent Ns]" (the
    # evidence an evacuation records), and how many were needed.
    evidence: tuple[str, ...] = ()
    quorum: int = 1
    # Sensors saying "critical" when fewer than ``quorum`` do (not acted on).
    minority: tuple[str, ...] = ()


def fresh(r: Reading, now: float, stale_s: float) -> bool:
    """A sensor last seen normal is fresh until silent past ``stale_s`` or
    its Last Will; after that it is unknown."""
    return r.state != "offline" and r.lwt_at is None and now - r.received <= stale_s


def silent_s(r: Reading, now: float) -> float:
    """How long since the sensor last said anything (its Last Will is silence)."""
    return max(now - r.received, 0.0)


def runtime_left(r: Reading, now: float) -> float | None:
    """The battery runtime the sensor reported, counted down with the clock
    since it said so: a silent UPS keeps draining."""
    if r.runtime_s is None:
        return None
    return max(r.runtime_s - max(now - r.received, 0.0), 0.0)


def _vote(r: Reading, now: float, *, grace_s: float, stale_s: float, silence_s: float
          ) -> tuple[str, str] | None:
    """One sensor's word: (verdict, evidence) or None when it says nothing.

    verdict is critical | generator | outage | normal.  A sensor last seen in
    an outage state keeps it while silent (rule 10) and is critical once
    silent past ``silence_s``.
    """
    quiet = silent_s(r, now)
    tag = f"{r.sensor}:{r.state}"
    if r.state in OUTAGE_ALL:
        if r.lwt_at is not None or quiet > stale_s:
            tag += f", silent {quiet:.0f}s" + (" (last will)" if r.lwt_at is not None else "")
        if quiet > silence_s:
            return "critical", tag
        if r.state in CRITICAL_STATES:
            return "critical", tag
        if r.state == "on_generator":
            return "generator", tag
        if now - r.since > grace_s:
            return "critical", f"{tag}, outage {now - r.since:.0f}s past the {grace_s:.0f}s grace"
        return "outage", tag
    if fresh(r, now, stale_s):
        return "normal", tag
    return None


@dataclass(frozen=True)
class SensorView:
    """One sensor as an operator sees it: what it said, how long ago, and
    which rule applies to it now (``failoverctl power``, the status page)."""

    sensor: str
    source: str
    state: str
    age_s: float
    runtime_s: float | None
    charge_pct: float | None
    rule: str  # normal | grace | budget | critical | silence | generator | stale
    explanation: str
    detail: str


def explain_sensor(r: Reading, now: float, *, grace_s: float, stale_s: float,
                   silence_s: float, budget_s: float) -> SensorView:
    """Which rule applies to one sensor's reading now, in words."""
    quiet = silent_s(r, now)
    left = runtime_left(r, now)
    vote = _vote(r, now, grace_s=grace_s, stale_s=stale_s, silence_s=silence_s)
    if vote is None:
        rule, why = "stale", (f"last seen {r.state} {quiet:.0f}s ago "
                              f"(> sensor_stale_s {stale_s:g}s or its Last Will): says nothing")
    elif vote[0] == "normal":
        rule, why = "normal", "on utility"
    elif vote[0] == "generator":
        rule, why = "generator", "a generator carries the load"
    elif vote[0] == "critical" and r.state in OUTAGE_ALL and quiet > silence_s:
        rule, why = "silence", (f"silent {quiet:.0f}s in an outage state "
                                f"(> power_silence_during_outage_s {silence_s:g}s): critical")
    elif vote[0] == "critical" and r.state in CRITICAL_STATES:
        rule, why = "critical", f"{r.state}: critical"
    elif vote[0] == "critical":
        rule, why = "grace", (f"outage {now - r.since:.0f}s, past power_grace_s "
                              f"{grace_s:g}s: critical")
    elif r.state == "on_battery" and left is not None and left < budget_s:
        rule, why = "budget", (f"{left:.0f}s of battery left, under the {budget_s:.0f}s "
                               "failover budget: the region is left")
    else:
        rule, why = "grace", f"outage {now - r.since:.0f}s of the {grace_s:g}s power_grace_s"
    return SensorView(r.sensor, r.source, r.state, quiet, left, r.charge_pct, rule, why,
                      r.detail)


def region_power(readings: Iterable[Reading], now: float, *, grace_s: float,
                 stale_s: float, silence_s: float | None = None, quorum: int = 1
                 ) -> RegionPower:
    """A region's power from its sensors.

    critical: at least ``quorum`` distinct sensors say so — a generator or
    transfer failure, low battery, imminent shutdown, an outage past
    ``grace_s`` (unless a generator carries the load), or an outage state
    followed by silence past ``silence_s``.  on_generator: a generator
    carries the load.  Within the grace: on_battery (runtime: the
    ``quorum``-th lowest, counted down since reported) or utility_lost.
    normal: every fresh sensor on utility.  unknown: no sensor says anything.
    """
    silence = stale_s if silence_s is None else silence_s
    votes = [(r, v) for r in readings
             if (v := _vote(r, now, grace_s=grace_s, stale_s=stale_s, silence_s=silence))]
    if not votes:
        return RegionPower("unknown", detail="no fresh sensor", quorum=quorum)
    generator = any(v == "generator" for _, (v, _) in votes)
    critical = sorted(tag for r, (v, tag) in votes
                      if v == "critical" and not (generator and r.state in OUTAGE_STATES
                                                  and silent_s(r, now) <= silence))
    outage = [r for r, (v, _) in votes if v in {"outage", "critical"}
              and r.state in OUTAGE_STATES]
    runtimes = sorted(t for r in outage if (t := runtime_left(r, now)) is not None)
    runtime = runtimes[quorum - 1] if len(runtimes) >= quorum else None
    since = min((r.since for r in outage), default=None)
    if len(critical) >= quorum:
        return RegionPower("critical", runtime, since, ", ".join(critical),
                           tuple(critical), quorum)
    short = (f"; {len(critical)} of {quorum} sensors needed say critical: "
             f"{', '.join(critical)}") if critical else ""
    minority = tuple(critical)
    if generator:
        return RegionPower("on_generator", detail="generator carrying the load" + short,
                           quorum=quorum, minority=minority)
    if not outage:
        return RegionPower("normal", detail=short.lstrip("; "), quorum=quorum,
                           minority=minority)
    assert since is not None
    state = "on_battery" if any(r.state == "on_battery" for r in outage) else "utility_lost"
    return RegionPower(state, runtime, since, f"outage for {now - since:.0f}s{short}",
                       quorum=quorum, minority=minority)


def reading_to_json(r: Reading, relayed_by: str) -> str:
    return json.dumps({"state": r.state, "ts": r.ts, "received": r.received,
                       "since": r.since, "runtime_s": r.runtime_s,
                       "charge_pct": r.charge_pct, "lwt_at": r.lwt_at,
                       "relayed_by": relayed_by, "source": r.source, "detail": r.detail},
                      separators=(",", ":"))


def reading_from_json(region: str, sensor: str, value: str) -> Reading:
    d = json.loads(value)
    if not isinstance(d, dict) or d.get("state") not in STATES:
        raise ValueError("not a power reading")
    return Reading(region, sensor, str(d["state"]), float(d["ts"]), float(d["received"]),
                   _opt(d.get("runtime_s")), _opt(d.get("charge_pct")), float(d["since"]),
                   _opt(d.get("lwt_at")), str(d.get("source") or "mqtt"),
                   str(d.get("detail") or "")[:300])


def _opt(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def merge(relayed: Mapping[tuple[str, str], list[Reading]]) -> dict[str, list[Reading]]:
    """Per region, the newest reading of each sensor, whoever relayed it."""
    out: dict[str, list[Reading]] = {}
    for (region, _), copies in sorted(relayed.items()):
        out.setdefault(region, []).append(
            max(copies, key=lambda r: (r.ts, r.received, r.lwt_at or 0.0)))
    return out
