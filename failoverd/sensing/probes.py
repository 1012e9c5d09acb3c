"""Health probes: every member probes every region and publishes what it sees.

The hysteresis (``fall`` consecutive failures to call a target down, ``rise``
successes to call it up) is the pure :func:`step`; :class:`Prober` is the
shell that runs checks (http/tcp/exec) with jitter and a concurrency cap and
writes ``observations/<member>/<region>`` under the member's lease — at once
when the region's verdict changes, every ``refresh_s`` otherwise.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import aiohttp
import structlog

from failoverd import metrics
from failoverd.config import ProbeSettings, RegionSettings, Settings
from failoverd.core.model import Keyspace, Observation
from failoverd.core.store import Store, StoreError
from failoverd.processes import HookFailed, run_once
from failoverd.publishing import LeasedPublisher

log = structlog.get_logger("failoverd.sensing.probes")

Status = Literal["unknown", "up", "down"]
BODY_LIMIT = 64 * 1024
# Regions not published by their probes for this long are published by the
# refresh task (their probes' interval is longer); a new lease, at once.
REFRESH_LOOK_S = 5.0


@dataclass(frozen=True)
class ProbeState:
    status: Status = "unknown"
    ok_streak: int = 0
    fail_streak: int = 0
    since: float = 0.0  # when status last changed
    latency_ms: float = 0.0
    detail: str = ""


def step(state: ProbeState, ok: bool, *, rise: int, fall: int, now: float,
         latency_ms: float = 0.0, detail: str = "") -> ProbeState:
    """One probe result through the fall/rise hysteresis."""
    ok_streak = state.ok_streak + 1 if ok else 0
    fail_streak = 0 if ok else state.fail_streak + 1
    status = state.status
    if ok and ok_streak >= rise:
        status = "up"
    elif not ok and fail_streak >= fall:
        status = "down"
    since = now if status != state.status else state.since
    return ProbeState(status, ok_streak, fail_streak, since, latency_ms, detail)


def region_verdict(states: list[tuple[ProbeSettings, ProbeState]]) -> tuple[Status, bool]:
    """(health verdict, ready) of one region from this member's probes.

    Health: down if any health probe is down, up if all are up, else unknown.
    Ready: every readiness probe up (True when there are none).
    """
    health = [s.status for p, s in states if not p.readiness]
    ready = all(s.status == "up" for p, s in states if p.readiness)
    if any(h == "down" for h in health):
        return "down", ready
    if health and all(h == "up" for h in health):
        return "up", ready
    return "unknown", ready


async def check(probe: ProbeSettings, session: aiohttp.ClientSession, region: str
                ) -> tuple[bool, str]:
    """Run one check; (ok, detail).  Never raises for a failing target."""
    try:
        async with asyncio.timeout(probe.timeout_s):
            if probe.kind == "tcp":
                assert isinstance(probe.target, str)
                host, _, port = probe.target.rpartition(":")
                _, writer = await asyncio.open_connection(host.strip("[]"), int(port))
                writer.close()
                return True, "connected"
            if probe.kind == "exec":
                assert isinstance(probe.target, list)
                env = {"FAILOVERD_TARGET_REGION": region}
                await run_once(probe.target, env, probe.timeout_s)
                return True, "exit 0"
            return await _http(probe, session)
    except TimeoutError:
        return False, f"timeout after {probe.timeout_s}s"
    except HookFailed as exc:
        return False, str(exc)
    except (OSError, aiohttp.ClientError, ValueError) as exc:
        return False, f"{type(exc).__name__}: {exc}"[:200]


def _ssl(probe: ProbeSettings) -> ssl.SSLContext | bool:
    if not probe.tls_verify:
        return False
    if probe.ca_file is not None:
        return ssl.create_default_context(cafile=str(probe.ca_file))
    return True


async def _read_bounded(resp: aiohttp.ClientResponse) -> bytes:
    """The body up to ``BODY_LIMIT``: to its end when it is shorter (only a
    response read to its end keeps its connection for the next probe)."""
    body = b""
    while len(body) < BODY_LIMIT and (chunk := await resp.content.read(BODY_LIMIT - len(body))):
        body += chunk
    return body


async def _http(probe: ProbeSettings, session: aiohttp.ClientSession) -> tuple[bool, str]:
    assert isinstance(probe.target, str)
    async with session.get(probe.target, ssl=_ssl(probe), allow_redirects=False) as resp:
        ok = (resp.status in probe.expect_status if probe.expect_status
              else 200 <= resp.status < 400)
        # Read (bounded) even when no body is matched: a response released
        # unread closes its connection, and a new TCP connection per probe
        # was most of a resting daemon's probing CPU.
        body = await _read_bounded(resp)
        if ok and probe.body_match is not None and probe.body_match.encode() not in body:
            return False, f"http {resp.status}, body lacks {probe.body_match!r}"
        return ok, f"http {resp.status}"


@dataclass
class _Region:
    settings: RegionSettings
    states: list[ProbeState] = field(default_factory=list)
    published_at: float = 0.0  # monotonic: the last publish (written or not)


class Prober:
    """Runs every region's probes and publishes one observation per region
    (the ``probes`` task).

    Owns the per-region verdicts (consecutive-failure counting); what it
    last published is kept by its :class:`LeasedPublisher`.  Probes run
    concurrently (``probing.max_concurrent``), each bounded by its timeout;
    observations are written under this member's lease when a verdict
    changes and refreshed on a timer.
    Errors: a probe that fails or times out is a failed check, never an
    exception; without a lease or with etcd out of reach nothing is
    published (the observation expires with the lease, which is the
    truth: this member's view is unknown).
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 lease_id: Callable[[], int | None],
                 clock: Callable[[], float] = time.time) -> None:
        self._keys = keys
        self._settings = settings
        self._clock = clock
        self._regions: dict[str, _Region] = {}
        self._restart = asyncio.Event()
        self._new_lease = asyncio.Event()
        self._published = LeasedPublisher(store, lease_id, clock)

    def reload(self) -> None:
        """Pick up new probe settings (called after SIGHUP)."""
        self._restart.set()

    async def run(self) -> None:
        while True:
            self._restart.clear()
            s = self._settings()
            self._regions = {r.name: _Region(r, [ProbeState() for _ in r.probes])
                             for r in s.regions if r.probes}
            sem = asyncio.Semaphore(s.probing.max_concurrent)
            async with aiohttp.ClientSession() as session:
                try:
                    async with asyncio.TaskGroup() as tg:
                        for reg in self._regions.values():
                            for i, probe in enumerate(reg.settings.probes):
                                tg.create_task(self._loop(reg, i, probe, sem, session),
                                               name=f"probe-{reg.settings.name}-{i}")
                        tg.create_task(self._refresh_loop(), name="probe-refresh")
                        tg.create_task(self._wait_restart(), name="probe-reload")
                except* _Restart:
                    log.info("probe settings reloaded")

    async def _wait_restart(self) -> None:
        await self._restart.wait()
        raise _Restart

    async def _loop(self, reg: _Region, i: int, probe: ProbeSettings,
                    sem: asyncio.Semaphore, session: aiohttp.ClientSession) -> None:
        jitter = self._settings().probing.jitter
        # Spread first checks over one interval so members do not align.
        await asyncio.sleep(random.uniform(0, probe.interval_s * jitter * 2))
        latency_metric = metrics.PROBE_LATENCY.labels(reg.settings.name, probe.kind)
        while True:
            started = time.monotonic()
            async with sem:
                ok, detail = await check(probe, session, reg.settings.name)
            elapsed = time.monotonic() - started
            latency_metric.observe(elapsed)
            latency = elapsed * 1000
            reg.states[i] = step(reg.states[i], ok, rise=probe.rise, fall=probe.fall,
                                 now=self._clock(), latency_ms=latency, detail=detail)
            await self._publish(reg)
            pause = probe.interval_s * random.uniform(1 - jitter, 1 + jitter)
            await asyncio.sleep(max(pause - (time.monotonic() - started), 0))

    def new_lease(self) -> None:
        """A new session: publish every region under its lease now, not at
        each probe's next check."""
        self._new_lease.set()

    async def _refresh_loop(self) -> None:
        """Publish every region at once under a new lease; and, every
        REFRESH_LOOK_S, the regions whose probes have not published for
        that long (a probe interval longer than that)."""
        while True:
            self._new_lease.clear()
            try:
                async with asyncio.timeout(REFRESH_LOOK_S):
                    await self._new_lease.wait()
                stale_after = 0.0
            except TimeoutError:
                stale_after = REFRESH_LOOK_S
            now = time.monotonic()
            for reg in self._regions.values():
                if now - reg.published_at >= stale_after:
                    await self._publish(reg)

    def observation(self, reg: _Region) -> Observation:
        pairs = list(zip(reg.settings.probes, reg.states, strict=True))
        verdict, ready = region_verdict(pairs)
        health = [st for p, st in pairs if not p.readiness] or [st for _, st in pairs]
        s = self._settings()
        return Observation(
            member=s.member, target=reg.settings.name, verdict=verdict, ready=ready,
            since=max(st.since for st in health), checked_at=self._clock(),
            latency_ms=round(max(st.latency_ms for st in health), 2),
            detail="; ".join(st.detail for st in health if st.detail)[:300],
        )

    async def _publish(self, reg: _Region) -> None:
        reg.published_at = time.monotonic()
        s = self._settings()
        target = reg.settings.name
        key = self._keys.observation(s.member, target)
        said = region_verdict(list(zip(reg.settings.probes, reg.states, strict=True)))
        before = self._published.identity(key)
        built: list[Observation] = []

        def render() -> str:
            # Built only if written: most probes change nothing.
            built.append(self.observation(reg))
            return built[-1].to_value()
        try:
            written = await self._published.publish(key, render, said, s.probing.refresh_s)
        except StoreError as exc:
            log.warning("cannot publish observation", target=target, error=str(exc))
            return
        if written and said != before:
            verdict, ready = said
            metrics.set_one_of(metrics.PROBE_VERDICT, metrics.VERDICTS, verdict,
                               target)
            log.info("observation changed", target=target, verdict=verdict, ready=ready,
                     detail=built[-1].detail if built else "")


class _Restart(Exception):
    pass

