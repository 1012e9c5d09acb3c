"""Typed settings: the TOML file of DESIGN.md, validated once at load.

Nothing past :func:`load_settings` sees an untyped dict.  Errors are reported
with their location in the file (``regions[1].probes[0].interval_s: must be >
0``) so ``failoverd check-config`` can print every one of them at once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    IPvAnyAddress,
    ValidationError,
    model_validator,
)

from failoverd.core.engine import GroupPolicy, Policy
from failoverd.core.power import OidTable, TopicMapping

Name = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")]
PositiveFloat = Annotated[float, Field(gt=0)]


# Bounds of rule 4's peer check timeout (Settings.peer_timeout_s).
PEER_TIMEOUT_MIN_S = 1.0
PEER_TIMEOUT_MAX_S = 10.0


class _Model(BaseModel):
    # Unknown keys are errors: a typo in a safety setting must not be ignored.
    model_config = ConfigDict(extra="forbid", frozen=True)


class EtcdSettings(_Model):
    endpoints: list[str] = Field(default_factory=lambda: ["127.0.0.1:2379"], min_length=1)
    # etcd refuses TTLs below its minimum (about 1.5 x election timeout); 2 s is
    # the smallest that a default-tuned etcd grants as asked.
    lease_ttl_s: Annotated[int, Field(ge=2, le=300)] = 5
    # Subtracted from the local lease deadline: covers clock-rate drift between
    # this host and the etcd leader.
    lease_margin_s: Annotated[float, Field(ge=0)] = 0.5
    timeout_s: PositiveFloat = 2.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    tls_server_name: str | None = None
    username: str | None = None
    password_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.lease_margin_s >= self.lease_ttl_s / 2:
            raise ValueError("lease_margin_s must be less than half of lease_ttl_s")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and self.ca_file is None:
            raise ValueError("client certificates need ca_file")
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self


class ApiToken(_Model):
    name: Name
    role: Literal["viewer", "operator"]
    sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class ApiSettings(_Model):
    listen: str = "127.0.0.1:8080"
    # The URL peers (rule 4's peer check, the coordinator's ask) and
    # failoverctl use to reach this member; default: built from ``listen``.
    # Needed when listening on a wildcard address or behind NAT.
    advertise_url: Annotated[str, Field(pattern=r"^https?://[^/\s]+/?$")] | None = None
    # Peer requests leave from this local address (multi-homed hosts whose
    # firewalls allow peers by source address); default: the kernel's choice.
    peer_source_address: IPvAnyAddress | None = None
    tokens: list[ApiToken] = Field(default_factory=list)
    metrics_public: bool = True
    # Requests per second per token (per client address without one), with
    # bursts up to rate_burst; past it, 429 with Retry-After.  /healthz and
    # /readyz are never limited (peers and systemd ask them).
    rate_per_token: Annotated[float, Field(gt=0, le=100_000)] = 20.0
    rate_burst: Annotated[int, Field(ge=1, le=100_000)] = 40
    # Requests handled at once; more wait up to 1 s, then 503 with Retry-After.
    max_concurrent_requests: Annotated[int, Field(ge=1, le=10_000)] = 32
    # HTTPS when both are set (PEM files).
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        host = self.listen.rpartition(":")[0].strip("[]")
        if self.advertise_url is None and host in {"", "0.0.0.0", "::"}:
            # Peers would be told to ask 0.0.0.0, which is themselves.
            raise ValueError(f"listen = {self.listen!r} is a wildcard address: set "
                             "advertise_url to the URL other members reach this one at")
        return self

    def url(self) -> str:
        """Where peers and failoverctl reach this member."""
        if self.advertise_url is not None:
            return self.advertise_url.rstrip("/")
        return f"{'https' if self.tls_cert_file else 'http'}://{self.listen}"


PowerStateName = Literal["utility_ok", "utility_lost", "on_generator", "on_battery",
                         "low_battery", "generator_failed", "transfer_failed",
                         "shutdown_imminent", "offline"]


class MqttMapping(_Model):
    """A foreign MQTT shape read as a power sensor (docs/power-sources.md)."""

    # An MQTT topic filter (+ and # allowed); subscribed on this broker.
    topic: Annotated[str, Field(min_length=1, max_length=512)]
    # Literal names, or "{n}": the n-th level of the topic (from 0).
    region: Annotated[str, Field(pattern=r"^(\{[0-9]+\}|[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")]
    sensor: Annotated[str, Field(pattern=r"^(\{[0-9]+\}|[A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")]
    # A dotted path into a JSON payload ("ENERGY.Voltage", "battery.0");
    # absent: the payload itself is the value.
    json_path: str | None = None
    # What each value means (compared case-insensitively; JSON true/false
    # are "true"/"false").  A value not listed is rejected, never guessed.
    states: dict[str, PowerStateName] = Field(default_factory=dict)
    # Or: the value is NUT ups.status flags ("OB DISCHRG").
    nut_status: bool = False
    runtime_path: str | None = None
    # Multiplier to seconds (60 for a runtime in minutes).
    runtime_scale: PositiveFloat = 1.0
    charge_path: str | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if bool(self.states) == self.nut_status:
            raise ValueError("give either states (a value → state table) or nut_status = true")
        levels = self.topic.split("/")
        for i, level in enumerate(levels):
            if "#" in level and (level != "#" or i != len(levels) - 1):
                raise ValueError(f"topic {self.topic!r}: # must be a whole, final level")
            if "+" in level and level != "+":
                raise ValueError(f"topic {self.topic!r}: + must be a whole level")
        for name in ("region", "sensor"):
            value = getattr(self, name)
            if value.startswith("{") and "#" not in self.topic and int(value[1:-1]) >= len(levels):
                raise ValueError(f"{name} {value}: the topic has only {len(levels)} levels")
        return self

    def to_core(self) -> TopicMapping:
        return TopicMapping(
            topic=self.topic, region=self.region, sensor=self.sensor, json_path=self.json_path,
            states=tuple(self.states.items()), nut_status=self.nut_status,
            runtime_path=self.runtime_path, runtime_scale=self.runtime_scale,
            charge_path=self.charge_path)


class MqttSettings(_Model):
    url: Annotated[str, Field(pattern=r"^mqtts?://[^/:]+(:[0-9]+)?/?$")]
    topics: list[str] = Field(default_factory=lambda: ["failoverd/power/#"], min_length=1)
    # Foreign shapes (Home Assistant, Zigbee2MQTT, Tasmota…): their topics are
    # subscribed too, and a message on one is read by its mapping.
    mappings: list[MqttMapping] = Field(default_factory=list)
    username: str | None = None
    password_file: Path | None = None
    ca_file: Path | None = None
    # A client certificate, for brokers that require one
    # (mosquitto's require_certificate); mqtts:// only.
    cert_file: Path | None = None
    key_file: Path | None = None
    # Where this member publishes its own status (retained, with a Last
    # Will); default failoverd/status/<cluster>/<member>.
    status_topic: str | None = None
    max_payload: Annotated[int, Field(ge=64, le=1_048_576)] = 4096

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file go together")
        if self.cert_file is not None and not self.url.startswith("mqtts://"):
            raise ValueError("a client certificate needs an mqtts:// url")
        return self

    @property
    def subscriptions(self) -> list[str]:
        """``topics`` and the mappings' topics, each once."""
        return list(dict.fromkeys([*self.topics, *(m.topic for m in self.mappings)]))

    @property
    def host_port(self) -> tuple[str, int, bool]:
        tls = self.url.startswith("mqtts://")
        rest = self.url.split("://", 1)[1].rstrip("/")
        host, _, port = rest.partition(":")
        return host, int(port) if port else (8883 if tls else 1883), tls


