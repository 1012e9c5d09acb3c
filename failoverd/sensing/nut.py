"""A client for NUT's network protocol (``upsd``, port 3493), as much as a
power source needs: STARTTLS, login, ``LIST VAR``.

Why not aionut: it has no STARTTLS, and NUT servers that offer TLS should
get it (see docs/architecture.md).  The protocol is line based
(docs/net-protocol.txt in NUT): a request is one line, ``LIST VAR <ups>``
answers ``BEGIN LIST VAR <ups>``, ``VAR <ups> <name> "<value>"`` lines and
``END LIST VAR <ups>``; any request may answer ``ERR <CODE>``.
"""

from __future__ import annotations

import asyncio
import ssl

import structlog

from failoverd import metrics
from failoverd.config import NutSource
from failoverd.core.power import Reading, Rejected, nut_reading, nut_unknown_flags
from failoverd.sensing.device import DeviceError

log = structlog.get_logger("failoverd.sensing.nut")

# A UPS has a few dozen variables; a server streaming more is not a UPS.
MAX_VARS = 2000
MAX_LINE = 4096


class NutError(DeviceError):
    """A NUT poll that gave no usable answer."""


def _unquote(text: str) -> str:
    """A NUT quoted value: ``"..."`` with ``\\"`` and ``\\\\`` escapes."""
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        raise NutError("malformed", f"unquoted value {text[:60]!r}")
    out, escaped = [], False
    for ch in text[1:-1]:
        if escaped:
            out.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        else:
            out.append(ch)
    return "".join(out)


def _err(line: str) -> NutError:
    code = line[4:].strip() or "UNKNOWN"
    reason = {"ACCESS-DENIED": "auth", "USERNAME-REQUIRED": "auth",
              "PASSWORD-REQUIRED": "auth", "INVALID-USERNAME": "auth",
              "INVALID-PASSWORD": "auth", "UNKNOWN-UPS": "unknown_ups",
              "DATA-STALE": "stale", "DRIVER-NOT-CONNECTED": "driver_gone",
              }.get(code.split()[0], "refused")
    return NutError(reason, f"upsd says ERR {code[:80]}")


class NutClient:
    """One connection to one ``upsd`` (a :class:`~failoverd.sensing.device.PowerDevice`),
    opened on first use and again after any error.

    Errors: every failure raises :class:`NutError` (the connection is closed
    and re-opened by the next call): unreachable, timeouts (the caller
    bounds each call), ``ERR`` answers, TLS refused or unverifiable, and
    answers that are not NUT.  Not safe for concurrent calls (one poller
    owns it).
    """

    def __init__(self, source: NutSource, password: str | None = None) -> None:
        self._source = source
        self._password = password
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self.tls = False
        self._unknown_flags: list[str] = []

    def describe(self) -> str:
        return "TLS" if self.tls else "plain text"

    async def poll(self, region: str, now: float) -> Reading | Rejected:
        """One ``LIST VAR`` read as upsmon would (a :class:`PowerDevice`)."""
        src = self._source
        found = await self.variables(src.ups)
        unknown = nut_unknown_flags(found.get("ups.status", ""))
        if unknown:
            metrics.POWER_SOURCE_POLLS.labels(src.sensor, src.kind, "unknown_flags").inc()
            if unknown != self._unknown_flags:
                log.warning("power source sent flags we do not know; they decide nothing",
                            sensor=src.sensor, flags=unknown, status=found.get("ups.status"))
        self._unknown_flags = unknown
        return nut_reading(region, src.sensor, found, now)

    def close(self) -> None:
        """Drop the connection (no waiting: also called while cancelled)."""
        writer, self._reader, self._writer = self._writer, None, None
        if writer is not None:
            writer.close()

    async def variables(self, ups: str) -> dict[str, str]:
        """``LIST VAR ups`` as a dict; raises :class:`NutError`."""
        try:
            if self._writer is None:
                await self._connect()
            await self._send(f"LIST VAR {ups}")
            first = await self._line()
            if first.startswith("ERR "):
                raise _err(first)
            if first != f"BEGIN LIST VAR {ups}":
                raise NutError("malformed", f"unexpected answer {first[:80]!r}")
            found: dict[str, str] = {}
            while (line := await self._line()) != f"END LIST VAR {ups}":
                parts = line.split(" ", 3)
                if len(parts) != 4 or parts[0] != "VAR" or parts[1] != ups:
                    raise NutError("malformed", f"unexpected line {line[:80]!r}")
                found[parts[2]] = _unquote(parts[3])
                if len(found) > MAX_VARS:
                    raise NutError("malformed", f"more than {MAX_VARS} variables")
            return found
        except NutError:
            self.close()
            raise
        except ssl.SSLError as exc:
            self.close()
            raise NutError("tls", f"TLS: {exc.reason or exc}") from exc
        except (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError,
                UnicodeDecodeError, ValueError) as exc:
            self.close()
            raise NutError("unreachable", f"{type(exc).__name__}: {exc}"[:200]) from exc
        except BaseException:  # cancelled (a timeout): the stream is mid-answer
            self.close()
            raise

    async def _connect(self) -> None:
        host, port = self._source.host_port
        self._reader, self._writer = await asyncio.open_connection(host, port, limit=MAX_LINE)
        self.tls = False
        if self._source.tls != "off":
            await self._send("STARTTLS")
            answer = await self._line()
            if answer.startswith("OK"):
                context = ssl.create_default_context(
                    cafile=str(self._source.ca_file) if self._source.ca_file else None)
                await self._writer.start_tls(context, server_hostname=host)
                self.tls = True
            elif self._source.tls == "required":
                raise NutError("tls", f"tls = required but upsd answered {answer[:60]!r}")
            elif not answer.startswith("ERR "):
                raise NutError("malformed", f"unexpected STARTTLS answer {answer[:60]!r}")
        if self._source.username is not None:
            for command in (f"USERNAME {self._source.username}",
                            f"PASSWORD {self._password or ''}"):
                await self._send(command)
                answer = await self._line()
                if not answer.startswith("OK"):
                    raise _err(answer) if answer.startswith("ERR ") else NutError(
                        "malformed", f"unexpected login answer {answer[:60]!r}")

    async def _send(self, line: str) -> None:
        assert self._writer is not None
        self._writer.write(line.encode() + b"\n")
        await self._writer.drain()

    async def _line(self) -> str:
        assert self._reader is not None
        raw = await self._reader.readline()
        if not raw:
            raise EOFError("upsd closed the connection")
        return raw.decode("ascii").rstrip("\r\n")
