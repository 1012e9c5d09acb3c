"""Work directories of the benchmarks (removed when ``bench/run`` exits),
and the py-spy sampling that writes into them.

Each run starts a 3-member etcd (64 MiB of preallocated WAL a member) and
daemons with their logs; kept, a day of benchmarking filled the disk.  Set
``FAILOVERD_BENCH_KEEP=1`` to keep them (printed at exit); a profiled run
(``FAILOVERD_BENCH_PROFILE``) keeps them too, for its py-spy output.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

_made: list[Path] = []


def work_dir(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    if not _made:
        atexit.register(_clean)
    _made.append(path)
    return path


def _clean() -> None:
    if os.environ.get("FAILOVERD_BENCH_KEEP") or os.environ.get("FAILOVERD_BENCH_PROFILE"):
        for path in _made:
            print(f"kept: {path}", file=sys.stderr)
        return
    for path in _made:
        shutil.rmtree(path, ignore_errors=True)


class _Daemon(Protocol):
    @property
    def pid(self) -> int: ...


def py_spy(daemons: Mapping[str, _Daemon], work: Path, seconds: float, rate_hz: int
           ) -> list[subprocess.Popen[bytes]]:
    """When FAILOVERD_BENCH_PROFILE is set, sample each daemon with py-spy for
    ``seconds`` (raw stacks in ``work/<member>.pyspy.txt``; the sampling
    costs CPU of its own: read the shares, not the totals).  py-spy comes
    from PATH or beside the interpreter; without it, nothing runs."""
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.environ.get("FAILOVERD_BENCH_PROFILE") or not Path(spy).exists():
        return []
    return [subprocess.Popen([spy, "record", "-r", str(rate_hz), "-d", str(int(seconds)),
                              "-f", "raw", "-o", str(work / f"{m}.pyspy.txt"), "-p",
                              str(d.pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            for m, d in daemons.items()]
