"""A local Redis Cluster of real redis-server processes for tests (free ports, temp dirs)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from redis.cluster import RedisCluster

from tests.servers import REDIS_CLI, REDIS_SERVER, RedisServer, free_port


class LocalCluster:
    """``masters`` cluster-enabled redis-servers joined with ``redis-cli --cluster create``, no replicas."""

    def __init__(self, base_dir: Path, *, masters: int = 3, appendonly: bool = False) -> None:
        if REDIS_CLI is None:
            raise RuntimeError("redis-cli binary not found")
        self.nodes: list[RedisServer] = []
        for i in range(masters):
            data_dir = Path(base_dir) / f"node{i}"
            self.nodes.append(RedisServer(
                data_dir,
                appendonly=appendonly,
                appendfsync="everysec",
                extra_args=[
                    "--cluster-enabled", "yes",
                    "--cluster-config-file", str(data_dir / "nodes.conf"),
                    "--cluster-port", str(free_port()),  # bus port; port + 10000 may exceed 65535
                    "--cluster-node-timeout", "5000",
                ],
            ))

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def addresses(self) -> list[str]:
        return [f"127.0.0.1:{node.port}" for node in self.nodes]

    def start(self, timeout: float = 30.0) -> LocalCluster:
        assert REDIS_CLI is not None
        try:
            for node in self.nodes:
                node.start()
            subprocess.run(
                [REDIS_CLI, "--cluster", "create", *self.addresses(), "--cluster-replicas", "0",
                 "--cluster-yes"],
                check=True, capture_output=True, timeout=timeout,
            )
            self._wait_ok(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ok(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for node in self.nodes:
            client = node.client()
            try:
                while client.execute_command("CLUSTER INFO").get("cluster_state") != "ok":
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"cluster node {node.port} did not reach cluster_state:ok")
                    time.sleep(0.05)
            finally:
                client.close()

    def client(self) -> RedisCluster:
        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port)

    def plain_client(self, index: int = 0) -> redis.Redis:
        return self.nodes[index].client()

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def running_cluster(directory: Path) -> Iterator[LocalCluster]:
    """Body of a cluster fixture: a started LocalCluster in ``directory``, stopped afterwards (skips the test
    when the redis binaries are missing)."""
    if REDIS_SERVER is None or REDIS_CLI is None:
        pytest.skip("redis-server / redis-cli binaries not installed")
    cluster = LocalCluster(directory).start()
    yield cluster
    cluster.stop()
