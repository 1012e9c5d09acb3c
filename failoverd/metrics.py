"""Prometheus metrics of one daemon (prometheus-client, default registry).

Module-level because each daemon is its own process; the API serves them on
``/metrics``.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

IS_COORDINATOR = Gauge("failoverd_is_coordinator", "1 while this member is the coordinator")
COORDINATOR_TERM = Gauge("failoverd_coordinator_term", "Term of the coordinator this member "
                         "holds (0 when not coordinator)")
ACTIVE_REGION = Gauge("failoverd_active_region", "1 for the active region of each group",
                      ["group", "region"])
EPOCH = Gauge("failoverd_epoch", "Epoch of each group's active record", ["group"])
FAILOVERS = Counter("failoverd_failovers_total", "Active-record changes this member committed "
                    "or attempted", ["trigger", "outcome"])
EVACUATIONS = Counter("failoverd_evacuations_total", "Region evacuations this member "
                      "committed as coordinator: one per incident, however many groups",
                      ["region", "trigger"])
ALERTS = Counter("failoverd_alerts_total", "Alerts raised (no candidate, limits)", ["group"])
PROBE_LATENCY = Histogram("failoverd_probe_latency_seconds", "Probe check duration",
                          ["region", "kind"],
                          buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
DATABASE_CHECK_FAILURES = Counter("failoverd_database_check_failures_total",
                                  "Checks of this member's region's database that failed",
                                  ["group"])
DATABASE_LAG_BYTES = Gauge("failoverd_database_lag_bytes",
                           "This region's standby: WAL bytes behind its primary",
                           ["group"])
PROBE_VERDICT = Gauge("failoverd_probe_verdict", "This member's view of each region "
                      "(1 for the current verdict)", ["region", "verdict"])
REGION_VERDICT = Gauge("failoverd_region_verdict", "Quorum verdict per region (1 for the "
                       "current one), as the coordinator sees it", ["region", "verdict"])
POWER_STATE = Gauge("failoverd_power_state", "Region power state (1 for the current one), as "
                    "the coordinator sees it", ["region", "state"])
MQTT_MESSAGES = Counter("failoverd_mqtt_messages_total", "MQTT messages by result",
                        ["result", "reason"])
POWER_SOURCE_POLLS = Counter("failoverd_power_source_polls_total", "Polls of NUT/SNMP power "
                             "sources by result (ok, or why no reading came)",
                             ["sensor", "kind", "result"])
POWER_SOURCE_UP = Gauge("failoverd_power_source_up", "1 while the power source's last poll "
                        "gave a reading", ["sensor", "kind"])
ETCD_LATENCY = Histogram("failoverd_etcd_op_seconds", "etcd call duration", ["op"],
                         buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2))
MALFORMED_KEYS = Gauge("failoverd_malformed_keys", "Keys under the cluster's prefix the "
                       "coordinator could not parse and ignores")
ETCD_ERRORS = Counter("failoverd_etcd_errors_total", "etcd calls that failed", ["op"])
WORKFLOW_STEP = Histogram("failoverd_workflow_step_seconds", "Failover workflow step "
                          "durations", ["step", "outcome"],
                          buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
API_REQUESTS = Counter("failoverd_api_requests_total", "API requests", ["route", "status"])
SDNOTIFY_ERRORS = Counter("failoverd_sdnotify_errors_total", "sd_notify messages not delivered")
WATCHDOG_WITHHELD = Counter("failoverd_watchdog_withheld_total", "Watchdog pings withheld "
                            "because something is stuck")

VERDICTS = ("up", "down", "unknown", "unprobed")
POWER_STATES = ("normal", "utility_lost", "on_generator", "on_battery", "critical", "unknown")


def set_one_of(gauge: Gauge, values: tuple[str, ...], current: str, *labels: str) -> None:
    """A state gauge (its labels: ``labels``, then the state): 1 for
    ``current``, 0 for every other value.  Set through :func:`set_labelled`:
    the coordinator exports this every tick, and ``Gauge.labels`` with
    keywords was a sixth of a resting coordinator's cycle."""
    for v in values:
        set_labelled(gauge, 1 if v == current else 0, *labels, v)


# Per labelled gauge, its children and the value each was last set to.
# ``Gauge.labels`` costs a lock and a tuple build per call: the coordinator
# exports three gauges per group every decided cycle, and members set one
# per group and region at each epoch, so at 1,000 groups the calls were
# ~5 % of an evacuating coordinator's loop.
_children: dict[Gauge, dict[tuple[str, ...], tuple[Gauge, float]]] = {}


def set_labelled(gauge: Gauge, value: float, *labels: str) -> None:
    """``gauge.labels(*labels).set(value)``, skipped when it holds ``value``."""
    seen = _children.setdefault(gauge, {})
    known = seen.get(labels)
    if known is not None:
        if known[1] == value:
            return
        child = known[0]
    else:
        child = gauge.labels(*labels)
    child.set(value)
    seen[labels] = (child, value)


def clear_labelled(gauge: Gauge) -> None:
    """``gauge.clear()``, forgetting the children :func:`set_labelled` knew."""
    gauge.clear()
    _children.pop(gauge, None)


PEER_RTT = Gauge("failoverd_peer_rtt_seconds", "Last measured /healthz round trip to a member "
                 "of another region (rule 4's peer check)", ["peer"])

# The coordinator's view of the cluster, for alerting (docs/operations.md,
# deploy/prometheus/failoverd-rules.yml).  Set each cycle by the coordinator
# only, and cleared when it steps down: a deposed coordinator must not keep
# exporting what it last saw.
GROUP_ACTIVE = Gauge("failoverd_group_active", "1 when the group has an active region",
                     ["group"])
SAGA_FAILED = Gauge("failoverd_saga_failed", "1 when the saga of the group's current epoch "
                    "failed (failoverctl retry)", ["group"])
REGION_MEMBERS = Gauge("failoverd_region_members", "Live members (with a lease) per region",
                       ["region"])
POWER_SENSORS_STALE = Gauge("failoverd_power_sensors_stale", "Power sensors of the region "
                            "silent past sensor_stale_s", ["region"])
DRAIN_SECONDS_LEFT = Gauge("failoverd_drain_seconds_left", "Time left of the region's drain "
                           "(0: not drained)", ["region"])
GROUPS_HELD = Gauge("failoverd_groups_held_by_guard", "Groups the last decision wanted to move "
                    "but a storm guard (cooldown excepted) or a missing candidate held")
LAST_DRILL = Gauge("failoverd_last_drill_timestamp_seconds", "When the group's last drill "
                   "ran (Unix time; 0: never)", ["group"])
COORDINATOR_VIEW = (GROUP_ACTIVE, SAGA_FAILED, REGION_MEMBERS, POWER_SENSORS_STALE,
                    DRAIN_SECONDS_LEFT, LAST_DRILL)
