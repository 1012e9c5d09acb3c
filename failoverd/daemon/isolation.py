"""Safety rule 4: a member of the active region that is cut off from etcd
*and* from the other regions' members fences itself (runs demote); one that
can still reach them, and hears of no newer epoch, holds.

While etcd is reachable the guard keeps the list of other regions' members.
Once this member has had no live lease for ``isolation_grace_s``, it asks
those peers' ``/healthz`` (open, and carrying the epochs each last read).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import aiohttp
import structlog

from failoverd import metrics
from failoverd.config import Settings
from failoverd.core.model import Keyspace, parse_member
from failoverd.core.store import KeyValue, Store, StoreError
from failoverd.daemon.roles import RoleReconciler
from failoverd.etcd.mirror import KeyMirror

log = structlog.get_logger("failoverd.daemon.isolation")

CHECK_EVERY_S = 1.0
PEER_REFRESH_S = 5.0
# Past the lease's local deadline by this much, so that it has passed.
LEASE_SLACK_S = 0.01
# Peers' round trips change with the WAN, slowly: measured this often (and
# when the peer set changes), not at every refresh of the list.
PEER_RTT_S = 30.0


def self_fence_deadline(absent_since: float, decided_at: float, grace_s: float,
                        peer_timeout_s: float) -> float:
    """The latest time a member of a region that vanished from etcd at
    ``absent_since`` has begun fencing a group whose new epoch was committed
    at ``decided_at`` (pure; wall-clock seconds).

    It noticed its lease was gone at most one check after etcd dropped it,
    asks its peers once ``grace_s`` has passed and then every check, and
    fences at the first answer that names the newer epoch (or when no peer
    answers).  A new region is promoted only after this (see the saga's
    ``fence_old``): an isolated old region never overlaps with the new one.
    """
    return max(absent_since + CHECK_EVERY_S + grace_s, decided_at) + CHECK_EVERY_S + \
        peer_timeout_s


def peer_source(s: Settings) -> str | None:
    """The local address peer requests leave from (None: any)."""
    address = s.api.peer_source_address
    return str(address) if address is not None else None


async def ask_healthz(urls: Sequence[str], timeout_s: float, source: str | None = None
                      ) -> list[dict[str, object] | None]:
    """Each member API's ``/healthz`` answer (None: no answer in time;
    ``timeout_s`` is ``Settings.peer_timeout_s``; ``source``: the local
    address to send from, ``api.peer_source_address``)."""
    async def ask(url: str) -> dict[str, object] | None:
        try:
            connector = aiohttp.TCPConnector(local_addr=(source, 0) if source else None)
            async with aiohttp.ClientSession(
                    connector=connector,
                    timeout=aiohttp.ClientTimeout(total=timeout_s)) as s, \
                    s.get(f"{url}/healthz", ssl=False) as r:
                data = await r.json()
            return data if isinstance(data, dict) else None
        except (aiohttp.ClientError, TimeoutError, ValueError, TypeError):
            return None
    return list(await asyncio.gather(*(ask(u) for u in urls)))


def isolation_decision(active: Mapping[str, int], answers: Sequence[Mapping[str, int]]
                       ) -> dict[str, str]:
    """Which of our active groups to fence, and why (pure).

    No peer in another region answers → fence every active group.  Peers
    answer → fence only a group for which one reports a newer epoch.
    """
    if not answers:
        return dict.fromkeys(active, "cut off from etcd and from every other region")
    out = {}
    for group, epoch in active.items():
        newer = max((a.get(group, 0) for a in answers), default=0)
        if newer > epoch:
            out[group] = f"a peer reports epoch {newer} > our {epoch}"
    return out


class IsolationGuard:
    """Safety rule 4 for this member (the ``isolation`` task).

    Owns the list of other regions' members (refreshed while etcd is up,
    with their round trips) and the decision to self-fence.  Once the lease
    has been gone ``isolation_grace_s``, it asks the peers' ``/healthz``
    every check: an answer naming a newer epoch for a group we hold fences
    that group; no answer at all fences every group at once; otherwise it
    holds.  Never waits on the store.  Errors: a peer that does not answer
    in ``peer_timeout_s`` counts as unreachable.
    """

    def __init__(self, store: Store, keys: Keyspace, settings: Callable[[], Settings],
                 roles: RoleReconciler, lease_alive: Callable[[], bool],
                 clock: Callable[[], float] = time.monotonic,
                 mirror: KeyMirror | None = None, *,
                 lease_left: Callable[[], float], lease_dropped: asyncio.Event) -> None:
        self._store = store
        self._lease_left = lease_left
        self._lease_dropped = lease_dropped
        self._mirror = mirror
        self._next_rtt = 0.0
        self._keys = keys
        self._settings = settings
        self._roles = roles
        self._lease_alive = lease_alive
        self._clock = clock
        self.peers: dict[str, str] = {}  # member -> API base URL, other regions only
        self._rtt_warned: dict[str, float] = {}
        self._lost_at: float | None = None
        self._next_refresh = 0.0
        self._holding = False

    async def run(self) -> None:
        while True:
            await self._nap()
            await self.check()

    async def _nap(self) -> None:
        """A check a second once the lease is gone.  While it is held, the
        next check is at its local deadline (the earliest it can run out:
        renewals only move it later) or the next peer refresh, and at once
        if the session drops the lease before (etcd said it expired)."""
        self._lease_dropped.clear()  # before looking: a drop from now on wakes us
        pause = CHECK_EVERY_S
        if self._lost_at is None and self._lease_alive():
            pause = max(min(self._lease_left() + LEASE_SLACK_S,
                            self._next_refresh - self._clock()), CHECK_EVERY_S)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(pause):
                await self._lease_dropped.wait()

    async def check(self) -> None:
        now = self._clock()
        if self._lease_alive():
            self._lost_at, self._holding = None, False
            if now >= self._next_refresh:
                self._next_refresh = now + PEER_REFRESH_S
                await self._refresh_peers()
            return
        if self._lost_at is None:
            self._lost_at = now
        active = self._roles.active_groups()
        if not active or now - self._lost_at < self._settings().policy.isolation_grace_s:
            return
        answers = await self._ask_peers()
        to_fence = isolation_decision(active, answers)
        if not to_fence and not self._holding:
            log.warning("etcd unreachable; other regions reachable, holding",
                        peers=len(answers), groups=sorted(active))
            self._holding = True
        # Every group at once (hooks bounded by max_concurrent_hooks): a site
        # active for 1,000 groups must not fence them one after the other.
        fences = [self._roles.fence(group, reason) for name, reason in to_fence.items()
                  if (group := self._settings().group_by_name(name)) is not None]
        await asyncio.gather(*fences)

    async def _refresh_peers(self) -> None:
        """The other regions' members, from the watch's copy when it has one
        (no read per refresh), then their round trips when due."""
        kvs: Iterable[KeyValue]
        if self._mirror is not None and self._mirror.ready.is_set():
            prefix = self._keys.members
            kvs = [kv for k, kv in self._mirror.kvs.items() if k.startswith(prefix)]
        else:
            try:
                kvs = (await self._store.get_prefix(self._keys.members)).kvs
            except StoreError:
                return
        me = self._settings()
        peers = {}
        for kv in kvs:
            try:
                m = parse_member(kv)
            except (ValueError, KeyError, TypeError):
                continue
            if m.region != me.region and m.api_url:
                peers[m.member] = m.api_url
        now = self._clock()
        if peers != self.peers:
            log.info("isolation peers", peers=sorted(peers))
            self._next_rtt = now
        self.peers = peers
        if now >= self._next_rtt:
            self._next_rtt = now + PEER_RTT_S
            await self._measure_rtt()

    async def _measure_rtt(self) -> None:
        """While etcd is up, time one /healthz round to each peer: the peer
        check's timeout (4 x the configured RTT) must outlast it, or rule 4
        would take a slow WAN for a dead one."""
        timeout = self._settings().peer_timeout_s

        async def one(member: str, url: str) -> None:
            started = time.monotonic()
            answer = await ask_healthz([url], timeout, peer_source(self._settings()))
            if answer[0] is None:
                return
            rtt = time.monotonic() - started
            metrics.PEER_RTT.labels(member).set(rtt)
            if rtt * 4 > timeout and self._rtt_warned.get(member, 0.0) < rtt:
                self._rtt_warned[member] = rtt * 1.5
                log.warning("peer round trip too slow for the peer check timeout; set "
                            "[[regions]] rtt_ms", peer=member, rtt_s=round(rtt, 3),
                            timeout_s=timeout)
        await asyncio.gather(*(one(m, u) for m, u in self.peers.items()))

    async def _ask_peers(self) -> list[dict[str, int]]:
        out = []
        s = self._settings()
        for data in await ask_healthz(list(self.peers.values()), s.peer_timeout_s,
                                      peer_source(s)):
            if data is None:
                continue
            epochs = data.get("epochs", {})
            try:
                out.append({str(k): int(v) for k, v in epochs.items()}
                           if isinstance(epochs, dict) else {})
            except (ValueError, TypeError):
                continue
        return out
