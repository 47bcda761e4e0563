"""The run-scoped ACL recipe (docs/acl.md): a user reaches its run's shards and nothing else."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from pr_loader.errors import ConfigError, StoreAuthError
from pr_loader.store.connection import acl_rules, connect, create_run_user
from tests.servers import REDIS_SERVER, RedisServer

PASSWORD = "run-user-pw"


@pytest.fixture
def admin(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis_server.client()
    create_run_user(client, "r1user", PASSWORD, "r1", ranks=range(2))
    yield client
    client.close()


@pytest.fixture
def user(redis_server: RedisServer, admin: redis.Redis) -> Iterator[redis.Redis]:
    client = connect(f"redis://r1user:{PASSWORD}@127.0.0.1:{redis_server.port}/0", retry_seconds=0)
    assert isinstance(client, redis.Redis)
    yield client
    client.close()


def test_rules_are_exact_per_shard() -> None:
    rules = acl_rules("r*1", ranks=[1, 0, 1])
    assert [r for r in rules if r.startswith("~")] == ["~prl:{r\\*1:0}:*", "~prl:{r\\*1:1}:*"]
    with pytest.raises(ConfigError):
        acl_rules("", ranks=[0])
    with pytest.raises(ConfigError):
        acl_rules("r", ranks=[])


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_user_works_on_its_run(user: redis.Redis) -> None:
    meta, batch = "prl:{r1:0}:meta", "prl:{r1:1}:batch:0"
    user.hset(meta, mapping={"a": "1", "b": "2"})
    assert user.hmget(meta, ["a", "b"]) == [b"1", b"2"]
    user.rpush(batch, "x", "y", "z")
    assert user.lpop(batch, 2) == [b"x", b"y"] and user.lrange(batch, 0, -1) == [b"z"]
    sha = user.script_load(
        "redis.call('HSET', KEYS[1], 'c', ARGV[1]); return redis.call('HGET', KEYS[1], 'c')"
    )
    assert user.evalsha(sha, 1, meta, "3") == b"3"
    # a key name built inside Lua is checked too, and allowed when it is the user's own
    own = "return redis.call('HGET', ARGV[1], 'a')"
    assert user.eval(own, 1, meta, meta) == b"1"
    assert user.info("server")["redis_version"]
    user.delete(meta, batch)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_user_is_denied_elsewhere(user: redis.Redis, admin: redis.Redis) -> None:
    admin.hset("prl:{r2:0}:meta", "secret", "x")
    foreign = ["prl:{r2:0}:meta", "prl:{r1:2}:meta", "prl:{r1:0:1}:meta", "other"]
    for key in foreign:
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.hget(key, "secret")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.hset(key, "secret", "overwritten")
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.eval("return redis.call('HGET', KEYS[1], 'secret')", 1, key)
        # declaring an own key but touching a foreign one from Lua fails inside the script
        with pytest.raises(redis.exceptions.ResponseError, match="can't access"):
            user.eval("return redis.call('HSET', ARGV[1], 'secret', 'lua')", 1, "prl:{r1:0}:meta", key)
    assert admin.hget("prl:{r2:0}:meta", "secret") == b"x"
    for command in (["FLUSHALL"], ["KEYS", "*"], ["CONFIG", "GET", "save"], ["SCRIPT", "FLUSH"],
                    ["FUNCTION", "FLUSH"], ["RANDOMKEY"], ["ACL", "LIST"], ["PUBLISH", "c", "m"]):
        with pytest.raises(redis.exceptions.NoPermissionError):
            user.execute_command(*command)


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_batch_store_scripts_run_under_the_recipe(user: redis.Redis, admin: redis.Redis) -> None:
    """The store's real Lua scripts touch only their shard's keys, so the restricted user can run a step."""
    from pr_loader.store import BatchStore, RunConfig

    config = RunConfig(run_id="r1", batch_size=2, steps_per_epoch=2, dataset_fingerprint="fp", world_size=2)
    store = BatchStore.open(user, config)
    assert store.materialise(0, [(0, b"a"), (1, b"b")])
    claimed = store.claim("c0", 60.0, now=100.0)
    assert claimed is not None and [row.payload for row in claimed.rows] == [b"a", b"b"]
    # the recipe denies SORT (and Redis would deny its GET patterns to a user confined to some keys):
    # the claim fell back to MGET, and left no xfer list behind
    assert admin.keys("prl:{r1:0}:xfer:*") == []
    store.commit(claimed.step, "c0", now=101.0)
    assert store.stats() is not None
    assert store.delete_run() > 0
    other = RunConfig(run_id="r2", batch_size=2, steps_per_epoch=2, dataset_fingerprint="fp")
    # the store may map the denial to StoreAuthError; either way it must be refused
    with pytest.raises((redis.exceptions.NoPermissionError, StoreAuthError)):
        BatchStore.open(user, other, retry_seconds=0)
    assert admin.keys("prl:{r2:*") == []  # nothing was written for the foreign run


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_user_without_info_gets_a_clear_error(redis_server: RedisServer, admin: redis.Redis) -> None:
    admin.execute_command("ACL", "SETUSER", "noinfo", "reset", "on", f">{PASSWORD}", "~*", "+@all", "-info")
    started = time.monotonic()
    with pytest.raises(StoreAuthError, match=r"INFO.*docs/acl\.md"):
        connect(f"redis://noinfo:{PASSWORD}@127.0.0.1:{redis_server.port}/0", retry_seconds=10)
    assert time.monotonic() - started < 2.0  # refused, not retried


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_sort_allowed_but_its_get_denied_falls_back_to_mget(
    redis_server: RedisServer, admin: redis.Redis
) -> None:
    """A user granted SORT but confined to its keys: Redis refuses the GET pattern when the transaction
    runs (after the claim script ran), so the claim reads its payloads with MGET, now and from then on."""
    from pr_loader.store import BatchStore, RunConfig

    rules = [*acl_rules("r3"), "+sort"]
    admin.execute_command("ACL", "SETUSER", "sorter", "reset", "on", f">{PASSWORD}", *rules)
    client = connect(f"redis://sorter:{PASSWORD}@127.0.0.1:{redis_server.port}/0", retry_seconds=0)
    assert isinstance(client, redis.Redis)
    try:
        store = BatchStore.open(client, RunConfig(run_id="r3", batch_size=2, steps_per_epoch=2,
                                                  dataset_fingerprint="fp"))  # fmt: skip
        assert store.materialise(0, [(0, b"a"), (1, b"b")]) and store.materialise(1, [(2, b"c"), (3, b"d")])
        first = store.claim("c0", 60.0, now=100.0)
        assert first is not None and [row.payload for row in first.rows] == [b"a", b"b"]
        assert store._payload_pattern is None  # (MGET from now on)
        second = store.claim("c0", 60.0, now=100.0)
        assert second is not None and [row.payload for row in second.rows] == [b"c", b"d"]
        assert admin.keys("prl:{r3:0}:xfer:*") == []
    finally:
        client.close()
