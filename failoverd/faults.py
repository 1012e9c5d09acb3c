"""Test-only fault points, armed by ``FAILOVERD_FAULTS`` (comma-separated
``point=action``; actions: ``stop`` = SIGSTOP ourselves, ``exit`` = die with
status 70, ``freeze`` = block the event loop's thread, ``wedge`` = the awaiting
task never resumes, at points reached with :func:`async_fault_point`).  Each
point fires once.  Unset in production: a no-op.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

log = structlog.get_logger("failoverd.faults")

_armed: dict[str, str] = {}
for _item in filter(None, os.environ.get("FAILOVERD_FAULTS", "").split(",")):
    _point, _, _action = _item.partition("=")
    _armed[_point.strip()] = _action.strip() or "stop"


def fault_point(point: str) -> None:
    action = _armed.pop(point, None)
    if action is None:
        return
    log.warning("fault point hit", point=point, action=action)
    if action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    elif action == "exit":
        os._exit(70)
    elif action == "freeze":
        time.sleep(3600)


async def async_fault_point(point: str) -> None:
    if _armed.get(point) == "wedge":
        _armed.pop(point)
        log.warning("fault point hit", point=point, action="wedge")
        await asyncio.Event().wait()
    fault_point(point)
