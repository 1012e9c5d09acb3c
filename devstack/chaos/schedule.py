"""A seed -> a schedule of faults and client operations (pure).

Operations: a region's generator fails or its power returns (MQTT), an
operator switchover (REST), a region's application fails its health checks
for a few seconds (``health_flap``).

Nemeses follow Jepsen's and etcd's robustness tests: kill and pause
processes (a daemon past its lease TTL, an etcd member, the etcd leader),
lose etcd quorum, restart the broker, cut one member off from etcd, from its
peers, or from both.  Each
fault lasts a while and is healed before the next one starts; client
operations (power events, operator switchovers) run throughout.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

NEMESES = ("kill_daemon", "pause_daemon", "kill_etcd_member", "kill_etcd_leader",
           "pause_etcd_member", "etcd_quorum_loss", "restart_broker", "partition_from_etcd",
           "partition_from_peers", "partition_total")
OPERATIONS = ("power_outage", "power_restored", "switchover", "health_flap")
REGIONS = ("east", "west", "central")


@dataclass(frozen=True)
class Fault:
    at: float  # seconds from the start
    nemesis: str
    target: str  # a region (its daemon), or "" where the nemesis picks
    lasts: float


@dataclass(frozen=True)
class Operation:
    at: float
    kind: str
    region: str


@dataclass(frozen=True)
class Schedule:
    seed: int
    faults: tuple[Fault, ...]
    operations: tuple[Operation, ...]
    duration: float

    def nemeses(self) -> tuple[str, ...]:
        return tuple(f.nemesis for f in self.faults)


def make_schedule(seed: int, duration: float = 24.0, ttl: float = 2.0) -> Schedule:
    """Faults back to back with a gap (each held past the lease TTL where
    that matters), and an operation every 1.5-4 s."""
    rnd = random.Random(seed)
    faults = []
    t = rnd.uniform(1.0, 3.0)
    while t < duration - 4:
        nemesis = rnd.choice(NEMESES)
        lasts = rnd.uniform(ttl * 1.5, ttl * 4)
        faults.append(Fault(round(t, 2), nemesis, rnd.choice(REGIONS), round(lasts, 2)))
        t += lasts + rnd.uniform(1.0, 3.0)
    ops = []
    t = rnd.uniform(0.5, 2.0)
    while t < duration:
        ops.append(Operation(round(t, 2), rnd.choice(OPERATIONS), rnd.choice(REGIONS)))
        t += rnd.uniform(1.5, 4.0)
    return Schedule(seed, tuple(faults), tuple(ops), duration)