class ProbeSettings(_Model):
    kind: Literal["http", "tcp", "exec"]
    target: str | list[str]
    interval_s: PositiveFloat = 1.0
    timeout_s: PositiveFloat = 0.5
    fall: Annotated[int, Field(ge=1)] = 3
    rise: Annotated[int, Field(ge=1)] = 2
    # A readiness probe answers "can this region take the load now?": it
    # gates candidacy but never triggers a failover away from the region.
    readiness: bool = False
    # http only: accepted status codes (default any 2xx/3xx), a substring the
    # body must contain, and TLS verification.
    expect_status: list[Annotated[int, Field(ge=100, le=599)]] = Field(default_factory=list)
    body_match: str | None = None
    tls_verify: bool = True
    ca_file: Path | None = None

    @model_validator(mode="after")
    def _check(self) -> Self:
        if self.timeout_s > self.interval_s:
            raise ValueError("timeout_s must not exceed interval_s")
        if self.kind == "exec" and not isinstance(self.target, list):
            raise ValueError("an exec probe's target is a command list")
        if self.kind != "exec" and not isinstance(self.target, str):
            raise ValueError(f"a {self.kind} probe's target is a string")
        return self


HostPort = Annotated[str, Field(pattern=r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)(:[0-9]{1,5})?$")]


def split_host_port(address: str, default_port: int) -> tuple[str, int]:
    """``host[:port]`` (IPv6 in brackets) → (host, port)."""
    if address.startswith("["):
        host, _, rest = address[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, _, port = address.partition(":")
    return host, int(port) if port else default_port


class NutSource(_Model):
    """A NUT ``upsd`` polled by the members of the source's region."""

    kind: Literal["nut"]
    # The sensor name under power/<region>/ (one sensor per UPS).
    sensor: Name
    server: HostPort = "127.0.0.1:3493"
    ups: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    username: str | None = None
    password_file: Path | None = None
    # auto: STARTTLS when the server offers it (certificate verified against
    # ca_file, else the system store); required: refuse a server without it.
    tls: Literal["auto", "required", "off"] = "auto"
    ca_file: Path | None = None
    poll_interval_s: Annotated[float, Field(ge=0.2, le=300)] = 2.0
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.username is None) != (self.password_file is None):
            raise ValueError("username and password_file go together")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.server, 3493)

    @property
    def where(self) -> str:
        """For people: ``ups1@host:3493``."""
        return f"{self.ups}@{self.server}"


