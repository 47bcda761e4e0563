"""Fixtures of the store contract suite: every test runs on fakeredis and on a real redis-server."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fakeredis
import pytest
import redis

from pr_loader.store import BatchStore, RunConfig
from tests.servers import REDIS_SERVER, RedisServer

_run_ids = itertools.count()


@pytest.fixture(scope="session")
def shared_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One real redis-server (no AOF: the contract suite is not about durability) for the whole session."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path_factory.mktemp("store-redis"), appendonly=False).start()
    yield server
    server.stop()


@pytest.fixture(params=["tcp", "unix"])
def own_server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of the test's own (no AOF), reached over TCP or a unix socket: for tests that stop,
    configure or watch it."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    srv = RedisServer(tmp_path / "redis", unix_socket=request.param == "unix", appendonly=False).start()
    yield srv
    srv.stop()


@pytest.fixture(params=["fake", "real"])
def client(request: pytest.FixtureRequest) -> Iterator[redis.Redis]:
    """A redis client: in-process fakeredis (with Lua) or a real redis-server, flushed."""
    if request.param == "fake":
        conn: redis.Redis = fakeredis.FakeRedis()
    else:
        conn = request.getfixturevalue("shared_redis").client()
        conn.flushall()
    yield conn
    conn.close()


def make_config(**overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "run_id": f"run{next(_run_ids)}",
        "batch_size": 4,
        "steps_per_epoch": 3,
        "dataset_fingerprint": "fp",
        "num_epochs": 2,
        "retain_steps": 2,
    }
    settings.update(overrides)
    return RunConfig(**settings)


def fill(store: BatchStore, steps: range | list[int]) -> None:
    """Materialise the given steps with payloads b"p<epoch>:<index>" (index = step*B + i)."""
    cfg = store.config
    for s in steps:
        epoch = s // cfg.steps_per_epoch
        rows = [
            (s * cfg.batch_size + i, f"p{epoch}:{s * cfg.batch_size + i}".encode())
            for i in range(cfg.batch_size)
        ]
        store.materialise(s, rows)


@pytest.fixture
def new_store(client: redis.Redis) -> Callable[..., BatchStore]:
    """new_store(**config_overrides) -> an opened BatchStore on the parametrised client."""

    def make(**overrides: Any) -> BatchStore:
        return BatchStore.open(client, make_config(**overrides))

    return make


@pytest.fixture
def store(new_store: Callable[..., BatchStore]) -> BatchStore:
    """A run of 2 epochs x 3 steps x 4 rows, every regular step materialised."""
    st = new_store()
    fill(st, range(6))
    return st
