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

from failoverd.config import PowerSource, Settings
from failoverd.core.model import Keyspace
from failoverd.core.power import Reading
from failoverd.core.store import StoreError
from failoverd.etcd.client import EtcdStore, etcd_failure
from failoverd.sensing.device import DeviceError
from failoverd.sensing.mqtt import try_broker
from failoverd.sensing.sources import make_device
from failoverd.traffic.prechecks import Result, route_check

TIMEOUT_S = 5.0


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
            check = route_check(route, TIMEOUT_S)
            if isinstance(check, Result):
                routes.append(check)
            else:
                jobs.append(check)
    jobs += [_power_source(src) for region in settings.regions for src in region.power_sources]
    return [*await asyncio.gather(*jobs), *routes]
