"""Running promote/demote commands: environment, timeout, retries.

A hook gets ``FAILOVERD_GROUP``, ``FAILOVERD_REGION``, ``FAILOVERD_EPOCH``
and ``FAILOVERD_ROLE``.  It runs in its own process group, which is killed on
timeout, and is retried with jittered exponential backoff (tenacity).  Hooks
must be idempotent: a retry or a crash between success and bookkeeping may
run one twice for the same epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_random_exponential

log = structlog.get_logger("failoverd.hooks")

OUTPUT_TAIL = 2000


@dataclass(frozen=True)
class HookResult:
    ok: bool
    attempts: int
    duration_s: float
    returncode: int | None
    output: str


class HookFailed(Exception):
    def __init__(self, returncode: int | None, output: str) -> None:
        self.returncode = returncode
        self.output = output
        super().__init__(f"exit status {returncode}" if returncode is not None else "timed out")


async def run_once(argv: Sequence[str], env: Mapping[str, str], timeout_s: float) -> str:
    """Run once; the output tail on exit 0, else :class:`HookFailed`."""
    proc = await asyncio.create_subprocess_exec(
        *argv, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, _ = await proc.communicate()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()
        raise HookFailed(None, "") from None
    except asyncio.CancelledError:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        raise
    text = out.decode(errors="replace")[-OUTPUT_TAIL:]
    if proc.returncode != 0:
        raise HookFailed(proc.returncode, text)
    return text


async def run_hook(argv: Sequence[str], *, group: str, region: str, epoch: int, role: str,
                   timeout_s: float, attempts: int, backoff_s: float = 0.5) -> HookResult:
    """Run ``argv`` until it exits 0 or ``attempts`` are spent; never raises
    for a failing command (a missing executable counts as a failure)."""
    start = time.monotonic()
    if not argv:
        return HookResult(True, 0, 0.0, 0, "")
    env = {**os.environ, "FAILOVERD_GROUP": group, "FAILOVERD_REGION": region,
           "FAILOVERD_EPOCH": str(epoch), "FAILOVERD_ROLE": role}
    tries = 0
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_attempt(attempts),
            wait=wait_random_exponential(multiplier=backoff_s, max=10 * backoff_s),
            reraise=False,
        ):
            with attempt:
                tries += 1
                try:
                    out = await run_once(argv, env, timeout_s)
                except OSError as exc:
                    raise HookFailed(None, f"cannot run {argv[0]}: {exc.strerror}") from exc
                except HookFailed as exc:
                    log.warning("hook attempt failed", group=group, role=role, epoch=epoch,
                                attempt=tries, error=str(exc), output=exc.output[-300:])
                    raise
    except RetryError as exc:
        last = exc.last_attempt.exception()
        failed = last if isinstance(last, HookFailed) else HookFailed(None, str(last))
        return HookResult(False, tries, time.monotonic() - start, failed.returncode,
                          failed.output)
    return HookResult(True, tries, time.monotonic() - start, 0, out)
