from __future__ import annotations

import itertools
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from tests.harness import EtcdCluster, LocalCluster

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
    (tmp_path / "etcd3").mkdir()
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
