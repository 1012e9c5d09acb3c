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


def _nut_state(status: str) -> str | None:
    flags = set(status.upper().split())
    if "FSD" in flags:
        return "shutdown_imminent"
    if "LB" in flags:
        return "low_battery"
    if "OB" in flags:
        return "on_battery"
    if "OL" in flags:
        return "utility_ok"
    return None


def parse_message(topic: str, payload: bytes, *, now: float, regions: Iterable[str],
                  max_bytes: int = MAX_PAYLOAD, max_future_s: float = MAX_FUTURE_S
                  ) -> Reading | RuntimeUpdate | Rejected:
    """One MQTT message → a reading, a NUT runtime update, or a rejection.

    Topics: ``…/<region>/<sensor>`` with a JSON payload, or NUT's
    ``…/<region>/<sensor>/ups.status`` and ``…/battery.runtime``.
    """
    if len(payload) > max_bytes:
        return Rejected("oversized", f"{len(payload)} bytes")
    parts = topic.split("/")
    nut = parts[-1] in {"ups.status", "battery.runtime"}
    if len(parts) < (3 if nut else 2):
        return Rejected("bad_topic", topic)
    region, sensor = (parts[-3], parts[-2]) if nut else (parts[-2], parts[-1])
    if region not in set(regions):
        return Rejected("unknown_region", region)
    try:
        text = payload.decode("utf-8").strip()
    except UnicodeDecodeError:
        return Rejected("malformed", "not UTF-8")
    if nut:
        return _parse_nut(parts[-1], text, region, sensor, now)
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
                       "relayed_by": relayed_by},
                      separators=(",", ":"))


def reading_from_json(region: str, sensor: str, value: str) -> Reading:
    d = json.loads(value)
    if not isinstance(d, dict) or d.get("state") not in STATES:
        raise ValueError("not a power reading")
    return Reading(region, sensor, str(d["state"]), float(d["ts"]), float(d["received"]),
                   _opt(d.get("runtime_s")), _opt(d.get("charge_pct")), float(d["since"]),
                   _opt(d.get("lwt_at")))


def _opt(v: object) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def merge(relayed: Mapping[tuple[str, str], list[Reading]]) -> dict[str, list[Reading]]:
    """Per region, the newest reading of each sensor, whoever relayed it."""
    out: dict[str, list[Reading]] = {}
    for (region, _), copies in sorted(relayed.items()):
        out.setdefault(region, []).append(
            max(copies, key=lambda r: (r.ts, r.received, r.lwt_at or 0.0)))
    return out
