"""Rollback, garbage collection and drain steps (fakeredis and real redis-server)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis

from pr_loader.errors import RollbackOutOfRange
from pr_loader.store import BatchStore, ClaimedStep
from tests.store.conftest import fill
from tests.store.helpers import dump, restrict

NewStore = Callable[..., BatchStore]


def run_step(store: BatchStore, consumer: str = "c") -> tuple[int, list[str]] | None:
    """Claim, prefetch and postpone by a fixed rule, commit; returns (step, committed refs)."""
    claimed = store.claim(consumer, 100, now=0)
    if claimed is None:
        return None
    s = claimed.step
    total = store.config.total_steps or 10**9
    if s % 2 == 0:
        store.prefetch(s, consumer, 2, min(s + 2, total - 1), now=0)
    rows = store.read_rows(s)
    moves = [(r.ref, r.payload + b"+") for r in rows[:: 3] if r.ref.version < 2]
    if moves:
        store.postpone(s, consumer, moves, s + 1 + s % 2, now=0)
    committed = [r.ref.encode() for r in store.read_rows(s)]
    store.commit(s, consumer, now=0)
    return s, committed


def test_rollback_to_every_retained_step_restores_that_state(
    new_store: NewStore, client: redis.Redis
) -> None:
    store = new_store(steps_per_epoch=5, num_epochs=2, retain_steps=4)
    fill(store, range(10))
    snapshots = {-1: dump(client, store)}
    trace = []
    while (done := run_step(store)) is not None:
        trace.append(done)
        snapshots[done[0]] = dump(client, store)
    last = trace[-1][0]
    assert last >= 10  # drain steps happened
    floor = store.stats().gc_floor
    with pytest.raises(RollbackOutOfRange, match="allowed"):
        store.rollback(floor - 2)
    with pytest.raises(RollbackOutOfRange):
        store.rollback(last + 1)
    for k in sorted((k for k in snapshots if k >= floor - 1), reverse=True):  # skipped drain steps have none
        store.rollback(k)
        assert restrict(dump(client, store), floor) == restrict(snapshots[k], floor), k
    # and the run continues exactly as it went the first time
    replay = []
    while (done := run_step(store)) is not None:
        replay.append(done)
    assert replay == [t for t in trace if t[0] > floor - 1]


def test_rollback_to_start_undoes_interleaved_in_flight_steps(store: BatchStore, client: redis.Redis) -> None:
    start = dump(client, store)
    a = store.claim("a", 100, now=0)
    b = store.claim("b", 100, now=0)
    assert a is not None and b is not None and (a.step, b.step) == (0, 1)
    store.prefetch(1, "b", 2, 3, now=0)   # takes the head of step 2
    store.prefetch(0, "a", 3, 3, now=0)   # then the rest of step 2 and the head of step 3
    store.postpone(0, "a", [(a.rows[0].ref, b"x")], 4, now=0)
    store.postpone(1, "b", [(b.rows[1].ref, b"y")], 4, now=0)
    store.dead_letter(1, b.rows[2].ref, "bad")
    store.commit(1, "b", now=0)
    c = store.claim("c", 100, now=0)
    assert c is not None and c.step == 2
    store.commit(0, "a", now=0)
    store.rollback(-1)
    after = dump(client, store)
    dead_ref = b.rows[2].ref.encode()
    expected = start["lists"]["batch:1"]
    assert after["lists"]["batch:1"] == [r for r in expected if r != dead_ref]
    start["lists"]["batch:1"] = after["lists"]["batch:1"]
    del start["payloads"][dead_ref]
    start["payload_keys"] -= 1
    start["dead"] = 1
    assert after == start


def test_rollback_keeps_in_flight_steps_at_or_below_target(store: BatchStore) -> None:
    store.claim("a", 100, now=0)
    store.claim("b", 100, now=0)
    store.commit(1, "b", now=0)
    store.claim("b", 100, now=0)
    store.rollback(1)
    stats = store.stats()
    assert [lease.step for lease in stats.in_flight] == [0] and stats.next_step == 2
    store.commit(0, "a", now=0)
    nxt = store.claim("b", 100, now=0)
    assert isinstance(nxt, ClaimedStep) and nxt.step == 2 and len(nxt.rows) == 4


def test_gc_keeps_memory_bounded(new_store: NewStore, client: redis.Redis) -> None:
    retain, batch = 2, 4
    store = new_store(num_epochs=None, steps_per_epoch=5, retain_steps=retain, batch_size=batch)
    fill(store, range(3))
    sizes = []
    for s in range(40):
        fill(store, [s + 2, s + 3])
        done = run_step(store)
        assert done is not None and done[0] == s
        names = list(client.scan_iter(match=store.keys.scan_pattern()))
        payload_keys = sum(1 for k in names if b":payload:" in k)
        assert payload_keys == store.stats().payloads
        sizes.append((payload_keys, len(names)))  # op results included: they go with their step
    # retained steps (rows, prefetched rows, superseded versions) + 3 upcoming batches + pending arrivals
    assert max(p for p, _ in sizes) <= (retain + 1) * (batch + 4) + 3 * batch + batch
    # and nothing grows with the run's length
    assert max(sizes[20:]) <= max(sizes[5:20])
    stats = store.stats()
    assert stats.gc_floor == stats.committed_upto - retain
    assert client.hlen(store.keys.steps) <= retain + 2
    with pytest.raises(RollbackOutOfRange):
        store.rollback(stats.gc_floor - 2)
    store.rollback(stats.gc_floor - 1)


def test_drain_steps_deliver_every_postponed_row_exactly_once(new_store: NewStore) -> None:
    store = new_store(num_epochs=1, steps_per_epoch=3, batch_size=4)
    fill(store, range(3))
    delivered: dict[str, int] = {}
    steps = []
    while (claimed := store.claim("c", 100, now=0)) is not None:
        s = claimed.step
        steps.append(s)
        # postpone every row of version < 3: the last ones go far into the drain region
        moves = [(r.ref, r.payload) for r in claimed.rows if r.ref.version < 3]
        if moves:
            store.postpone(s, "c", moves, s + 1 if s < 4 else 9, now=0)
        for r in store.read_rows(s):
            delivered[r.ref.key()] = delivered.get(r.ref.key(), 0) + 1
        store.commit(s, "c", now=0)
    assert delivered == {f"0:{i}": 1 for i in range(12)}
    assert steps[:5] == [0, 1, 2, 3, 4] and steps[-1] == 9
    assert store.claim("c", 100, now=0) is None
