"""Work directories of the benchmarks: removed when ``bench/run`` exits.

Each run starts a 3-member etcd (64 MiB of preallocated WAL a member) and
daemons with their logs; kept, a day of benchmarking filled the disk.  Set
``FAILOVERD_BENCH_KEEP=1`` to keep them (printed at exit); a profiled run
(``FAILOVERD_BENCH_PROFILE``) keeps them too, for its py-spy output.
"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

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
