"""MQTT power feeds: subscribe, parse, relay to etcd; publish our own status.

One task per broker (``[[mqtt]]``), each a reconnect loop with jittered
exponential backoff that re-subscribes (QoS 1) on every connection and
publishes ``{"state": "online", …}`` retained on the member's status topic,
with a Last Will that sets it ``offline``.  Accepted readings are relayed to
``power/<region>/<sensor>/<member>`` under the member's lease — at once when
they change, at most every ``sensor_stale_s / 3`` otherwise.  Bad messages
are counted by reason and logged at most once per ``LOG_EVERY_S`` per reason;
none of them can stop the loop.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import ssl
import time
from collections import Counter
from collections.abc import Callable

import aiomqtt
import structlog

from failoverd import __version__, metrics
from failoverd.config import MqttSettings, Settings
from failoverd.core.model import Keyspace
from failoverd.core.power import (
    Reading,
    Rejected,
    RuntimeUpdate,
    SensorTable,
    TopicMapping,
    apply_mapping,
    parse_message,
    reading_to_json,
    topic_matches,
)
from failoverd.core.store import Store, StoreError
from failoverd.publishing import LeasedPublisher

log = structlog.get_logger("failoverd.sensing.mqtt")

LOG_EVERY_S = 10.0
REFUSED_NAMES_KEPT = 10
STATUS_EVERY_S = 5.0
# A power event published while we reconnect waits for us: reconnect within
# about a second of the broker's return (x 0.5-1.5 jitter), whatever the
# outage lasted.  A refused connection costs the broker next to nothing.
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 1.0


class _WireErrors(logging.Handler):
    """Keeps the MQTT client library's last socket error for one broker: a
    TLS alert (client certificate required or refused) reaches us only as
    "Operation timed out", while the library logs the real cause."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last = ""

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()


def _wire_logger(url: str) -> tuple[logging.Logger, _WireErrors]:
    logger = logging.getLogger(f"failoverd.sensing.mqtt.wire.{url}")
    logger.propagate = False  # said once, by our own reconnect line
    handler = next((h for h in logger.handlers if isinstance(h, _WireErrors)), None)
    if handler is None:
        handler = _WireErrors()
        logger.addHandler(handler)
    return logger, handler


def mqtt_failure(exc: BaseException | None, wire: str = "") -> str:
    """What went wrong with a broker, in words an operator can act on (the
    client library wraps the cause: the whole chain is read, and ``wire``,
    the library's own last socket error)."""
    chain: list[BaseException] = []
    while exc is not None and len(chain) < 5:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__
    for link in chain:
        if isinstance(link, ssl.SSLError):
            exc = link
            break
    else:
        exc = chain[0] if chain else None
    if exc is None:
        return "disconnected"
    text = " ".join([*(str(e) for e in chain), wire]).lower()
    if "certificate required" in text or "alert unknown ca" in text or \
            "alert bad certificate" in text:
        return "client certificate refused (cert_file/key_file)"
    if isinstance(exc, ssl.SSLCertVerificationError) or "certificate verify failed" in text:
        return "TLS verify failed (the broker's certificate is not trusted by ca_file)"
    if isinstance(exc, ssl.SSLError):
        if "certificate required" in text or "unknown ca" in text or "bad certificate" in text:
            return "client certificate refused (cert_file/key_file)"
        return f"TLS failed ({exc.__class__.__name__})"
    if "not authorized" in text or "bad user name or password" in text or "code:5" in text \
            or "code:4" in text or "code:135" in text or "code:134" in text:
        return "authentication failed (username/password_file)"
    if isinstance(exc, ConnectionRefusedError) or "refused" in text:
        return "unreachable (connection refused)"
    if isinstance(exc, TimeoutError) or "timed out" in text:
        return "unreachable (timed out)"
    return "disconnected"


def broker_credentials(broker: MqttSettings) -> tuple[str | None, ssl.SSLContext | None]:
    """The password and TLS context (CA, client certificate) for ``broker``."""
    password = broker.password_file.read_text().strip() if broker.password_file else None
    context = (ssl.create_default_context(
        cafile=str(broker.ca_file) if broker.ca_file else None)
        if broker.host_port[2] else None)
    if context is not None and broker.cert_file is not None and broker.key_file is not None:
        context.load_cert_chain(str(broker.cert_file), str(broker.key_file))
    return password, context


async def try_broker(broker: MqttSettings, identifier: str, timeout_s: float = 5.0) -> str:
    """Connect to ``broker`` as the daemon would, then leave: "" when it
    worked, else why not (``failoverd check-config --connect``)."""
    host, port, _ = broker.host_port
    logger, wire = _wire_logger(broker.url)
    wire.last = ""
    try:
        password, context = broker_credentials(broker)
        async with asyncio.timeout(timeout_s + 1), aiomqtt.Client(
                host, port, username=broker.username, password=password,
                identifier=identifier, tls_context=context, timeout=timeout_s,
                logger=logger) as client:
            for topic in broker.subscriptions:
                await client.subscribe(topic, qos=1)
    except (aiomqtt.MqttError, OSError, ValueError, TimeoutError) as exc:
        return mqtt_failure(exc, wire.last)
    return ""


