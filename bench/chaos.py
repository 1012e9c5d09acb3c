"""The long chaos run: N seeded schedules on the real stack, violations per
nemesis (issue 12).  ``bench/run --only chaos --schedules N [--first-seed S]``.

Each schedule's outcome is appended to ``chaos-results.jsonl`` in the
current directory as it finishes (seed, nemeses, violations, seconds), so a
long run can be read while it goes; the work directory (daemon logs, hook
log, state files) of a schedule with violations is kept.  Violations name the schedule's seed:
``pytest tests/test_chaos.py`` style replays use ``make_schedule(seed)``.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from devstack.chaos.runner import run_schedule
from devstack.chaos.schedule import NEMESES, make_schedule

RESULTS = Path("chaos-results.jsonl")


async def run(schedules: int, first_seed: int = 1000) -> list[dict[str, Any]]:
    used: Counter[str] = Counter()
    broken: Counter[str] = Counter()
    bad_seeds: list[int] = []
    seconds: list[float] = []
    for seed in range(first_seed, first_seed + schedules):
        schedule = make_schedule(seed)
        tmp = Path(tempfile.mkdtemp(prefix=f"failoverd-chaos-{seed}-"))
        try:
            outcome = await run_schedule(schedule, tmp)
            found, took = outcome.violations, outcome.seconds
        except Exception as exc:  # a harness failure is a result too
            found, took = [f"run failed: {type(exc).__name__}: {exc}"], 0.0
        if found:
            print(f"    kept for reading: {tmp} (logs, hooks.jsonl, state)", flush=True)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        seconds.append(took)
        for n in set(schedule.nemeses()):
            used[n] += 1
            if found:
                broken[n] += 1
        if found:
            bad_seeds.append(seed)
        with RESULTS.open("a") as f:
            f.write(json.dumps({"seed": seed, "nemeses": schedule.nemeses(),
                                "violations": found, "seconds": round(took, 1)}) + "\n")
        print(f"chaos seed {seed}: {len(found)} violation(s) "
              f"[{', '.join(schedule.nemeses())}] {took:.0f}s", flush=True)
        for v in found:
            print(f"    {v}", flush=True)
    print("\nnemesis                    schedules  with violations")
    for n in NEMESES:
        print(f"{n:<27}{used[n]:>9}  {broken[n]:>15}")
    print(f"seeds {first_seed}..{first_seed + schedules - 1}; "
          f"violating seeds: {bad_seeds or 'none'}")
    return [{"benchmark": "chaos: schedules with a violation", "samples": schedules,
             "p50": len(bad_seeds), "p99": len(bad_seeds), "min": 0, "max": len(bad_seeds),
             "unit": "runs", "floor": f"seeds {first_seed}..{first_seed + schedules - 1}"},
            {"benchmark": "chaos: seconds per schedule", "samples": len(seconds),
             "p50": round(sorted(seconds)[len(seconds) // 2], 1) if seconds else 0,
             "p99": round(max(seconds), 1) if seconds else 0,
             "min": round(min(seconds), 1) if seconds else 0,
             "max": round(max(seconds), 1) if seconds else 0, "unit": "s", "floor": ""}]