Oid = Annotated[str, Field(pattern=r"^[0-9]+(\.[0-9]+){2,127}$")]


class SnmpOids(_Model):
    """A device outside the UPS-MIB: which OID holds its state and what each
    value means (docs/power-sources.md has a worked example)."""

    state: Oid
    states: Annotated[dict[str, PowerStateName], Field(min_length=1)]
    runtime: Oid | None = None
    # Multiplier to seconds (0.01 for TimeTicks, 60 for minutes).
    runtime_scale: PositiveFloat = 1.0
    charge: Oid | None = None

    def to_core(self) -> OidTable:
        return OidTable(state=self.state, states=tuple(self.states.items()),
                        runtime=self.runtime, runtime_scale=self.runtime_scale,
                        charge=self.charge)


class SnmpSource(_Model):
    """An SNMP agent (a UPS, generator controller, ATS) polled by the
    members of the source's region: v2c with a community, or v3 (USM)."""

    kind: Literal["snmp"]
    sensor: Name
    target: HostPort
    version: Literal["2c", "3"] = "2c"
    # v2c: the community, inline or (better) in a file.
    community: str | None = None
    community_file: Path | None = None
    # v3: a USM user; auth and priv keys in files.
    user: str | None = None
    auth_protocol: Literal["SHA", "SHA224", "SHA256", "SHA384", "SHA512", "MD5"] | None = None
    auth_key_file: Path | None = None
    priv_protocol: Literal["AES", "AES192", "AES256", "DES"] | None = None
    priv_key_file: Path | None = None
    context: str = ""
    # "ups": RFC 1628's UPS-MIB; "oids": the table below.
    mib: Literal["ups", "oids"] = "ups"
    oids: SnmpOids | None = None
    poll_interval_s: Annotated[float, Field(ge=0.2, le=300)] = 2.0
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        if (self.mib == "oids") != (self.oids is not None):
            raise ValueError('mib = "oids" goes with an [oids] table (and only with one)')
        if self.version == "2c":
            if self.community is not None and self.community_file is not None:
                raise ValueError("give community or community_file, not both")
            if self.user is not None:
                raise ValueError('user is for version = "3"')
        else:
            if self.user is None:
                raise ValueError('version = "3" needs user')
            if self.community is not None or self.community_file is not None:
                raise ValueError('community is for version = "2c"')
            if (self.auth_protocol is None) != (self.auth_key_file is None):
                raise ValueError("auth_protocol and auth_key_file go together")
            if (self.priv_protocol is None) != (self.priv_key_file is None):
                raise ValueError("priv_protocol and priv_key_file go together")
            if self.priv_protocol is not None and self.auth_protocol is None:
                raise ValueError("privacy needs authentication (auth_protocol)")
        return self

    @property
    def host_port(self) -> tuple[str, int]:
        return split_host_port(self.target, 161)

    @property
    def where(self) -> str:
        """For people: ``host:161``."""
        return self.target


PowerSource = Annotated[NutSource | SnmpSource, Field(discriminator="kind")]


