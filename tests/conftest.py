from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import REDIS_SERVER, RedisServer


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (AOF, appendfsync always) on a free port; killed at teardown."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()
