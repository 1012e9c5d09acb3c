"""systemd's notify protocol: READY, STATUS, RELOADING, STOPPING, WATCHDOG.

The protocol is one datagram per message to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a leading ``@`` means the abstract namespace).  It is a
dozen lines, so we speak it ourselves rather than add a dependency.

Error contract: without ``$NOTIFY_SOCKET`` (not under systemd) every call is a
no-op; a send that fails is logged and counted, never raised: a lost
notification must not take the failover machinery down.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable, MutableMapping

import structlog

from failoverd import metrics

log = structlog.get_logger("failoverd.daemon.sdnotify")


class Notifier:
    """Sends notifications to the service manager (atomic: one datagram each)."""

    def __init__(self, env: MutableMapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        # Taken out of the environment so hooks and exec routers (our children)
        # cannot speak for us.
        addr = env.pop("NOTIFY_SOCKET", "")
        usec = env.pop("WATCHDOG_USEC", "")
        wpid = env.pop("WATCHDOG_PID", "")
        self._addr = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        self.watchdog_s: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not wpid or wpid == str(os.getpid())):
            self.watchdog_s = int(usec) / 1e6
        self.sent = 0
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, **fields: str | int) -> bool:
        """Send one message of ``KEY=value`` lines; False if not delivered."""
        if not self._addr:
            return False
        data = "".join(f"{k}={v}\n" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                self._sock.setblocking(False)
            self._sock.sendto(data, self._addr)
        except OSError as exc:
            self.failed += 1
            metrics.SDNOTIFY_ERRORS.inc()
            log.warning("sd_notify failed", error=str(exc), message=list(fields))
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        return self.send(READY=1, STATUS=status)

    def reloading(self) -> bool:
        # MONOTONIC_USEC lets systemd (253+) tell this reload from an older one.
        return self.send(RELOADING=1, MONOTONIC_USEC=time.clock_gettime_ns(
            time.CLOCK_MONOTONIC) // 1000)

    def stopping(self) -> bool:
        return self.send(STOPPING=1, STATUS="stopping: resigning and revoking the lease")

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(notifier: Notifier, stuck: Callable[[], str | None]) -> None:
    """Ping the watchdog four times per period while the daemon is healthy.

    A blocked event loop stops this task with it; ``stuck`` names anything
    else that is wedged (the coordinator cycle), and while it does no ping is
    sent, so systemd restarts us after ``WatchdogSec``.
    """
    if notifier.watchdog_s is None or not notifier.enabled:
        return
    interval = notifier.watchdog_s / 4
    while True:
        reason = stuck()
        if reason is None:
            notifier.send(WATCHDOG=1)
        else:
            metrics.WATCHDOG_WITHHELD.inc()
            log.error("watchdog ping withheld", reason=reason)
            notifier.status(f"stuck: {reason}")
        await asyncio.sleep(interval)
