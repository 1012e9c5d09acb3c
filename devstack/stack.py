"""Local clusters for tests, benchmarks and the demo.

The stack launcher: real etcd (Debian ``etcd-server``), mosquitto, HAProxy,
BIND 9 and ``failoverd`` daemons as processes on free loopback ports, plus
the tools to break them (relays that partition, fault-point daemons).
Nothing here reaches beyond 127.0.0.0/8.  Shared by ``tests/``, ``bench/``
and ``scripts/demo`` — a part of the project of its own, not of the test
package.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import inspect
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPERATOR_TOKEN = "operator-secret-for-tests"
VIEWER_TOKEN = "viewer-secret-for-tests"


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


# Ports free_port gave out in this process: never given twice, so a server
# that is down for a moment (an etcd member killed, to be started again on
# its port) cannot lose its port to another component of the same test
# (chaos CI: "bind: address already in use" on an etcd restart).
_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free loopback port *outside* the kernel's ephemeral range: a server
    restarted on a port from that range (an etcd member killed and started
    again) can find it taken by some client connection's source port."""
    low, high = _ephemeral_range()
    candidates = [p for p in range(10000, 65000)
                  if not low <= p <= high and p not in _HANDED_OUT]
    for port in random.sample(candidates, 50):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            _HANDED_OUT.add(port)
            return port
    with socket.socket() as s:  # everything sampled was taken: any free port
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def etcd_binary() -> str:
    for cand in (shutil.which("etcd"), "/usr/bin/etcd"):
        if cand and os.path.exists(cand):
            return cand
    raise RuntimeError("etcd not found: install Debian's etcd-server (scripts/test does)")


async def wait_until(cond: Callable[[], Awaitable[Any] | Any], timeout: float, what: str,
                     interval: float = 0.02) -> Any:
    """Poll ``cond`` (sync or async) until it returns something truthy; fail
    after ``timeout``.

    A store error inside ``cond`` (etcd restarting) counts as "not yet".
    """
    from failoverd.core.store import StoreError  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = cond()
            if inspect.isawaitable(last):
                last = await last
        except StoreError as exc:
            last = exc
        if last and not isinstance(last, StoreError):
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")
        await asyncio.sleep(interval)


@dataclass
class EtcdMember:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    metrics_port: int = field(default_factory=free_port)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdCluster:
    """One or three etcd members; kill, stop and restart them at will."""

    def __init__(self, workdir: Path, size: int = 1, extra_args: list[str] | None = None
                 ) -> None:
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.extra_args = extra_args or []
        self.members = [
            EtcdMember(f"etcd{i}", free_port(), free_port(), workdir / f"etcd{i}.data",
                       workdir / f"etcd{i}.log")
            for i in range(size)
        ]
        self._initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)

    @property
    def endpoints(self) -> list[str]:
        return [m.endpoint for m in self.members]

    def start_member(self, m: EtcdMember, state: str = "new") -> None:
        # Short heartbeat/election so a 3-member cluster re-elects quickly on
        # loopback; the minimum lease TTL this allows is ~1 s.  Pre-vote is
        # etcd 3.5's default (3.4, Debian's, needs it spelled out): without
        # it a restarted member campaigns at once and deposes the leader just
        # elected, and two elections back to back outlast a 3 s lease.
        argv = [
            etcd_binary(), "--name", m.name, "--data-dir", str(m.data_dir),
            "--listen-client-urls", f"http://{m.endpoint}",
            "--advertise-client-urls", f"http://{m.endpoint}",
            "--listen-peer-urls", m.peer_url, "--initial-advertise-peer-urls", m.peer_url,
            "--initial-cluster", self._initial, "--initial-cluster-state", state,
            "--initial-cluster-token", f"failoverd-test-{self.members[0].client_port}",
            "--heartbeat-interval", "50", "--election-timeout", "500", "--pre-vote=true",
            "--listen-metrics-urls", f"http://127.0.0.1:{m.metrics_port}",
            "--log-level", "warn", *self.extra_args,
        ]
        m.proc = subprocess.Popen(argv, stdout=open(m.log_path, "ab"),  # noqa: SIM115
                                  stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        for m in self.members:
            self.start_member(m)
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 20.0, members: Iterable[EtcdMember] | None = None
                     ) -> None:
        import urllib.request  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        for m in members or self.members:
            while True:
                try:
                    with urllib.request.urlopen(f"http://{m.endpoint}/health", timeout=1) as r:
                        if json.loads(r.read()).get("health") == "true":
                            break
                except OSError:
                    pass
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"etcd {m.name} exited: {m.log_path.read_text()[-2000:]}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"etcd {m.name} not healthy after {timeout}s")
                time.sleep(0.05)

    def leader(self, timeout: float = 10.0) -> EtcdMember:
        """The member that leads now (asked through etcd's JSON gateway)."""
        import urllib.request  # noqa: PLC0415

        deadline = time.monotonic() + timeout
        while True:
            ids = {}
            leader = None
            for m in self.members:
                if m.proc is None:
                    continue
                try:
                    req = urllib.request.Request(f"http://{m.endpoint}/v3/maintenance/status",
                                                 data=b"{}", method="POST")
                    with urllib.request.urlopen(req, timeout=1) as r:
                        st = json.loads(r.read())
                except OSError:
                    continue
                ids[st["header"]["member_id"]] = m
                leader = st.get("leader") or leader
            if leader in ids:
                return ids[leader]
            if time.monotonic() > deadline:
                raise RuntimeError("no etcd leader")
            time.sleep(0.05)

    def kill(self, m: EtcdMember) -> None:
        if m.proc is not None:
            m.proc.kill()
            m.proc.wait()
            m.proc = None

    def restart(self, m: EtcdMember) -> None:
        self.kill(m)
        self.start_member(m, state="existing")
        self.wait_healthy(members=[m])

    def stop(self) -> None:
        for m in self.members:
            self.kill(m)


