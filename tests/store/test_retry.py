"""Connection errors: retries re-send the same op id; exhausted retries name the address, not the secret."""

from __future__ import annotations

from typing import Any

import fakeredis
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pr_loader.errors import StoreUnavailable
from pr_loader.store import BatchStore
from tests.servers import free_port
from tests.store.conftest import fill, make_config


class FlakyRedis(fakeredis.FakeRedis):
    """Drops the reply of the next ``fail_after_apply`` script calls (the script ran, the client saw an
    error) and fails the next ``fail_before_apply`` ones before they are sent."""

    fail_after_apply = 0
    fail_before_apply = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA" and self.fail_before_apply:
            self.fail_before_apply -= 1
            raise redis.ConnectionError("connection reset before the request")
        result = super().execute_command(*args, **options)
        if args[0] == "EVALSHA" and self.fail_after_apply:
            self.fail_after_apply -= 1
            raise redis.TimeoutError("reply lost")
        return result


def test_lost_replies_are_retried_without_applying_twice() -> None:
    client = FlakyRedis()
    store = BatchStore.open(client, make_config(), retry_seconds=5)
    fill(store, range(3))
    client.fail_after_apply = 1
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None and claimed.step == 0 and len(claimed.rows) == 4
    client.fail_after_apply = 1
    got = store.prefetch(0, "c", 2, 2, now=0)
    assert len(got.rows) == 2 and len(store.read_rows(1)) == 2
    client.fail_after_apply = 2
    store.postpone(0, "c", [(claimed.rows[0].ref, b"x")], 2, now=0)
    assert [r.payload for r in store.read_rows(2)] == [b"x", b"p0:8", b"p0:9", b"p0:10", b"p0:11"]
    client.fail_before_apply = 1
    client.fail_after_apply = 1
    store.commit(0, "c", now=0)
    nxt = store.claim("c", 10, now=0)
    assert nxt is not None and nxt.step == 1


def test_unreachable_redis_raises_store_unavailable_without_secret() -> None:
    port = free_port()
    client = redis.Redis(host="127.0.0.1", port=port, password="s3cret-pw", socket_connect_timeout=0.2,
                         retry=Retry(NoBackoff(), 0))  # only BatchStore's own retries
    with pytest.raises(StoreUnavailable) as info:
        BatchStore.open(client, make_config(), retry_seconds=0.3)
    text = str(info.value) + repr(info.value.__cause__)
    assert f"127.0.0.1:{port}" in str(info.value) and "s3cret" not in text
    assert isinstance(info.value, ConnectionError)


def test_server_restart_mid_run_is_transparent(redis_server: Any) -> None:
    """A real server restarted from its AOF: scripts are reloaded (NOSCRIPT) and the run goes on."""
    client = redis_server.client()
    store = BatchStore.open(client, make_config(), retry_seconds=10)
    fill(store, range(3))
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    redis_server.restart()
    store.commit(0, "c", now=1)
    nxt = store.claim("c", 10, now=1)
    assert nxt is not None and nxt.step == 1


class StageLosingRedis(fakeredis.FakeRedis):
    """Deletes every staged upload before the next ``lose`` script calls (like a restart without fsync)."""

    lose = 0

    def execute_command(self, *args: Any, **options: Any) -> Any:
        if args[0] == "EVALSHA" and self.lose:
            self.lose -= 1
            stale = list(self.scan_iter(match="*:stage:*"))
            if stale:
                self.delete(*stale)
        return super().execute_command(*args, **options)


def test_lost_staged_payloads_are_uploaded_again() -> None:
    client = StageLosingRedis()
    store = BatchStore.open(client, make_config(), retry_seconds=5)
    client.lose = 1
    assert store.materialise(0, [(0, b"a"), (1, b"b")])
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None and [r.payload for r in claimed.rows] == [b"a", b"b"]
    client.lose = 1
    store.postpone(0, "c", [(claimed.rows[0].ref, b"a2")], 1, now=0)
    assert [r.payload for r in store.read_rows(1)] == [b"a2"]
    assert not list(client.scan_iter(match="*:stage:*"))
