"""Real PostgreSQL (Debian ``postgresql``) for tests, benchmarks and the demo:
a primary and streaming standbys, one per region, on loopback ports.

PostgreSQL refuses to run as root, so as root (CI) every server runs as the
``postgres`` user the package creates, in a directory of its own under
/tmp; otherwise as the current user.  Nothing listens beyond 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import asyncpg

from devstack.stack import free_port


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"),
                      key=lambda p: int(p.parent.parent.name))
    if not versions:
        raise RuntimeError("PostgreSQL is not installed (Debian package postgresql)")
    return versions[-1].parent


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


CONF = """
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{sockets}'
wal_level = replica
max_wal_senders = 10
wal_keep_size = '256MB'
hot_standby = on
wal_log_hints = on
wal_receiver_status_interval = 1s
shared_buffers = 16MB
max_connections = 40
fsync = on
logging_collector = off
"""
HBA = """
local all all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
"""


class PgServer:
    """One PostgreSQL server of a :class:`PgReplicaSet`."""

    def __init__(self, root: Path, region: str) -> None:
        self.root = root
        self.region = region
        self.port = free_port()
        self.datadir = root / region

    @property
    def dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, *argv: str, timeout: float = 60) -> str:
        out = subprocess.run([*_as_postgres(), *argv], capture_output=True, text=True,
                             timeout=timeout, cwd=self.root, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {out.stderr.strip() or out.stdout.strip()}")
        return out.stdout

    def initdb(self) -> None:
        self._run(str(pg_bin() / "initdb"), "-D", str(self.datadir), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")
        with (self.datadir / "postgresql.conf").open("a") as f:
            f.write(CONF.format(port=self.port, sockets=self.root))
        (self.datadir / "pg_hba.conf").write_text(HBA)

    def clone_from(self, primary: PgServer) -> None:
        """A streaming standby of ``primary`` (pg_basebackup -R)."""
        self._run(str(pg_bin() / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(primary.port),
                  "-U", "postgres", "-D", str(self.datadir), "-R", "-X", "stream", "-c", "fast",
                  "--no-sync")
        with (self.datadir / "postgresql.auto.conf").open("a") as f:
            f.write(f"port = {self.port}\n")
            f.write(f"primary_conninfo = 'host=127.0.0.1 port={primary.port} user=postgres "
                    f"application_name={self.region}'\n")

    def start(self) -> None:
        self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.datadir), "-l",
                  str(self.root / f"{self.region}.log"), "-w", "-t", "60", "start")

    def stop(self, mode: str = "fast") -> None:
        if (self.datadir / "postmaster.pid").exists():
            self._run(str(pg_bin() / "pg_ctl"), "-D", str(self.datadir), "-m", mode, "-w",
                      "stop")

    def sql(self, query: str) -> str:
        """Run ``query`` with psql; its unaligned output, stripped."""
        return self._run(str(pg_bin() / "psql"), "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", "postgres", "-d", "postgres", "-XtAq", "-c", query).strip()

    def lsn(self) -> int:
        """Current WAL position (primary) or replayed position (standby), in bytes."""
        return int(self.sql(
            "SELECT (CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn() "
            "ELSE pg_current_wal_lsn() END - '0/0'::pg_lsn)::bigint"))


class PgReplicaSet:
    """A primary in ``primary``'s region and a streaming standby in each other."""

    def __init__(self, regions: Iterable[str], primary: str) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="failoverd-pg-"))
        os.chmod(self.root, 0o755)
        if os.geteuid() == 0:
            shutil.chown(self.root, "postgres", "postgres")
        self.servers = {r: PgServer(self.root, r) for r in regions}
        self.primary = primary

    def __getitem__(self, region: str) -> PgServer:
        return self.servers[region]

    def start(self) -> PgReplicaSet:
        first = self.servers[self.primary]
        first.initdb()
        first.start()
        for region, server in self.servers.items():
            if region != self.primary:
                server.clone_from(first)
                server.start()
        self.wait_streaming()
        return self

    def wait_streaming(self, timeout: float = 30.0) -> None:
        """Until every standby streams from the primary."""
        want = len(self.servers) - 1
        deadline = time.monotonic() + timeout
        while True:
            n = int(self.servers[self.primary].sql(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"))
            if n >= want:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{n} of {want} standbys streaming after {timeout}s")
            time.sleep(0.1)

    def stop(self) -> None:
        for server in self.servers.values():
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                server.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class PgWriter:
    """Inserts a numbered row into ``acked`` every 10 ms through ``port``
    (HAProxy in front of the primary) and keeps the numbers the database
    acknowledged (a commit that returned), with when."""

    port: int
    acked: list[tuple[int, float]] = field(default_factory=list)
    errors: int = 0

    async def run(self) -> None:
        n = 0
        conn = None
        while True:
            n += 1
            try:
                if conn is None:
                    async with asyncio.timeout(1):
                        conn = await asyncpg.connect(host="127.0.0.1", port=self.port,
                                                     user="postgres", database="postgres")
                async with asyncio.timeout(1):
                    await conn.execute("INSERT INTO acked (n) VALUES ($1)", n)
                self.acked.append((n, time.monotonic()))
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError,
                    asyncpg.InternalClientError):
                self.errors += 1
                if conn is not None:
                    conn.terminate()
                    conn = None
            await asyncio.sleep(0.01)

    def outage_ms(self) -> float:
        """The longest gap between two acknowledged writes."""
        times = [t for _, t in self.acked]
        return max((b - a for a, b in itertools.pairwise(times)), default=0) * 1000



    def missing_in(self, server: PgServer) -> set[int]:
        """Acknowledged numbers that ``server`` does not hold."""
        return self.missing_from(server.sql("SELECT n FROM acked"))

    def missing_from(self, rows: str) -> set[int]:
        """Acknowledged numbers absent from ``rows`` (psql's output of
        ``SELECT n FROM acked``)."""
        return {n for n, _ in self.acked} - {int(x) for x in rows.split()}


HOOKS = Path(__file__).resolve().parent.parent / "deploy" / "hooks" / "postgresql"


def hook_env_dir(replicas: PgReplicaSet, region: str, group: str, workdir: Path) -> Path:
    """The env file deploy/hooks/postgresql reads, for ``region``'s member
    (its own server, and how to reach every region's): the directory to
    give the daemon as FAILOVERD_PG_ENV_DIR."""
    d = workdir / f"pg-env-{region}"
    d.mkdir(parents=True, exist_ok=True)
    server = replicas[region]
    lines = [f"PGBIN={pg_bin()}", f"PGDATA={server.datadir}", "PGHOST=127.0.0.1",
             f"PGPORT={server.port}", "PGUSER=postgres",
             'RUN_AS="runuser -u postgres --"' if os.geteuid() == 0 else "RUN_AS=",
             f"STATE_DIR={workdir / f'pg-state-{region}'}", "TIMEOUT_S=30"]
    lines += [f'CONNINFO_{r}="host=127.0.0.1 port={s.port} user=postgres"'
              for r, s in replicas.servers.items()]
    (d / f"{group}.env").write_text("\n".join(lines) + "\n")
    return d


def database_group_toml(replicas: PgReplicaSet, haproxy_socket: str | None = None,
                        **database: object) -> str:
    """A group's TOML for the replica set: the PostgreSQL hooks, its
    [groups.database] and, given HAProxy's socket, a route to the primary."""
    dsn = ", ".join(f'{r} = "{s.dsn}"' for r, s in replicas.servers.items())
    text = (f'promote = ["{HOOKS / "promote"}"]\ndemote = ["{HOOKS / "demote"}"]\n'
            f'rejoin = ["{HOOKS / "rejoin"}"]\n')
    if haproxy_socket is not None:
        servers = ", ".join(f'{r} = "{r}"' for r in replicas.servers)
        text += (f'[[groups.routes]]\nkind = "haproxy"\nsocket = "{haproxy_socket}"\n'
                 f'backend = "app"\nservers = {{ {servers} }}\n')
    text += f'[groups.database]\nkind = "postgres"\ndsn = {{ {dsn} }}\n'
    text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in database.items())
    return text
