"""Read-only checks of a route's endpoint, as a saga's reroute would reach
it: HAProxy ``show servers state`` (every configured server must exist),
one TSIG-signed DNS query of the fence record, a TCP connect to a webhook,
a look at an exec route's file.  Nothing is switched, updated or posted.
Used by ``failoverd check-config --connect`` and by drills.
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import dns.asyncquery
import dns.exception
import dns.message
import dns.rdatatype

from failoverd.config import DnsRoute, ExecRoute, HaproxyRoute, WebhookRoute
from failoverd.traffic.routers import DnsRouter, HaproxyRouter, RouterError


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


async def _haproxy(route: HaproxyRoute, timeout_s: float) -> Result:
    what = f"haproxy {route.socket} backend {route.backend}"
    try:
        states = await HaproxyRouter(route).states()
    except RouterError as exc:
        return Result(what, False, str(exc))
    missing = sorted(s for s in route.servers.values() if s not in states)
    if missing:
        return Result(what, False, f"no server {', '.join(missing)} in the backend")
    return Result(what, True, f"servers {', '.join(sorted(route.servers.values()))} known")


async def _dns(route: DnsRoute, timeout_s: float) -> Result:
    router = DnsRouter(route)
    what = f"dns {route.server} {router.fence}"
    q = dns.message.make_query(router.fence, dns.rdatatype.TXT)
    if router.keyring is not None:
        q.use_tsig(router.keyring, keyname=router.keyname)
    try:
        resp = await dns.asyncquery.tcp(q, router.host, port=router.port, timeout=timeout_s)
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


async def _webhook(route: WebhookRoute, timeout_s: float) -> Result:
    parts = urlsplit(route.url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    what = f"webhook {route.url}"
    try:
        async with asyncio.timeout(timeout_s):
            _, writer = await asyncio.open_connection(parts.hostname, port)
        writer.close()
    except (OSError, TimeoutError) as exc:
        return Result(what, False, f"unreachable: {exc or 'timed out'}")
    return Result(what, True, "reachable (nothing posted)")


def _exec(route: ExecRoute) -> Result:
    cmd = route.command[0]
    what = f"exec {cmd}"
    path, problem = find_executable(cmd)
    if problem:
        return Result(what, False, problem)
    return Result(what, True, f"{path} is executable")


def find_executable(cmd: str) -> tuple[str, str]:
    """``cmd``'s path (searched in PATH without a slash) and what is wrong
    with it: "not found", "not executable", or "" when it can run."""
    path = cmd if os.sep in cmd else shutil.which(cmd)
    if path is None or not os.path.isfile(path):
        return cmd, "not found"
    if not os.access(path, os.X_OK):
        return path, "not executable"
    return path, ""


def route_check(route: HaproxyRoute | DnsRoute | WebhookRoute | ExecRoute, timeout_s: float
                ) -> Result | Coroutine[Any, Any, Result]:
    """The check of one route: a result at once (exec), else a coroutine."""
    if isinstance(route, HaproxyRoute):
        return _haproxy(route, timeout_s)
    if isinstance(route, DnsRoute):
        return _dns(route, timeout_s)
    if isinstance(route, WebhookRoute):
        return _webhook(route, timeout_s)
    return _exec(route)
