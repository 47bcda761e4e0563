from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster import LocalCluster, running_cluster
from tests.servers import REDIS_SERVER, RedisServer
from tests.tls import TlsFiles, TlsRedisServer, make_certs


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF, appendfsync always) on a free port; killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A local 3-master Redis Cluster (no replicas, no AOF), shared by the tests of a module."""
    yield from running_cluster(tmp_path_factory.mktemp("cluster"))


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    """A throwaway CA with server and client certificates (needs the ``cryptography`` package)."""
    pytest.importorskip("cryptography")
    return make_certs(tmp_path_factory.mktemp("tls"))


@pytest.fixture
def tls_redis(tmp_path: Path, tls_files: TlsFiles) -> Iterator[TlsRedisServer]:
    """A TLS-only redis-server (client certificates optional) on a free port."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = TlsRedisServer(tmp_path / "redis-tls", tls_files).start()
    yield server
    server.stop()
