"""Fixtures of the cluster suite: one local 3-master Redis Cluster for the whole session.

The directory has no ``__init__.py`` on purpose: a package ``tests.cluster`` would shadow the module
``tests/cluster.py`` (``LocalCluster``) that ``tests/conftest.py`` imports. Tests stay independent by
using a fresh run id each (every key of a run carries the run id in its hash tag).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
from redis.cluster import RedisCluster

from pr_loader.store.connection import connect
from tests.cluster import LocalCluster, running_cluster


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local 3-master Redis Cluster (no replicas, no AOF) on free ports, stopped at the end."""
    yield from running_cluster(tmp_path_factory.mktemp("cluster-suite"))


@pytest.fixture(scope="session")
def cluster_client(cluster: LocalCluster) -> Iterator[RedisCluster]:
    """A cluster client as the code opens it: ``connect(url, cluster=True)``."""
    client = connect(cluster.url, cluster=True, retry_seconds=5.0)
    assert isinstance(client, RedisCluster)
    yield client
    client.close()


@pytest.fixture
def run_id(request: pytest.FixtureRequest) -> str:
    """A run id no other test uses (the test name keeps the keys readable when debugging)."""
    name = request.node.name.replace("[", "-").replace("]", "").replace(" ", "")
    return f"{name[:40]}-{uuid.uuid4().hex[:8]}"
