"""sd_notify against a real datagram socket: the daemon as systemd sees it."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.stack import EtcdCluster, LocalCluster, call, wait_until
from failoverd.config import GroupSettings
from failoverd.daemon.saga import worst_step_s
from failoverd.daemon.sdnotify import Notifier, run_watchdog

_n = itertools.count()


class NotifySocket:
    """What systemd listens on: an AF_UNIX datagram socket; keeps every
    message with the monotonic time it arrived."""

    def __init__(self, abstract: bool = True) -> None:
        if abstract:
            self.env_value = f"@failoverd-test-{os.getpid()}-{next(_n)}"
            addr = "\0" + self.env_value[1:]
        else:
            self._dir = tempfile.mkdtemp(prefix="fo-notify-", dir="/tmp")
            self.env_value = addr = f"{self._dir}/notify.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(addr)
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str, pattern: str = "") -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages)
                if key in m and re.search(pattern, m[key])]

    async def wait_for(self, key: str, pattern: str = "", timeout: float = 15,
                       after: float = 0.0) -> tuple[float, dict[str, str]]:
        async def seen() -> tuple[float, dict[str, str]] | None:
            hits = [(t, m) for t, m in self.having(key, pattern) if t > after]
            return hits[0] if hits else None
        return await wait_until(seen, timeout, f"{key}={pattern or '*'} on the notify socket")

    def close(self) -> None:
        self._closed = True
        self._thread.join()
        self.sock.close()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    s = NotifySocket()
    yield s
    s.close()


async def test_notifier_speaks_the_protocol_on_path_and_abstract_sockets() -> None:
    for abstract in (False, True):
        sock = NotifySocket(abstract=abstract)
        env = {"NOTIFY_SOCKET": sock.env_value, "WATCHDOG_USEC": "2000000",
               "WATCHDOG_PID": str(os.getpid()), "OTHER": "kept"}
        n = Notifier(env)
        # Children (hooks, exec routers) must not inherit the socket.
        assert env == {"OTHER": "kept"}
        assert n.watchdog_s == 2.0
        assert n.ready("member; active: app=east")
        assert n.reloading()
        _, ready = await sock.wait_for("READY")
        assert ready == {"READY": "1", "STATUS": "member; active: app=east"}
        _, reloading = await sock.wait_for("RELOADING")
        assert abs(int(reloading["MONOTONIC_USEC"]) - time.monotonic() * 1e6) < 5e6
        n.close()
        sock.close()


def test_notifier_without_systemd_is_a_no_op_and_a_dead_socket_is_counted() -> None:
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.send(READY=1) and quiet.watchdog_s is None
    other_pid = Notifier({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "1000000",
                          "WATCHDOG_PID": "1"})
    assert other_pid.watchdog_s is None  # the watchdog is meant for another process
    gone = Notifier({"NOTIFY_SOCKET": "/nonexistent/notify.sock"})
    assert not gone.send(READY=1) and (gone.sent, gone.failed) == (0, 1)


async def test_watchdog_withholds_pings_while_something_is_stuck(
        notify_socket: NotifySocket) -> None:
    n = Notifier({"NOTIFY_SOCKET": notify_socket.env_value, "WATCHDOG_USEC": "200000"})
    reason: list[str | None] = [None]
    task = asyncio.create_task(run_watchdog(n, lambda: reason[0]))
    try:
        await wait_until(lambda: len(notify_socket.having("WATCHDOG")) >= 3, 5, "pings")
        reason[0] = "coordinator cycle stuck for 9.0s"
        first, _ = await notify_socket.wait_for("STATUS", "^stuck: coordinator")
        await wait_until(lambda: len(notify_socket.having("STATUS", "^stuck")) >= 3, 5,
                         "three withheld pings")
        last = notify_socket.having("STATUS", "^stuck")[-1][0]
        assert not [t for t, _ in notify_socket.having("WATCHDOG") if first < t <= last]
        reason[0] = None
        await notify_socket.wait_for("WATCHDOG", after=last)
    finally:
        task.cancel()


async def test_ready_only_once_etcd_answers_and_the_api_listens(
        tmp_path: Path, cluster_name: str, notify_socket: NotifySocket) -> None:
    late = EtcdCluster(tmp_path / "late-etcd")  # ports chosen, not started yet
    c = LocalCluster(tmp_path, cluster_name, late.endpoints, {"east": 100}, {"app": ["east"]})
    d = c.add("e1", "east", env={"NOTIFY_SOCKET": notify_socket.env_value})
    try:
        await wait_until(lambda: any(e.get("event") == "etcd unreachable; retrying"
                                     for e in d.log_events()), 15, "the daemon to retry etcd")
        assert (await call(d.api, "GET", "/healthz"))[0] == 200  # the API is up ...
        assert not notify_socket.having("READY")  # ... but etcd is not: not ready
        late.start()
        await notify_socket.wait_for("READY", timeout=20)
        assert "e1" in (await c.view()).members
        await notify_socket.wait_for("STATUS", r"^coordinator, term \d+; active: app=east$")
    finally:
        await c.close()
        late.stop()


async def test_reload_and_stop_are_announced(tmp_path: Path, etcd: EtcdCluster,
                                             cluster_name: str,
                                             notify_socket: NotifySocket) -> None:
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100}, {"app": ["east"]})
    d = c.add("e1", "east", env={"NOTIFY_SOCKET": notify_socket.env_value,
                                 "WATCHDOG_USEC": "1000000"})
    try:
        ready_at, _ = await notify_socket.wait_for("READY")
        await wait_until(lambda: len(notify_socket.having("WATCHDOG")) >= 3, 10, "pings")
        d.signal(signal.SIGHUP)
        reload_at, msg = await notify_socket.wait_for("RELOADING", after=ready_at)
        assert int(msg["MONOTONIC_USEC"]) > 0
        await notify_socket.wait_for("READY", after=reload_at)
        d.signal(signal.SIGTERM)
        await notify_socket.wait_for("STOPPING")
        assert d.proc is not None and d.proc.wait(10) == 0
    finally:
        await c.close()


async def test_watchdog_stops_when_the_coordinator_cycle_is_wedged(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str,
        notify_socket: NotifySocket) -> None:
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100}, {"app": ["east"]},
                     policy={"tick_s": 0.2})
    # The first coordinator cycle never finishes; etcd.timeout_s is 1 s, so
    # the cycle counts as stuck after 2 * 0.2 + 4 * 1 = 4.4 s.
    c.add("e1", "east", env={"NOTIFY_SOCKET": notify_socket.env_value,
                             "WATCHDOG_USEC": "1000000",
                             "FAILOVERD_FAULTS": "coordinator-cycle=wedge"})
    try:
        await notify_socket.wait_for("READY")
        first, _ = await notify_socket.wait_for("STATUS", "^stuck: coordinator cycle")
        await wait_until(lambda: len(notify_socket.having("STATUS", "^stuck")) >= 3, 10,
                         "the watchdog to keep withholding")
        last = notify_socket.having("STATUS", "^stuck")[-1][0]
        assert notify_socket.having("WATCHDOG")  # it pinged before the wedge showed
        assert not [t for t, _ in notify_socket.having("WATCHDOG") if first < t <= last]
    finally:
        await c.close()


async def test_watchdog_keeps_pinging_while_a_resting_coordinator_sleeps(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str,
        notify_socket: NotifySocket) -> None:
    """At rest the coordinator sleeps until its next decision is due (up to
    10 s, or its lease's deadline), longer than the stuck limit of a cycle
    (here 2 x 0.2 + 4 x 1 = 4.4 s): a sleep that ends on time is not a
    wedge, and the watchdog goes on pinging."""
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100}, {"app": ["east"]},
                     ttl=8, policy={"tick_s": 0.2})
    c.add("e1", "east", env={"NOTIFY_SOCKET": notify_socket.env_value,
                             "WATCHDOG_USEC": "1000000"})
    try:
        await notify_socket.wait_for("READY")
        await c.wait_active("app", "east", 15)
        rested_from = time.monotonic()
        await asyncio.sleep(7)  # an observation window at rest, not a wait for a state
        assert not notify_socket.having("STATUS", "^stuck")
        assert [t for t, _ in notify_socket.having("WATCHDOG") if t > rested_from + 5]
    finally:
        await c.close()


async def test_watchdog_stops_when_the_event_loop_is_frozen(
        tmp_path: Path, etcd: EtcdCluster, cluster_name: str,
        notify_socket: NotifySocket) -> None:
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, {"east": 100}, {"app": ["east"]})
    # SIGHUP reaches a fault point that blocks the loop's thread.
    d = c.add("e1", "east", env={"NOTIFY_SOCKET": notify_socket.env_value,
                                 "WATCHDOG_USEC": "400000", "FAILOVERD_FAULTS": "reload=freeze"})
    try:
        await notify_socket.wait_for("READY")
        await wait_until(lambda: len(notify_socket.having("WATCHDOG")) >= 3, 10, "pings")
        d.signal(signal.SIGHUP)
        await wait_until(lambda: any(e.get("point") == "reload" for e in d.log_events()), 10,
                         "the loop to freeze")
        frozen_at = time.monotonic()
        # An absence can only be watched for a while: five ping intervals.
        await asyncio.sleep(0.5)
        assert d.alive()
        assert not [t for t, _ in notify_socket.having("WATCHDOG") if t > frozen_at + 0.1]
    finally:
        d.kill9()  # a frozen loop cannot handle SIGTERM
        await c.close()


def test_watchdog_bound_covers_a_saga_step_whose_routers_hang_to_their_timeouts() -> None:
    group = GroupSettings.model_validate({
        "name": "app", "regions": ["east"],
        "routes": [{"kind": "haproxy", "socket": "/run/h.sock", "backend": "app",
                    "servers": {"east": "e"}},
                   {"kind": "exec", "command": ["/bin/true"], "timeout_s": 7}]})
    # verify's HTTP (2 s) + 3 calls x (HAProxy 5 s + exec 7 s): no router wait
    # that ends by its own timeout can look like a wedged coordinator.
    assert worst_step_s(group) == 2 + 3 * (5 + 7)
