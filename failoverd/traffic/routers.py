"""Traffic routers: move one group's traffic from one region to another.

Each router implements :class:`Router`.  Every call is idempotent (applying
the same change again leaves the same state), carries the epoch, and raises
:class:`RouterError` when it could not be confirmed; the caller retries with
backoff.  :class:`FencedOut` means a newer epoch already owns the resource:
never retry it.

- ``haproxy``: runtime API over the admin socket (unix path or host:port);
  servers of the new region ``ready``, the others ``maint`` (or ``drain``),
  confirmed by reading back ``show servers state``.
- ``dns``: RFC 2136 update with TSIG, fenced by ``_failoverd.<name>`` TXT
  ``"epoch=N"``: a compare-and-set the DNS server itself enforces.
- ``webhook``: HTTP POST of the change, signed with HMAC-SHA256.
- ``exec``: a command with the change in its environment.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import dns.asyncquery
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.tsig
import dns.tsigkeyring
import dns.update

from failoverd.config import DnsRoute, ExecRoute, HaproxyRoute, WebhookRoute
from failoverd.faults import fault_point
from failoverd.processes import HookFailed, run_once


class RouterError(Exception):
    """The change could not be made or confirmed; retry later."""


class FencedOut(RouterError):
    """A newer epoch owns the resource: this writer is stale.  Do not retry."""


# HAProxy's admin socket and the DNS server: one exchange must answer within this.
RESOURCE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class Change:
    group: str
    from_region: str | None
    to_region: str
    epoch: int
    step: str  # "drain" (planned) | "fence" (forced: old region out) | "reroute"


class Router(Protocol):
    """Moves traffic for one group.  Idempotent; raises RouterError (or
    FencedOut) when the change is not confirmed; never leaves a group with
    no region serving (safety rule 8)."""

    kind: str

    async def apply(self, change: Change) -> str:
        """Make ``change``; return a short description of what was confirmed."""
        ...


# -- HAProxy ------------------------------------------------------------------

ADMIN_MAINT, ADMIN_DRAIN = 0x01, 0x08


class HaproxyRouter:
    kind = "haproxy"

    def __init__(self, route: HaproxyRoute, timeout_s: float = RESOURCE_TIMEOUT_S) -> None:
        self.route = route
        self.timeout_s = timeout_s

    async def command(self, line: str) -> str:
        """One runtime-API command (non-interactive: HAProxy closes after it)."""
        try:
            return await self._command(line)
        except (OSError, TimeoutError) as exc:
            raise RouterError(f"haproxy {self.route.socket}: {type(exc).__name__}: {exc}"
                              ) from exc

    async def _command(self, line: str) -> str:
        async with asyncio.timeout(self.timeout_s):
            sock = self.route.socket
            if sock.startswith("/"):
                reader, writer = await asyncio.open_unix_connection(sock)
            else:
                host, _, port = sock.rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                return (await reader.read()).decode(errors="replace")
            finally:
                writer.close()

    def _parse_states(self, out: str) -> dict[str, int]:
        states: dict[str, int] = {}
        for line in out.splitlines():
            parts = line.split()
            # be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state ...
            if len(parts) > 6 and parts[1] == self.route.backend and parts[0].isdigit():
                states[parts[3]] = int(parts[6])
        return states

    async def states(self) -> dict[str, int]:
        """server name -> admin state bits, from ``show servers state``."""
        return self._parse_states(
            await self.command(f"show servers state {self.route.backend}"))

    async def _drain_skipped(self, change: Change) -> str:
        """Why the old server is not drained, or "" to drain it.  A drain
        never raises a server (one in maintenance stays there) and never
        leaves the backend with no server for new sessions (rule 8): until
        the reroute makes the new region ready, the old one keeps serving."""
        old = self.route.servers.get(change.from_region or "")
        if old is None:
            return "no server for the old region"
        states = await self.states()
        bits = states.get(old)
        if bits is None or bits & ADMIN_MAINT:
            return f"{old} already out of service"
        if not any(b & (ADMIN_MAINT | ADMIN_DRAIN) == 0 for s, b in states.items() if s != old):
            return f"{old} kept serving: no other server takes new sessions before the reroute"
        return ""

    async def apply(self, change: Change) -> str:
        servers = self.route.servers
        new = servers.get(change.to_region)
        if new is None:
            raise RouterError(f"no HAProxy server for {change.to_region}")
        want: dict[str, str] = {}
        if change.step == "drain":
            skip = await self._drain_skipped(change)
            if skip:
                return skip
            want[servers[change.from_region or ""]] = "drain"
        elif change.step == "fence":
            # fence: no sessions at all to the old region.
            if change.from_region in servers:
                want[servers[change.from_region]] = "maint"
        else:
            # Ready first, then take the others out: never zero servers up.
            want = {new: "ready"} | {s: "maint" for r, s in servers.items()
                                     if r != change.to_region}
        # Every command and the read-back on one connection, in order (the
        # runtime API runs ';'-separated commands one after the other).
        line = "; ".join([*(f"set server {self.route.backend}/{server} state {state}"
                            for server, state in want.items()),
                          f"show servers state {self.route.backend}"])
        out = await self.command(line)
        header = out.find("# be_id")
        # Before the state table: only the table's version line; anything
        # else is a refused `set server` (HAProxy answers those with text).
        refused = [ln for ln in out[:max(header, 0)].splitlines()
                   if ln.strip() and not ln.strip().isdigit()]
        if refused or header < 0:
            raise RouterError(f"haproxy: {'; '.join(refused)[:200] or 'no state table'}")
        got = self._parse_states(out[header:])
        for server, state in want.items():
            bits = got.get(server)
            ok = bits is not None and (
                (state == "ready" and bits & (ADMIN_MAINT | ADMIN_DRAIN) == 0)
                or (state == "maint" and bits & ADMIN_MAINT)
                or (state == "drain" and bits & ADMIN_DRAIN))
            if not ok:
                raise RouterError(f"haproxy: {server} is not {state} (admin state {bits})")
        return ", ".join(f"{s}={st}" for s, st in want.items())


# -- DNS (RFC 2136, fenced) -------------------------------------------------

_KEY = re.compile(r'key\s+"?([^"\s]+)"?\s*\{\s*algorithm\s+([^;\s]+)\s*;\s*'
                  r'secret\s+"([^"]+)"\s*;\s*\}', re.S)


def load_tsig(path: Path) -> tuple[dict[dns.name.Name, dns.tsig.Key], dns.name.Name]:
    """A BIND key file (``key "name" { algorithm …; secret "…"; };``)."""
    m = _KEY.search(path.read_text())
    if m is None:
        raise RouterError(f"{path}: not a BIND key file")
    name, algorithm, secret = m.groups()
    keyring = dns.tsigkeyring.from_text({name: (algorithm, secret)})
    return keyring, dns.name.from_text(name)


_PREREQUISITE_FAILED = frozenset({dns.rcode.NXRRSET, dns.rcode.YXDOMAIN, dns.rcode.NXDOMAIN,
                                  dns.rcode.YXRRSET})
# Per (server, fence name): the epoch this process last saw the fence hold
# or moved it to — the prerequisite of its next update.
_FENCE_SEEN: dict[tuple[str, str], int] = {}


class DnsRouter:
    kind = "dns"

    def __init__(self, route: DnsRoute, timeout_s: float = RESOURCE_TIMEOUT_S) -> None:
        self.route = route
        self.timeout_s = timeout_s
        host, _, port = route.server.rpartition(":")
        self.host, self.port = (host, int(port)) if host else (route.server, 53)
        self.zone = dns.name.from_text(route.zone)
        self.name = dns.name.from_text(route.name, self.zone)
        self.fence = dns.name.from_text(f"_failoverd.{route.name}", self.zone)
        self.keyring: dict[dns.name.Name, dns.tsig.Key] | None = None
        self.keyname: dns.name.Name | None = None
        if route.tsig_key_file is not None:
            self.keyring, self.keyname = load_tsig(route.tsig_key_file)

    async def fence_epoch(self) -> int | None:
        """The epoch the fence record holds now (None: no fence yet)."""
        q = dns.message.make_query(self.fence, dns.rdatatype.TXT)
        resp = await dns.asyncquery.tcp(q, self.host, port=self.port, timeout=self.timeout_s)
        for rrset in resp.answer:
            for rd in rrset:
                m = re.fullmatch(r'"epoch=(\d+)"', rd.to_text())
                if m:
                    return int(m.group(1))
        return None

    async def addresses(self) -> set[str]:
        q = dns.message.make_query(self.name, dns.rdatatype.A)
        resp = await dns.asyncquery.tcp(q, self.host, port=self.port, timeout=self.timeout_s)
        return {rd.to_text() for rrset in resp.answer for rd in rrset}

    def update(self, epoch: int, addresses: list[str], current: int | None
               ) -> dns.update.UpdateMessage:
        """Replace the record set and move the fence current -> epoch, on the
        prerequisite that the fence still holds ``current``."""
        upd = dns.update.UpdateMessage(self.zone, keyring=self.keyring, keyname=self.keyname)
        if current is None:
            upd.absent(self.fence)
        else:
            upd.present(self.fence, dns.rdata.from_text(
                dns.rdataclass.IN, dns.rdatatype.TXT, f'"epoch={current}"'))
        upd.replace(self.name, self.route.ttl, dns.rdatatype.A, *addresses)
        upd.replace(self.fence, self.route.ttl, dns.rdatatype.TXT, f'"epoch={epoch}"')
        return upd

    async def send(self, upd: dns.update.UpdateMessage) -> dns.rcode.Rcode:
        resp = await dns.asyncquery.tcp(upd, self.host, port=self.port, timeout=self.timeout_s)
        return resp.rcode()

    async def apply(self, change: Change) -> str:
        """Move the record set and the fence to ``change.epoch`` in one
        signed update whose prerequisite is the fence's expected value: the
        epoch this process last saw it hold, else the one before ours (a
        group's epochs go up by one, and each is rerouted).  One round trip
        when that holds; when the server refuses the prerequisite, read the
        fence and either stop (it holds our epoch or a newer one: a retry, or
        a stale writer) or send again on what it holds."""
        if change.step in {"drain", "fence"}:
            return "dns: moves at reroute (fenced)"
        addresses = self.route.addresses.get(change.to_region) or []
        if not addresses:  # safety rule 8: never an empty record set
            raise RouterError(f"dns: no addresses for {change.to_region}; refusing")
        seen_key = (self.route.server, self.fence.to_text())
        try:
            guess = _FENCE_SEEN.get(seen_key, change.epoch - 1)
            rcode: dns.rcode.Rcode | None = None
            if guess < change.epoch:
                fault_point("dns-before-send")  # tests: a writer paused before its send
                rcode = await self.send(self.update(change.epoch, addresses,
                                                    guess if guess > 0 else None))
            if rcode is None or rcode in _PREREQUISITE_FAILED:
                # Not sent (we saw the fence at our epoch or above), or the
                # guess was refused: what does the fence hold?
                refused, current = rcode, await self.fence_epoch()
                if current is not None:
                    _FENCE_SEEN[seen_key] = current
                if current is not None and current >= change.epoch:
                    if current == change.epoch and await self.addresses() == set(addresses):
                        return f"dns: already at epoch {change.epoch}"  # idempotent retry
                    raise FencedOut(
                        ("dns: server refused the update, prerequisite failed "
                         f"({dns.rcode.to_text(refused)}): " if refused is not None
                         else "dns: ") + f"the fence holds epoch {current} >= {change.epoch}")
                fault_point("dns-before-send")
                rcode = await self.send(self.update(change.epoch, addresses, current))
        except (OSError, TimeoutError, dns.exception.DNSException) as exc:
            raise RouterError(f"dns: {type(exc).__name__}: {exc}") from exc
        if rcode in _PREREQUISITE_FAILED:
            _FENCE_SEEN.pop(seen_key, None)
            raise FencedOut(f"dns: server refused the update, prerequisite failed "
                            f"({dns.rcode.to_text(rcode)}): the fence moved under us")
        if rcode != dns.rcode.NOERROR:
            raise RouterError(f"dns: update refused: {dns.rcode.to_text(rcode)}")
        _FENCE_SEEN[seen_key] = change.epoch
        return f"dns: {self.name} -> {', '.join(addresses)} at epoch {change.epoch}"


# -- webhook and exec -------------------------------------------------------

def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


class WebhookRouter:
    kind = "webhook"

    def __init__(self, route: WebhookRoute) -> None:
        self.route = route
        self.secret = route.secret_file.read_bytes().strip() if route.secret_file else b""

    async def apply(self, change: Change) -> str:
        body = json.dumps({**asdict(change), "from": change.from_region, "to": change.to_region,
                           "ts": time.time()}, sort_keys=True).encode()
        headers = {"Content-Type": "application/json",
                   "X-Failoverd-Signature": sign(self.secret, body),
                   "X-Failoverd-Epoch": str(change.epoch)}
        try:
            async with aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self.route.timeout_s)) as s, \
                    s.post(self.route.url, data=body, headers=headers) as resp:
                if not 200 <= resp.status < 300:
                    raise RouterError(f"webhook: HTTP {resp.status}")
                return f"webhook: HTTP {resp.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise RouterError(f"webhook: {type(exc).__name__}: {exc}") from exc


def change_env(change: Change) -> Mapping[str, str]:
    return {"FAILOVERD_GROUP": change.group, "FAILOVERD_FROM": change.from_region or "",
            "FAILOVERD_TO": change.to_region, "FAILOVERD_EPOCH": str(change.epoch),
            "FAILOVERD_STEP": change.step}


class ExecRouter:
    kind = "exec"

    def __init__(self, route: ExecRoute) -> None:
        self.route = route

    async def apply(self, change: Change) -> str:
        try:
            out = await run_once(self.route.command, change_env(change),
                                 self.route.timeout_s)
        except HookFailed as exc:
            raise RouterError(f"exec: {exc}: {exc.output[-200:]}") from exc
        except OSError as exc:
            raise RouterError(f"exec: cannot run {self.route.command[0]}: {exc}") from exc
        return f"exec: ok {out.strip()[-100:]}"


def route_timeout_s(route: HaproxyRoute | DnsRoute | WebhookRoute | ExecRoute) -> float:
    """The bound of one call of the route's router (no I/O: the watchdog asks)."""
    if isinstance(route, WebhookRoute | ExecRoute):
        return route.timeout_s
    return RESOURCE_TIMEOUT_S


def make_router(route: HaproxyRoute | DnsRoute | WebhookRoute | ExecRoute) -> Router:
    if isinstance(route, HaproxyRoute):
        return HaproxyRouter(route)
    if isinstance(route, DnsRoute):
        return DnsRouter(route)
    if isinstance(route, WebhookRoute):
        return WebhookRouter(route)
    return ExecRouter(route)
