"""Polled power sources: NUT ``upsd`` and SNMP devices of this member's
region, read every ``poll_interval_s`` and relayed like MQTT sensors.

One task per source.  A poll that fails (unreachable, timeout, refused,
garbage, a status that says nothing) is counted by reason and logged once
when the reason changes — never a power verdict: the sensor just goes
silent, and the engine's rule 10 judges silence (an outage state followed by
silence turns critical after ``power_silence_during_outage_s``; a sensor last
seen on utility becomes unknown).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from failoverd import metrics
from failoverd.config import NutSource, PowerSource, Settings
from failoverd.core.power import Reading, Rejected
from failoverd.sensing.device import DeviceError, PowerDevice
from failoverd.sensing.mqtt import PowerFeeds
from failoverd.sensing.nut import NutClient

log = structlog.get_logger("failoverd.sensing.sources")


@dataclass
class SourceStatus:
    """What ``failoverctl power`` and the status page show per source."""

    kind: str
    target: str
    ok: bool = False
    reason: str = "not polled yet"
    last_ok: float | None = None
    polls: int = 0
    failures: int = 0
    # The reason label of the current failure ("" while answering): what
    # is logged once per change.
    kind_of_failure: str = ""


class _Restart(Exception):
    pass


class PowerSources:
    """Polls the power sources of this member's region (the
    ``power-sources`` task).  Owns one client per source and its status;
    relays through :class:`~failoverd.sensing.mqtt.PowerFeeds`.  Restarts
    its pollers on :meth:`reload`."""

    def __init__(self, feeds: PowerFeeds, settings: Callable[[], Settings],
                 clock: Callable[[], float] = time.time) -> None:
        self._feeds = feeds
        self._settings = settings
        self._clock = clock
        self._restart = asyncio.Event()
        self.status: dict[str, SourceStatus] = {}

    def reload(self) -> None:
        self._restart.set()

    def poll_status(self) -> dict[str, dict[str, object]]:
        """Per sensor, how this member's polls go (the API shows it)."""
        now = self._clock()
        return {sensor: {"ok": st.ok, "reason": st.reason, "polls": st.polls,
                         "failures": st.failures,
                         "last_ok_age_s": (round(now - st.last_ok, 1)
                                           if st.last_ok is not None else None)}
                for sensor, st in self.status.items()}

    async def run(self) -> None:
        while True:
            self._restart.clear()
            s = self._settings()
            region = next((r for r in s.regions if r.name == s.region), None)
            sources = region.power_sources if region is not None else []
            self.status = {src.sensor: SourceStatus(src.kind, src.where)
                           for src in sources}
            try:
                async with asyncio.TaskGroup() as tg:
                    for src in sources:
                        tg.create_task(self._poll_loop(s.region, src),
                                       name=f"power-source-{src.sensor}")
                    tg.create_task(self._wait_restart(), name="power-sources-reload")
            except* _Restart:
                log.info("power sources reloaded", sources=len(sources))

    async def _wait_restart(self) -> None:
        await self._restart.wait()
        raise _Restart

    async def _poll_loop(self, region: str, src: PowerSource) -> None:
        status = self.status[src.sensor]
        device = await self._device(src, status)
        # Members of one region poll the same device: spread them.
        await asyncio.sleep(random.uniform(0, src.poll_interval_s / 2))
        try:
            while True:
                started = time.monotonic()
                outcome = await self._poll(device, region, src)
                status.polls += 1
                if isinstance(outcome, Reading):
                    if not status.ok:
                        log.info("power source answering", sensor=src.sensor, kind=src.kind,
                                 target=status.target, via=device.describe())
                    status.ok, status.reason, status.last_ok = True, "", self._clock()
                    status.kind_of_failure = ""
                    metrics.POWER_SOURCE_POLLS.labels(src.sensor, src.kind, "ok").inc()
                    await self._feeds.ingest(outcome)
                else:
                    reason, detail = outcome
                    status.failures += 1
                    metrics.POWER_SOURCE_POLLS.labels(src.sensor, src.kind, reason).inc()
                    if status.ok or status.kind_of_failure != reason:
                        # Once per change of what is wrong, not once per poll.
                        log.warning("power source poll failed", sensor=src.sensor,
                                    kind=src.kind, target=status.target, reason=reason,
                                    error=detail)
                    status.ok, status.reason, status.kind_of_failure = False, detail, reason
                metrics.POWER_SOURCE_UP.labels(src.sensor, src.kind).set(1 if status.ok else 0)
                pause = src.poll_interval_s * random.uniform(0.9, 1.1)
                await asyncio.sleep(max(pause - (time.monotonic() - started), 0))
        finally:
            device.close()

    async def _poll(self, device: PowerDevice, region: str, src: PowerSource
                    ) -> Reading | tuple[str, str]:
        """One poll: a reading, or (reason, detail) when it gave none."""
        try:
            async with asyncio.timeout(src.timeout_s):
                item = await device.poll(region, self._clock())
        except TimeoutError:
            return "timeout", f"no answer within {src.timeout_s:g}s"
        except DeviceError as exc:
            return exc.reason, str(exc)
        if isinstance(item, Rejected):
            return item.reason, item.detail
        return item

    async def _device(self, src: PowerSource, status: SourceStatus) -> PowerDevice:
        """The source's device, waiting (and saying why) while its secrets
        cannot be read."""
        while True:
            try:
                # In a thread: the first SNMP device imports pysnmp and
                # builds its engine (~0.6 s) — the loop must keep the lease.
                return await asyncio.to_thread(make_device, src)
            except OSError as exc:
                detail = f"cannot read a secret file: {exc.strerror} ({exc.filename})"
                if status.reason != detail:
                    log.error("power source not polled", sensor=src.sensor, error=detail)
                status.ok, status.reason = False, detail
                metrics.POWER_SOURCE_POLLS.labels(src.sensor, src.kind, "config").inc()
                await asyncio.sleep(max(src.poll_interval_s, 5.0))


def make_device(src: PowerSource) -> PowerDevice:
    """The client for ``src``; reads its secret files (``OSError``)."""
    if isinstance(src, NutSource):
        password = src.password_file.read_text().strip() if src.password_file else None
        return NutClient(src, password)
    # pysnmp costs 0.6 s and 18 MiB at import: only members that poll SNMP
    # devices pay for it.
    from failoverd.sensing.snmp import SnmpClient  # noqa: PLC0415

    return SnmpClient(src)