class PowerFeeds:
    """Power-sensor feeds from MQTT, relayed to etcd (the ``mqtt`` task);
    polled power sources (:mod:`failoverd.sensing.sources`) relay through
    :meth:`ingest` too, so every sensor follows the same freshness rules.

    Owns one aiomqtt client per configured broker (each with its own
    reconnect loop), the last reading per sensor, and this member's status
    topic with its Last Will.  Readings are validated (size, JSON shape,
    known state, sane times) and relayed under the member's lease.
    Errors: a bad payload is counted and logged (rate-limited) and changes
    nothing; a broker out of reach is retried with jittered backoff, and
    silence is judged by the engine (rule 10), not here.
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 lease_id: Callable[[], int | None],
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self.table = SensorTable()
        self.accepted = 0
        self.rejected: Counter[str] = Counter()
        self.connected: dict[str, bool] = {}
        self._relays = LeasedPublisher(store, lease_id, clock)
        self._last_log: dict[str, float] = {}
        self._mappings_of: Settings | None = None
        self._mappings: list[TopicMapping] = []
        self._sensors_per_region: dict[str, int] = {}
        # Sensor names refused by max_sensors_per_region (a few, and how many
        # messages), per region: failoverctl power and the status page say so.
        self.refused_sensors: dict[str, set[str]] = {}
        self.refused_counts: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()

    async def run(self) -> None:
        brokers = self._settings().mqtt
        if not brokers:
            await asyncio.Event().wait()  # nothing to do; keep the task shape
        async with asyncio.TaskGroup() as tg:
            for i, broker in enumerate(brokers):
                tg.create_task(self._broker_loop(broker), name=f"mqtt-{i}")
            tg.create_task(self._resync_loop(), name="mqtt-relay")

    def status(self, state: str = "online") -> str:
        s = self._settings()
        return json.dumps({
            "state": state, "member": s.member, "region": s.region, "version": __version__,
            "ts": self._clock(), "accepted": self.accepted, "rejected": dict(self.rejected),
        }, separators=(",", ":"))

    def _status_topic(self, broker: MqttSettings) -> str:
        s = self._settings()
        return broker.status_topic or f"failoverd/status/{s.cluster}/{s.member}"

    async def _broker_loop(self, broker: MqttSettings) -> None:
        backoff = BACKOFF_MIN_S
        while True:
            error: BaseException | None = None
            try:
                await self._connection(broker)
            # The connection runs a TaskGroup, so errors arrive grouped.
            except* (aiomqtt.MqttError, OSError, ValueError) as group:
                error = group.exceptions[0]
            if self.connected.get(broker.url):
                backoff = BACKOFF_MIN_S  # we were connected: start the backoff over
            self.connected[broker.url] = False
            wait = backoff * random.uniform(0.5, 1.5)
            wire = _wire_logger(broker.url)[1]
            log.warning("mqtt disconnected; reconnecting", broker=broker.url,
                        reason=mqtt_failure(error, wire.last), error=str(error),
                        detail=wire.last[:200] or None, retry_in_s=round(wait, 2))
            wire.last = ""
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connection(self, broker: MqttSettings) -> None:
        host, port, _ = broker.host_port
        s = self._settings()
        topic = self._status_topic(broker)
        password, context = broker_credentials(broker)
        async with aiomqtt.Client(
            host, port, username=broker.username, password=password,
            identifier=f"failoverd-{s.cluster}-{s.member}-{port}",
            will=aiomqtt.Will(topic, self.status("offline"), qos=1, retain=True),
            tls_context=context, keepalive=10, timeout=5, logger=_wire_logger(broker.url)[0],
        ) as client:
            for t in broker.subscriptions:
                await client.subscribe(t, qos=1)
            await client.publish(topic, self.status(), qos=1, retain=True)
            self.connected[broker.url] = True
            log.info("mqtt connected", broker=broker.url, topics=broker.subscriptions)
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self._status_loop(client, topic), name=f"mqtt-status-{port}")
                async for message in client.messages:
                    payload = message.payload
                    raw = (payload if isinstance(payload, bytes)
                           else b"" if payload is None else str(payload).encode())
                    await self.handle(message.topic.value, raw)

    async def _status_loop(self, client: aiomqtt.Client, topic: str) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await client.publish(topic, self.status(), qos=1, retain=True)

    def refused(self) -> dict[str, dict[str, object]]:
        """Per region, how many messages came from sensor names refused by
        ``max_sensors_per_region``, and some of those names."""
        return {region: {"messages": n, "names": sorted(self.refused_sensors.get(region, ()))}
                for region, n in self.refused_counts.items()}

    def _mapping_for(self, s: Settings, topic: str) -> TopicMapping | None:
        if s is not self._mappings_of:
            self._mappings_of = s
            self._mappings = [m.to_core() for b in s.mqtt for m in b.mappings]
        return next((m for m in self._mappings if topic_matches(m.topic, topic)), None)

    async def handle(self, topic: str, payload: bytes) -> None:
        """One message in; never raises for bad input.  A topic that one of
        the brokers' ``mappings`` matches is read by that mapping, anything
        else as our own JSON or NUT-topic shape."""
        s = self._settings()
        regions = [r.name for r in s.regions]
        max_bytes = min(b.max_payload for b in s.mqtt) if s.mqtt else 4096
        mapping = self._mapping_for(s, topic)
        item = (apply_mapping(mapping, topic, payload, now=self._clock(), regions=regions,
                              max_bytes=max_bytes) if mapping is not None
                else parse_message(topic, payload, now=self._clock(), regions=regions,
                                   max_bytes=max_bytes))
        if not isinstance(item, Rejected):
            item = self._admit(s, item)
        if isinstance(item, Rejected):
            self.rejected[item.reason] += 1
            metrics.MQTT_MESSAGES.labels("rejected", item.reason).inc()
            self._log_rejected(item, topic)
            return
        self.accepted += 1
        metrics.MQTT_MESSAGES.labels("accepted", "").inc()
        await self.ingest(item)

    def _admit(self, s: Settings, item: Reading | RuntimeUpdate
               ) -> Reading | RuntimeUpdate | Rejected:
        """A sensor we already know, or room for a new one in its region
        (``max_sensors_per_region``): a flood of names must not become a
        flood of etcd keys, nor push out the sensors we had."""
        key = (item.region, item.sensor)
        if key in self.table.readings:
            return item
        known = self._sensors_per_region.get(item.region, 0)
        if known < s.policy.max_sensors_per_region:
            return item
        refused = self.refused_sensors.setdefault(item.region, set())
        if len(refused) < REFUSED_NAMES_KEPT:
            refused.add(item.sensor)
        self.refused_counts[item.region] += 1
        return Rejected("too_many_sensors",
                        f"{item.region} has {known} sensors (max_sensors_per_region); "
                        f"{item.sensor!r} refused")

    async def ingest(self, item: Reading | RuntimeUpdate) -> None:
        """Fold a reading in (from MQTT or a polled power source) and relay
        it if it changed what the sensor says; never raises for a store
        error (logged; the next change or refresh writes it)."""
        key = (item.region, item.sensor)
        new = key not in self.table.readings
        reading = self.table.apply(item)
        if new and key in self.table.readings:
            self._sensors_per_region[item.region] = (
                self._sensors_per_region.get(item.region, 0) + 1)
        if reading is not None:
            await self._relay(reading)

    def _log_rejected(self, item: Rejected, topic: str) -> None:
        now = self._clock()
        if now - self._last_log.get(item.reason, 0.0) < LOG_EVERY_S:
            self._suppressed[item.reason] += 1
            return
        log.warning("mqtt message rejected", reason=item.reason, detail=item.detail,
                    topic=topic[:200], suppressed_since_last=self._suppressed.pop(item.reason, 0))
        self._last_log[item.reason] = now

    async def _relay(self, r: Reading) -> None:
        s = self._settings()
        key = self._keys.power(r.region, r.sensor, s.member)
        said = (r.state, r.since, r.lwt_at)
        before = self._relays.identity(key)
        # Runtime and charge alone are news at most once per
        # relay_min_interval_s — at once when the runtime just fell under
        # the failover budget (configured; the coordinator's learned one
        # can only be judged by it).
        budget = s.policy.expected_failover_s + s.policy.power_runtime_margin_s
        relayed = self._relays.minor(key)
        was = relayed[0] if isinstance(relayed, tuple) else None
        crossing = (r.runtime_s is not None and r.runtime_s < budget
                    and (was is None or was >= budget))
        try:
            written = await self._relays.publish(
                key, reading_to_json(r, s.member), said, s.policy.sensor_stale_s / 3,
                minor=(r.runtime_s, r.charge_pct, r.detail),
                min_interval_s=0.0 if crossing else s.policy.relay_min_interval_s)
        except StoreError as exc:
            log.warning("cannot relay power reading", region=r.region, sensor=r.sensor,
                        error=str(exc))
            return
        if written and (not isinstance(before, tuple) or before[0] != r.state):
            log.info("power reading", power_region=r.region, sensor=r.sensor, state=r.state,
                     runtime_s=r.runtime_s, source=r.source, detail=r.detail or None)

    async def _resync_loop(self) -> None:
        """Re-relay everything under a new lease (new session)."""
        while True:
            await asyncio.sleep(0.5)
            try:
                await self._relays.resync()
                await self._relays.flush()  # coalesced runtime/charge changes now due
            except StoreError as exc:
                log.warning("cannot relay power readings again", error=str(exc))
