"""A PostgreSQL primary/standby pair under failoverd, and under Patroni, on
the same box: the write outage and the writes lost.

Each run starts a fresh pair (east primary, west streaming standby, the
same Debian PostgreSQL binaries), HAProxy (TCP) in front and a writer that
inserts a numbered row every 10 ms through it and keeps what was
acknowledged; then either

- a planned switchover to west (failoverd: ``POST /v1/groups/db/switchover``;
  Patroni: ``POST /switchover``), or
- a power loss of east's site: its failoverd (or Patroni) is killed -9 and
  its PostgreSQL stopped ``-m immediate`` at the same instant.

It prints, per system and scenario, the write outage (the longest gap
between two acknowledged writes) p50/p99 over the runs, the acknowledged
writes missing from the new primary, and failoverd's catch-up wait (the
saga's catchup step).  Systems: failoverd (3 daemons — east, west and a
central witness that holds the coordinator — lease TTL ``ttl``), Patroni at
its documented defaults (ttl 30, loop_wait 10, retry_timeout 10) and Patroni
tuned as close to failoverd's TTL as it allows (its validator refuses ttl <
20 and retry_timeout < 3: ttl max(``ttl``, 20), loop_wait 1, retry_timeout 3).  Both
behind HAProxy; Patroni's the way its documentation sets it up (health check
on its REST API's ``/primary``, here every 500 ms, 2 falls).

Patroni (PyPI ``patroni[etcd3]``, ``psycopg2-binary``) goes into a venv of
its own under /var/tmp (it must run as the ``postgres`` user, who cannot
read the project's venv when it lives under /root), made on first use.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.workdirs import work_dir
from devstack.postgres import (
    PgReplicaSet,
    PgWriter,
    database_group_toml,
    hook_env_dir,
    pg_bin,
)
from devstack.stack import (
    OPERATOR_TOKEN,
    EtcdCluster,
    Haproxy,
    LocalCluster,
    Mosquitto,
    call,
    free_port,
    wait_until,
)

PATRONI_VENV = Path("/var/tmp/failoverd-bench-patroni")
SCENARIOS = ("switchover", "power loss")
WRITES_BEFORE = 100
WRITES_AFTER = 100


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


def patroni_bin() -> Path:
    """Patroni in a venv of its own (made once), runnable by ``postgres``."""
    exe = PATRONI_VENV / "bin" / "patroni"
    if not exe.exists():
        python = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable
        subprocess.run([python, "-m", "venv", str(PATRONI_VENV)], check=True)
        subprocess.run([str(PATRONI_VENV / "bin" / "pip"), "install", "-q",
                        "--disable-pip-version-check", "patroni[etcd3]>=4", "psycopg2-binary"],
                       check=True)
    return exe


# -- failoverd -------------------------------------------------------------------

async def failoverd_run(scenario: str, etcd: EtcdCluster, broker: Mosquitto, ttl: int,
                        n: int) -> dict[str, float]:
    work = work_dir(f"failoverd-bench-db-{n}-")
    pg = PgReplicaSet(["east", "west"], "east").start()
    pg["east"].sql("CREATE TABLE acked (n int PRIMARY KEY)")
    hp = Haproxy(work, {r: s.port for r, s in pg.servers.items()}, "east", mode="tcp").start()
    c = LocalCluster(work, f"benchdb{n}", etcd.endpoints,
                     {"east": 100, "west": 50, "central": 10}, {"db": ["east", "west"]},
                     ttl=ttl, mqtt=[broker.url], drain_s=0, log_level="info",
                     policy={"cooldown_s": 0, "member_loss_grace_s": 0,
                             "bootstrap_grace_s": 2},
                     group_toml=database_group_toml(pg, hp.socket, check_interval_s=0.5))
    writer = PgWriter(hp.port)
    writing: asyncio.Task[None] | None = None
    try:
        c.add("central-1", "central")
        await c.wait_coordinator(20)
        for region in ("east", "west"):
            c.add(f"{region}-1", region,
                  env={"FAILOVERD_PG_ENV_DIR": str(hook_env_dir(pg, region, "db", work))})
        before = await c.wait_active("db", "east", 30)
        await c.wait_saga_done("db", before.epoch, 30)
        writing = asyncio.create_task(writer.run())
        await wait_until(lambda: len(writer.acked) >= WRITES_BEFORE, 20, "writes")
        if scenario == "switchover":
            status, body = await call(c.daemons["central-1"].api, "POST",
                                      "/v1/groups/db/switchover", OPERATOR_TOKEN, {"to": "west"})
            assert status == 200, body
        else:
            c.daemons["east-1"].kill9()
            pg["east"].stop("immediate")
        after = await c.wait_active("db", "west", 60)
        wf = await c.wait_saga_done("db", after.epoch, 60)
        acked = len(writer.acked)
        await wait_until(lambda: len(writer.acked) >= acked + WRITES_AFTER, 30, "writes to west")
        catchup = next((s for s in wf.steps if s.name == "catchup"), None)
        return {"outage_ms": writer.outage_ms(), "lost": len(writer.missing_in(pg["west"])),
                "acked": len(writer.acked),
                "catchup_ms": ((catchup.finished - catchup.started) * 1000
                               if catchup and catchup.finished and catchup.started else 0.0)}
    finally:
        if writing is not None:
            writing.cancel()
        await c.close()
        hp.stop()
        pg.stop()


# -- Patroni ---------------------------------------------------------------------

class PatroniPair:
    """Two Patroni nodes (east, west) on the given etcd, each bootstrapping
    and running its own PostgreSQL, and HAProxy checking their REST APIs."""

    def __init__(self, etcd: EtcdCluster, ttl: int, loop_wait: int, retry_timeout: int,
                 scope: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="failoverd-bench-patroni-"))
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.etcd, self.scope = etcd, scope
        self.dcs = {"ttl": ttl, "loop_wait": loop_wait, "retry_timeout": retry_timeout,
                    "maximum_lag_on_failover": 1048576,
                    "postgresql": {"use_pg_rewind": True, "parameters": {
                        "wal_level": "replica", "hot_standby": "on", "wal_log_hints": "on",
                        "max_wal_senders": 10, "wal_keep_size": "256MB",
                        "wal_receiver_status_interval": "1s"}}}
        self.nodes = {r: {"rest": free_port(), "pg": free_port()} for r in ("east", "west")}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.hp: Haproxy | None = None

    def _config(self, name: str) -> Path:
        node = self.nodes[name]
        hosts = ",".join(e.removeprefix("http://") for e in self.etcd.endpoints)
        cfg = {
            "scope": self.scope, "name": name, "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{node['rest']}",
                        "connect_address": f"127.0.0.1:{node['rest']}"},
            "etcd3": {"hosts": hosts},
            "bootstrap": {"dcs": self.dcs, "initdb": [{"encoding": "UTF8"}],
                          "pg_hba": ["host replication all 127.0.0.1/32 trust",
                                     "host all all 127.0.0.1/32 trust",
                                     "local all all trust"]},
            "postgresql": {
                "listen": f"127.0.0.1:{node['pg']}",
                "connect_address": f"127.0.0.1:{node['pg']}",
                "data_dir": str(self.root / name), "bin_dir": str(pg_bin()),
                "pgpass": str(self.root / f"{name}.pgpass"),
                "authentication": {"superuser": {"username": "postgres"},
                                   "replication": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": str(self.root),
                               "shared_buffers": "16MB", "max_connections": 40}},
        }
        path = self.root / f"{name}.yml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        return path

    def start_node(self, name: str) -> None:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115
        self.procs[name] = subprocess.Popen(
            [*_as_postgres(), str(patroni_bin()), str(self._config(name))],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root)

    async def role(self, name: str) -> str:
        """``primary``, ``replica`` (streaming), another state by the REST
        API, or "" when it does not answer."""
        url = f"http://127.0.0.1:{self.nodes[name]['rest']}/patroni"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1)) as s, \
                    s.get(url) as r:
                body = await r.json()
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return ""
        if body.get("role") in {"primary", "master"} and body.get("state") == "running":
            return "primary"
        if body.get("role") == "replica" and body.get("replication_state") == "streaming":
            return "replica"
        return f"{body.get('role', '')} ({body.get('replication_state', body.get('state'))})"

    async def start(self) -> None:
        self.start_node("east")
        await wait_until(lambda: self._is("east", "primary"), 60, "Patroni east primary")
        self.start_node("west")
        await wait_until(lambda: self._is("west", "replica"), 60, "Patroni west streaming")
        self.sql("east", "CREATE TABLE acked (n int PRIMARY KEY)")

        async def replicated() -> bool:
            return self.sql("west", "SELECT to_regclass('acked') IS NOT NULL") == "t"
        await wait_until(replicated, 30, "the table on west")
        self.hp = Haproxy(self.root, {r: n["pg"] for r, n in self.nodes.items()}, None,
                          mode="tcp",
                          backend_options=["option httpchk OPTIONS /primary",
                                           "http-check expect status 200",
                                           "default-server inter 500ms fall 2 rise 1 "
                                           "on-marked-down shutdown-sessions"],
                          server_options={r: f"check port {n['rest']}"
                                          for r, n in self.nodes.items()}).start()

    async def _is(self, name: str, role: str) -> bool:
        return await self.role(name) == role

    def sql(self, name: str, query: str) -> str:
        out = subprocess.run([str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p",
                              str(self.nodes[name]["pg"]), "-U", "postgres", "-d", "postgres",
                              "-XtAq", "-c", query], capture_output=True, text=True,
                             timeout=30, check=True)
        return out.stdout.strip()

    def lose_site(self, name: str) -> None:
        """Power loss: Patroni killed -9 and PostgreSQL stopped at once."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        subprocess.run([*_as_postgres(), str(pg_bin() / "pg_ctl"), "-D",
                        str(self.root / name), "-m", "immediate", "-w", "stop"],
                       capture_output=True, timeout=30, check=False)

    async def switchover(self, to: str) -> None:
        url = f"http://127.0.0.1:{self.nodes['east']['rest']}/switchover"
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as s, \
                s.post(url, json={"leader": "east", "candidate": to}) as r:
            text = await r.text()
            assert r.status == 200, f"switchover: {r.status} {text}"

    def stop(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            subprocess.run([*_as_postgres(), str(pg_bin() / "pg_ctl"), "-D",
                            str(self.root / name), "-m", "immediate", "-w", "stop"],
                           capture_output=True, timeout=30, check=False)
        if self.hp is not None:
            self.hp.stop()
        if not os.environ.get("FAILOVERD_BENCH_KEEP"):
            shutil.rmtree(self.root, ignore_errors=True)


async def patroni_run(scenario: str, etcd: EtcdCluster, dcs: tuple[int, int, int],
                      n: int) -> dict[str, float]:
    pair = PatroniPair(etcd, *dcs, scope=f"benchdb{n}")
    writing: asyncio.Task[None] | None = None
    try:
        await pair.start()
        assert pair.hp is not None
        writer = PgWriter(pair.hp.port)
        writing = asyncio.create_task(writer.run())
        await wait_until(lambda: len(writer.acked) >= WRITES_BEFORE, 30, "writes")
        if scenario == "switchover":
            await pair.switchover("west")
        else:
            pair.lose_site("east")
        await wait_until(lambda: pair._is("west", "primary"), 120, "west primary")
        acked = len(writer.acked)
        await wait_until(lambda: len(writer.acked) >= acked + WRITES_AFTER, 60, "writes to west")
        return {"outage_ms": writer.outage_ms(),
                "lost": len(writer.missing_from(pair.sql("west", "SELECT n FROM acked"))),
                "acked": len(writer.acked), "catchup_ms": float("nan")}
    finally:
        if writing is not None:
            writing.cancel()
        pair.stop()


# -- the table ---------------------------------------------------------------------

def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(q * (len(s) - 1)))]


