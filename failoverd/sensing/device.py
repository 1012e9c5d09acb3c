"""What every polled power device (NUT, SNMP) offers the poller."""

from __future__ import annotations

from typing import Protocol

from failoverd.core.power import Reading, Rejected


class DeviceError(Exception):
    """A poll that got no usable answer.  ``reason`` is a short, fixed label
    (the metric's label value: unreachable, timeout, auth, tls, refused,
    unknown_ups, stale, driver_gone, malformed, config)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


class PowerDevice(Protocol):
    """One polled power device.

    :meth:`poll` asks the device once and returns its reading, or a
    :class:`Rejected` when it answered something that says nothing about the
    power (a status we cannot read); it raises :class:`DeviceError` when
    there is no usable answer.  The caller bounds each poll with a timeout
    (cancellation must leave the device usable: the next poll reconnects if
    needed).  Not safe for concurrent polls; :meth:`close` never blocks.
    """

    def describe(self) -> str:
        """How we talk to it, for logs ("TLS", "SNMPv3 authPriv")."""
        ...

    async def poll(self, region: str, now: float) -> Reading | Rejected:
        ...

    def close(self) -> None:
        ...
