"""The daemon shell: one root TaskGroup, named tasks, one shutdown path.

Root tasks: ``watch`` (wakes the others on etcd changes), ``roles`` (local
promote/demote), ``probes`` (health observations), ``mqtt`` (power feeds),
``power-sources`` (NUT/SNMP devices of our region, relayed like MQTT feeds),
``api``, ``isolation`` (safety rule 4), ``session`` (lease + membership +
election + coordinator, rebuilt whenever the lease is lost), ``reload``
(SIGHUP), ``shutdown`` (SIGTERM/SIGINT), and under systemd ``sd-status``
(READY once etcd answered and the API listens, then STATUS lines) and
``sd-watchdog``.  On the way out the coordinator
seat is resigned and the lease revoked so a successor takes over at once, not
after a TTL.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import signal
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import structlog
from tenacity import AsyncRetrying, retry_if_exception_type, wait_random_exponential

from failoverd import __version__, metrics
from failoverd.config import ConfigError, Overrides, Settings, engine_policy, load_settings
from failoverd.core.engine import Policy
from failoverd.core.model import ClusterView, Keyspace, MemberRecord, ViewIndex, parse_view
from failoverd.core.store import Store, StoreError
from failoverd.daemon.coordinator import Coordinator, NotCoordinator
from failoverd.daemon.drill import Drill, hook_checks
from failoverd.daemon.isolation import IsolationGuard
from failoverd.daemon.roles import Applied, RoleReconciler
from failoverd.daemon.saga import catchup_targets, worst_step_s
from failoverd.daemon.sdnotify import Notifier, run_watchdog
from failoverd.etcd.client import EtcdStore, etcd_failure
from failoverd.etcd.election import campaign, resign
from failoverd.etcd.history import History, read_history
from failoverd.etcd.lease import KeptLease, LeaseLost
from failoverd.etcd.mirror import KeyMirror
from failoverd.faults import fault_point
from failoverd.processes import set_child_nice
from failoverd.sensing.database import DatabaseChecker
from failoverd.sensing.mqtt import PowerFeeds
from failoverd.sensing.probes import Prober
from failoverd.sensing.sources import PowerSources
from failoverd.web.api import Api, serve_api

log = structlog.get_logger("failoverd.daemon.wiring")

RELEASE_TIMEOUT_S = 3.0


class _Stop(Exception):
    """Raised inside the root TaskGroup to unwind every task."""


class Watcher:
    """One watch on the cluster prefix: keeps the :class:`KeyMirror` current
    and wakes subscribers whose sub-prefix changed."""

    def __init__(self, store: Store, keys: Keyspace) -> None:
        self._store = store
        self._keys = keys
        self._subs: list[tuple[str, asyncio.Event]] = []
        self._listeners: list[tuple[str, Callable[[list[str] | None], None]]] = []
        self.mirror = KeyMirror(keys.prefix, exclude=("history/",), index=ViewIndex(keys))

    def subscribe(self, sub_prefix: str) -> asyncio.Event:
        event = asyncio.Event()
        self._subs.append((self._keys.prefix + sub_prefix, event))
        return event

    def listen(self, sub_prefix: str, fn: Callable[[list[str] | None], None]) -> None:
        """Call ``fn`` with the changed keys under ``sub_prefix`` (None: the
        mirror was reloaded, everything may have changed)."""
        self._listeners.append((self._keys.prefix + sub_prefix, fn))

    def _reloaded(self) -> None:
        for _, fn in self._listeners:
            fn(None)
        for _, event in self._subs:
            event.set()

    async def _load(self) -> int:
        async for attempt in AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type(StoreError),
        ):
            with attempt:
                snap = await self._store.snapshot(self._keys.prefix, exclude=("history/",))
        self.mirror.load(snap)
        self._reloaded()
        return snap.revision

    async def resync(self) -> None:
        """Reload the mirror from a fresh snapshot (the watch looked stuck)."""
        snap = await self._store.snapshot(self._keys.prefix, exclude=("history/",))
        if snap.revision > self.mirror.revision:
            self.mirror.load(snap)
            self._reloaded()

    async def run(self) -> None:
        while True:
            start = await self._load() + 1
            async with contextlib.aclosing(self._store.watch(self._keys.prefix, start)) as watch:
                async for batch in watch:
                    if not batch:
                        # Compacted past what we had: reload from a snapshot.
                        log.warning("watch compacted; reloading the mirror")
                        break
                    changed = self.mirror.apply(batch)
                    for prefix, fn in self._listeners:
                        keys = [k for k in changed if k.startswith(prefix)]
                        if keys:
                            fn(keys)
                    for prefix, event in self._subs:
                        if any(k.startswith(prefix) for k in changed):
                            event.set()


class Daemon:
    """One site's daemon: the only place that wires the adapters together.

    Owns the store client, the watch and its mirror, the lease session and
    the election, the role reconciler, the prober, the power feeds, the API,
    the isolation guard and the history writer, all as named tasks of one
    root TaskGroup (``watch``, ``history``, ``roles``, ``probes``, ``mqtt``,
    ``api``, ``isolation``, ``session``, ``reload``, ``shutdown``,
    ``databases``, and per
    lease session ``lease-keepalive`` and ``election``, which runs the
    :class:`~failoverd.daemon.coordinator.Coordinator` while it holds the seat).
    Signals feed one shutdown path; SIGHUP reloads the config and keeps the
    old one when the new one does not validate.  It decides nothing and runs
    no hook itself.  Errors: etcd out of reach is retried (registration with
    jittered backoff) while the last applied roles hold; a task that crashes
    ends the daemon, for systemd to restart.
    """

    def __init__(self, settings: Settings, config_path: Path | None = None,
                 overrides: Overrides | None = None, store: Store | None = None,
                 notifier: Notifier | None = None) -> None:
        self.settings = settings
        set_child_nice(settings.policy.hook_nice)
        self._policy_for: Settings | None = None
        self._policy_cached = engine_policy(settings)
        self._config_path = config_path
        self._overrides = overrides or Overrides()
        self.keys = Keyspace(settings.cluster)
        self.store: Store = store or EtcdStore(settings.etcd)
        self.history = History(self.store, self.keys, settings.member, settings.region)
        self.watcher = Watcher(self.store, self.keys)
        self.roles: RoleReconciler | None = None
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self.lease: KeptLease | None = None
        self.coordinator: Coordinator | None = None
        self.prober: Prober | None = None
        self.power: PowerFeeds | None = None
        self.sources: PowerSources | None = None
        self.databases: DatabaseChecker | None = None
        self.notifier = notifier or Notifier()
        self._registered = asyncio.Event()
        self._lease_dropped = asyncio.Event()  # a session ended: its lease is gone

    # -- signals ---------------------------------------------------------
    def request_stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    def _install_signals(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)

    # -- lifecycle -------------------------------------------------------
    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(
            member=self.settings.member, region=self.settings.region
        )
        self._install_signals()
        roles = self.roles = RoleReconciler(
            self.store, self.keys, lambda: self.settings, self.history,
            self.watcher.subscribe("groups/"), self._live_lease, mirror=self.watcher.mirror)
        self.watcher.listen("groups/", roles.keys_changed)
        self.watcher.listen("", self._decision_inputs)
        self.prober = Prober(self.store, self.keys, lambda: self.settings, self._live_lease)
        self.databases = databases = DatabaseChecker(
            self.store, self.keys, lambda: self.settings, self._live_lease,
            catchup_targets=self._catchup_targets)
        # A saga reaching catchup into our region: look at our server now.
        self.watcher.listen("groups/", databases.keys_changed)
        self.power = PowerFeeds(self.store, self.keys, lambda: self.settings, self._live_lease)
        self.sources = PowerSources(self.power, lambda: self.settings)
        self.power.on_reading = self._heard_power
        drill = Drill(self.store, self.keys, lambda: self.settings, self._read_view,
                      self.history, lambda limit: read_history(self.store, self.keys, limit))
        self.api = Api(self.store, self.keys, lambda: self.settings,
                       self.watcher.subscribe("control/results/"), lambda: dict(roles.epochs),
                       history=lambda limit: read_history(self.store, self.keys, limit),
                       polls=self.sources.poll_status, refused=self.power.refused,
                       cached_view=self._mirror_view, drill=drill.dry_run,
                       hook_checks=lambda group: [
                           {"name": c.name, "ok": c.ok, "detail": c.detail}
                           for c in hook_checks(self.settings, group)])
        guard = IsolationGuard(self.store, self.keys, lambda: self.settings, roles,
                               lambda: self._live_lease() is not None,
                               mirror=self.watcher.mirror, lease_left=self._lease_left,
                               lease_dropped=self._lease_dropped)
        log.info("failoverd starting", version=__version__, cluster=self.settings.cluster)
        for warning in self.settings.policy.deprecations():
            log.warning("deprecated setting", detail=warning)
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(self.watcher.run(), name="watch")
                tg.create_task(self.history.run(), name="history")
                tg.create_task(roles.run(), name="roles")
                tg.create_task(self.prober.run(), name="probes")
                tg.create_task(databases.run(), name="databases")
                tg.create_task(self.power.run(), name="mqtt")
                tg.create_task(self.sources.run(), name="power-sources")
                tg.create_task(serve_api(self.api, self.settings.api), name="api")
                tg.create_task(guard.run(), name="isolation")
                tg.create_task(self._sessions(), name="session")
                tg.create_task(self._reloads(), name="reload")
                tg.create_task(self._wait_stop(), name="shutdown")
                if self.notifier.enabled:
                    tg.create_task(self._sd_status(roles), name="sd-status")
                    tg.create_task(run_watchdog(self.notifier, self._stuck), name="sd-watchdog")
        except* _Stop:
            pass
        finally:
            self.notifier.stopping()
            await self._release()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self.history.flush()  # what the writer had not sent
            await self.store.close()
            self.notifier.close()
            log.info("failoverd stopped")

    async def _wait_stop(self) -> None:
        await self._stop.wait()
        log.info("shutdown requested")
        raise _Stop

    # -- systemd -----------------------------------------------------------
    async def _sd_status(self, roles: RoleReconciler) -> None:
        """READY=1 once etcd answered (a lease was granted) and the API
        listens; then a STATUS line whenever role, term or active regions change."""
        await self._registered.wait()
        await self.api.listening.wait()
        last = self.status_line(roles)
        self.notifier.ready(last)
        log.info("ready", status=last)
        changed = self.watcher.subscribe("")
        while True:
            changed.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await changed.wait()
            line = self.status_line(roles)
            if line != last:
                self.notifier.status(line)
                last = line

    def status_line(self, roles: RoleReconciler) -> str:
        coord = self.coordinator
        if coord is not None:
            role = f"coordinator, term {coord.term}"
        elif self._live_lease() is not None:
            role = "member"
        else:
            role = "member, no etcd session"
        active = ", ".join(f"{g}={r}" for g, r in sorted(roles.active_regions.items()))
        return f"{role}; active: {active or 'none yet'}"

    def _stuck(self) -> str | None:
        """Why the watchdog must not be pinged, or None when healthy."""
        coord = self.coordinator
        if coord is None:
            return None
        s = self.settings
        # A healthy cycle makes a few etcd calls and may run one saga step
        # whose routers hang until their timeouts; its sleep ends on time
        # (counted from then: at rest it sleeps until a decision is due).
        limit = max(2 * s.policy.tick_s + 4 * s.etcd.timeout_s
                    + max((worst_step_s(g) for g in s.groups), default=0.0),
                    (self.notifier.watchdog_s or 0.0) / 2)
        age = time.monotonic() - max(coord.cycle_started, coord.wake_due)
        return f"coordinator cycle stuck for {age:.1f}s" if age > limit else None

    async def _release(self) -> None:
        """Resign the seat and revoke the lease, bounded in time."""
        lease, coord = self.lease, self.coordinator
        if lease is None:
            return
        try:
            async with asyncio.timeout(RELEASE_TIMEOUT_S):
                if coord is not None:
                    await resign(self.store, self.keys, coord.term,
                                 self.history.put_op("coordinator_resigned", term=coord.term))
                await self.history.record("member_left")
                await self.history.flush()
                await self.store.revoke(lease.id)
        except (StoreError, TimeoutError) as exc:
            log.warning("could not release lease cleanly; it will expire", error=str(exc))

    # -- reload ----------------------------------------------------------
    async def _reloads(self) -> None:
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self.reload()

    async def reload(self) -> bool:
        fault_point("reload")
        if self._config_path is None:
            return False
        self.notifier.reloading()
        try:
            return await self._reload_config(self._config_path)
        finally:
            self.notifier.send(READY=1)

    async def _reload_config(self, path: Path) -> bool:
        try:
            new = load_settings(path, self._overrides)
        except ConfigError as exc:
            log.error("config reload rejected; keeping the running config", errors=exc.errors)
            await self.history.record("config_reload_failed", errors=exc.errors)
            return False
        old = self.settings
        fixed = {"cluster": old.cluster, "member": old.member, "region": old.region,
                 "etcd": old.etcd, "state_dir": old.state_dir, "mqtt": old.mqtt,
                 "api": old.api.model_copy(update={"tokens": new.api.tokens})}
        ignored = [k for k, v in fixed.items() if getattr(new, k) != v]
        if ignored:
            log.warning("these settings need a restart to change", settings=ignored)
        self.settings = new.model_copy(update=fixed)
        set_child_nice(self.settings.policy.hook_nice)
        if self.prober is not None:
            self.prober.reload()
        if self.power is not None:
            self.power.reload()  # lanes follow the regions; narrowed ones the bound
        if self.sources is not None and _own_sources(old) != _own_sources(self.settings):
            self.sources.reload()
        if self.databases is not None:
            self.databases.reload()
        if self.roles is not None:
            self.roles.reload()
        log.info("config reloaded", path=str(path))
        await self.history.record("config_reloaded", needs_restart=ignored)
        return True

    # -- session: lease, membership, election -------------------------------
    async def _sessions(self) -> None:
        while True:
            try:
                await self._session()
            except* LeaseLost as eg:
                # Not in a finally: on shutdown the lease is still needed to
                # resign and revoke.
                self.lease = None
                self._lease_dropped.set()
                self.coordinator = None
                log.warning("lease lost; starting a new session", error=str(eg.exceptions[0]))
                await self.history.record("lease_lost")
            await asyncio.sleep(0.1)

    async def _grant(self) -> KeptLease:
        s = self.settings
        async for attempt in AsyncRetrying(
            wait=wait_random_exponential(multiplier=0.2, max=5),
            retry=retry_if_exception_type(StoreError),
            before_sleep=lambda rs: log.warning(
                "etcd unreachable; retrying",
                reason=etcd_failure(str(rs.outcome.exception())) if rs.outcome else "",
                error=str(rs.outcome.exception()) if rs.outcome else ""),
        ):
            with attempt:
                sent = time.monotonic()
                lease_id, ttl = await self.store.grant(s.etcd.lease_ttl_s)
                member = MemberRecord(
                    member=s.member, region=s.region, version=__version__,
                    api_url=s.api.url(),
                    started=time.time(),
                    epochs={g: a.epoch for g, a in self._applied().items()},
                )
                await self.store.put(self.keys.member(s.member), member.to_value(), lease_id)
        return KeptLease(self.store, lease_id, ttl, sent, s.etcd.lease_margin_s)

    def _applied(self) -> Mapping[str, Applied]:
        return self.roles.state.groups if self.roles is not None else {}

    async def _session(self) -> None:
        self.lease = await self._grant()
        # What this member publishes under its lease is re-published under
        # the new one now, not at each publisher's next turn.
        for component in (self.power, self.prober):
            if component is not None:
                component.new_lease()
        if self.roles is not None:
            self.roles.reload()  # its acks too
        log.info("registered", lease=f"{self.lease.id:x}", ttl=self.lease.ttl)
        await self.history.record("member_joined", lease=f"{self.lease.id:x}")
        self._registered.set()
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self.lease.run(), name="lease-keepalive")
            tg.create_task(self._campaign(self.lease), name="election")

    def _seat_held_by_another(self, lease: KeptLease) -> bool:
        """The watch's copy shows the coordinator key under someone else's
        lease (its deletion wakes us through the watch)."""
        mirror = self.watcher.mirror
        seat = mirror.kvs.get(self.keys.coordinator) if mirror.ready.is_set() else None
        return seat is not None and seat.lease != lease.id

    async def _campaign(self, lease: KeptLease) -> None:
        seat_changed = self.watcher.subscribe("coordinator")
        everything = self.watcher.subscribe("")
        last_try = -math.inf
        while True:
            seat_changed.clear()
            # A follower does not ask etcd every tick for a seat the watch
            # shows taken (one txn a second per follower, at rest): the
            # seat's deletion wakes it.  It still asks once per lease TTL,
            # in case the watch missed that (the txn decides, not the copy).
            if (not self._seat_held_by_another(lease)
                    or time.monotonic() - last_try >= lease.ttl):
                last_try = time.monotonic()
                try:
                    term = await campaign(self.store, self.keys, self.settings.member, lease)
                except StoreError as exc:
                    log.warning("campaign failed", error=str(exc))
                    term = None
                if term is not None:
                    await self._lead(lease, term, everything)
            pause = self.settings.policy.tick_s
            if self._seat_held_by_another(lease):  # its deletion wakes us
                pause = max(last_try + lease.ttl - time.monotonic(), pause)
            try:
                async with asyncio.timeout(max(min(pause, lease.remaining()), 0.05)):
                    await seat_changed.wait()
            except TimeoutError:
                pass

    def _heard_power(self) -> asyncio.Event | None:
        if self.coordinator is not None:
            return self.coordinator.note_local_power()
        return None

    async def _lead(self, lease: KeptLease, term: int, wake: asyncio.Event) -> None:
        s = self.settings
        coord = Coordinator(
            self.store, self.keys, s.member, term, lease, self.history,
            policy=self._policy, tick_s=lambda: self.settings.policy.tick_s,
            history_limit=lambda: self.settings.policy.history_limit, wake=wake,
            settings=lambda: self.settings, mirror=self.watcher.mirror,
            resync=self.watcher.resync,
            local_power=lambda: self.power.unrelayed if self.power is not None else {},
        )
        self.coordinator = coord
        metrics.IS_COORDINATOR.set(1)
        metrics.COORDINATOR_TERM.set(term)
        structlog.contextvars.bind_contextvars(term=term)
        log.info("elected coordinator", term=term)
        await self.history.record("coordinator_elected", term=term)
        try:
            await coord.run()
        except NotCoordinator as exc:
            self.coordinator = None
            log.warning("stepping down", reason=str(exc))
            await self.history.record("coordinator_stepped_down", term=term, reason=str(exc))
            # Python 3.11's TaskGroup drops a cancellation that arrives while
            # it unwinds an error (here: the lease task ended the session
            # as our term ended): honour it, or the session never ends.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise asyncio.CancelledError from None
        finally:
            coord.stop_holding_relays()
            metrics.IS_COORDINATOR.set(0)
            metrics.COORDINATOR_TERM.set(0)
            for gauge in metrics.COORDINATOR_VIEW:
                metrics.clear_labelled(gauge)
            metrics.GROUPS_HELD.set(0)
            structlog.contextvars.unbind_contextvars("term")

    def _catchup_targets(self) -> dict[str, int]:
        """Groups whose switchover waits for our region's database."""
        if not any(g.database is not None for g in self.settings.groups):
            return {}
        view = self._mirror_view()
        return catchup_targets(view, self.settings.region) if view is not None else {}

    def _decision_inputs(self, keys: list[str] | None) -> None:
        coord = self.coordinator
        if coord is not None:
            coord.note_changes(keys)

    async def _read_view(self) -> ClusterView:
        """The watch-fed view, else one snapshot (a drill's judgement)."""
        view = self._mirror_view()
        if view is not None:
            return view
        return parse_view(self.keys, await self.store.snapshot(self.keys.prefix,
                                                               exclude=("history/",)))

    def _mirror_view(self) -> ClusterView | None:
        """The watch-fed view, once the mirror has loaded (the API's reads)."""
        mirror = self.watcher.mirror
        return mirror.view() if mirror.ready.is_set() else None

    def _lease_left(self) -> float:
        return self.lease.remaining() if self.lease is not None else 0.0

    def _live_lease(self) -> int | None:
        lease = self.lease
        return lease.id if lease is not None and lease.valid() else None

    def _policy(self) -> Policy:
        # Rebuilt only when the settings object changes (a reload): every
        # decision cycle asks for it.
        settings = self.settings
        if self._policy_for is not settings:
            self._policy_cached, self._policy_for = engine_policy(settings), settings
        return self._policy_cached


def _own_sources(s: Settings) -> object:
    """The power sources this member polls (its region's)."""
    return next((r.power_sources for r in s.regions if r.name == s.region), [])
