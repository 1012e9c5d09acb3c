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
import weakref
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


async def runtime_api(socket: str, line: str, timeout_s: float) -> str:
    """One line of ';'-separated runtime-API commands on one connection
    (non-interactive: HAProxy answers them in order and closes)."""
    try:
        async with asyncio.timeout(timeout_s):
            if socket.startswith("/"):
                reader, writer = await asyncio.open_unix_connection(socket)
            else:
                host, _, port = socket.rpartition(":")
                reader, writer = await asyncio.open_connection(host, int(port))
            try:
                writer.write(line.encode() + b"\n")
                await writer.drain()
                return (await reader.read()).decode(errors="replace")
            finally:
                writer.close()
    except (OSError, TimeoutError) as exc:
        raise RouterError(f"haproxy {socket}: {type(exc).__name__}: {exc}") from exc


def runtime_api_answers(out: str) -> list[list[str]]:
    """The answer of each command of one line, in order: HAProxy ends every
    answer with an empty line (a ``set server`` that worked answers nothing
    else; one refused answers why; ``show servers state`` its table)."""
    answers: list[list[str]] = []
    current: list[str] = []
    for line in out.splitlines():
        if line.strip():
            current.append(line)
        else:
            answers.append(current)
            current = []
    return answers  # an unterminated last answer (a cut connection) is not one


# A shared line's length: HAProxy reads a command line into one buffer
# (tune.bufsize, 16 kB by default).
RUNTIME_LINE_MAX = 8000


@dataclass
class _Queued:
    commands: list[str]
    answers: asyncio.Future[list[list[str]]]


class RuntimeApi:
    """One HAProxy socket's commands from concurrent sagas, on shared
    connections.

    An evacuation moves hundreds of groups behind one HAProxy at once; each
    saga's commands (its ``set server`` lines and the read-back) are queued,
    and whoever holds the turn sends everything queued by then on one
    connection, within ``RUNTIME_LINE_MAX``; callers that queue meanwhile go
    in the next turn.  Atomicity is per caller, as before: its commands stay
    together and in order (ready first, then the others out), and it reads
    back its own table.  Errors: a connection that fails fails every caller
    of that turn with the same :class:`RouterError` (each saga retries its
    own change, which is idempotent)."""

    def __init__(self, socket: str, timeout_s: float) -> None:
        self.socket = socket
        self.timeout_s = timeout_s
        self._queue: list[_Queued] = []
        self._lock = asyncio.Lock()

    async def run(self, commands: list[str]) -> list[list[str]]:
        """Each command's answer (see :func:`runtime_api_answers`)."""
        queued = _Queued(commands, asyncio.get_running_loop().create_future())
        self._queue.append(queued)
        try:
            # Bounded as a call of its own was: the turn in flight, then ours.
            async with asyncio.timeout(2 * self.timeout_s):
                await asyncio.sleep(0)  # let the commands of this moment join
                while not queued.answers.done():
                    async with self._lock:
                        if not queued.answers.done():
                            await self._send()
        except (asyncio.CancelledError, TimeoutError) as exc:
            if queued in self._queue:
                self._queue.remove(queued)
            if isinstance(exc, TimeoutError):
                raise RouterError(f"haproxy {self.socket}: no answer within "
                                  f"{2 * self.timeout_s:.0f}s") from exc
            raise
        return queued.answers.result()

    async def _send(self) -> None:
        batch: list[_Queued] = []
        size = 0
        while self._queue:
            nxt = self._queue[0]
            length = sum(len(c) + 2 for c in nxt.commands)
            if batch and size + length > RUNTIME_LINE_MAX:
                break
            batch.append(self._queue.pop(0))
            size += length
        if not batch:
            return
        commands = [c for q in batch for c in q.commands]
        try:
            out = await runtime_api(self.socket, "; ".join(commands), self.timeout_s)
            answers = runtime_api_answers(out)
            if len(answers) < len(commands):
                raise RouterError(f"haproxy {self.socket}: {len(answers)} answers to "
                                  f"{len(commands)} commands")
        except BaseException as exc:
            # Every caller of this turn gets an outcome, whatever went wrong
            # (one left waiting would never be sent again: it left the queue).
            failure = exc if isinstance(exc, RouterError) else RouterError(
                f"haproxy {self.socket}: {type(exc).__name__}")
            for q in batch:
                if not q.answers.done():
                    q.answers.set_exception(failure)
                    q.answers.exception()  # retrieved: a cancelled caller never looks
            raise
        at = 0
        for q in batch:
            q.answers.set_result(answers[at:at + len(q.commands)])
            at += len(q.commands)


_RUNTIME_APIS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[str, RuntimeApi]] = (
    weakref.WeakKeyDictionary())


def shared_runtime_api(socket: str, timeout_s: float) -> RuntimeApi:
    """The :class:`RuntimeApi` of ``socket`` for this event loop."""
    apis = _RUNTIME_APIS.setdefault(asyncio.get_running_loop(), {})
    api = apis.get(socket)
    if api is None:
        api = apis[socket] = RuntimeApi(socket, timeout_s)
    return api


class HaproxyRouter:
    kind = "haproxy"

    def __init__(self, route: HaproxyRoute, timeout_s: float = RESOURCE_TIMEOUT_S) -> None:
        self.route = route
        self.timeout_s = timeout_s

    async def command(self, line: str) -> str:
        """One line of runtime-API commands on a connection of its own."""
        return await runtime_api(self.route.socket, line, self.timeout_s)

    async def _commands(self, commands: list[str]) -> list[list[str]]:
        """Commands on the socket's shared connection (see :class:`RuntimeApi`)."""
        return await shared_runtime_api(self.route.socket, self.timeout_s).run(commands)

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
        [table] = await self._commands([f"show servers state {self.route.backend}"])
        return self._parse_states("\n".join(table))

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
        # runtime API runs ';'-separated commands one after the other),
        # shared with other sagas' changes to the same HAProxy.
        *sets, table = await self._commands(
            [*(f"set server {self.route.backend}/{server} state {state}"
               for server, state in want.items()),
             f"show servers state {self.route.backend}"])
        # A `set server` that worked answers nothing; a refused one says why.
        refused = [ln for answer in sets for ln in answer]
        if refused or not any(ln.startswith("# be_id") for ln in table):
            raise RouterError(f"haproxy: {'; '.join(refused)[:200] or 'no state table'}")
        got = self._parse_states("\n".join(table))
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
