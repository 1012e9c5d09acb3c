"""Hook runner: environment, retries with backoff, timeouts (real processes)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from devstack.stack import wait_until
from failoverd.processes import BatchItem, run_batch, run_hook, set_child_nice


def _script(tmp_path: Path, body: str, name: str = "hook.sh") -> list[str]:
    p = tmp_path / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return [str(p)]


async def test_environment_reaches_the_hook(tmp_path: Path) -> None:
    argv = _script(tmp_path, 'echo "$FAILOVERD_GROUP $FAILOVERD_REGION $FAILOVERD_EPOCH '
                             '$FAILOVERD_ROLE"\n')
    r = await run_hook(argv, group="app", region="west", epoch=7, role="active",
                       timeout_s=5, attempts=1)
    assert r.ok and r.attempts == 1 and r.output.strip() == "app west 7 active"


async def test_retried_until_it_succeeds(tmp_path: Path) -> None:
    count = tmp_path / "n"
    argv = _script(tmp_path, f'echo x >> {count}\n[ "$(wc -l < {count})" -ge 3 ]\n')
    r = await run_hook(argv, group="g", region="r", epoch=1, role="active", timeout_s=5,
                       attempts=5, backoff_s=0.01)
    assert r.ok and r.attempts == 3


async def test_gives_up_after_its_attempts(tmp_path: Path) -> None:
    argv = _script(tmp_path, "echo broken; exit 3\n")
    r = await run_hook(argv, group="g", region="r", epoch=1, role="standby", timeout_s=5,
                       attempts=2, backoff_s=0.01)
    assert not r.ok and r.attempts == 2 and r.returncode == 3 and "broken" in r.output


async def test_timeout_kills_the_process_group(tmp_path: Path) -> None:
    pidfile = tmp_path / "child.pid"
    argv = _script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\nwait\n")
    r = await run_hook(argv, group="g", region="r", epoch=1, role="active", timeout_s=0.5,
                       attempts=1)
    assert not r.ok and r.returncode is None and r.duration_s < 2
    # The background child was in the killed process group too.
    child = int(pidfile.read_text())

    async def child_dead() -> bool:
        try:
            state = Path(f"/proc/{child}/stat").read_text().split()[2]
        except FileNotFoundError:
            return True
        return state in {"Z", "X"}
    await wait_until(child_dead, 2, "the hook's child to be killed")


async def test_missing_executable_is_a_failure_not_a_crash(tmp_path: Path) -> None:
    r = await run_hook([str(tmp_path / "nope")], group="g", region="r", epoch=1,
                       role="active", timeout_s=1, attempts=2, backoff_s=0.01)
    assert not r.ok and "cannot run" in r.output


async def test_no_hook_configured_is_success() -> None:
    r = await run_hook([], group="g", region="r", epoch=1, role="active", timeout_s=1,
                       attempts=1)
    assert r.ok and r.attempts == 0


async def test_a_hook_that_leaves_a_daemon_on_its_output_is_done_when_it_exits(
        tmp_path: Path) -> None:
    """A promote hook that starts a service in the background (which keeps
    the hook's stdout open) is done when the hook exits, not when the
    service closes its output: waiting for the end of the pipe would time
    out and fail a promote that succeeded."""
    import os  # noqa: PLC0415
    import signal  # noqa: PLC0415

    pidfile = tmp_path / "daemon.pid"
    argv = _script(tmp_path, f"sleep 30 &\necho $! > {pidfile}\necho started\n")
    try:
        r = await run_hook(argv, group="g", region="r", epoch=1, role="active",
                           timeout_s=3, attempts=1)
        assert r.ok and r.output.strip() == "started"
    finally:
        os.kill(int(pidfile.read_text()), signal.SIGKILL)


async def test_without_pidfd_hooks_still_run_and_time_out(tmp_path: Path,
                                                          monkeypatch) -> None:
    """Where pidfd_open is refused (an old kernel, a seccomp filter), a
    thread waits for the process instead: results and timeouts are the same."""
    import os  # noqa: PLC0415

    def refused(pid: int) -> int:
        raise PermissionError(1, "Operation not permitted")
    monkeypatch.setattr(os, "pidfd_open", refused)
    ok = await run_hook(_script(tmp_path, "echo fine\n"), group="g", region="r", epoch=1,
                        role="active", timeout_s=5, attempts=1)
    assert ok.ok and ok.output.strip() == "fine"
    slow = await run_hook(_script(tmp_path, "sleep 30\n"), group="g", region="r", epoch=1,
                          role="active", timeout_s=0.3, attempts=1)
    assert not slow.ok and slow.returncode is None and slow.duration_s < 3


async def test_hooks_run_below_the_daemons_priority(tmp_path: Path) -> None:
    """An evacuation's hundreds of hooks must not starve the daemon's lease
    keep-alive: children run ``hook_nice`` nicer than the daemon, and what
    they start inherits it.  The hook reads its priority only after the
    test (on the loop, so after the spawn's synchronous renice) lets it go."""
    gate = tmp_path / "gate"
    argv = _script(tmp_path, f'read _ < {gate}\nsh -c \'cut -d" " -f19 /proc/$$/stat\'\n')
    own = os.getpriority(os.PRIO_PROCESS, 0)

    async def nice_of_a_hook(increment: int) -> int:
        os.mkfifo(gate)
        set_child_nice(increment)
        hook = asyncio.create_task(run_hook(argv, group="g", region="r", epoch=1,
                                            role="active", timeout_s=5, attempts=1))
        writer = await asyncio.to_thread(gate.open, "w")  # the hook is reading
        writer.write("go\n")
        writer.close()
        result = await hook
        gate.unlink()
        assert result.ok, result.output
        return int(result.output)

    try:
        assert await nice_of_a_hook(7) == min(own + 7, 19)
        assert await nice_of_a_hook(0) == own
    finally:
        set_child_nice(0)


def _batch_script(tmp_path: Path) -> list[str]:
    """Logs each run's groups; says ``failed G`` once for each G with a
    ``fail-G`` file (then removes it)."""
    return _script(tmp_path, f'''echo "run $FAILOVERD_BATCH $FAILOVERD_ROLE" >> {tmp_path}/runs
while read -r g e; do
  if [ -f "{tmp_path}/fail-$g" ]; then rm "{tmp_path}/fail-$g"; echo "failed $g disk full"
  else echo "$g $e" >> {tmp_path}/applied; fi
done
''')


async def test_a_batch_runs_once_for_its_groups_and_again_only_for_the_failed(
        tmp_path: Path) -> None:
    argv = _batch_script(tmp_path)
    (tmp_path / "fail-b").touch()
    items = [BatchItem(g, f"{g} {e}") for g, e in (("a", 3), ("b", 4), ("c", 5))]
    results = await run_batch(argv, items, env={"FAILOVERD_ROLE": "active"}, timeout_s=5,
                              attempts=3, backoff_s=0.01)
    assert {g: (r.ok, r.attempts) for g, r in results.items()} == {
        "a": (True, 1), "b": (True, 2), "c": (True, 1)}
    assert (tmp_path / "runs").read_text().splitlines() == ["run 1 active", "run 1 active"]
    assert (tmp_path / "applied").read_text().splitlines() == ["a 3", "c 5", "b 4"]


async def test_a_failing_batch_fails_each_group_with_its_reason(tmp_path: Path) -> None:
    argv = _batch_script(tmp_path)
    (tmp_path / "fail-x").touch()
    items = [BatchItem("x", "x 1"), BatchItem("y", "y 1")]
    results = await run_batch(argv, items, env={}, timeout_s=5, attempts=1)
    assert not results["x"].ok and "disk full" in results["x"].output
    assert results["y"].ok
    broken = _script(tmp_path, "cat > /dev/null; echo no route to the API; exit 4\n",
                     name="broken.sh")
    results = await run_batch(broken, items, env={}, timeout_s=5, attempts=2, backoff_s=0.01)
    assert all(not r.ok and r.returncode == 4 and r.attempts == 2
               and "no route to the API" in r.output for r in results.values())
    missing = await run_batch([str(tmp_path / "nope")], items, env={}, timeout_s=5, attempts=1)
    assert all(not r.ok and "cannot run" in r.output for r in missing.values())


async def test_a_batch_reads_more_groups_than_a_pipe_holds(tmp_path: Path) -> None:
    """stdin is a file: 5,000 lines (about 300 KB) reach the command whole."""
    argv = _script(tmp_path, f"wc -l > {tmp_path}/count\n")
    items = [BatchItem(f"group-with-a-long-name-{i:05d}-{'x' * 30}", f"g{i} 1")
             for i in range(5000)]
    results = await run_batch(argv, items, env={}, timeout_s=10, attempts=1)
    assert all(r.ok for r in results.values())
    assert (tmp_path / "count").read_text().strip() == "5000"
