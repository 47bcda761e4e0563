"""Random claim/prefetch/postpone/commit/expiry/rollback/reconnect sequences against a pure-Python model."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import fakeredis
import msgpack
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pr_loader.errors import PrLoaderError
from pr_loader.store import BatchStore, RowRef, RunConfig
from tests.store.model import Model

B, S, E, RETAIN = 3, 3, 2, 2
CONSUMERS = ("a", "b")
MOSTLY = st.integers(0, 5).map(bool)  # True 5 times in 6
RARELY = st.integers(0, 5).map(lambda n: n == 0)
HELD = st.one_of(st.none(), st.integers(0, 100))  # a step named as claimed ahead (None: none)


def payload(ref: str, tag: str = "") -> bytes:
    return f"{ref}{tag}".encode()


def store_dump(client: fakeredis.FakeRedis, store: BatchStore) -> dict[str, Any]:
    """The shard's whole state in the shape of Model.dump() (two round trips: KEYS, then one pipeline)."""
    keys = store.keys
    everything = sorted(k.decode()[len(keys.prefix):] for k in client.keys(keys.scan_pattern()))
    lists = ("batch", "arrivals", "rows", "journal", "claimed")
    names = [n for n in everything if n.partition(":")[0] in lists]
    refs = [n.partition(":")[2] for n in everything if n.startswith("payload:")]
    assert not [n for n in everything if n.startswith("stage:")]  # every staged upload was adopted or dropped
    pipe = client.pipeline(transaction=False)
    for name in names:
        pipe.lrange(keys.prefix + name, 0, -1)
    pipe.hgetall(keys.meta)
    pipe.hgetall(keys.steps)
    pipe.hgetall(keys.owners)
    pipe.zrange(keys.leases, 0, -1, withscores=True)
    pipe.zrange(keys.requeue, 0, -1)
    pipe.mget([keys.payload(r) for r in refs] or ["-"])
    pipe.lrange(keys.dead, 0, -1)
    pipe.hkeys(keys.materialised)
    *lists, meta, steps, owners, leases, requeue, payloads, dead, materialised = pipe.execute()
    max_target = meta.get(b"max_target")
    return {
        "lists": {name: [v.decode() for v in items] for name, items in zip(names, lists)},
        "steps": {int(k): v.decode() for k, v in steps.items()},
        "owners": {int(k): v.decode() for k, v in owners.items()},
        "leases": {int(k): v for k, v in leases},
        "requeue": sorted(int(v) for v in requeue),
        "payloads": dict(zip(refs, payloads)),
        "dead": [msgpack.unpackb(v)["ref"] for v in dead],
        "materialised": sorted(int(k) for k in materialised),
        "meta": (int(meta[b"next_step"]), int(meta[b"committed_upto"]), int(meta[b"gc_floor"]),
                 int(meta[b"seq"]), None if max_target is None else int(max_target), int(meta[b"payloads"])),
    }


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.server = fakeredis.FakeServer()
        self.client = fakeredis.FakeRedis(server=self.server)
        self.config = RunConfig("model", batch_size=B, steps_per_epoch=S, dataset_fingerprint="fp",
                                num_epochs=E, retain_steps=RETAIN)
        self.store = BatchStore.open(self.client, self.config)
        self.model = Model(B, S, E, RETAIN)
        self.now = 1000.0
        self.ops = 0
        self.replayable: list[tuple[int, Callable[[], Any]]] = []  # (step the op concerns, replay)
        for s in range(4):  # steps 4 and 5 are left to the materialise_step rule
            self.materialise(s)

    # -- helpers ----------------------------------------------------------------------------------

    def op(self) -> str:
        self.ops += 1
        return f"op{self.ops}"

    def both(self, on_store: Callable[[], Any], on_model: Callable[[], Any]) -> tuple[Any, Any]:
        """Run an operation on both; they must agree on success or on the exception class."""
        try:
            expected = on_model()
        except PrLoaderError as exc:
            event(f"refused: {type(exc).__name__}")
            with pytest.raises(type(exc)):
                on_store()
            return None, exc
        event(f"ok: {on_model.__qualname__.split('.')[1]}")
        return on_store(), expected

    def in_flight(self, idx: int) -> int | None:
        steps = sorted(s for s, v in self.model.steps.items() if v == "inflight")
        return steps[idx % len(steps)] if steps else None

    def materialise(self, s: int) -> None:
        rows = [(s * B + i, payload(f"{s // S}:{s * B + i}")) for i in range(B)]
        got, expected = self.both(lambda: self.store.materialise(s, rows),
                                  lambda: self.model.materialise(s, rows))
        assert got == expected

    # -- rules ------------------------------------------------------------------------------------

    @rule(step=st.integers(0, E * S - 1))
    def materialise_step(self, step: int) -> None:
        self.materialise(step)

    def held(self, idx: int | None) -> int | None:
        """A step named as claimed ahead: None, or one in flight (of any consumer, touched or not)."""
        return None if idx is None else self.in_flight(idx)

    @rule(consumer=st.sampled_from(CONSUMERS), lease=st.sampled_from([5.0, 50.0]), ahead=HELD)
    def claim(self, consumer: str, lease: float, ahead: int | None) -> None:
        op = self.op()
        held = self.held(ahead)
        got, expected = self.both(
            lambda: self.store.claim(consumer, lease, now=self.now, op_id=op, held=held),
            lambda: self.model.claim(consumer, lease, self.now, held),
        )
        if isinstance(expected, PrLoaderError):
            return
        if expected is None:
            assert got is None
            return
        assert got is not None and (got.step, [r.ref.encode() for r in got.rows]) == expected
        assert all(r.payload == self.model.payloads[r.ref.encode()] for r in got.rows)
        before = store_dump(self.client, self.store)
        again = self.store.claim(consumer, lease, now=self.now, op_id=op)
        assert again == got and store_dump(self.client, self.store) == before

    @rule(idx=st.integers(0, 100), count=st.integers(0, 4), reach=st.integers(1, 4), owner=MOSTLY,
          ahead=HELD)
    def prefetch(self, idx: int, count: int, reach: int, owner: bool, ahead: int | None) -> None:
        s = self.in_flight(idx)
        if s is None:
            return
        consumer = self.model.owners[s] if owner else "intruder"
        op = self.op()
        held = self.held(ahead)
        got, expected = self.both(
            lambda: self.store.prefetch(s, consumer, count, s + reach, now=self.now, op_id=op, held=held),
            lambda: self.model.prefetch(s, consumer, count, s + reach, self.now, held),
        )
        if isinstance(expected, PrLoaderError):
            return
        assert ([r.ref.encode() for r in got.rows], got.needs_materialise) == expected
        again = self.store.prefetch(s, consumer, count, s + reach, now=self.now, op_id=op)
        assert again == got

    @rule(idx=st.integers(0, 100), mask=st.integers(1, 255), dist=st.integers(1, 4), far=RARELY,
          stranger=RARELY, ahead=HELD)
    def postpone(self, idx: int, mask: int, dist: int, far: bool, stranger: bool, ahead: int | None) -> None:
        s = self.in_flight(idx)
        if s is None:
            return
        rows = self.model.rows[s]
        chosen = [r for i, r in enumerate(rows) if mask >> i & 1]
        if stranger:
            chosen.append("9:99:0:-")
        target = s + dist + (E * S if far else 0)
        moves = []
        for ref in chosen:
            new = RowRef.parse(ref).postponed(s).encode()
            moves.append((ref, new, payload(new, "~")))
        op = self.op()
        consumer = self.model.owners[s]
        held = self.held(ahead)
        got, expected = self.both(
            lambda: self.store.postpone(s, consumer, [(RowRef.parse(o), p) for o, _, p in moves], target,
                                        now=self.now, op_id=op, held=held),
            lambda: self.model.postpone(s, consumer, moves, target, self.now, held),
        )
        if not isinstance(expected, PrLoaderError):
            assert [r.encode() for r in got] == [n for _, n, _ in moves]
            self.replayable.append((s, lambda: self.store.postpone(
                s, consumer, [(RowRef.parse(o), p) for o, _, p in moves], target, now=self.now, op_id=op)))

    @rule(idx=st.integers(0, 100), owner=MOSTLY)
    def commit(self, idx: int, owner: bool) -> None:
        s = self.in_flight(idx)
        if s is None:
            return
        consumer = self.model.owners[s] if owner else "intruder"
        op = self.op()
        _, expected = self.both(lambda: self.store.commit(s, consumer, now=self.now, op_id=op),
                                lambda: self.model.commit(s, consumer, self.now))
        if not isinstance(expected, PrLoaderError):
            self.replayable.append((s, lambda: self.store.commit(s, consumer, now=self.now, op_id=op)))

    @rule(idx=st.integers(0, 100), lease=st.sampled_from([5.0, 50.0]))
    def renew(self, idx: int, lease: float) -> None:
        s = self.in_flight(idx)
        if s is not None:
            consumer = self.model.owners[s]
            got, expected = self.both(lambda: self.store.renew(s, consumer, lease, now=self.now),
                                      lambda: self.model.renew(s, consumer, lease, self.now))
            assert isinstance(expected, PrLoaderError) or got == expected

    @rule(idx=st.integers(0, 100), which=st.integers(0, 100))
    def dead_letter(self, idx: int, which: int) -> None:
        s = self.in_flight(idx)
        if s is None or not self.model.rows[s]:
            return
        ref = self.model.rows[s][which % len(self.model.rows[s])]
        op = self.op()
        _, expected = self.both(lambda: self.store.dead_letter(s, RowRef.parse(ref), "bad", op_id=op),
                                lambda: self.model.dead_letter(s, ref))
        if not isinstance(expected, PrLoaderError):
            self.replayable.append(
                (s, lambda: self.store.dead_letter(s, RowRef.parse(ref), "bad", op_id=op))
            )

    @rule(dt=st.sampled_from([1.0, 6.0, 60.0]), sweep=st.booleans())
    def tick(self, dt: float, sweep: bool) -> None:
        self.now += dt
        if sweep:
            assert self.store.expire_leases(now=self.now) == self.model.expire(self.now)

    @rule(back=st.integers(-1, RETAIN + 2))
    def rollback(self, back: int) -> None:
        k = self.model.committed_upto - back
        op = self.op()
        self.both(lambda: self.store.rollback(k, op_id=op), lambda: self.model.rollback(k))

    @rule()
    def reconnect(self) -> None:
        self.client = fakeredis.FakeRedis(server=self.server)
        self.client.script_flush()  # the next call of every script meets NOSCRIPT and reloads it
        self.store = BatchStore.open(self.client, self.config, create=False)

    @precondition(lambda self: bool(self.replayable))
    @rule(idx=st.integers(0, 100))
    def replay_old_op(self, idx: int) -> None:
        step, replay = self.replayable[idx % len(self.replayable)]
        if step < self.model.gc_floor:  # op results go with their step (docs/architecture.md): a replay
            return  # after collection is answered from the current state, like a new call
        before = store_dump(self.client, self.store)
        replay()
        assert store_dump(self.client, self.store) == before

    # -- checks -----------------------------------------------------------------------------------

    @invariant()
    def same_state(self) -> None:
        assert store_dump(self.client, self.store) == self.model.dump()

    @invariant()
    def every_row_is_somewhere_once(self) -> None:
        m = self.model
        places: Counter[str] = Counter()
        for table in (m.batch, m.arrivals):
            for items in table.values():
                places.update(RowRef.parse(r).key() for r in items)
        for s, items in m.rows.items():
            if m.steps.get(s) == "inflight":
                places.update(RowRef.parse(r).key() for r in items)
        for items in m.committed_rows.values():
            places.update(RowRef.parse(r).key() for r in items)
        places.update(RowRef.parse(r).key() for r in m.dead)
        assert set(places) <= {f"{s // S}:{s * B + i}" for s in range(E * S) for i in range(B)}
        assert all(n == 1 for n in places.values()), places.most_common(3)

    def teardown(self) -> None:
        """Finish the run: every row is committed exactly once or dead-lettered."""
        for s in range(E * S):
            self.materialise(s)
        self.now += 1000
        while (claimed := self.store.claim("z", 50, now=self.now)) is not None:
            expected = self.model.claim("z", 50, self.now)
            assert expected is not None and claimed.step == expected[0]
            self.store.commit(claimed.step, "z", now=self.now)
            self.model.commit(claimed.step, "z", self.now)
        done = Counter(RowRef.parse(r).key() for rows in self.model.committed_rows.values() for r in rows)
        done.update(RowRef.parse(r).key() for r in self.model.dead)
        assert done == Counter({f"{s // S}:{s * B + i}": 1 for s in range(E * S) for i in range(B)})


StoreMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("PR_LOADER_MODEL_EXAMPLES", "25")), stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestStoreModel = StoreMachine.TestCase
