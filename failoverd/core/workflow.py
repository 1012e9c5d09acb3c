"""The failover saga, pure: its steps, its record, and what gates the hooks.

A workflow is created in the same fenced txn as the epoch change it carries
out and stored at ``groups/<group>/workflow``.  The coordinator advances it
step by step (:mod:`failoverd.daemon.saga`); every step is idempotent and carries
the epoch, so a successor coordinator re-runs the recorded step and goes on.

Orders:
- planned (old region alive): precheck → drain_old → promote_new → reroute →
  verify → demote_old.  The old region keeps serving while it drains.
- forced (old region gone or critical): precheck → fence_old → promote_new →
  reroute → verify → demote_old.  The old region is fenced first.
- bootstrap: promote_new → reroute → verify.

A group with a database (``DATA_ORDERS``) fences the old primary first and
waits for the new region to replay everything it wrote before promoting:
- planned: precheck → drain_old → fence_old → catchup → promote_new →
  reroute → verify → rejoin_old (no acknowledged write lost).
- forced: precheck → fence_old → catchup → promote_new → reroute → verify
  → rejoin_old (catchup waits only when the old primary's final WAL
  position is known: a dead primary's is not, and the data guard bounded
  the loss before the move).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

ORDERS: dict[str, tuple[str, ...]] = {
    "planned": ("precheck", "drain_old", "promote_new", "reroute", "verify", "demote_old"),
    "forced": ("precheck", "fence_old", "promote_new", "reroute", "verify", "demote_old"),
    "bootstrap": ("promote_new", "reroute", "verify"),
}
DATA_ORDERS: dict[str, tuple[str, ...]] = {
    "planned": ("precheck", "drain_old", "fence_old", "catchup", "promote_new", "reroute",
                "verify", "rejoin_old"),
    "forced": ("precheck", "fence_old", "catchup", "promote_new", "reroute", "verify",
               "rejoin_old"),
    "bootstrap": ORDERS["bootstrap"],
}


@dataclass(frozen=True)
class Step:
    name: str
    state: str = "pending"  # pending | running | done | failed
    attempts: int = 0
    started: float | None = None
    finished: float | None = None
    error: str = ""
    detail: str = ""
    retry_at: float = 0.0


_STEP_DEFAULTS = asdict(Step(""))


@dataclass(frozen=True)
class Workflow:
    id: str
    group: str
    epoch: int
    from_region: str | None
    to_region: str
    mode: str
    created: float
    steps: tuple[Step, ...]
    state: str = "running"  # running | done | failed
    updated: float = 0.0
    error: str = ""
    mod_revision: int = field(default=0, compare=False)

    @classmethod
    def new(cls, group: str, epoch: int, from_region: str | None, to_region: str, mode: str,
            now: float, data: bool = False) -> Workflow:
        """``data``: the group has a database (fence, catch up, rejoin)."""
        order = (DATA_ORDERS if data else ORDERS)[mode]
        return cls(id=f"{group}-{epoch}", group=group, epoch=epoch, from_region=from_region,
                   to_region=to_region, mode=mode, created=now,
                   steps=tuple(Step(n) for n in order), updated=now)

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.steps)

    def step(self, name: str) -> Step | None:
        return next((s for s in self.steps if s.name == name), None)

    def current(self) -> Step | None:
        """The first step not done (None when every step is done)."""
        return next((s for s in self.steps if s.state != "done"), None)

    def reached(self, name: str) -> bool:
        """Has the saga started (or passed) step ``name``?  True if it has no
        such step: nothing to wait for."""
        step = next((s for s in self.steps if s.name == name), None)
        return step is None or step.state != "pending" or self.state != "running"

    def with_step(self, step: Step, now: float) -> Workflow:
        steps = tuple(step if s.name == step.name else s for s in self.steps)
        state = self.state
        if all(s.state == "done" for s in steps):
            state = "done"
        elif step.state == "failed":
            state = "failed"
        return replace(self, steps=steps, state=state, updated=now,
                       error=step.error if step.state == "failed" else self.error)

    def retried(self, now: float) -> Workflow:
        """A failed saga set running again from its failed step (an operator's
        retry, once the cause is fixed); the steps already done stay done."""
        steps = tuple(replace(s, state="pending", attempts=0, retry_at=0.0, started=None,
                              finished=None, error="") if s.state == "failed" else s
                      for s in self.steps)
        return replace(self, steps=steps, state="running", error="", updated=now)

    def to_value(self) -> str:
        # Built by hand, not with asdict (a deep copy): the coordinator
        # writes 5,000 of these in an evacuation of 1,000 groups.  Steps
        # without their default fields: every member parses every workflow
        # change, so size matters.
        d = {f: getattr(self, f) for f in _WORKFLOW_FIELDS}
        d["steps"] = [{k: v for k, v in vars(step).items()
                       if k == "name" or v != _STEP_DEFAULTS[k]} for step in self.steps]
        return json.dumps(d, separators=(",", ":"), sort_keys=True)

    def summary(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("mod_revision")
        return d


_WORKFLOW_FIELDS = tuple(f.name for f in fields(Workflow)
                         if f.name not in {"steps", "mod_revision"})


def parse_workflow(value: str, mod_revision: int) -> Workflow:
    d = json.loads(value)
    if not isinstance(d, dict):
        raise ValueError("workflow is not a JSON object")
    steps = tuple(Step(**s) for s in d.pop("steps"))
    return Workflow(**d, steps=steps, mod_revision=mod_revision)


def may_promote(wf: Workflow | None, epoch: int) -> bool:
    """A member promotes for ``epoch`` once the saga reaches promote_new (or
    when no saga carries that epoch: bootstrap of old records, hand edits).
    A database's saga that failed before promote_new (its catch-up did not
    finish) never lets the new region promote: that would lose writes and
    race the rollback to the fenced primary."""
    if wf is None or wf.epoch != epoch:
        return True
    if wf.state == "failed" and wf.has("catchup"):
        step = wf.step("promote_new")
        return step is not None and step.state != "pending"
    return wf.reached("promote_new")


def may_demote(wf: Workflow | None, epoch: int) -> bool:
    """A planned switchover keeps the old region serving until demote_old
    (a database's: until fence_old, after the drain); a forced one fences
    at once."""
    if wf is None or wf.epoch != epoch or wf.mode != "planned":
        return True
    return wf.reached("fence_old" if wf.has("fence_old") else "demote_old")


def may_rejoin(wf: Workflow | None, epoch: int) -> bool:
    """The other regions' databases follow the new primary once the saga
    reached rejoin_old (the new primary serves).  Not when the saga failed
    before it: the new region never became primary (a catch-up that did
    not finish), and following it would rewind the fenced primary that has
    every write."""
    if wf is None or wf.epoch != epoch:
        return False
    step = wf.step("rejoin_old")
    return step is not None and step.state in {"running", "done"}
