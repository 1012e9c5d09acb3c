from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest

from devstack.stack import VIEWER_TOKEN, EtcdCluster, LocalCluster, call, wait_until

API_REGIONS = {"east": 100, "west": 50, "central": 25}

_names = itertools.count()


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdCluster]:
    """One real etcd for the session; tests isolate by cluster name."""
    cluster = EtcdCluster(tmp_path_factory.mktemp("etcd"), size=1)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def etcd3(tmp_path: Path) -> Iterator[EtcdCluster]:
    """A fresh 3-member etcd cluster for one test."""
    cluster = EtcdCluster(tmp_path / "etcd3", size=3)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest) -> str:
    return f"t{os.getpid()}-{next(_names)}-{request.node.name[:30]}".replace("[", "-").replace(
        "]", "")


@pytest.fixture
async def two_regions(tmp_path: Path, etcd: EtcdCluster, cluster_name: str
                      ) -> AsyncIterator[LocalCluster]:
    """east (priority 100) and west (50), group ``app`` over both; no daemons yet."""
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints,
                     regions={"east": 100, "west": 50}, groups={"app": ["east", "west"]})
    yield c
    await c.close()


@pytest.fixture
async def api_cluster(tmp_path: Path, etcd: EtcdCluster, cluster_name: str
                  ) -> AsyncIterator[LocalCluster]:
    """east/west/central, one daemon each, group app; every API ready."""
    c = LocalCluster(tmp_path, cluster_name, etcd.endpoints, API_REGIONS,
                     {"app": list(API_REGIONS)}, policy={"max_evacuations_per_hour": 100})
    for region in API_REGIONS:
        c.add(f"{region[0]}1", region)
    await c.wait_active("app", "east", 15)

    await c.wait_saga_done("app", 1, 30)

    async def ready() -> bool:
        # Settled as each member sees it, not only in etcd: a test's request
        # to any member must not meet the bootstrap saga still running, nor
        # a mirror one watch event behind (both seen in CI as a refused drill).
        for d in c.daemons.values():
            try:
                if (await call(d.api, "GET", "/readyz"))[0] != 200:
                    return False
                wf = (await call(d.api, "GET", "/v1/status", VIEWER_TOKEN))[1][
                    "groups"]["app"]["workflow"]
            except aiohttp.ClientError:
                return False
            if wf is None or (wf["epoch"], wf["state"]) != (1, "done"):
                return False
        return len((await c.view()).members) == 3
    await wait_until(ready, 15, "every API ready and every member's view settled")
    yield c
    await c.close()