async def run(ttl: int, runs: int) -> list[dict[str, Any]]:
    work = work_dir("failoverd-bench-db-")
    etcd = EtcdCluster(work, size=3)
    etcd.start()
    broker = Mosquitto(work).start()
    systems: dict[str, Any] = {
        f"failoverd (ttl {ttl})": lambda sc, i: failoverd_run(sc, etcd, broker, ttl, i),
        "Patroni defaults (ttl 30, loop_wait 10)":
            lambda sc, i: patroni_run(sc, etcd, (30, 10, 10), i),
        # Patroni refuses ttl < 20 and retry_timeout < 3: its floor.
        f"Patroni tuned (ttl {max(ttl, 20)}, loop_wait 1, retry 3)":
            lambda sc, i: patroni_run(sc, etcd, (max(ttl, 20), 1, 3), i),
    }
    only = os.environ.get("FAILOVERD_BENCH_DB_SYSTEMS")  # e.g. "failoverd"
    rows: list[dict[str, Any]] = []
    n = 0
    try:
        for name, fn in systems.items():
            if only and not any(o.strip() and o.strip() in name for o in only.split(",")):
                continue
            for scenario in SCENARIOS:
                results = []
                for _ in range(runs):
                    n += 1
                    results.append(await fn(scenario, n))
                outages = [r["outage_ms"] for r in results]
                lost = [r["lost"] for r in results]
                catchups = [r["catchup_ms"] for r in results if r["catchup_ms"] == r["catchup_ms"]]
                rows.append({
                    "benchmark": f"database {scenario}: write outage, {name}", "unit": "ms",
                    "samples": len(outages), "p50": round(statistics.median(outages), 1),
                    "p99": round(_pct(outages, 0.99), 1), "min": round(min(outages), 1),
                    "max": round(max(outages), 1),
                    "stdev": round(statistics.pstdev(outages), 1),
                    "floor": (f"acknowledged writes lost: {sum(lost)} in {len(lost)} runs "
                              f"(max {max(lost)} a run)"
                              + (f"; catch-up wait p50 {statistics.median(catchups):.0f} ms, "
                                 f"max {max(catchups):.0f} ms" if catchups else ""))})
                print(f"# {rows[-1]['benchmark']}: p50 {rows[-1]['p50']} ms, "
                      f"p99 {rows[-1]['p99']} ms; {rows[-1]['floor']}", file=sys.stderr,
                      flush=True)
    finally:
        broker.stop()
        etcd.stop()
    return rows
