"""``failoverd check-config --connect``: try every endpoint the config names
with its configured credentials and say, per endpoint, whether it works and
if not why (TLS verify, client certificate refused, authentication failed,
unreachable).

Read-only everywhere: etcd gets one read under the cluster's prefix (so the
user's role is checked too), each broker one connect and subscribe, HAProxy
``show servers state`` (every configured server must exist), DNS one
TSIG-signed query of the fence record, webhooks a TCP connect, exec routes
a look at the file, power sources one poll (a failure there is a warning:
only the region's members must reach them).  Nothing is switched,
published or posted.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from dataclasses import dataclass
from urllib.parse import urlsplit

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdatatype

from failoverd.config import (
    DnsRoute,
    ExecRoute,
    HaproxyRoute,
    PowerSource,
    Settings,
    WebhookRoute,
)
from failoverd.core.model import Keyspace
from failoverd.core.power import Reading
from failoverd.core.store import StoreError
from failoverd.etcd.client import EtcdStore, etcd_failure
from failoverd.sensing.device import DeviceError
from failoverd.sensing.mqtt import try_broker
from failoverd.sensing.sources import make_device
from failoverd.traffic.routers import DnsRouter, HaproxyRouter, RouterError

TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Result:
    what: str  # e.g. "etcd 10.0.0.1:2379"
    ok: bool
    detail: str
    # A problem that does not fail the check (a power source only its
    # region's members reach).
    warning: bool = False

    def line(self) -> str:
        tag = "ok  " if self.ok else "warn" if self.warning else "FAIL"
        return f"{tag} {self.what}: {self.detail}"


async def _power_source(src: PowerSource) -> Result:
    """One poll of a NUT or SNMP source; a failure is a warning (only the
    members of its region must reach it)."""
    what = f"{src.kind} {src.where} (sensor {src.sensor})"
    try:
        device = make_device(src)
    except OSError as exc:
        return Result(what, False, f"cannot read a secret file: {exc.strerror} "
                                   f"({exc.filename})")
    try:
        async with asyncio.timeout(min(src.timeout_s * 2, TIMEOUT_S)):
            item = await device.poll("-", 0.0)
    except TimeoutError:
        return Result(what, False, "no answer (only the region's members need to reach it)",
                      warning=True)
    except DeviceError as exc:
        return Result(what, False, f"{exc.reason}: {exc}", warning=True)
    finally:
        device.close()
    if isinstance(item, Reading):
        return Result(what, True, f"{item.detail} read as {item.state} ({device.describe()})")
    return Result(what, False, f"no reading: {item.detail} ({device.describe()})", warning=True)


async def _etcd(settings: Settings, endpoint: str) -> Result:
    store = EtcdStore(settings.etcd.model_copy(update={"endpoints": [endpoint]}))
    keys = Keyspace(settings.cluster)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            await store.get(keys.coordinator)
        return Result(f"etcd {endpoint}", True, f"read {keys.coordinator}")
    except (StoreError, TimeoutError, OSError) as exc:
        return Result(f"etcd {endpoint}", False, etcd_failure(str(exc) or "timed out"))
    finally:
        await store.close()


async def _haproxy(route: HaproxyRoute) -> Result:
    what = f"haproxy {route.socket} backend {route.backend}"
    try:
        states = await HaproxyRouter(route).states()
    except RouterError as exc:
        return Result(what, False, str(exc))
    missing = sorted(s for s in route.servers.values() if s not in states)
    if missing:
        return Result(what, False, f"no server {', '.join(missing)} in the backend")
    return Result(what, True, f"servers {', '.join(sorted(route.servers.values()))} known")


async def _dns(route: DnsRoute) -> Result:
    router = DnsRouter(route)
    what = f"dns {route.server} {router.fence}"
    q = dns.message.make_query(router.fence, dns.rdatatype.TXT)
    if router.keyring is not None:
        q.use_tsig(router.keyring, keyname=router.keyname)
    try:
        resp = await dns.asyncquery.tcp(q, router.host, port=router.port, timeout=TIMEOUT_S)
    except dns.exception.DNSException as exc:
        reason = ("TSIG key refused" if "tsig" in type(exc).__module__
                  or "Bad" in type(exc).__name__ or "Peer" in type(exc).__name__
                  else type(exc).__name__)
        return Result(what, False, f"{reason}: {exc}"[:200])
    except OSError as exc:
        return Result(what, False, f"unreachable: {exc}")
    fence = next((rd.to_text() for rr in resp.answer for rd in rr), "no fence yet")
    signed = "signed query accepted" if router.keyring is not None else "unsigned"
    return Result(what, True, f"{signed}; fence {fence}")


async def _webhook(route: WebhookRoute) -> Result:
    parts = urlsplit(route.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    what = f"webhook {route.url}"
    try:
        async with asyncio.timeout(TIMEOUT_S):
            _, writer = await asyncio.open_connection(parts.hostname, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Result(what, False, f"unreachable: {exc or 'timed out'}")
    return Result(what, True, "reachable (nothing posted)")


def _exec(route: ExecRoute) -> Result:
    cmd = route.command[0]
    path = cmd if os.sep in cmd else shutil.which(cmd)
    what = f"exec {cmd}"
    if path is None or not os.path.isfile(path):
        return Result(what, False, "not found")
    if not os.access(path, os.X_OK):
        return Result(what, False, "not executable")
    return Result(what, True, f"{path} is executable")


async def connect_check(settings: Settings) -> list[Result]:
    """Every endpoint of ``settings``, each tried once, concurrently."""
    jobs = [_etcd(settings, ep) for ep in settings.etcd.endpoints]

    async def broker(url: str, index: int) -> Result:
        why = await try_broker(settings.mqtt[index],
                               f"failoverd-check-{settings.cluster}-{os.getpid()}", TIMEOUT_S)
        return Result(f"mqtt {url}", not why, why or "connected and subscribed")
    jobs += [broker(m.url, i) for i, m in enumerate(settings.mqtt)]
    seen: set[tuple[str, ...]] = set()
    routes: list[Result] = []
    for group in settings.groups:
        for route in group.routes:
            key = tuple(str(v) for v in route.model_dump().values())
            if key in seen:
                continue
            seen.add(key)
            if isinstance(route, HaproxyRoute):
                jobs.append(_haproxy(route))
            elif isinstance(route, DnsRoute):
                jobs.append(_dns(route))
            elif isinstance(route, WebhookRoute):
                jobs.append(_webhook(route))
            else:
                routes.append(_exec(route))
    jobs += [_power_source(src) for region in settings.regions for src in region.power_sources]
    return [*await asyncio.gather(*jobs), *routes]