class RegionSettings(_Model):
    name: Name
    priority: int = 0
    # Distinct sensors that must say "critical" before the region is
    # evacuated for power (one lying sensor cannot empty a site with three).
    power_quorum: Annotated[int, Field(ge=1)] = 1
    # Round-trip time from the other regions' members to this region's
    # (ms), for rule 4's peer check across a WAN: the check waits 4 x the
    # largest configured RTT (at least 1 s, at most 10 s).  Members measure
    # the RTT too and warn when it outgrows the timeout.
    rtt_ms: Annotated[float, Field(gt=0, le=5000)] | None = None
    probes: list[ProbeSettings] = Field(default_factory=list)
    # Power devices this region's members poll (NUT, SNMP), published like
    # MQTT feeds under power/<region>/<sensor>.
    power_sources: list[PowerSource] = Field(default_factory=list)

    @model_validator(mode="after")
    def _check_sources(self) -> Self:
        sensors = [src.sensor for src in self.power_sources]
        if len(set(sensors)) != len(sensors):
            raise ValueError("power_sources: each source needs its own sensor name")
        return self


class HaproxyRoute(_Model):
    kind: Literal["haproxy"]
    socket: str
    backend: str
    servers: dict[str, str]


class DnsRoute(_Model):
    kind: Literal["dns"]
    server: str
    zone: str
    name: str
    ttl: Annotated[int, Field(ge=0)] = 30
    tsig_key_file: Path | None = None
    addresses: dict[str, list[str]]

    @model_validator(mode="after")
    def _check(self) -> Self:
        # Never route to nowhere (safety rule 8): every region needs addresses.
        empty = sorted(r for r, addrs in self.addresses.items() if not addrs)
        if empty:
            raise ValueError(f"regions with no addresses: {', '.join(empty)}")
        return self


class WebhookRoute(_Model):
    kind: Literal["webhook"]
    url: Annotated[str, Field(pattern=r"^https?://")]
    secret_file: Path | None = None
    timeout_s: PositiveFloat = 5.0


class ExecRoute(_Model):
    kind: Literal["exec"]
    command: list[str] = Field(min_length=1)
    timeout_s: PositiveFloat = 30.0


Route = Annotated[
    HaproxyRoute | DnsRoute | WebhookRoute | ExecRoute, Field(discriminator="kind")
]


class PostgresDatabase(_Model):
    """A group's PostgreSQL: the member of each region checks its own
    region's server (asyncpg) and publishes role, replay position and lag."""

    kind: Literal["postgres"]
    # region -> libpq URI of that region's server, as its member reaches it
    # (postgresql://user@host:port/db; the password from password_file).
    dsn: Annotated[dict[Name, str], Field(min_length=1)]
    password_file: Path | None = None
    # A standby further behind than this is no candidate for automatic
    # failover (Patroni's maximum_lag_on_failover, 1 MiB by default).
    max_lag_bytes: Annotated[int, Field(ge=0)] = 1_048_576
    check_interval_s: Annotated[float, Field(ge=0.1, le=60)] = 1.0
    timeout_s: Annotated[float, Field(gt=0, le=60)] = 2.0
    # A switchover waits this long, after fencing the old primary, for the
    # new region to replay its last WAL; then it aborts and switches back.
    catchup_timeout_s: Annotated[float, Field(gt=0, le=3600)] = 30.0

    @model_validator(mode="after")
    def _check(self) -> Self:
        for region, dsn in self.dsn.items():
            if not dsn.startswith(("postgresql://", "postgres://")):
                raise ValueError(f"dsn.{region}: a postgresql:// URI")
        return self


class GroupSettings(_Model):
    name: Name
    regions: list[Name] = Field(min_length=1)
    promote: list[str] = Field(default_factory=list)
    demote: list[str] = Field(default_factory=list)
    # Database groups: run in the old region after a switchover, to bring
    # its old primary back as a standby of the new one (pg_rewind).
    rejoin: list[str] = Field(default_factory=list)
    hook_timeout_s: PositiveFloat = 30.0
    hook_attempts: Annotated[int, Field(ge=1, le=20)] = 3
    # The promote/demote commands take many groups at once: one line per
    # group (``GROUP EPOCH``) on standard input, ``FAILOVERD_BATCH=1``; groups
    # with the same command and role that need it together share one run.
    hook_batch: bool = False
    routes: list[Route] = Field(default_factory=list)
    # Planned switchover: how long the old region drains before promotion.
    drain_s: Annotated[float, Field(ge=0)] = 5.0
    # Verify after reroute: GET this URL (through the traffic path) until the
    # body names the new region; routers' own read-backs are checked too.
    verify_url: str | None = None
    verify_timeout_s: PositiveFloat = 15.0
    # A failing saga step is retried (jittered backoff) this many times,
    # then the saga is marked failed and an alert recorded.
    step_attempts: Annotated[int, Field(ge=1, le=50)] = 5
    # The group's database: a region is promoted only when its copy is current.
    database: PostgresDatabase | None = None

    @model_validator(mode="after")
    def _check_database(self) -> Self:
        if self.database is not None and self.hook_batch:
            raise ValueError("hook_batch: a database group's hooks handle one server each "
                             "(the demote hook reports its final WAL position)")
        if self.database is not None:
            missing = [r for r in self.regions if r not in self.database.dsn]
            extra = [r for r in self.database.dsn if r not in self.regions]
            if missing:
                raise ValueError(f"database.dsn has no server for {', '.join(missing)} "
                                 "(a region without one could never be promoted)")
            if extra:
                raise ValueError(f"database.dsn names regions not in the group: "
                                 f"{', '.join(extra)}")
        return self


