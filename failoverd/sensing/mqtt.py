"""MQTT power feeds: subscribe, parse, relay to etcd; publish our own status.

Per broker (``[[mqtt]]``), one connection per *lane*: the default topic
``failoverd/power/#`` is subscribed as ``failoverd/power/<region>/#`` on a
connection per region, and a mapping with a fixed region rides on that
region's lane; everything else shares the ``main`` lane.  MQTT delivers a
connection's messages in order, so a flood of one region's topics (a bridge
replaying its buffer, a misconfigured sensor) would otherwise queue every
other region's power events behind it — or have the broker drop them when
our queue there is full.  Each lane is a reconnect loop with jittered
exponential backoff that re-subscribes (QoS 1) on every connection; the
``main`` lane publishes ``{"state": "online", …}`` retained on the member's
status topic, with a Last Will that sets it ``offline``.

Accepted readings are relayed to ``power/<region>/<sensor>/<member>`` under
the member's lease: a change of state at once; news that is not urgent
(runtime or charge alone, a new sensor saying all is well) with the next
batch (one txn every ``RESYNC_EVERY_S``); an unchanged reading again before
``sensor_stale_s / 3``.  Bad messages are counted by reason and logged at
most once per ``LOG_EVERY_S`` per reason; none of them can stop the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import random
import socket
import ssl
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

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
    topic_sensor,
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
# Our own topic shape, whose region is the level after this prefix: it is
# split into a lane per region.
POWER_TOPIC_PREFIX = "failoverd/power/"
MAIN_LANE = "main"
# Messages read from a lane's socket but not handled yet.  Past this the
# oldest is dropped (counted, logged): a flood must not grow our memory, and
# the newest readings are the ones worth having — a power event that arrives
# during a flood is not held behind more than this many older messages.
LANE_QUEUE_MAX = 2_000
DRAIN_BATCH = 64
# How long a relayed reading stays in PowerFeeds.unrelayed after its write.
UNRELAYED_KEEP_S = 2.0
# How long the relay of news the coordinator here decides on waits for that
# decision and its commit (a commit takes milliseconds; etcd's timeout is
# longer).
RELAY_AFTER_DECISION_S = 0.25
# A lane's socket receive buffer.  Left to the kernel it grows to megabytes
# on a fast link: a flood then sits in our own socket, 100,000 messages and
# many seconds of reading deep, with every core busy.  Capped, the broker
# holds what we cannot read yet and drops the surplus (QoS 0 first).
LANE_RCVBUF = 64 * 1024
# How often held-back relays (coalesced runtimes, quiet new sensors) are
# written, and a new session's relays re-written.
RESYNC_EVERY_S = 0.5
# With nothing held back and every relay under the current lease, the relay
# task sleeps until woken; it looks anyway this often.
RELAY_IDLE_S = 30.0
NORMAL_STATE = "utility_ok"
# How long a lane waits for the broker to acknowledge a changed
# subscription; the connection stays up either way.
SWAP_ACK_S = 30.0


class _LaneQueue(asyncio.Queue[aiomqtt.Message]):
    """A lane's bounded message queue: when full it drops its oldest message,
    not the newest.  The client library builds it (``queue_type``); the
    ``made`` hook hands us the instance, so the reader can drain a backlog
    in one go instead of one library task per message."""

    made: Callable[[_LaneQueue], None] = staticmethod(lambda q: None)
    dropped: Callable[[], None] = staticmethod(lambda: None)

    def __init__(self, maxsize: int = 0) -> None:
        super().__init__(maxsize)
        type(self).made(self)

    def put_nowait(self, item: aiomqtt.Message) -> None:
        if self.full():
            self.get_nowait()
            type(self).dropped()
        super().put_nowait(item)


def _lane_queue(made: Callable[[_LaneQueue], None], dropped: Callable[[], None]
                ) -> type[_LaneQueue]:
    return type("LaneQueue", (_LaneQueue,), {"made": staticmethod(made),
                                             "dropped": staticmethod(dropped)})


async def _swap_subscriptions(client: aiomqtt.Client, new: list[str], old: list[str]) -> bool:
    """Subscribe to ``new`` and drop ``old`` on one connection, both sent at
    once: the broker handles a connection's packets in order, so the new
    filters hold before the old go, and the acknowledgements may sit behind
    a flood we are still reading — waiting for the first before sending the
    second would keep the flood on.  An unacknowledged change (timeout)
    keeps the connection.  False, with ``old`` subscribed again, when the
    broker refuses a new filter (an ACL)."""
    # Tasks start in creation order: SUBSCRIBE leaves before UNSUBSCRIBE.
    sub = asyncio.ensure_future(client.subscribe([(t, 1) for t in new], timeout=SWAP_ACK_S))
    unsub = asyncio.ensure_future(client.unsubscribe(old, timeout=SWAP_ACK_S))
    granted, _ = await asyncio.gather(sub, unsub, return_exceptions=True)
    if isinstance(granted, BaseException):
        if not isinstance(granted, aiomqtt.MqttError):
            raise granted
        log.info("mqtt subscription change not acknowledged yet", error=str(granted))
        return True
    if any(_refused_code(g) for g in granted):
        log.warning("mqtt subscription refused by the broker; keeping the old filters",
                    topics=new[:4])
        await client.subscribe([(t, 1) for t in old], timeout=SWAP_ACK_S)
        return False
    return True


def _refused_code(granted: object) -> bool:
    value = getattr(granted, "value", granted)
    return isinstance(value, int) and value >= 0x80


def subscription_lanes(broker: MqttSettings, regions: list[str]) -> dict[str, list[str]]:
    """Lane name → the topic filters its connection subscribes to.

    ``failoverd/power/#`` becomes one ``failoverd/power/<region>/#`` per
    region, and a mapping whose region is a literal name joins that region's
    lane; other topics (a custom layout, mappings that take the region from
    a topic level) stay on ``main``, which always exists (it carries the
    member's status and Last Will).  A sensor's messages all travel on one
    lane, so their order is kept."""
    lanes: dict[str, list[str]] = {MAIN_LANE: []}
    for topic in broker.topics:
        if topic == POWER_TOPIC_PREFIX + "#":
            for region in regions:
                lanes.setdefault(region, []).append(f"{POWER_TOPIC_PREFIX}{region}/#")
        else:
            lanes[MAIN_LANE].append(topic)
    for mapping in broker.mappings:
        lane = mapping.region if mapping.region in regions else MAIN_LANE
        lanes.setdefault(lane, []).append(mapping.topic)
    return {name: list(dict.fromkeys(topics)) for name, topics in lanes.items()}


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


@dataclass(frozen=True)
class _ParseInputs:
    """What parsing a message needs from the settings."""

    regions: list[str]
    max_bytes: int
    mappings: list[TopicMapping]


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
        self._lanes_up: dict[str, set[str]] = {}
        self._lane_count: dict[str, int] = {}
        self._lane_tasks: dict[tuple[int, str, tuple[str, ...]], asyncio.Task[None]] = {}
        self._tasks: asyncio.TaskGroup | None = None
        # The relay task's wake-up: a held write due before it planned to
        # wake (``_relay_planned``, this clock; -inf while it works), a new
        # lease.  Under a flood most held writes are due after that: no wake.
        self._relay_wake = asyncio.Event()
        self._relay_planned = -math.inf
        self._relays = LeasedPublisher(store, lease_id, clock, on_pending=self._held)
        self._flushed_at = -math.inf
        # Readings heard but not yet confirmed in etcd, and who to tell when
        # one arrives: the coordinator, when it runs in this daemon, decides
        # on them at once instead of one etcd write and watch hop later.
        self.unrelayed: dict[tuple[str, str], Reading] = {}
        self.on_reading: Callable[[], asyncio.Event | None] | None = None
        self._last_log: dict[str, float] = {}
        self._inputs_of: Settings | None = None
        self._parse_inputs = _ParseInputs([], 0, [])
        self._accepted_metric = metrics.MQTT_MESSAGES.labels("accepted", "")
        self._sensors_per_region: dict[str, int] = {}
        # Sensor names refused by max_sensors_per_region (a few, and how many
        # messages), per region: failoverctl power and the status page say so.
        self.refused_sensors: dict[str, set[str]] = {}
        self.refused_counts: Counter[str] = Counter()
        self._suppressed: Counter[str] = Counter()
        # Regions whose lane subscribes to its known sensors' topics only
        # (the region is full and refused a name); the event is set when a
        # region first refuses a name or a reload may have changed the
        # bound, then replaced.
        self.narrowed: set[str] = set()
        self._fullness = asyncio.Event()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as tg:
            self._tasks = tg
            self.reload()
            tg.create_task(self._resync_loop(), name="mqtt-relay")

    def reload(self) -> None:
        """Follow the settings' regions (a reload may add or remove one):
        start the lanes that are new, stop the ones that are gone; the rest
        keep their connections (and re-judge whether they are narrowed)."""
        if self._tasks is None:
            return
        self._announce_fullness()
        s = self._settings()
        regions = [r.name for r in s.regions]
        wanted: dict[tuple[int, str, tuple[str, ...]], MqttSettings] = {}
        for i, broker in enumerate(s.mqtt):
            lanes = subscription_lanes(broker, regions)
            self._lane_count[broker.url] = len(lanes)
            for lane, topics in lanes.items():
                wanted[(i, lane, tuple(topics))] = broker
        for key in set(self._lane_tasks) - set(wanted):
            self._lane_tasks.pop(key).cancel()
            self._lanes_up.get(s.mqtt[key[0]].url, set()).discard(key[1])
        for key, broker in wanted.items():
            if key not in self._lane_tasks:
                i, lane, filters = key
                self._lane_tasks[key] = self._tasks.create_task(
                    self._broker_loop(broker, lane, list(filters)), name=f"mqtt-{i}-{lane}")

    def status(self, state: str = "online") -> str:
        s = self._settings()
        return json.dumps({
            "state": state, "member": s.member, "region": s.region, "version": __version__,
            "ts": self._clock(), "accepted": self.accepted, "rejected": dict(self.rejected),
        }, separators=(",", ":"))

    def _status_topic(self, broker: MqttSettings) -> str:
        s = self._settings()
        return broker.status_topic or f"failoverd/status/{s.cluster}/{s.member}"

    async def _broker_loop(self, broker: MqttSettings, lane: str, topics: list[str]) -> None:
        backoff = BACKOFF_MIN_S
        up = self._lanes_up.setdefault(broker.url, set())
        while True:
            error: BaseException | None = None
            try:
                await self._connection(broker, lane, topics, up)
            # The connection runs a TaskGroup, so errors arrive grouped.
            except* (aiomqtt.MqttError, OSError, ValueError) as group:
                error = group.exceptions[0]
            if lane in up:
                backoff = BACKOFF_MIN_S  # we were connected: start the backoff over
            up.discard(lane)
            self.connected[broker.url] = False
            wait = backoff * random.uniform(0.5, 1.5)
            wire = _wire_logger(broker.url)[1]
            log.warning("mqtt disconnected; reconnecting", broker=broker.url, lane=lane,
                        reason=mqtt_failure(error, wire.last), error=str(error),
                        detail=wire.last[:200] or None, retry_in_s=round(wait, 2))
            wire.last = ""
            await asyncio.sleep(wait)
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _connection(self, broker: MqttSettings, lane: str, topics: list[str],
                          up: set[str]) -> None:
        host, port, _ = broker.host_port
        s = self._settings()
        main = lane == MAIN_LANE
        topic = self._status_topic(broker)
        password, context = broker_credentials(broker)
        identifier = f"failoverd-{s.cluster}-{s.member}-{port}"
        queues: list[_LaneQueue] = []
        async with aiomqtt.Client(
            host, port, username=broker.username, password=password,
            identifier=identifier if main else f"{identifier}-{lane}",
            will=aiomqtt.Will(topic, self.status("offline"), qos=1, retain=True) if main else None,
            tls_context=context, keepalive=10, timeout=5, logger=_wire_logger(broker.url)[0],
            queue_type=_lane_queue(queues.append, lambda: self._dropped(broker.url, lane)),
            max_queued_incoming_messages=LANE_QUEUE_MAX,
            socket_options=((socket.SOL_SOCKET, socket.SO_RCVBUF, LANE_RCVBUF),),
        ) as client:
            for t in topics:
                await client.subscribe(t, qos=1)
            if main:
                await client.publish(topic, self.status(), qos=1, retain=True)
            up.add(lane)
            if len(up) >= self._lane_count.get(broker.url, 1):  # every lane: readings flow
                self.connected[broker.url] = True
                log.info("mqtt connected", broker=broker.url, topics=broker.subscriptions,
                         lanes=sorted(up))
            async with asyncio.TaskGroup() as tg:
                if main:
                    tg.create_task(self._status_loop(client, topic), name=f"mqtt-status-{port}")
                wide = f"{POWER_TOPIC_PREFIX}{lane}/#"
                if wide in topics:
                    tg.create_task(self._narrow_when_full(client, lane, wide),
                                   name=f"mqtt-narrow-{port}-{lane}")
                queue = queues[0]
                # The library's iterator waits for a message (and notices a
                # lost connection); up to DRAIN_BATCH queued behind it are
                # handled in the same step: a task per message would let a
                # flood outrun us three to one, and an unbounded step would
                # hold the other lanes and the watch back.
                async for first in client.messages:
                    message = first
                    for _ in range(DRAIN_BATCH):
                        payload = message.payload
                        raw = (payload if isinstance(payload, bytes)
                               else b"" if payload is None else str(payload).encode())
                        await self.handle(message.topic.value, raw)
                        if queue.empty():
                            break
                        message = queue.get_nowait()

    def _announce_fullness(self) -> None:
        event, self._fullness = self._fullness, asyncio.Event()
        event.set()

    async def _narrow_when_full(self, client: aiomqtt.Client, region: str, wide: str) -> None:
        """Once ``region`` has max_sensors_per_region sensors and a further
        name was refused (a topic explosion, seen and reported), no new
        name can be admitted: subscribe to the known sensors' topics instead
        of the region's wildcard, so that the broker filters the explosion
        out instead of it costing us a read and a parse per message.  Subscribe
        before unsubscribing: no reading of a known sensor falls in a gap.
        Widen again if the bound is raised (a reload)."""
        exact: list[str] = []
        try:
            while True:
                changed = self._fullness
                s = self._settings()
                full = (self._sensors_per_region.get(region, 0) >= s.policy.max_sensors_per_region
                        and self.refused_counts[region] > 0)
                if full and not exact:
                    sensors = sorted(sensor for r, sensor in self.table.readings if r == region)
                    exact = [t for sensor in sensors for t in (
                        f"{POWER_TOPIC_PREFIX}{region}/{sensor}",
                        f"{POWER_TOPIC_PREFIX}{region}/{sensor}/+")]
                    if await _swap_subscriptions(client, exact, [wide]):
                        self.narrowed.add(region)
                        log.warning("mqtt lane narrowed to the region's known sensors",
                                    power_region=region, sensors=len(sensors),
                                    max_sensors_per_region=s.policy.max_sensors_per_region)
                    else:
                        exact = []
                elif not full and exact:
                    await _swap_subscriptions(client, [wide], exact)
                    exact = []
                    self.narrowed.discard(region)
                    log.info("mqtt lane widened again", power_region=region)
                await changed.wait()
        finally:
            self.narrowed.discard(region)  # a new connection starts wide

    async def _status_loop(self, client: aiomqtt.Client, topic: str) -> None:
        while True:
            await asyncio.sleep(STATUS_EVERY_S)
            await client.publish(topic, self.status(), qos=1, retain=True)

    def refused(self) -> dict[str, dict[str, object]]:
        """Per region, how many messages came from sensor names refused by
        ``max_sensors_per_region``, and some of those names."""
        return {region: {"messages": n, "names": sorted(self.refused_sensors.get(region, ())),
                         "narrowed": region in self.narrowed}
                for region, n in self.refused_counts.items()}

    def _inputs(self, s: Settings) -> _ParseInputs:
        # Rebuilt only when the settings object changes (a reload): every
        # message asks for it, and a flood is 10,000 messages a second.
        if s is not self._inputs_of:
            self._inputs_of = s
            self._parse_inputs = _ParseInputs(
                regions=[r.name for r in s.regions],
                max_bytes=min(b.max_payload for b in s.mqtt) if s.mqtt else 4096,
                mappings=[m.to_core() for b in s.mqtt for m in b.mappings])
        return self._parse_inputs

    async def handle(self, topic: str, payload: bytes) -> None:
        """One message in; never raises for bad input.  A topic that one of
        the brokers' ``mappings`` matches is read by that mapping, anything
        else as our own JSON or NUT-topic shape."""
        s = self._settings()
        inputs = self._inputs(s)
        mapping = next((m for m in inputs.mappings if topic_matches(m.topic, topic)), None)
        named = topic_sensor(topic) if mapping is None else None
        # A name past the cardinality bound is refused before its payload is
        # parsed: that is most of a topic explosion's cost.
        refused = self._refusal(s, *named) if named is not None else None
        item = (refused if refused is not None
                else apply_mapping(mapping, topic, payload, now=self._clock(),
                                   regions=inputs.regions, max_bytes=inputs.max_bytes)
                if mapping is not None
                else parse_message(topic, payload, now=self._clock(), regions=inputs.regions,
                                   max_bytes=inputs.max_bytes))
        if not isinstance(item, Rejected):
            item = self._refusal(s, item.region, item.sensor) or item
        if isinstance(item, Rejected):
            self.rejected[item.reason] += 1
            metrics.MQTT_MESSAGES.labels("rejected", item.reason).inc()
            self._log_rejected(item, topic)
            return
        self.accepted += 1
        self._accepted_metric.inc()
        await self.ingest(item)

    def _refusal(self, s: Settings, region: str, sensor: str) -> Rejected | None:
        """None for a sensor we already know, or when its region has room
        for a new one (``max_sensors_per_region``): a flood of names must not
        become a flood of etcd keys, nor push out the sensors we had."""
        if (region, sensor) in self.table.readings:
            return None
        known = self._sensors_per_region.get(region, 0)
        if known < s.policy.max_sensors_per_region:
            return None
        refused = self.refused_sensors.setdefault(region, set())
        if len(refused) < REFUSED_NAMES_KEPT:
            refused.add(sensor)
        self.refused_counts[region] += 1
        if self.refused_counts[region] == 1:
            self._announce_fullness()  # the lane may narrow now
        return Rejected("too_many_sensors",
                        f"{region} has {known} sensors (max_sensors_per_region); "
                        f"{sensor!r} refused")

    async def ingest(self, item: Reading | RuntimeUpdate) -> None:
        """Fold a reading in (from MQTT or a polled power source) and relay
        it if it changed what the sensor says; never raises for a store
        error (logged; the next change or refresh writes it)."""
        key = (item.region, item.sensor)
        before = self.table.readings.get(key)
        reading = self.table.apply(item)
        if before is None and key in self.table.readings:
            self._sensors_per_region[item.region] = (
                self._sensors_per_region.get(item.region, 0) + 1)
        if reading is None:
            return
        if before is None or (before.state, before.lwt_at) != (reading.state, reading.lwt_at):
            # News the engine acts on (a state, a Last Will): the coordinator
            # may decide on it before its relay is in etcd.  A runtime that
            # merely ticks (a flood of them, at worst) goes the relay's way.
            self.unrelayed[key] = reading
            decided = self.on_reading() if self.on_reading is not None else None
            if decided is not None:
                # The coordinator runs here and decides on it first: our own
                # relay would only stand in front of its commit, in this loop
                # and in etcd's queue (bounded: a slow commit does not hold
                # the other members' view of this sensor back for long).
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(RELAY_AFTER_DECISION_S):
                        await decided.wait()
            try:
                await self._relay(reading)
            finally:
                # Kept a moment past the write: the coordinator's watch shows
                # it a hop later, and must not see the older copy meanwhile.
                asyncio.get_running_loop().call_later(UNRELAYED_KEEP_S, self._forget_unrelayed,
                                                      key, reading)
        else:
            await self._relay(reading)

    def _forget_unrelayed(self, key: tuple[str, str], reading: Reading) -> None:
        if self.unrelayed.get(key) is reading:
            del self.unrelayed[key]

    def _dropped(self, url: str, lane: str) -> None:
        self.rejected["lane_full"] += 1
        metrics.MQTT_MESSAGES.labels("rejected", "lane_full").inc()
        self._log_rejected(Rejected("lane_full", f"lane {lane} of {url} has {LANE_QUEUE_MAX} "
                                    "messages waiting; the oldest dropped"), f"lane {lane}")

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
        # A sensor we never relayed that says all is well is not urgent: it
        # goes with the next batch (within RESYNC_EVERY_S) — a bridge coming
        # up with 64 sensors is one etcd entry, not 64 in front of an event.
        quiet = before is None and r.state == NORMAL_STATE
        try:
            written = await self._relays.publish(
                key, lambda: reading_to_json(r, s.member), said, s.policy.sensor_stale_s / 3,
                minor=(r.runtime_s, r.charge_pct, r.detail),
                min_interval_s=0.0 if crossing else s.policy.relay_min_interval_s,
                batch=quiet)
        except StoreError as exc:
            log.warning("cannot relay power reading", region=r.region, sensor=r.sensor,
                        error=str(exc))
            return
        if written and (not isinstance(before, tuple) or before[0] != r.state):
            log.info("power reading", power_region=r.region, sensor=r.sensor, state=r.state,
                     runtime_s=r.runtime_s, source=r.source, detail=r.detail or None)

    def new_lease(self) -> None:
        """A new session: re-relay every reading under its lease now."""
        self._relay_wake.set()

    def _held(self, due: float) -> None:
        if due < self._relay_planned:
            self._relay_wake.set()

    async def _resync_loop(self) -> None:
        """Re-relay everything under a new lease (new session), and write
        the held-back relays when due — at most every RESYNC_EVERY_S, so
        that what arrives together is written together.  At rest (nothing
        held, every key under the current lease) it sleeps until woken."""
        while True:
            await self._until_relays_due()
            self._flushed_at = time.monotonic()
            try:
                await self._relays.resync()
                await self._relays.flush()  # coalesced runtime/charge changes now due
            except StoreError as exc:
                log.warning("cannot relay power readings again", error=str(exc))

    async def _until_relays_due(self) -> None:
        while True:
            self._relay_wake.clear()
            soonest = self._flushed_at + RESYNC_EVERY_S - time.monotonic()
            due = self._relays.next_due()
            if self._relays.behind_lease():
                pause = soonest
            elif due is not None:
                pause = max(due - self._clock(), soonest)
            else:
                pause = RELAY_IDLE_S  # the next held write or lease wakes us
            if pause <= 0:
                return
            self._relay_planned = self._clock() + pause
            try:
                async with asyncio.timeout(pause):
                    await self._relay_wake.wait()
            except TimeoutError:
                return
            finally:
                self._relay_planned = -math.inf
