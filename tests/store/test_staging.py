"""Staged payload writes (one MULTI round trip on a plain server) and commit replays after collection."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from pr_loader.store import BatchStore
from tests.store.conftest import fill


def _stage_keys(client: redis.Redis, store: BatchStore) -> list[bytes]:
    return list(client.scan_iter(match=store.keys.prefix.replace("{", "\\{").replace("}", "\\}") + "stage:*"))


def test_staged_writes_survive_a_flushed_script_cache(
    client: redis.Redis, new_store: Callable[..., BatchStore]
) -> None:
    store = new_store()
    client.script_flush()  # the transaction's EVALSHA meets NOSCRIPT: the script is loaded and adopts them
    fill(store, range(2))
    claimed = store.claim("c", 60)
    assert claimed is not None
    row = claimed.rows[0]
    client.script_flush()
    (new,) = store.postpone(claimed.step, "c", [(row.ref, b"partial")], claimed.step + 1)
    assert _stage_keys(client, store) == []
    assert client.get(store.keys.payload(new.encode())) == b"partial"
    assert client.ttl(store.keys.payload(new.encode())) == -1  # (the stage's TTL was dropped on adoption)
    assert store.stats().payloads == 2 * store.config.batch_size + 1  # the old version stays until GC


def test_a_crash_right_after_noscript_leaves_only_expiring_stages(
    client: redis.Redis, new_store: Callable[..., BatchStore], monkeypatch: pytest.MonkeyPatch
) -> None:
    store = new_store()
    fill(store, range(2))
    claimed = store.claim("c", 60)
    assert claimed is not None
    real = store._scripts["POSTPONE"]

    class DiesBeforeRunning:  # the process is killed before the reloaded script adopts the stages
        sha, script = real.sha, real.script

        def __call__(self, **_: object) -> object:
            raise KeyboardInterrupt

    monkeypatch.setitem(store._scripts, "POSTPONE", DiesBeforeRunning())
    client.script_flush()
    rows = [(row.ref, b"partial") for row in claimed.rows[:2]]
    with pytest.raises(KeyboardInterrupt):
        store.postpone(claimed.step, "c", rows, claimed.step + 1)
    stages = _stage_keys(client, store)
    assert len(stages) == 2 and all(0 < client.ttl(key) <= 3600 for key in stages)


def test_refused_staged_writes_leave_nothing(
    client: redis.Redis, new_store: Callable[..., BatchStore]
) -> None:
    store = new_store()
    fill(store, [0])
    assert not store.materialise(0, [(0, b"again")])  # already materialised: the upload is dropped
    assert _stage_keys(client, store) == []
    assert client.get(store.keys.payload("0:0:0:-")) == b"p0:0"


def test_commit_replay_after_its_step_was_collected(new_store: Callable[..., BatchStore]) -> None:
    store = new_store(retain_steps=1)
    fill(store, range(6))
    for s in range(4):
        store.claim("c", 60)
        store.commit(s, "c", op_id=f"commit-{s}")
    assert store.stats().gc_floor == 2  # steps 0 and 1 are collected
    store.commit(0, "c", op_id="commit-0")  # a retry of a commit that was applied: still fine
    store.commit(1, "c", op_id="commit-1")
