"""Test-only fault points.  Nothing arms them in shipped code: only the
test harness's entry point (``devstack/fault_daemon.py``) calls :func:`arm`
before it runs the daemon.  A spec is comma-separated ``point=action``;
actions: ``stop`` = SIGSTOP ourselves, ``exit`` = die with status 70,
``freeze`` = block the event loop's thread, ``wedge`` = the awaiting task
never resumes, at points reached with :func:`async_fault_point`.  Each point
fires once.  Unarmed, a point is a dictionary lookup.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import structlog

log = structlog.get_logger("failoverd.faults")

_armed: dict[str, str] = {}


def arm(spec: str) -> None:
    """Arm the fault points of ``spec`` (the test harness only)."""
    for item in filter(None, spec.split(",")):
        point, _, action = item.partition("=")
        _armed[point.strip()] = action.strip() or "stop"
    if _armed:
        log.warning("test fault points armed", points=sorted(_armed))


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
