"""Crashes on a real redis-server: a consumer SIGKILLed mid-step, and redis-server itself killed -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter

import pytest

from pr_loader.store import BatchStore, RowRef
from tests.servers import RedisServer
from tests.store.conftest import fill, make_config
from tests.store.helpers import dump

pytestmark = pytest.mark.redis

CONSUMER = """
import sys, time, redis
from pr_loader.store import BatchStore, RunConfig
cfg = RunConfig(**eval(sys.argv[2]))
store = BatchStore.open(redis.Redis.from_url(sys.argv[1]), cfg, create=False)
claimed = store.claim("doomed", 10, now=0)
store.prefetch(claimed.step, "doomed", 2, claimed.step + 1, now=1)
store.postpone(claimed.step, "doomed", [(claimed.rows[0].ref, b"partial")], claimed.step + 2, now=2)
print("mid-step", flush=True)
time.sleep(60)
"""


def test_consumer_killed_mid_step_loses_nothing(redis_server: RedisServer) -> None:
    client = redis_server.client()
    cfg = make_config()
    store = BatchStore.open(client, cfg)
    fill(store, range(6))
    before = dump(client, store)
    settings = {f: getattr(cfg, f) for f in cfg.__dataclass_fields__}
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", CONSUMER, redis_server.url, repr(settings)],
                            stdout=subprocess.PIPE, env=env)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"mid-step\n"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    assert [lease.owner for lease in store.stats().in_flight] == ["doomed"]
    assert store.read_rows(2)[0].ref == RowRef(0, 0, 1, 0)  # the postpone was applied
    claimed = store.claim("survivor", 10, now=11)  # the lease ran out at 10
    assert claimed is not None and claimed.step == 0
    assert [r.payload for r in claimed.rows] == [f"p0:{i}".encode() for i in range(4)]
    store.expire_leases(now=100)
    assert dump(client, store)["lists"] == before["lists"]


def test_redis_killed_mid_run_keeps_every_acknowledged_commit(
    redis_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """kill -9 of redis-server (appendfsync always) while a consumer works; restart from the AOF."""
    client = redis_server.client()
    store = BatchStore.open(client, make_config(batch_size=8, steps_per_epoch=10, retain_steps=3),
                            retry_seconds=20)
    fill(store, range(20))
    acknowledged: list[tuple[int, list[str]]] = []
    kills = 0

    def killer() -> None:
        nonlocal kills
        for delay in (0.05, 0.15, 0.1):
            time.sleep(delay)
            redis_server.kill()
            kills += 1
            time.sleep(0.05)
            redis_server.start()

    thread = threading.Thread(target=killer)
    thread.start()
    try:
        while (claimed := store.claim("c", 100, now=0)) is not None:
            s = claimed.step
            if s % 2 == 0:
                store.prefetch(s, "c", 3, min(s + 2, 19), now=0)
            rows = store.read_rows(s)
            if s < 25:
                store.postpone(s, "c", [(r.ref, r.payload + b"+") for r in rows[:2]], s + 1, now=0)
            committed = [r.ref.encode() for r in store.read_rows(s)]
            store.commit(s, "c", now=0)
            acknowledged.append((s, committed))
            time.sleep(0.005)
            if kills < 3 and s > 15:
                thread.join()
    finally:
        thread.join()
    assert kills == 3 and "retrying" in caplog.text  # the consumer did meet the crashes
    # no acknowledged commit was lost (a lost one would be claimed and committed again)...
    assert len({s for s, _ in acknowledged}) == len(acknowledged)
    assert int(client.hget(store.keys.meta, "committed_upto")) == max(s for s, _ in acknowledged)
    # ...and every row was committed exactly once
    delivered = Counter(RowRef.parse(r).key() for _, refs in acknowledged for r in refs)
    assert delivered == Counter({f"{i // 80}:{i}": 1 for i in range(160)})
