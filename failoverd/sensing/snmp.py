"""SNMP power devices (pysnmp 7, asyncio): the RFC 1628 UPS-MIB, or a
declared OID table for anything else (generator controllers, ATSes, vendor
MIBs).  v2c with a community, or v3 with a USM user (auth, priv).

One ``GET`` of the needed objects per poll, plus a walk of the alarm table
when the UPS says alarms are present.  The device is read-only to us:
nothing is ever set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pysnmp.hlapi.v3arch.asyncio import (
    CommunityData,
    ContextData,
    ObjectIdentity,
    ObjectType,
    SnmpEngine,
    UdpTransportTarget,
    UsmUserData,
    get_cmd,
    usmAesBlumenthalCfb192Protocol,
    usmAesBlumenthalCfb256Protocol,
    usmAesCfb128Protocol,
    usmDESPrivProtocol,
    usmHMAC128SHA224AuthProtocol,
    usmHMAC192SHA256AuthProtocol,
    usmHMAC256SHA384AuthProtocol,
    usmHMAC384SHA512AuthProtocol,
    usmHMACMD5AuthProtocol,
    usmHMACSHAAuthProtocol,
    walk_cmd,
)
from pysnmp.proto import errind
from pysnmp.proto.rfc1905 import EndOfMibView, NoSuchInstance, NoSuchObject

from failoverd.config import SnmpSource
from failoverd.core.power import (
    UPS_ALARM_DESCR,
    UPS_ALARMS_PRESENT,
    UPS_MIB_OIDS,
    Reading,
    Rejected,
    oid_table_reading,
    ups_mib_reading,
)
from failoverd.sensing.device import DeviceError

AUTH = {"SHA": usmHMACSHAAuthProtocol, "SHA224": usmHMAC128SHA224AuthProtocol,
        "SHA256": usmHMAC192SHA256AuthProtocol, "SHA384": usmHMAC256SHA384AuthProtocol,
        "SHA512": usmHMAC384SHA512AuthProtocol, "MD5": usmHMACMD5AuthProtocol}
# AES-192/256 as Net-SNMP and most agents do them (Blumenthal key extension).
PRIV = {"AES": usmAesCfb128Protocol, "AES192": usmAesBlumenthalCfb192Protocol,
        "AES256": usmAesBlumenthalCfb256Protocol, "DES": usmDESPrivProtocol}
# A UPS lists a handful of alarms; more rows than this is not a UPS.
MAX_ALARMS = 64
_ABSENT = (NoSuchInstance, NoSuchObject, EndOfMibView)


_engines: dict[str, SnmpEngine] = {}


def _engine(key: str) -> SnmpEngine:
    """The engine for ``key``, built on first use.  v2c devices share one
    (an engine costs 0.15 s of CPU to build, and concurrent requests to
    many agents are what it is made for); each v3 device has its own, since
    an engine keeps one set of keys per USM user name."""
    if key not in _engines:
        _engines[key] = SnmpEngine()
    return _engines[key]


class SnmpError(DeviceError):
    """An SNMP poll that gave no usable answer."""


def _failure(indication: object) -> SnmpError:
    """pysnmp's error indication → a reason (wrong v2c communities are not
    answered at all: they show up as timeouts)."""
    text = str(indication)
    if isinstance(indication, errind.EncryptionError):
        return SnmpError("config", f"SNMPv3 privacy unavailable here: {text}")
    if isinstance(indication, errind.RequestTimedOut):
        return SnmpError("timeout", "no SNMP answer (wrong community, or unreachable)")
    if isinstance(indication, errind.WrongDigest | errind.UnknownUserName
                  | errind.UnsupportedSecurityLevel | errind.DecryptionError
                  | errind.UnknownSecurityName | errind.AuthenticationError):
        return SnmpError("auth", f"SNMPv3 credentials refused: {text}")
    return SnmpError("refused", text[:200])


class SnmpClient:
    """One SNMP agent (a :class:`~failoverd.sensing.device.PowerDevice`).

    Errors: :class:`SnmpError` for timeouts, refused credentials, error
    statuses and answers of the wrong type; UDP keeps no connection, so
    nothing needs re-opening after a failure.  Secrets are read once, when
    the client is made (``OSError`` from there is the caller's).  Making the
    first client imports pysnmp and builds the shared engine (about 0.6 s of
    CPU): do it off the event loop.
    """

    def __init__(self, source: SnmpSource) -> None:
        self._source = source
        self._engine = _engine("v2c" if source.version == "2c" else f"v3 {source.sensor}")
        self._target: UdpTransportTarget | None = None
        self._auth: CommunityData | UsmUserData
        if source.version == "2c":
            community = (source.community_file.read_text().strip() if source.community_file
                         else source.community or "public")
            self._auth = CommunityData(community, mpModel=1)
        else:
            auth_key = (source.auth_key_file.read_text().strip() if source.auth_key_file
                        else None)
            priv_key = (source.priv_key_file.read_text().strip() if source.priv_key_file
                        else None)
            kw: dict[str, Any] = {}
            if source.auth_protocol:
                kw["authProtocol"] = AUTH[source.auth_protocol]
            if source.priv_protocol:
                kw["privProtocol"] = PRIV[source.priv_protocol]
            self._auth = UsmUserData(source.user, auth_key, priv_key, **kw)
        self._context = ContextData(contextName=source.context.encode())

    def describe(self) -> str:
        s = self._source
        if s.version == "2c":
            return "SNMPv2c"
        level = ("authPriv" if s.priv_protocol else "authNoPriv" if s.auth_protocol
                 else "noAuthNoPriv")
        return f"SNMPv3 {level}"

    def close(self) -> None:
        """Nothing to release: the engine is shared and UDP keeps no
        connection."""

    async def poll(self, region: str, now: float) -> Reading | Rejected:
        s = self._source
        if s.mib == "ups":
            values = await self._get(UPS_MIB_OIDS)
            numbers = {oid: _integer(oid, v) for oid, v in values.items()}
            alarms: list[str] = []
            if (numbers.get(UPS_ALARMS_PRESENT) or 0) > 0:
                alarms = [str(v) for _, v in await self._walk(UPS_ALARM_DESCR)]
            return ups_mib_reading(region, s.sensor, numbers, alarms, now)
        assert s.oids is not None
        table = s.oids.to_core()
        wanted = [o for o in (table.state, table.runtime, table.charge) if o is not None]
        texts = {oid: (None if v is None else v.prettyPrint())
                 for oid, v in (await self._get(wanted)).items()}
        return oid_table_reading(region, s.sensor, table, texts, now)

    async def _transport(self) -> UdpTransportTarget:
        if self._target is None:
            host, port = self._source.host_port
            try:
                # Our own poll interval is the retry: one request per poll.
                # Half the poll's bound each: a poll may walk the alarm
                # table after its GET.
                self._target = await UdpTransportTarget.create(
                    (host, port), timeout=self._source.timeout_s / 2, retries=0)
            except Exception as exc:  # pysnmp raises its own error types here
                raise SnmpError("unreachable", f"cannot resolve {host}: {exc}") from exc
        return self._target

    async def _get(self, oids: Sequence[str]) -> dict[str, Any]:
        """The values of ``oids`` (None where the agent has no such object)."""
        target = await self._transport()
        indication, status, index, binds = await get_cmd(
            self._engine, self._auth, target, self._context,
            *(ObjectType(ObjectIdentity(oid)) for oid in oids))
        if indication:
            raise _failure(indication)
        if status:
            raise SnmpError("refused", f"agent says {status.prettyPrint()} at index {index}")
        out: dict[str, Any] = {}
        for oid, value in binds:
            out[str(oid)] = None if isinstance(value, _ABSENT) else value
        return out

    async def _walk(self, prefix: str) -> list[tuple[str, Any]]:
        target = await self._transport()
        rows: list[tuple[str, Any]] = []
        async for indication, status, _, binds in walk_cmd(
                self._engine, self._auth, target, self._context,
                ObjectType(ObjectIdentity(prefix)), lexicographicMode=False):
            if indication:
                raise _failure(indication)
            if status:
                raise SnmpError("refused", f"agent says {status.prettyPrint()}")
            rows += [(str(o), v) for o, v in binds if not isinstance(v, _ABSENT)]
            if len(rows) > MAX_ALARMS:
                raise SnmpError("malformed", f"more than {MAX_ALARMS} rows under {prefix}")
        return rows


def _integer(oid: str, value: Any) -> int | None:
    if value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise SnmpError("malformed", f"{oid} is not a number: {str(value)[:40]!r}") from exc