def _toml(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(v)


class NutServer:
    """A real NUT ``upsd`` (Debian ``nut-server``) on a free loopback port,
    with one ``dummy-ups`` driver per UPS reading a ``.dev`` file that
    :meth:`set` rewrites (the driver re-reads it when it changes)."""

    def __init__(self, workdir: Path, upses: Iterable[str] = ("ups1",), tls: bool = False
                 ) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.upses = list(upses)
        # STARTTLS with a self-signed certificate for 127.0.0.1 (its PEM is
        # ``ca_file``), in the NSS database Debian's upsd is built against.
        self.tls = tls
        self.ca_file = workdir / "upsd-cert.pem"
        self.upsd: subprocess.Popen[bytes] | None = None
        self.drivers: dict[str, subprocess.Popen[bytes]] = {}
        self._mtimes: dict[str, int] = {}
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "state").mkdir(exist_ok=True)
        self._env = {**os.environ, "NUT_CONFPATH": str(workdir),
                     "NUT_STATEPATH": str(workdir / "state")}

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def set(self, ups: str, **variables: str | float) -> None:
        """Replace the UPS's variables, e.g. ``set("ups1", **{"ups.status": "OB"})``."""
        lines = {"ups.mfr": "failoverd-test", "ups.model": "dummy", **{
            k: str(v) for k, v in variables.items()}}
        path = self.workdir / f"{ups}.dev"
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
        # dummy-ups notices a change by the file's mtime in whole seconds:
        # two changes within one second must still differ.
        mtime = max(int(time.time()), self._mtimes.get(ups, 0) + 1)
        os.utime(tmp, (mtime, mtime))
        self._mtimes[ups] = mtime
        os.replace(tmp, path)

    def start(self, **initial: str | float) -> NutServer:
        (self.workdir / "nut.conf").write_text("MODE=standalone\n")
        (self.workdir / "ups.conf").write_text("".join(
            f"[{u}]\n  driver = dummy-ups\n  port = {self.workdir / (u + '.dev')}\n"
            "  pollinterval = 1\n" for u in self.upses))
        conf = f"LISTEN 127.0.0.1 {self.port}\n"
        if self.tls:
            conf += self._certificate()
        (self.workdir / "upsd.conf").write_text(conf)
        users = self.workdir / "upsd.users"
        users.write_text("[monitor]\n  password = s3cret\n  upsmon secondary\n")
        users.chmod(0o600)
        for u in self.upses:
            if not (self.workdir / f"{u}.dev").exists():
                self.set(u, **({"ups.status": "OL", "battery.charge": 100,
                                "battery.runtime": 1800, "input.voltage": 230.0} | initial))
            self.start_driver(u)
        self.start_upsd()
        for u in self.upses:  # past the driver's start-up "WAIT"
            deadline = time.monotonic() + 10
            while self.status(u) in {"", "WAIT"}:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"upsd never served {u}")
                time.sleep(0.05)
        return self

    def status(self, ups: str) -> str:
        """``ups.status`` as upsd serves it now ('' if it does not)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=2) as conn:
            conn.sendall(f"GET VAR {ups} ups.status\n".encode())
            answer = conn.makefile().readline()
        prefix = f"VAR {ups} ups.status "
        return answer[len(prefix):].strip().strip('"') if answer.startswith(prefix) else ""

    def _certificate(self) -> str:
        """A self-signed certificate in an NSS database; upsd.conf lines."""
        w, nss = self.workdir, self.workdir / "nss"
        nss.mkdir(exist_ok=True)
        (w / "nss-password").write_text("nss-db-password\n")
        for argv in (
            ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
             "-keyout", str(w / "upsd-key.pem"), "-out", str(self.ca_file),
             "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
            ["openssl", "pkcs12", "-export", "-in", str(self.ca_file), "-inkey",
             str(w / "upsd-key.pem"), "-out", str(w / "upsd.p12"), "-name", "upsd",
             "-passout", "pass:p12"],
            ["certutil", "-N", "-d", f"sql:{nss}", "-f", str(w / "nss-password")],
            ["pk12util", "-i", str(w / "upsd.p12"), "-d", f"sql:{nss}", "-W", "p12",
             "-k", str(w / "nss-password")],
        ):
            subprocess.run(argv, check=True, capture_output=True, timeout=30)
        return f'CERTPATH {nss}\nCERTIDENT "upsd" "nss-db-password"\n'

    def start_driver(self, ups: str) -> None:
        # -D: stay in the foreground (we own the process); -u root: the
        # test runs as root and NUT would drop to its own user.
        self.drivers[ups] = subprocess.Popen(
            ["/lib/nut/dummy-ups", "-a", ups, "-D", "-u", "root"], env=self._env,
            stdout=open(self.workdir / f"{ups}.driver.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not (self.workdir / "state" / f"dummy-ups-{ups}").exists():
            if time.monotonic() > deadline or self.drivers[ups].poll() is not None:
                raise RuntimeError(f"dummy-ups {ups} did not start")
            time.sleep(0.02)

    def start_upsd(self) -> None:
        self.upsd = subprocess.Popen(
            ["/lib/nut/upsd", "-D", "-u", "root"], env=self._env,
            stdout=open(self.workdir / "upsd.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        _await_listening(self.port, self.upsd, "upsd")

    def stop_upsd(self) -> None:
        if self.upsd is not None:
            self.upsd.kill()
            self.upsd.wait()
            self.upsd = None

    def stop_driver(self, ups: str) -> None:
        proc = self.drivers.pop(ups, None)
        if proc is not None:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        self.stop_upsd()
        for u in list(self.drivers):
            self.stop_driver(u)


class Mosquitto:
    """A real mosquitto broker (Debian ``mosquitto``) on a free loopback port."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def start(self) -> Mosquitto:
        conf = self.workdir / f"mosquitto-{self.port}.conf"
        conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                        "persistence false\n")
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.proc = subprocess.Popen([binary, "-c", str(conf)],
                                     stdout=open(self.workdir / "mosquitto.log", "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        _await_listening(self.port, self.proc, "mosquitto")
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


class SnmpSim:
    """The ``snmpsim`` responder (PyPI ``snmpsim``) on a free loopback UDP
    port, serving real device recordings from ``snmpsim-data``: each named
    recording is the community (v2c) or context (v3) ``name``.  The OIDs in
    ``writable`` are served through snmpsim's ``writecache`` variation, so a
    test changes a device's state with an SNMP SET (:meth:`set`)."""

    V3_USER, V3_AUTH, V3_PRIV = "failoverd", "auth-secret-1", "priv-secret-1"

    def __init__(self, workdir: Path, recordings: Mapping[str, str],
                 writable: Iterable[str] = ()) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.recordings = dict(recordings)
        self.writable = set(writable)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> SnmpSim:
        import bz2  # noqa: PLC0415
        import importlib.resources  # noqa: PLC0415

        data = self.workdir / "data"
        data.mkdir(parents=True, exist_ok=True)
        ups = importlib.resources.files("snmpsim_data") / "data" / "UPS"
        for name, recording in self.recordings.items():
            raw = (ups / recording).read_bytes()
            text = (bz2.decompress(raw) if recording.endswith(".bz2") else raw).decode()
            lines = []
            for line in text.splitlines():
                oid, _, rest = line.partition("|")
                tag, _, value = rest.partition("|")
                lines.append(f"{oid}|{tag}:writecache|value={value}" if oid in self.writable
                             else line)
            (data / f"{name}.snmprec").write_text("\n".join(lines) + "\n")
        # snmpsim refuses to run as root unless it drops privileges, and an
        # unprivileged user cannot import the Python it runs on here (under
        # /root): the test sandbox runs it as is.
        boot = ("import sys, contextlib, snmpsim.daemon as d; "
                "d.PrivilegesOf = lambda *a, **k: contextlib.nullcontext(); "
                "from snmpsim.commands.responder import main; sys.exit(main())")
        argv = [sys.executable, "-c", boot, f"--cache-dir={self.workdir / 'cache'}",
                "--v3-engine-id=auto", f"--v3-user={self.V3_USER}",
                f"--v3-auth-key={self.V3_AUTH}", "--v3-auth-proto=SHA",
                f"--v3-priv-key={self.V3_PRIV}", "--v3-priv-proto=AES",
                f"--data-dir={data}", f"--agent-udpv4-endpoint={self.target}"]
        self.proc = subprocess.Popen(argv, stdout=open(self.workdir / "snmpsim.log", "ab"),  # noqa: SIM115
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while "Listening at UDP" not in (self.workdir / "snmpsim.log").read_text(errors="replace"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("snmpsim did not start: see " + str(self.workdir))
            time.sleep(0.05)
        return self

    async def set(self, community: str, oid: str, value: int) -> None:
        """SNMP SET of an integer through the writecache variation."""
        from pysnmp.hlapi.v3arch.asyncio import (  # noqa: PLC0415
            CommunityData,
            ContextData,
            Integer,
            ObjectIdentity,
            ObjectType,
            SnmpEngine,
            UdpTransportTarget,
            set_cmd,
        )
        engine = SnmpEngine()
        try:
            target = await UdpTransportTarget.create(("127.0.0.1", self.port), timeout=2,
                                                     retries=2)
            indication, status, _, _ = await set_cmd(
                engine, CommunityData(community, mpModel=1), target, ContextData(),
                ObjectType(ObjectIdentity(oid), Integer(value)))
            if indication or status:
                raise RuntimeError(f"SET {oid} = {value} failed: {indication or status}")
        finally:
            engine.close_dispatcher()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


def write_config(path: Path, *, cluster: str, endpoints: list[str], regions: dict[str, int],
                 groups: dict[str, list[str]], state_dir: Path, hook: Path | None = None,
                 ttl: int = 2, policy: dict[str, Any] | None = None,
                 probes: dict[str, list[dict[str, Any]]] | None = None,
                 mqtt: list[str] | None = None, group_toml: str = "",
                 drain_s: float = 0.5, log_level: str = "debug",
                 region_settings: dict[str, dict[str, Any]] | None = None,
                 etcd_timeout_s: float = 1.0, group_tomls: dict[str, str] | None = None,
                 api_settings: dict[str, Any] | None = None,
                 mqtt_mappings: list[dict[str, Any]] | None = None) -> Path:
    """A TOML config shared by every member (member/region come from flags).

    ``group_toml`` is raw TOML added to every group (settings, routes), or
    ``group_tomls[name]`` where given."""
    first = next(iter(regions))
    lines = [
        f'cluster = "{cluster}"', 'member = "unset"', f'region = "{first}"',
        f'state_dir = "{state_dir}"', "", "[etcd]",
        f"endpoints = {json.dumps(endpoints)}", f"lease_ttl_s = {ttl}",
        "lease_margin_s = 0.3", f"timeout_s = {etcd_timeout_s}", "", "[log]",
        f'level = "{log_level}"', "",
        "[api]", *(f"{k} = {_toml(v)}" for k, v in (api_settings or {}).items()),
        "[[api.tokens]]", 'name = "ops"', 'role = "operator"',
        f'sha256 = "{hashlib.sha256(OPERATOR_TOKEN.encode()).hexdigest()}"',
        "[[api.tokens]]", 'name = "watcher"', 'role = "viewer"',
        f'sha256 = "{hashlib.sha256(VIEWER_TOKEN.encode()).hexdigest()}"', "",
    ]
    for url in mqtt or []:
        lines += ["[[mqtt]]", f'url = "{url}"', 'topics = ["failoverd/power/#"]', ""]
        for mapping in mqtt_mappings or []:
            lines += ["[[mqtt.mappings]]", *(f"{k} = {_toml(v)}" for k, v in mapping.items()),
                      ""]
    for name, prio in regions.items():
        lines += ["[[regions]]", f'name = "{name}"', f"priority = {prio}",
                  *(f"{k} = {_toml(v)}" for k, v in (region_settings or {}).get(name, {}).items()),
                  ""]
        for probe in (probes or {}).get(name, []):
            lines += ["[[regions.probes]]", *(f"{k} = {_toml(v)}" for k, v in probe.items()), ""]
    for name, members in groups.items():
        lines += ["[[groups]]", f'name = "{name}"', f"regions = {json.dumps(members)}",
                  "hook_timeout_s = 5", "hook_attempts = 2", f"drain_s = {drain_s}"]
        extra = (group_tomls or {}).get(name, group_toml)
        if hook is not None and "promote =" not in extra:  # a group's own hooks win
            lines += [f'promote = ["{hook}"]', f'demote = ["{hook}"]']
        lines += [extra, ""]
    pol = {"cooldown_s": 0, "tick_s": 0.5, "bootstrap_grace_s": 2,
           "member_loss_grace_s": 0, **(policy or {})}
    lines.append("[policy]")
    lines += [f"{k} = {_toml(v)}" for k, v in pol.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_hook(path: Path, log: Path) -> Path:
    """A promote/demote hook that appends one JSON line per group applied to
    ``log``; with ``FAILOVERD_BATCH=1`` (``hook_batch``) it reads its groups
    from standard input, and says ``failed GROUP`` for those named in
    ``HOOK_FAIL_GROUPS``.  bash's ``$EPOCHREALTIME``, not ``date``: one
    process per hook, so 1,000 hooks in a benchmark measure failoverd, not
    forks of the fixture."""
    line = (f"printf '{{\"t\": %s, \"role\": \"%s\", \"group\": \"%s\", "
            f"\"region\": \"%s\", \"epoch\": %s, \"member\": \"%s\"}}\\n' "
            f"\"$EPOCHREALTIME\" \"$FAILOVERD_ROLE\" \"$g\" \"$FAILOVERD_REGION\" \"$e\" "
            f"\"$HOOK_MEMBER\" >> {log}\n")
    path.write_text(
        "#!/bin/bash\n"
        # A member started with HOOK_DEMOTE_DELAY demotes that slowly (the
        # line is written when the demote ends).
        '[ "$FAILOVERD_ROLE" = standby ] && [ -n "$HOOK_DEMOTE_DELAY" ] '
        '&& sleep "$HOOK_DEMOTE_DELAY"\n'
        'if [ "$FAILOVERD_BATCH" != 1 ]; then\n'
        '  g=$FAILOVERD_GROUP e=$FAILOVERD_EPOCH\n'
        f"  {line}"
        "  exit 0\n"
        "fi\n"
        "while read -r g e; do\n"
        '  case " $HOOK_FAIL_GROUPS " in *" $g "*) echo "failed $g (HOOK_FAIL_GROUPS)"; '
        "continue;; esac\n"
        f"  {line}"
        "done\n"
    )
    path.chmod(0o755)
    return path


def read_hook_log(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


@dataclass
class DaemonProc:
    member: str
    region: str
    config: Path
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None
    api_port: int = field(default_factory=free_port)
    # Each member may listen on its own loopback address (127.0.0.0/8 is all
    # local), so a test can cut the traffic between members by address.
    api_host: str = "127.0.0.1"

    @property
    def api(self) -> str:
        return f"http://{self.api_host}:{self.api_port}"

    def start(self) -> DaemonProc:
        # Inherited FAILOVERD_* (member, region, faults) would override flags.
        env = {k: v for k, v in os.environ.items() if not k.startswith("FAILOVERD_")}
        env.update({"HOOK_MEMBER": self.member, "PYTHONUNBUFFERED": "1", **self.env})
        # Fault points are armed only through the harness's own entry point.
        entry = "devstack.fault_daemon" if "FAILOVERD_FAULTS" in env else "failoverd"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", entry, "run", "--config", str(self.config),
             "--member", self.member, "--region", self.region,
             "--api-listen", f"{self.api_host}:{self.api_port}"],
            stdout=open(self.log_path, "ab"), stderr=subprocess.STDOUT,  # noqa: SIM115
            env=env, cwd=ROOT,
        )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill9(self) -> None:
        if self.alive():
            self.signal(signal.SIGKILL)
            assert self.proc is not None
            self.proc.wait()

    def stop(self, timeout: float = 10.0) -> int | None:
        if not self.alive():
            return self.proc.returncode if self.proc else None
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.proc.terminate()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                with contextlib.suppress(ValueError):
                    out.append(json.loads(line))
        return out


class LocalCluster:
    """A set of daemons sharing one config, plus a store client to inspect etcd."""

    def __init__(self, workdir: Path, cluster: str, endpoints: list[str],
                 regions: dict[str, int], groups: dict[str, list[str]], ttl: int = 2,
                 policy: dict[str, Any] | None = None,
                 probes: dict[str, list[dict[str, Any]]] | None = None,
                 mqtt: list[str] | None = None, group_toml: str = "",
                 drain_s: float = 0.5, log_level: str = "debug",
                 region_settings: dict[str, dict[str, Any]] | None = None,
                 etcd_timeout_s: float = 1.0, group_tomls: dict[str, str] | None = None,
                 mqtt_mappings: list[dict[str, Any]] | None = None) -> None:
        from failoverd.config import EtcdSettings  # noqa: PLC0415
        from failoverd.core.model import Keyspace  # noqa: PLC0415
        from failoverd.etcd.client import EtcdStore  # noqa: PLC0415

        self.workdir = workdir
        self.hook_log = workdir / "hooks.jsonl"
        hook = write_hook(workdir / "hook.sh", self.hook_log)
        self._config_args: dict[str, Any] = dict(
            cluster=cluster, endpoints=endpoints, regions=regions, groups=groups,
            state_dir=workdir / "state", hook=hook, ttl=ttl, policy=policy, probes=probes,
            mqtt=mqtt, group_toml=group_toml, drain_s=drain_s, log_level=log_level,
            region_settings=region_settings, etcd_timeout_s=etcd_timeout_s,
            group_tomls=group_tomls, mqtt_mappings=mqtt_mappings,
        )
        self.config = write_config(workdir / "failoverd.toml", **self._config_args)
        self.ttl = ttl
        self.keys = Keyspace(cluster)
        self.store = EtcdStore(EtcdSettings(endpoints=endpoints, timeout_s=1.0))
        self.daemons: dict[str, DaemonProc] = {}

    def config_variant(self, name: str, **changes: Any) -> Path:
        """A config file for some members only (e.g. other probe targets)."""
        return write_config(self.workdir / f"{name}.toml", **{**self._config_args, **changes})

    def add(self, member: str, region: str, env: dict[str, str] | None = None,
            config: Path | None = None, api_host: str = "127.0.0.1") -> DaemonProc:
        d = DaemonProc(member, region, config or self.config, self.workdir / f"{member}.log",
                       env=env or {}, api_host=api_host)
        self.daemons[member] = d
        return d.start()

    async def wait_api(self, member: str, timeout: float = 10.0) -> None:
        """Until ``member``'s API answers (it listens a moment after the
        daemon joins etcd: a busy machine can tell the difference)."""
        async def answers() -> bool:
            try:
                return (await call(self.daemons[member].api, "GET", "/healthz"))[0] > 0
            except OSError:
                return False
        await wait_until(answers, timeout, f"{member}'s API", interval=0.05)

    def restart(self, member: str) -> DaemonProc:
        self.daemons[member].stop()
        return self.daemons[member].start()

    async def view(self) -> Any:
        from failoverd.core.model import parse_view  # noqa: PLC0415

        snap = await self.store.snapshot(self.keys.prefix, exclude=("history/",))
        return parse_view(self.keys, snap)

    async def history(self, limit: int = 1000) -> list[dict[str, Any]]:
        from failoverd.etcd.history import read_history  # noqa: PLC0415

        return await read_history(self.store, self.keys, limit)

    def hooks(self) -> list[dict[str, Any]]:
        return read_hook_log(self.hook_log)

    async def wait_coordinator(self, timeout: float, not_term: int | None = None) -> Any:
        async def seat() -> Any:
            v = await self.view()
            c = v.coordinator
            return c if c is not None and c.term != not_term else None
        return await wait_until(seat, timeout, "a coordinator")

    async def wait_active(self, group: str, region: str, timeout: float) -> Any:
        async def rec() -> Any:
            r = (await self.view()).active.get(group)
            return r if r is not None and r.region == region else None
        return await wait_until(rec, timeout, f"{group} active in {region}")

    async def wait_saga_done(self, group: str, epoch: int, timeout: float) -> Any:
        """The group's saga of ``epoch`` once done; raises at once when it failed."""
        async def done() -> Any:
            wf = (await self.view()).workflows.get(group)
            if wf is not None and wf.epoch == epoch and wf.state == "failed":
                raise AssertionError(f"the {group} saga of epoch {epoch} failed: {wf.error}")
            return wf if wf is not None and wf.epoch == epoch and wf.state == "done" else None
        return await wait_until(done, timeout, f"the {group} saga of epoch {epoch} done")

    async def close(self) -> None:
        for d in self.daemons.values():
            d.stop()
        await self.store.close()


class TcpProxy:
    """A loopback TCP relay that the test can partition: ``cut()`` blackholes
    it (connections stay open, bytes are dropped both ways, new connections
    hang — a partition, not a reset, so clients see timeouts), ``heal()``
    closes what hung and relays again.  One member's own path to a server
    (its etcd endpoints, say) can be cut while every other member keeps
    theirs."""

    def __init__(self, target: str | int) -> None:
        host, _, port = str(target).rpartition(":")
        self._target = (host or "127.0.0.1", int(port))
        self.port = free_port()
        self.cut_off = False
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.cut_off:
                await reader.read()  # hold it open until the client gives up or heal
                return
            up_r, up_w = await asyncio.open_connection(*self._target)
            self._writers.add(up_w)
            await asyncio.gather(self._pipe(reader, up_w), self._pipe(up_r, writer))
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                if not self.cut_off:
                    dst.write(data)
                    await dst.drain()
        except OSError:
            pass
        finally:
            self._writers.discard(dst)
            dst.close()

    def cut(self) -> None:
        self.cut_off = True

    def heal(self) -> None:
        self.cut_off = False
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    async def stop(self) -> None:
        self.heal()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()


class HttpService:
    """A region's application, served from the test process on loopback.

    ``mode``: ``ok`` (200, body names the region), ``fail`` (503), or
    ``flap`` (fails during alternate ``flap_s`` periods).  ``stop()`` closes
    the port (connection refused).
    """

    def __init__(self, name: str, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.name = name
        self.mode = "ok"
        self.flap_s = 0.3
        self.hits = 0
        self.host = host
        self.port = port or free_port()
        self._runner: Any = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.address}/health"

    def healthy_now(self) -> bool:
        if self.mode == "flap":
            return int(time.monotonic() / self.flap_s) % 2 == 0
        return self.mode == "ok"

    async def start(self) -> HttpService:
        from aiohttp import web  # noqa: PLC0415

        async def health(_: web.Request) -> web.Response:
            self.hits += 1
            if self.healthy_now():
                return web.Response(text=f"region {self.name}\n")
            return web.Response(status=503, text="unhealthy\n")

        app = web.Application()
        app.router.add_get("/{path:.*}", health)
        # A short shutdown: a stopped service must close its port at once.
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True)


def make_ca(d: Path, name: str) -> tuple[Path, Path]:
    """A self-signed CA (certificate, key), made by openssl."""
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj",
             f"/CN={name}", "-keyout", str(key), "-out", str(crt))
    return crt, key


def make_cert(d: Path, name: str, ca: tuple[Path, Path], san: str = "") -> tuple[Path, Path]:
    """A certificate signed by ``ca`` (server: give ``san``, e.g. IP:127.0.0.1)."""
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={name}", "-keyout", str(key),
             "-out", str(csr))
    ext = d / f"{name}.ext"
    ext.write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(crt))
    return crt, key


