"""Running promote/demote commands: environment, timeout, retries.

A hook gets ``FAILOVERD_GROUP``, ``FAILOVERD_REGION``, ``FAILOVERD_EPOCH``
and ``FAILOVERD_ROLE``.  It runs in its own process group, which is killed on
timeout, below the daemon's CPU priority (:func:`set_child_nice`), and is
retried with jittered exponential backoff (tenacity).  Hooks must be
idempotent: a retry or a crash between success and bookkeeping may run one
twice for the same epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog
from tenacity import AsyncRetrying, RetryError, stop_after_attempt, wait_random_exponential

log = structlog.get_logger("failoverd.processes")

OUTPUT_TAIL = 2000
# How much nicer than the daemon its children run (``policy.hook_nice``, set
# by the daemon at load and reload through :func:`set_child_nice`): one
# process-wide value, since it is about this host's CPU, not a group.
_child_nice = 0
# How long a command killed at its timeout may take to exit before it is
# left to a background reaper.
KILLED_WAIT_S = 2.0


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


def _environment(extra: Mapping[str, str]) -> dict[bytes, bytes]:
    """The daemon's environment plus ``extra``, as bytes (``os.environb``:
    decoding and re-encoding all of ``os.environ`` for every process cost
    more than the spawn).  Copied from the mapping's backing dict when it
    has one (CPython's ``_Environ._data``, kept in step with ``os.environ``):
    ``dict(os.environb)`` goes through a Python ``__getitem__`` per variable."""
    data = getattr(os.environb, "_data", None)
    env = dict(data) if isinstance(data, dict) else dict(os.environb)
    for k, v in extra.items():
        env[k.encode()] = v.encode()
    return env


def set_child_nice(increment: int) -> None:
    """Run every later child ``increment`` nicer than the daemon (0: as nice).

    Why: an evacuation runs hundreds of hooks and routes at once; at the
    daemon's own priority they starve its event loop, and a coordinator that
    cannot renew its lease in time steps down mid-evacuation (seen with
    1,000 groups on a 2-core host).  Niced, they still get every idle cycle."""
    global _child_nice  # noqa: PLW0603 -- one value for the whole process
    _child_nice = max(0, increment)


def _renice(pid: int) -> None:
    """Lower ``pid``'s priority from the parent, after the spawn: a
    ``preexec_fn`` would cost the vfork fast path.  The child may run a few
    instructions at the daemon's priority first; what it forks after that
    inherits the new value."""
    if not _child_nice:
        return
    with contextlib.suppress(OSError):  # it may have exited already
        own = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, pid, min(own + _child_nice, 19))


def _stdin_file(data: bytes) -> int:
    """``data`` in a file with no name, at its start, for a child's standard
    input: not a pipe, since a batch's lines may exceed a pipe's buffer and
    the child reads at its own pace; in memory (memfd) where the kernel has
    it, else an unlinked temporary file."""
    try:
        fd = os.memfd_create("failoverd-stdin", os.MFD_CLOEXEC)
    except (AttributeError, OSError):
        fd, path = tempfile.mkstemp(prefix="failoverd-stdin-")
        os.unlink(path)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return fd


async def run_once(  # noqa: PLR0915 -- one spawn, its two watchers and cleanup
        argv: Sequence[str], env: Mapping[str, str], timeout_s: float,
        stdin: bytes = b"", keep: int = OUTPUT_TAIL) -> str:
    """Run once with ``env`` added to the daemon's environment and ``stdin``
    as its standard input; the last ``keep`` characters of its output on
    exit 0, else :class:`HookFailed`.

    Spawned with ``subprocess.Popen`` (vfork) and watched through a pidfd and
    the output pipe on the event loop: asyncio's subprocess transports cost
    about 1 ms of the loop per process, and an evacuation of 1,000 groups runs
    3,000 hooks and routes.  The result is read at the process's exit, not at
    the pipe's end of file: a hook that leaves a daemon holding its stdout
    does not hang us.
    """
    loop = asyncio.get_running_loop()
    out_r, out_w = os.pipe()
    feed = _stdin_file(stdin) if stdin else None
    try:
        proc = subprocess.Popen(list(argv), env=_environment(env),  # noqa: ASYNC220 -- vfork
                                stdin=feed if feed is not None else subprocess.DEVNULL,
                                stdout=out_w, stderr=subprocess.STDOUT,
                                start_new_session=True)
    except BaseException:
        os.close(out_r)
        raise
    finally:
        os.close(out_w)
        if feed is not None:
            os.close(feed)
    _renice(proc.pid)
    os.set_blocking(out_r, False)
    output = bytearray()
    exited = loop.create_future()

    def read() -> None:
        try:
            while chunk := os.read(out_r, 65536):
                output.extend(chunk)
                if len(output) > 4 * keep:
                    del output[:-keep]
            loop.remove_reader(out_r)  # end of file
        except BlockingIOError:
            pass

    def reap() -> None:
        if not exited.done():
            exited.set_result(None)

    try:
        pidfd: int | None = os.pidfd_open(proc.pid)
    except OSError:  # no pidfd here (old kernel, seccomp): a thread waits instead
        pidfd = None
    loop.add_reader(out_r, read)
    if pidfd is not None:
        loop.add_reader(pidfd, reap)
    else:
        waiter = loop.run_in_executor(None, proc.wait)
        waiter.add_done_callback(lambda _: reap())
    try:
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(exited)  # a timeout must not cancel the future
        except TimeoutError:
            _kill_group(proc.pid)
            await _reaped(proc, exited)
            raise HookFailed(None, "") from None
        except asyncio.CancelledError:
            _kill_group(proc.pid)
            _reap_later(proc)
            raise
        proc.wait()  # it has exited: this returns at once
        read()  # what it wrote last
    finally:
        loop.remove_reader(out_r)
        os.close(out_r)
        if pidfd is not None:
            loop.remove_reader(pidfd)
            os.close(pidfd)
    text = output.decode(errors="replace")[-keep:]
    if proc.returncode != 0:
        raise HookFailed(proc.returncode, text)
    return text


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


async def _reaped(proc: subprocess.Popen[bytes], exited: asyncio.Future[None]) -> None:
    """After SIGKILL: wait (bounded) for the exit, never blocking the loop —
    a process in uninterruptible sleep (a hung NFS mount) dies only when its
    I/O ends, and the daemon's lease must not wait for it."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(KILLED_WAIT_S):
            await asyncio.shield(exited)
    if proc.poll() is None:
        log.error("a killed command has not exited; reaping it in the background",
                  pid=proc.pid, command=proc.args)
        _reap_later(proc)


def _reap_later(proc: subprocess.Popen[bytes]) -> None:
    """Reap ``proc`` when it exits, from a thread (no zombie, no blocked loop)."""
    if proc.poll() is None:
        threading.Thread(target=proc.wait, name=f"reap-{proc.pid}", daemon=True).start()


def _retrying(attempts: int, backoff_s: float) -> AsyncRetrying:
    """A hook's attempts: jittered exponential backoff, the last failure
    reported as a :class:`RetryError` (not raised from inside)."""
    return AsyncRetrying(stop=stop_after_attempt(attempts),
                         wait=wait_random_exponential(multiplier=backoff_s, max=10 * backoff_s),
                         reraise=False)


async def run_hook(argv: Sequence[str], *, group: str, region: str, epoch: int, role: str,
                   timeout_s: float, attempts: int, backoff_s: float = 0.5,
                   extra_env: Mapping[str, str] | None = None) -> HookResult:
    """Run ``argv`` until it exits 0 or ``attempts`` are spent; never raises
    for a failing command (a missing executable counts as a failure)."""
    start = time.monotonic()
    if not argv:
        return HookResult(True, 0, 0.0, 0, "")
    env = {"FAILOVERD_GROUP": group, "FAILOVERD_REGION": region,
           "FAILOVERD_EPOCH": str(epoch), "FAILOVERD_ROLE": role, **(extra_env or {})}
    tries = 0
    try:
        async for attempt in _retrying(attempts, backoff_s):
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


# A batch command names a group it could not apply on a line of its own:
# ``failed GROUP [why]``.
_FAILED_LINE = re.compile(r"^failed[ \t]+(\S+)[ \t]*(.*)$", re.MULTILINE)
# A batch keeps this much of its output per group (to find those lines).
BATCH_OUTPUT_PER_ITEM = 512
BATCH_OUTPUT_MAX = 1 << 20


@dataclass(frozen=True)
class BatchItem:
    """One group's line of a batch command's standard input."""

    name: str
    line: str


def failed_in_batch(output: str, names: set[str]) -> dict[str, str]:
    """The groups a batch's output says failed (``failed GROUP [why]``
    lines), with why; lines naming a group not in the batch are ignored."""
    return {m.group(1): m.group(2).strip() or "failed" for m in _FAILED_LINE.finditer(output)
            if m.group(1) in names}


async def run_batch(argv: Sequence[str], items: Sequence[BatchItem], *, env: Mapping[str, str],
                    timeout_s: float, attempts: int, backoff_s: float = 0.5
                    ) -> dict[str, HookResult]:
    """Run ``argv`` once for all of ``items`` (one line each on its standard
    input, ``FAILOVERD_BATCH=1`` in its environment), then again for the
    ones that failed, until none did or ``attempts`` are spent; the result
    per item name.  Never raises for a failing command.

    Exit 0 applies every item except those its output names on a
    ``failed GROUP [why]`` line; any other exit (or the timeout, which is
    the whole batch's) fails every item of that attempt.  Why batches: an
    evacuation asks a member for 1,000 promotes at once, and 1,000
    processes cost a 2-core host seconds of CPU that the daemon and the
    routes need (docs/architecture.md)."""
    start = time.monotonic()
    results: dict[str, HookResult] = {}
    remaining = list(items)
    if not argv:
        return {i.name: HookResult(True, 0, 0.0, 0, "") for i in items}
    batch_env = {**env, "FAILOVERD_BATCH": "1"}
    tries = 0
    last: dict[str, tuple[int | None, str]] = {}
    try:
        async for attempt in _retrying(attempts, backoff_s):
            with attempt:
                tries += 1
                last = await _batch_once(argv, remaining, batch_env, timeout_s)
                took = time.monotonic() - start
                for item in remaining:
                    if item.name not in last:
                        results[item.name] = HookResult(True, tries, took, 0, "")
                remaining = [i for i in remaining if i.name in last]
                if remaining:
                    log.warning("batch attempt failed", command=list(argv), attempt=tries,
                                failed=len(remaining), of=len(items),
                                example=next(iter(last.values()))[1][-300:])
                    raise HookFailed(None, "")
    except RetryError:
        pass
    took = time.monotonic() - start
    for item in remaining:
        code, why = last.get(item.name, (None, "failed"))
        results[item.name] = HookResult(False, tries, took, code, why)
    return results


async def _batch_once(argv: Sequence[str], items: Sequence[BatchItem], env: Mapping[str, str],
                      timeout_s: float) -> dict[str, tuple[int | None, str]]:
    """One run of a batch: the items that failed, with (exit status, why)."""
    stdin = "".join(f"{i.line}\n" for i in items).encode()
    keep = min(BATCH_OUTPUT_PER_ITEM * len(items) + OUTPUT_TAIL, BATCH_OUTPUT_MAX)
    try:
        out = await run_once(argv, env, timeout_s, stdin=stdin, keep=keep)
    except OSError as exc:
        why = f"cannot run {argv[0]}: {exc.strerror}"
        return {i.name: (None, why) for i in items}
    except HookFailed as exc:
        why = f"{exc}: {exc.output[-OUTPUT_TAIL:]}"
        return {i.name: (exc.returncode, why) for i in items}
    failed = failed_in_batch(out, {i.name for i in items})
    return {name: (0, f"the batch said: {why}") for name, why in failed.items()}