class PolicySettings(_Model):
    # Per group, between health-triggered moves and failbacks (never holds a
    # group in a region that is dying: rule 6).
    cooldown_s: Annotated[float, Field(ge=0)] = 300.0
    # One group's flapping limit: its automatic moves per hour.
    max_auto_failovers_per_group_per_hour: Annotated[int, Field(ge=0)] = 3
    # Cluster-wide: region incidents (evacuations, failback waves) per hour,
    # not group moves.
    max_evacuations_per_hour: Annotated[int, Field(ge=0)] | None = None
    # Deprecated alias of max_evacuations_per_hour (it used to count group
    # moves, which held most groups of a region in a dying site).
    max_auto_failovers_per_hour: Annotated[int, Field(ge=0)] | None = None
    failback: Literal["manual", "auto"] = "manual"
    failback_stable_s: Annotated[float, Field(ge=0)] = 300.0
    power_grace_s: Annotated[float, Field(ge=0)] = 30.0
    power_runtime_margin_s: Annotated[float, Field(ge=0)] = 120.0
    # A sensor last seen normal that is silent this long (or whose Last Will
    # fired) is unknown.
    sensor_stale_s: PositiveFloat = 30.0
    # A sensor last seen in an outage state keeps it through silence, and
    # after this long silent the region counts as power critical (rule 10).
    power_silence_during_outage_s: PositiveFloat = 30.0
    # A sensor's runtime/charge changes are relayed to etcd at most this
    # often (its state changes, and a runtime crossing the failover budget,
    # at once): a UPS reporting every 100 ms costs one write a second.
    relay_min_interval_s: Annotated[float, Field(ge=0, le=60)] = 1.0
    # Distinct sensor names a member accepts per region from MQTT (a
    # misconfigured bridge, or anyone with publish rights, must not fill
    # etcd); configured power_sources are always accepted.
    max_sensors_per_region: Annotated[int, Field(ge=1, le=10_000)] = 64
    # A drain without a duration lasts this long; none may last longer
    # (Route 53 ARC's zonal shifts expire after 72 h at most): a forgotten
    # drain must not keep a region out of candidacy for ever.
    drain_default_s: Annotated[float, Field(ge=1)] = 4 * 3600.0
    drain_max_s: Annotated[float, Field(ge=1)] = 72 * 3600.0
    # Sagas the coordinator runs at once (an evacuation starts one per group).
    max_concurrent_sagas: Annotated[int, Field(ge=1, le=4096)] = 64
    # Promote/demote hooks a member runs at once.
    max_concurrent_hooks: Annotated[int, Field(ge=1, le=4096)] = 64
    # Groups in one run of a batch hook (groups with ``hook_batch``); more
    # go in further runs, each taking one of the hook slots above.
    max_hook_batch: Annotated[int, Field(ge=1, le=10_000)] = 250
    # Hooks, exec routes and exec probes run this much nicer than the daemon
    # (0: at its priority): hundreds of them at once must not starve the
    # daemon's lease keep-alive; they still get every idle cycle.
    hook_nice: Annotated[int, Field(ge=0, le=19)] = 10
    # How long a failover takes before history has measured ones to learn from.
    expected_failover_s: PositiveFloat = 60.0
    # The coordinator reacts to watch events; this tick only bounds how long a
    # time-based rule (cooldown expiry) waits when nothing else happens.
    tick_s: PositiveFloat = 1.0
    # At a cold start, wait this long for every region of a group to register
    # before bootstrapping its active record (not waited if all are present).
    bootstrap_grace_s: Annotated[float, Field(ge=0)] = 10.0
    # How long the active region must have no live member before the
    # member-loss trigger fires: a daemon restart (upgrade) is not a loss.
    # Detection after a crash is lease_ttl_s + this.
    member_loss_grace_s: Annotated[float, Field(ge=0)] = 5.0
    # Audit events kept (oldest pruned): an evacuation of 1,000 groups writes
    # several per group (epoch change, saga steps, hooks).
    history_limit: Annotated[int, Field(ge=10)] = 20_000
    # Safety rule 4: after this long without a lease, a member of the active
    # region asks the other regions' members; if none answers (or one names
    # a newer epoch), it demotes.  Unplanned moves out of a region whose
    # members vanished wait for this plus two seconds (the self-fence
    # deadline) before promoting: keep it short.
    isolation_grace_s: PositiveFloat = 3.0
    # An unplanned move out of a region whose members are still in etcd waits
    # up to this long for them to report standby (their demote ran) before
    # promoting the new region; then it goes on, fenced by routing.
    fence_ack_wait_s: Annotated[float, Field(ge=0, le=300)] = 5.0
    # Observer regions (other than the target) that must agree for a region
    # to be judged down or up; 0 = a majority of the live observer regions.
    health_quorum: Annotated[int, Field(ge=0)] = 0

    @model_validator(mode="after")
    def _check_drains(self) -> Self:
        if self.drain_default_s > self.drain_max_s:
            raise ValueError(f"drain_default_s ({self.drain_default_s:g}) is longer than "
                             f"drain_max_s ({self.drain_max_s:g})")
        return self

    @property
    def evacuation_limit(self) -> int:
        if self.max_evacuations_per_hour is not None:
            return self.max_evacuations_per_hour
        if self.max_auto_failovers_per_hour is not None:
            return self.max_auto_failovers_per_hour
        return 3

    def deprecations(self) -> list[str]:
        if self.max_auto_failovers_per_hour is None:
            return []
        if self.max_evacuations_per_hour is not None:
            return ["policy.max_auto_failovers_per_hour is deprecated and ignored: "
                    "max_evacuations_per_hour is set"]
        return ["policy.max_auto_failovers_per_hour is deprecated: it now means "
                "max_evacuations_per_hour (region incidents per hour, not group moves); "
                "rename it"]