def http_probe(url: str, **kw: Any) -> dict[str, Any]:
    """A fast probe: 0.2 s interval, fall 3, rise 2 (detection window 0.6 s)."""
    return {"kind": "http", "target": url, "interval_s": 0.2, "timeout_s": 0.15, "fall": 3,
            "rise": 2, **kw}


async def call(base: str, method: str, path: str, token: str | None = None,
               body: Any = None, raw: bytes | None = None) -> tuple[int, Any]:
    """One API request; (status, parsed JSON or text)."""
    import aiohttp  # noqa: PLC0415

    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with aiohttp.ClientSession() as s, s.request(
            method, base + path, headers=headers,
            json=body if raw is None else None, data=raw) as r:
        text = await r.text()
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text


class Haproxy:
    """A real HAProxy (Debian ``haproxy``): frontend on a free port, backend
    ``app`` with one server per region (a port on 127.0.0.1 or "host:port"),
    admin socket in the workdir."""

    def __init__(self, workdir: Path, servers: Mapping[str, int | str], active: str | None,
                 mode: str = "http", backend_options: Iterable[str] = (),
                 server_options: Mapping[str, str] | None = None,
                 more_backends: Iterable[str] = ()) -> None:
        """``active`` None: every server enabled (health checks choose:
        ``backend_options`` and ``server_options``, e.g. Patroni's REST API).
        ``more_backends``: further backends like ``app`` (one per group)."""
        self.workdir = workdir
        self.more_backends = list(more_backends)
        self.mode = mode  # "tcp" for PostgreSQL
        self.backend_options = list(backend_options)
        self.server_options = dict(server_options or {})
        self.port = free_port()
        self.socket = str(workdir / "haproxy.sock")
        self.servers = servers
        self.active = active
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Haproxy:
        lines = ["global", f"    stats socket {self.socket} mode 600 level admin",
                 "defaults", f"    mode {self.mode}", "    timeout connect 1s",
                 "    timeout client 5s", "    timeout server 5s", "frontend fe",
                 f"    bind 127.0.0.1:{self.port}", "    default_backend app"]
        for backend in ("app", *self.more_backends):
            lines += [f"backend {backend}", *(f"    {o}" for o in self.backend_options)]
            for name, port in self.servers.items():
                addr = port if isinstance(port, str) else f"127.0.0.1:{port}"
                lines.append(f"    server {name} {addr}"
                             + ("" if self.active in (None, name) else " disabled")
                             + (f" {self.server_options[name]}" if name in self.server_options
                                else ""))
        cfg = self.workdir / "haproxy.cfg"
        cfg.write_text("\n".join(lines) + "\n")
        self.proc = subprocess.Popen(
            [shutil.which("haproxy") or "/usr/sbin/haproxy", "-db", "-f", str(cfg)],
            stdout=open(self.workdir / "haproxy.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not (os.path.exists(self.socket) and _connects(self.port)):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("haproxy did not start: "
                                   + (self.workdir / "haproxy.log").read_text()[-1000:])
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()


def _connects(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _await_listening(port: int, proc: subprocess.Popen[bytes], what: str,
                     timeout: float = 10.0) -> None:
    """Until ``proc`` accepts TCP on loopback ``port``; it must not exit."""
    deadline = time.monotonic() + timeout
    while not _connects(port):
        if time.monotonic() > deadline or proc.poll() is not None:
            raise RuntimeError(f"{what} did not start")
        time.sleep(0.02)


class Bind:
    """A real authoritative BIND 9 (Debian ``bind9``) on a free loopback port
    serving ``example.test`` with RFC 2136 updates allowed for a TSIG key."""

    ZONE = "example.test"

    def __init__(self, workdir: Path, a_record: str = "192.0.2.10") -> None:
        import base64  # noqa: PLC0415

        self.dir = workdir / "bind"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.a_record = a_record
        secret = base64.b64encode(os.urandom(32)).decode()
        self.key_file = self.dir / "tsig.key"
        self.key_file.write_text(
            f'key "failoverd" {{\n\talgorithm hmac-sha256;\n\tsecret "{secret}";\n}};\n')
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def server(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> Bind:
        d = self.dir
        (d / f"{self.ZONE}.zone").write_text(
            "$TTL 30\n"
            f"@ IN SOA ns.{self.ZONE}. admin.{self.ZONE}. 1 60 60 600 30\n"
            f"@ IN NS ns.{self.ZONE}.\nns IN A 127.0.0.1\n"
            f"app IN A {self.a_record}\n")
        (d / "named.conf").write_text(
            f'include "{self.key_file}";\n'
            "options {\n"
            f'  directory "{d}";\n  pid-file "{d}/named.pid";\n'
            f'  session-keyfile "{d}/session.key";\n  managed-keys-directory "{d}";\n'
            f"  listen-on port {self.port} {{ 127.0.0.1; }};\n  listen-on-v6 {{ none; }};\n"
            "  recursion no;\n  dnssec-validation no;\n  notify no;\n};\n"
            "controls { };\n"
            f'zone "{self.ZONE}" {{\n  type primary;\n  file "{d}/{self.ZONE}.zone";\n'
            '  allow-update { key "failoverd"; };\n};\n')
        self.proc = subprocess.Popen(
            [shutil.which("named") or "/usr/sbin/named", "-g", "-4", "-c", str(d / "named.conf")],
            stdout=open(d / "named.log", "ab"),  # noqa: SIM115
            stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 15
        while not self._answers():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError("named did not start: " + (d / "named.log").read_text()[-1500:])
            time.sleep(0.05)
        return self

    def _answers(self) -> bool:
        import dns.exception  # noqa: PLC0415
        import dns.message  # noqa: PLC0415
        import dns.query  # noqa: PLC0415

        try:
            q = dns.message.make_query(f"{self.ZONE}.", "SOA")
            return bool(dns.query.tcp(q, "127.0.0.1", port=self.port, timeout=0.3).answer)
        except (OSError, dns.exception.DNSException):
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