class ProbingSettings(_Model):
    """How this member runs its probes (not how verdicts are judged)."""

    max_concurrent: Annotated[int, Field(ge=1, le=1024)] = 32
    # +/- this fraction of interval_s, so members do not probe in lockstep.
    jitter: Annotated[float, Field(ge=0, le=0.5)] = 0.1
    # An unchanged observation is re-published this often (a changed one at
    # once): N members x M regions / refresh_s etcd writes per second.
    refresh_s: Annotated[float, Field(ge=1)] = 30.0


class LogSettings(_Model):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


_GROUP_INDEX: dict[int, tuple[list[GroupSettings], dict[str, GroupSettings]]] = {}


class Settings(_Model):
    cluster: Name
    member: Name
    region: Name
    state_dir: Path = Path("/var/lib/failoverd")
    etcd: EtcdSettings = Field(default_factory=EtcdSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    mqtt: list[MqttSettings] = Field(default_factory=list)
    regions: list[RegionSettings] = Field(min_length=1)
    groups: list[GroupSettings] = Field(default_factory=list)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    probing: ProbingSettings = Field(default_factory=ProbingSettings)
    log: LogSettings = Field(default_factory=LogSettings)

    @model_validator(mode="after")
    def _check_references(self) -> Self:
        problems = reference_problems(self.model_dump(mode="python"))
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def unreadable_files(self) -> tuple[list[str], list[str]]:
        """Files the config names that cannot be read, with their location:
        (needed to start: etcd, MQTT, API credentials and certificates;
        needed at failover time: routes' keys and secrets, probes' CAs)."""
        start: list[tuple[str, Path | None]] = [
            ("etcd.ca_file", self.etcd.ca_file), ("etcd.cert_file", self.etcd.cert_file),
            ("etcd.key_file", self.etcd.key_file),
            ("etcd.password_file", self.etcd.password_file),
            ("api.tls_cert_file", self.api.tls_cert_file),
            ("api.tls_key_file", self.api.tls_key_file)]
        for i, m in enumerate(self.mqtt):
            start += [(f"mqtt[{i}].password_file", m.password_file),
                      (f"mqtt[{i}].ca_file", m.ca_file), (f"mqtt[{i}].cert_file", m.cert_file),
                      (f"mqtt[{i}].key_file", m.key_file)]
        later: list[tuple[str, Path | None]] = []
        for i, g in enumerate(self.groups):
            for j, route in enumerate(g.routes):
                for attr in ("tsig_key_file", "secret_file"):
                    later.append((f"groups[{i}].routes[{j}].{attr}", getattr(route, attr, None)))
        for i, r in enumerate(self.regions):
            for j, probe in enumerate(r.probes):
                later.append((f"regions[{i}].probes[{j}].ca_file", probe.ca_file))
            for j, src in enumerate(r.power_sources):
                for attr in ("password_file", "ca_file", "community_file", "auth_key_file",
                             "priv_key_file"):
                    later.append((f"regions[{i}].power_sources[{j}].{attr}",
                                  getattr(src, attr, None)))

        def unreadable(items: list[tuple[str, Path | None]]) -> list[str]:
            out = []
            for where, path in items:
                if path is None:
                    continue
                try:
                    with path.open("rb"):
                        pass
                except OSError as exc:
                    out.append(f"{where}: cannot read {path}: {exc.strerror}")
            return out
        return unreadable(start), unreadable(later)

    def region_by_name(self, name: str) -> RegionSettings | None:
        return next((r for r in self.regions if r.name == name), None)

    @property
    def peer_timeout_s(self) -> float:
        """How long rule 4's peer check (and the coordinator's check of a
        memberless region) waits for a member's /healthz: 4 x the largest
        configured inter-region RTT, 1 s to 10 s (Patroni's fixed 2 s
        breaks its failsafe across regions)."""
        rtts = [r.rtt_ms for r in self.regions if r.rtt_ms is not None]
        return min(max(4 * max(rtts) / 1000, PEER_TIMEOUT_MIN_S), PEER_TIMEOUT_MAX_S) \
            if rtts else PEER_TIMEOUT_MIN_S

    def group_by_name(self, name: str) -> GroupSettings | None:
        # O(1): sagas ask per step.  Indexed by the groups list itself (kept
        # alive by the index, so its id cannot be reused), outside the model
        # so equality and dumps are unaffected.
        index = _GROUP_INDEX.get(id(self.groups))
        if index is None or index[0] is not self.groups:
            if len(_GROUP_INDEX) > 16:
                _GROUP_INDEX.clear()
            index = (self.groups, {g.name: g for g in self.groups})
            _GROUP_INDEX[id(self.groups)] = index
        return index[1].get(name)


def _items(value: object) -> list[dict[str, object]]:
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []


def reference_problems(raw: Mapping[str, object]) -> list[str]:
    """Cross-references between sections (region names, route entries).

    Works on raw data too, so ``check-config`` reports these alongside field
    errors instead of only after those are fixed.
    """
    problems: list[str] = []
    names = [r.get("name") for r in _items(raw.get("regions"))]
    if len(set(names)) != len(names):
        problems.append("regions: names must be unique")
    known = {n for n in names if isinstance(n, str)}
    region = raw.get("region")
    if isinstance(region, str) and region not in known:
        problems.append(f"region: {region!r} is not one of the [[regions]]")
    groups = _items(raw.get("groups"))
    if len({g.get("name") for g in groups}) != len(groups):
        problems.append("groups: names must be unique")
    for i, group in enumerate(groups):
        members = group.get("regions")
        members = [m for m in members if isinstance(m, str)] if isinstance(members, list) else []
        problems += [f"groups[{i}].regions: unknown region {m!r}"
                     for m in members if m not in known]
        for j, route in enumerate(_items(group.get("routes"))):
            per_region = route.get("servers", route.get("addresses"))
            if isinstance(per_region, dict):
                missing = [m for m in members if m not in per_region]
                if missing:
                    problems.append(
                        f"groups[{i}].routes[{j}]: no entry for region(s) {', '.join(missing)}")
    for i, broker in enumerate(_items(raw.get("mqtt"))):
        for j, mapping in enumerate(_items(broker.get("mappings"))):
            region = mapping.get("region")
            if isinstance(region, str) and not region.startswith("{") and region not in known:
                problems.append(f"mqtt[{i}].mappings[{j}].region: unknown region {region!r}")
    return problems


@dataclass(frozen=True)
class Overrides:
    """Per-member settings from the command line or environment (these win)."""

    member: str | None = None
    region: str | None = None
    api_listen: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Overrides:
        env = os.environ if environ is None else environ
        return cls(
            member=env.get("FAILOVERD_MEMBER") or None,
            region=env.get("FAILOVERD_REGION") or None,
            api_listen=env.get("FAILOVERD_API_LISTEN") or None,
        )

    def over(self, other: Overrides) -> Overrides:
        """Fields of ``self`` where set, else ``other``'s."""
        return Overrides(
            member=self.member or other.member,
            region=self.region or other.region,
            api_listen=self.api_listen or other.api_listen,
        )


class ConfigError(Exception):
    """A config file that cannot be used; ``errors`` lists each problem."""

    def __init__(self, path: Path, errors: list[str]) -> None:
        self.path = path
        self.errors = errors
        super().__init__(f"{path}: " + "; ".join(errors))


# The ``kind`` values of discriminated unions (routes, power sources).
_UNION_TAGS = frozenset({"haproxy", "dns", "webhook", "exec", "nut", "snmp"})


def _location(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in _UNION_TAGS:
            continue  # the discriminated-union tag adds nothing for a reader
        else:
            out += f".{part}" if out else str(part)
    return out or "(top level)"


def _message(err: Mapping[str, object]) -> str:
    ctx = err.get("ctx")
    ctx = ctx if isinstance(ctx, dict) else {}
    kind = err.get("type")
    bounds = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}
    if isinstance(kind, str) and kind in bounds:
        key = {">": "gt", ">=": "ge", "<": "lt", "<=": "le"}[bounds[kind]]
        limit = ctx.get(key)
        if isinstance(limit, float) and limit.is_integer():
            limit = int(limit)
        return f"must be {bounds[kind]} {limit}"
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "unknown setting"
    if kind == "string_pattern_mismatch":
        return f"does not match {ctx.get('pattern')}"
    msg = str(err.get("msg", "invalid"))
    return msg.removeprefix("Value error, ")


def format_validation_error(exc: ValidationError) -> list[str]:
    return [f"{_location(tuple(e['loc']))}: {_message(e)}" for e in exc.errors()]


def parse_settings(raw: dict[str, object], overrides: Overrides, path: Path) -> Settings:
    data = dict(raw)
    if overrides.member:
        data["member"] = overrides.member
    if overrides.region:
        data["region"] = overrides.region
    if overrides.api_listen:
        api = data.get("api")
        data["api"] = {**(api if isinstance(api, dict) else {}), "listen": overrides.api_listen}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        errors = format_validation_error(exc)
        joined = "\n".join(errors)
        errors += [p for p in reference_problems(data) if p not in joined]
        raise ConfigError(path, errors) from exc


def load_settings(path: Path, overrides: Overrides | None = None) -> Settings:
    """Read and validate ``path``; raise :class:`ConfigError` listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(path, [f"cannot read: {exc.strerror}"]) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, [f"not valid TOML: {exc}"]) from exc
    return parse_settings(raw, overrides or Overrides.from_env(), path)


def engine_policy(s: Settings) -> Policy:
    """The engine's :class:`~failoverd.core.engine.Policy` from validated
    settings: the loader maps its types onto the core's, so the pure core
    never imports the loader."""
    return Policy(
        priorities=tuple((r.name, r.priority) for r in s.regions),
        groups=tuple(GroupPolicy(g.name, tuple(g.regions),
                                 g.database.max_lag_bytes if g.database else None)
                     for g in s.groups),
        cooldown_s=s.policy.cooldown_s,
        max_evacuations_per_hour=s.policy.evacuation_limit,
        max_auto_failovers_per_group_per_hour=(
            s.policy.max_auto_failovers_per_group_per_hour),
        failback=s.policy.failback,
        failback_stable_s=s.policy.failback_stable_s,
        bootstrap_grace_s=s.policy.bootstrap_grace_s,
        member_loss_grace_s=s.policy.member_loss_grace_s,
        probed_regions=frozenset(r.name for r in s.regions if r.probes),
        health_quorum=s.policy.health_quorum,
        power_grace_s=s.policy.power_grace_s,
        power_runtime_margin_s=s.policy.power_runtime_margin_s,
        sensor_stale_s=s.policy.sensor_stale_s,
        power_silence_during_outage_s=s.policy.power_silence_during_outage_s,
        expected_failover_s=s.policy.expected_failover_s,
        power_quorums=tuple((r.name, r.power_quorum) for r in s.regions),
        drain_default_s=s.policy.drain_default_s,
        drain_max_s=s.policy.drain_max_s,
    )
