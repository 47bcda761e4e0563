from __future__ import annotations

import pickle
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

import fakeredis
import numpy as np
import pytest
import torch

from pr_loader import codec
from pr_loader import linked as linked_module
from pr_loader.errors import (
    CodecError,
    ConfigError,
    DataProtoError,
    LeaseLost,
    NeedsMaterialisation,
    PolicyError,
    RowsNotInStep,
    StepStateError,
)
from pr_loader.linked import LinkedDataProto, StepSession
from pr_loader.policy import FixedBatch, Policy, PostponeToEpochEnd, PostponeToNext, RunLayout
from pr_loader.protocol import DataProto
from pr_loader.rows import RESERVED_FIELDS, dataproto_row, rows_to_dataproto
from pr_loader.store import BatchStore, RunConfig
from tests.servers import RedisServer

B, S, E = 4, 3, 2  # batch size, steps per epoch, epochs: regular steps 0..5, drain steps from 6


def sample(i: int) -> dict[str, Any]:
    return {"input_ids": torch.arange(i, i + 3), "prompt": f"p{i}", "extra": {"i": i}}


def plan(step: int) -> list[int]:
    """Dataset indices of regular step ``step`` (unshuffled)."""
    b = step % S
    return list(range(b * B, (b + 1) * B))


class Harness:
    """A store on ``client`` with a materialise callback and a claim helper (what the loader does)."""

    def __init__(
        self, client: Any, policy: Policy, *, num_epochs: int | None = E, corrupt: int | None = None
    ):
        self.policy = policy
        self.corrupt = corrupt
        config = RunConfig(
            run_id="t",
            batch_size=B,
            steps_per_epoch=S,
            dataset_fingerprint="fp",
            policy=policy.name,
            num_epochs=num_epochs,
        )
        self.store = BatchStore.open(client, config)
        self.materialised: list[int] = []

    def materialise(self, step: int) -> None:
        self.materialised.append(step)
        rows = [(i, b"garbage" if i == self.corrupt else codec.encode(sample(i))) for i in plan(step)]
        self.store.materialise(step, rows)

    def session(self, step: int, consumer: str = "c1", **kwargs: Any) -> StepSession:
        return StepSession(self.store, step, consumer, self.policy, materialise=self.materialise, **kwargs)

    def claim(self, consumer: str = "c1", **kwargs: Any) -> LinkedDataProto | None:
        while True:
            try:
                claimed = self.store.claim(consumer, 60.0)
            except NeedsMaterialisation as exc:
                self.materialise(exc.step)
                continue
            if claimed is None:
                return None
            return LinkedDataProto.from_claim(claimed, self.session(claimed.step, consumer, **kwargs))


@pytest.fixture
def client() -> Iterator[Any]:
    server = fakeredis.FakeServer()
    yield fakeredis.FakeRedis(server=server)


def claim(h: Harness) -> LinkedDataProto:
    view = h.claim()
    assert view is not None
    return view


def ids(view: DataProto) -> list[str]:
    return [str(x) for x in view.non_tensor_batch["prl_sample_id"]]


def key(i: int, epoch: int = 0) -> str:
    return f"{epoch}:{i}"


def with_partial(view: LinkedDataProto, positions: list[int], lengths: list[int]) -> DataProto:
    """Rows of ``view`` at ``positions`` with a ragged partial response added (what the scheduler sends)."""
    rows = []
    for pos, n in zip(positions, lengths):
        row = dataproto_row(view, pos)
        row["prl_partial_tokens"] = torch.arange(n, dtype=torch.int64)
        row["prl_partial_logprobs"] = torch.full((n,), -0.5, dtype=torch.float32)
        rows.append(row)
    return rows_to_dataproto(DataProto, rows)


def test_view_of_claimed_step_has_reserved_fields(client: Any) -> None:
    h = Harness(client, FixedBatch())
    view = claim(h)
    assert type(view) is LinkedDataProto
    assert (view.step, view.epoch, view.target_size, view.policy) == (0, 0, B, FixedBatch())
    assert view.sample_ids() == [key(i) for i in range(B)]
    assert list(view.non_tensor_batch["prl_index"]) == list(range(B))
    assert list(view.non_tensor_batch["prl_epoch"]) == [0] * B
    assert list(view.non_tensor_batch["prl_times_postponed"]) == [0] * B
    assert list(view.non_tensor_batch["prl_first_step"]) == [0] * B
    assert view.session is not None and view.session.step == 0


def test_fixed_batch_is_plain_dataloader(client: Any) -> None:
    h = Harness(client, FixedBatch())
    for step in range(S * E):
        view = claim(h)
        assert view.step == step
        expected = rows_to_dataproto(DataProto, [sample(i) for i in plan(step)])
        assert view.batch is not None and expected.batch is not None
        assert torch.equal(view.batch["input_ids"], expected.batch["input_ids"])
        for name, column in expected.non_tensor_batch.items():
            assert list(view.non_tensor_batch[name]) == list(column)
        before = ids(view)
        empty = view.prefetch_samples(3)
        assert len(empty) == 0 and type(empty) is LinkedDataProto
        assert view.postpone_samples(view.select_idxs([0, 1])) is False
        assert ids(view) == before
        assert not view.should_stop_gen()
        view.mark_finished(before[:-1])
        assert not view.should_stop_gen()
        view.mark_finished(before[-1:])
        assert view.should_stop_gen()
        view.commit()
    assert h.claim() is None


def test_postpone_to_next_rows_arrive_first_with_partial_fields(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    samples = with_partial(view, [2, 0], [5, 2])  # postpone order: row 2, then row 0
    assert view.postpone_samples(samples) is True
    assert ids(view) == [key(1), key(3)]  # self shrank in place
    assert view.batch is not None and view.batch["input_ids"].shape == (2, 3)
    view.commit()

    nxt = claim(h)
    assert nxt.step == 1
    assert nxt.sample_ids() == [key(2), key(0)] + [key(i) for i in plan(1)]
    assert list(nxt.non_tensor_batch["prl_times_postponed"]) == [1, 1, 0, 0, 0, 0]
    assert list(nxt.non_tensor_batch["prl_first_step"]) == [0, 0, 1, 1, 1, 1]
    partial = nxt.non_tensor_batch["prl_partial_tokens"]  # ragged + missing in fresh rows -> objects
    assert torch.equal(partial[0], torch.arange(5)) and torch.equal(partial[1], torch.arange(2))
    assert list(partial[2:]) == [None] * 4
    assert nxt.non_tensor_batch["prl_partial_logprobs"][0].dtype == torch.float32
    assert nxt.batch is not None
    assert torch.equal(nxt.batch["input_ids"][0], torch.arange(2, 5))  # original fields intact
    assert nxt.non_tensor_batch["extra"][1] == {"i": 0}


def test_prefetch_takes_head_of_nearest_later_batch(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    assert h.materialised == [0]
    got = view.prefetch_samples(2)
    assert h.materialised == [0, 1]  # source step materialised through the callback
    assert type(got) is LinkedDataProto and got.session is None
    assert ids(got) == [key(4), key(5)]
    assert list(got.non_tensor_batch["prl_first_step"]) == [0, 0]
    assert ids(view) == [key(i) for i in range(4)] + [key(4), key(5)]  # self grew in place
    assert view.batch is not None and view.batch["input_ids"].shape == (6, 3)
    # step 1 has 2 rows left: take them, then continue at step 2 (the nearest batch that still has rows)
    got = view.prefetch_samples(3)
    assert ids(got) == [key(6), key(7), key(8)]
    assert h.materialised == [0, 1, 2]
    view.commit()

    nxt = claim(h)
    assert nxt.step == 1 and len(nxt) == 0  # delivered without the prefetched rows
    nxt.commit()
    nxt = claim(h)
    assert nxt.step == 2 and nxt.sample_ids() == [key(9), key(10), key(11)]


def test_policy_decides_prefetch_count(client: Any) -> None:
    class Capped(PostponeToNext):
        name = "CappedForTest"

        def prefetch_count(self, view: Any, requested: int) -> int:
            return min(requested, 1)

    h = Harness(client, Capped())
    view = claim(h)
    assert ids(view.prefetch_samples(5)) == [key(4)]
    assert len(view) == B + 1


def test_prefetch_stops_at_epoch_end(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    for _ in range(S - 1):
        claim(h).commit()
    end = claim(h)
    assert end.step == S - 1
    assert len(end.prefetch_samples(4)) == 0  # last step of the epoch: nothing to take
    assert S not in h.materialised  # the next epoch was not touched
    assert len(end) == B


def test_prefetched_corrupt_row_is_dead_lettered(client: Any) -> None:
    h = Harness(client, PostponeToNext(), corrupt=5)
    view = claim(h)
    got = view.prefetch_samples(3)
    assert ids(got) == [key(4), key(6)]
    assert ids(view)[B:] == [key(4), key(6)]
    assert [r.ref.key() for r in h.store.read_rows(0)][B:] == [key(4), key(6)]
    dead = h.store.dead_letters()
    assert [(d.ref.key(), d.step) for d in dead] == [(key(5), 0)]
    assert "undecodable" in dead[0].reason


def test_payload_that_is_not_a_dict_is_dead_lettered(client: Any) -> None:
    h = Harness(client, FixedBatch())
    h.store.materialise(0, [(0, codec.encode([1, 2])), (1, codec.encode(sample(1)))])
    view = claim(h)
    assert view.sample_ids() == [key(1)]
    assert "not a dict" in h.store.dead_letters()[0].reason


def test_unencodable_partial_field_changes_nothing(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    bad = view.select_idxs([0])
    bad.non_tensor_batch["weird"] = np.array([object()], dtype=object)
    with pytest.raises(CodecError, match="row 0:0"):
        view.postpone_samples(bad)
    assert ids(view) == [key(i) for i in range(B)]
    assert [r.ref.key() for r in h.store.read_rows(0)] == [key(i) for i in range(B)]


def test_lost_lease_changes_nothing(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    h.materialise(0)
    claimed = h.store.claim("c1", 10.0, now=100.0)
    assert claimed is not None
    clock = [105.0]
    view = LinkedDataProto.from_claim(claimed, h.session(0, clock=lambda: clock[0], lease_seconds=10.0))
    assert view.session is not None and view.session.lease_expiry == 110.0
    assert view.session.renew() == 115.0
    clock[0] = 200.0
    with pytest.raises(LeaseLost):
        view.postpone_samples(view.select_idxs([0]))
    with pytest.raises(LeaseLost):
        view.prefetch_samples(1)
    assert ids(view) == [key(i) for i in range(B)]


def test_postpone_target_claimed_by_another_consumer(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    other = h.claim("c2")
    assert other is not None and other.step == 1
    assert view.postpone_samples(view.select_idxs([0])) is True  # step 1 is taken: first unclaimed step
    assert [r.ref.key() for r in h.store.read_rows(2)] == [key(0)]
    assert [r.ref.key() for r in h.store.read_rows(1)] == [key(i) for i in plan(1)]
    view.commit()
    other.commit()
    nxt = claim(h)
    assert nxt.step == 2 and nxt.sample_ids()[0] == key(0)


def test_postpone_after_commit_is_refused(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    view.commit()
    with pytest.raises(StepStateError, match="not in flight"):
        view.postpone_samples(view.select_idxs([0]))
    assert len(view) == B


def test_prefetched_then_postponed_row(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    got = view.prefetch_samples(1)
    assert view.postpone_samples(got) is True
    assert ids(view) == [key(i) for i in range(4)]
    view.commit()
    nxt = claim(h)
    assert nxt.sample_ids() == [key(4)] + [key(i) for i in range(5, 8)]
    assert list(nxt.non_tensor_batch["prl_first_step"])[:2] == [0, 1]


def test_counters_increment_over_repeated_postpones(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    for step in range(3):
        view = claim(h)
        assert view.step == step
        row = view.select_idxs([view.sample_ids().index(key(0))])
        assert view.postpone_samples(row) is True
        view.commit()
    view = claim(h)
    assert view.sample_ids()[0] == key(0)
    assert view.non_tensor_batch["prl_times_postponed"][0] == 3
    assert view.non_tensor_batch["prl_first_step"][0] == 0


def test_max_postpones_bound_refuses_and_changes_nothing(client: Any) -> None:
    h = Harness(client, PostponeToNext(max_postpones=1))
    view = claim(h)
    assert view.postpone_samples(view.select_idxs([0])) is True
    view.commit()
    view = claim(h)
    assert view.must_finish_ids() == [key(0)]
    before = ids(view)
    stored_before = [r.ref.encode() for r in h.store.read_rows(2)]
    with pytest.raises(PolicyError, match=r"\['0:0'\].*max_postpones=1"):
        view.postpone_samples(view.select_idxs([0, 1]))
    assert ids(view) == before
    assert [r.ref.encode() for r in h.store.read_rows(2)] == stored_before
    assert view.postpone_samples(view.select_idxs([1])) is True  # the others may go
    view.mark_finished([key(i) for i in plan(1)[1:]])
    assert view.num_finished == B - 1
    assert not view.should_stop_gen()  # 0:0 must be finished first
    view.mark_finished(key(0))
    assert view.should_stop_gen()
    assert view.finished_ids() == [key(0)] + [key(i) for i in plan(1)[1:]]
    assert view.must_finish_ids() == []


def test_wrong_rows_raise_and_change_nothing(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    view.postpone_samples(view.select_idxs([0]))
    before = ids(view)
    stored = [[r.ref.encode() for r in h.store.read_rows(s)] for s in (0, 1)]
    stray = rows_to_dataproto(DataProto, [{"prl_sample_id": "0:99"}, {"prl_sample_id": key(1)}])
    with pytest.raises(RowsNotInStep, match=r"'0:99'"):
        view.postpone_samples(stray)
    again = rows_to_dataproto(DataProto, [{"prl_sample_id": key(0)}])
    with pytest.raises(RowsNotInStep, match="already postponed"):
        view.postpone_samples(again)
    with pytest.raises(DataProtoError, match="more than once"):
        view.postpone_samples(view.select_idxs([0, 0]))
    with pytest.raises(DataProtoError, match="lack"):
        view.postpone_samples(view.select(non_tensor_batch_keys=["prompt"]))
    with pytest.raises(DataProtoError, match="needs a DataProto"):
        view.postpone_samples([key(1)])  # type: ignore[arg-type]
    with pytest.raises(RowsNotInStep):
        view.mark_finished(["0:99"])
    assert view.num_finished == 0
    assert ids(view) == before
    assert [[r.ref.encode() for r in h.store.read_rows(s)] for s in (0, 1)] == stored
    assert view.postpone_samples(rows_to_dataproto(DataProto, [])) is True
    with pytest.raises(ConfigError):
        view.prefetch_samples(-1)


def test_subclass_type_survives_ops(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    derived = [
        view.select(batch_keys=["input_ids"], non_tensor_batch_keys=["prl_sample_id"]),
        view.select_idxs([1, 2]),
        view[1:3],
        view.slice(0, 2),
        view.chunk(2)[1],
        DataProto.concat([view, view]),
        view.repeat(2),
    ]
    for d in derived:
        assert type(d) is LinkedDataProto
        assert d.step == 0 and d.target_size == B and d.policy == view.policy
        assert d.session is None
    with pytest.raises(StepStateError, match="not bound"):
        derived[1].postpone_samples(derived[1])
    with pytest.raises(StepStateError, match="not bound"):
        derived[1].prefetch_samples(1)
    with pytest.raises(StepStateError, match="not bound"):
        derived[1].commit()
    # a derived selection is a valid argument of postpone_samples on the bound view
    assert view.postpone_samples(derived[1]) is True
    assert ids(view) == [key(0), key(3)]
    restored = pickle.loads(pickle.dumps(view))
    assert type(restored) is LinkedDataProto and restored.session is None
    assert restored.sample_ids() == view.sample_ids()


def test_dead_lettered_payload_is_skipped(client: Any) -> None:
    h = Harness(client, PostponeToNext(), corrupt=2)
    view = claim(h)
    assert view.sample_ids() == [key(0), key(1), key(3)]
    assert [r.ref.key() for r in h.store.read_rows(0)] == [key(0), key(1), key(3)]
    assert h.store.stats().dead_letters == 1
    view.commit()


def test_postpone_to_epoch_end_and_drain_steps(client: Any) -> None:
    h = Harness(client, PostponeToEpochEnd())
    view = claim(h)
    view.postpone_samples(view.select_idxs([3]))
    view.commit()
    claim(h).commit()
    last = claim(h)
    assert last.step == 2 and last.sample_ids()[0] == key(3)
    last.postpone_samples(last.select_idxs([0]))  # from the last step: to epoch 1's first step
    last.commit()
    first = claim(h)
    assert first.step == 3 and first.sample_ids()[:2] == [key(3), key(0, epoch=1)]
    first.commit()
    for step in (4, 5):
        view = claim(h)
        assert view.step == step
        if step == 5:
            view.postpone_samples(view.select_idxs([0, 1]))  # final step: into drain step 6
        view.commit()
    drain = claim(h)
    assert drain.step == 6 and drain.epoch == 2
    assert drain.sample_ids() == [key(8, epoch=1), key(9, epoch=1)]
    assert drain.prefetch_samples(3).batch is None
    drain.mark_finished(drain.sample_ids()[:1])
    assert not drain.should_stop_gen()  # fewer rows than target: every row must finish
    drain.postpone_samples(drain.select_idxs([1]))  # drain -> next drain step
    drain.commit()
    drain2 = claim(h)
    assert drain2.step == 7 and drain2.sample_ids() == [key(9, epoch=1)]
    drain2.commit()
    assert h.claim() is None


def test_next_is_a_read_only_peek(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    peek = view.next
    assert peek is not None and peek.step == 1
    assert peek.sample_ids() == [key(i) for i in plan(1)]
    assert view.next is peek  # lazy and cached
    view.postpone_samples(view.select_idxs([0]))
    peek = view.next
    assert peek is not None and peek.sample_ids()[0] == key(0)
    assert peek.non_tensor_batch["prl_times_postponed"][0] == 1
    with pytest.raises(StepStateError, match="read-only"):
        peek.postpone_samples(peek.select_idxs([0]))
    with pytest.raises(StepStateError, match="read-only"):
        peek.commit()
    assert view.select_idxs([0]).next is None
    view.commit()
    nxt = claim(h)
    assert nxt.sample_ids() == peek.sample_ids()


def test_session_without_materialise_callback(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    h.materialise(0)
    claimed = h.store.claim("c1", 60.0)
    assert claimed is not None
    view = LinkedDataProto.from_claim(claimed, StepSession(h.store, 0, "c1", h.policy))
    view.postpone_samples(view.select_idxs([2]))
    peek = view.next  # step 1 is not materialised: the peek shows what is there
    assert peek is not None and peek.sample_ids() == [key(2)]
    with pytest.raises(StepStateError, match="step 1 is not materialised"):
        view.prefetch_samples(1)
    assert len(view) == B - 1
    h.materialise(1)
    with pytest.raises(StepStateError, match="step 2 is not materialised"):
        view.prefetch_samples(6)  # takes step 1's rows, then fails at step 2: the moved rows are in self
    assert ids(view) == [key(0), key(1), key(3)] + [key(i) for i in plan(1)]
    assert [r.ref.key() for r in h.store.read_rows(0)] == ids(view)


def test_bad_policy_decisions_raise_policy_error(client: Any) -> None:
    class Backwards(PostponeToNext):
        name = "BackwardsForTest"

        def postpone_target(self, step: int, layout: RunLayout) -> int | None:
            return step

        def prefetch_count(self, view: Any, requested: int) -> int:
            return -1

    h = Harness(client, Backwards())
    view = claim(h)
    with pytest.raises(PolicyError, match="postpone_target returned 0"):
        view.postpone_samples(view.select_idxs([0]))
    with pytest.raises(PolicyError, match="prefetch_count returned -1"):
        view.prefetch_samples(1)
    assert len(view) == B


def test_session_validation(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    with pytest.raises(ConfigError, match="lease_seconds"):
        h.session(0, lease_seconds=0)
    with pytest.raises(ConfigError, match="step"):
        h.session(-1)
    with pytest.raises(ConfigError, match="differs from the run's policy 'PostponeToNext'"):
        StepSession(h.store, 0, "c1", PostponeToEpochEnd())
    claimed = None
    while claimed is None:
        try:
            claimed = h.store.claim("c1", 60.0)
        except NeedsMaterialisation as exc:
            h.materialise(exc.step)
    with pytest.raises(StepStateError, match="does not match"):
        LinkedDataProto.from_claim(claimed, h.session(1))


def test_reserved_fields_are_not_stored_in_payloads(client: Any) -> None:
    h = Harness(client, PostponeToNext())
    view = claim(h)
    view.postpone_samples(with_partial(view, [0], [3]))
    stored = h.store.read_rows(1)[0]
    decoded = codec.decode(stored.payload)
    assert not set(RESERVED_FIELDS) & set(decoded)
    assert torch.equal(decoded["prl_partial_tokens"], torch.arange(3))
    assert decoded["prompt"] == "p0"


@pytest.mark.redis
def test_postpone_and_prefetch_on_real_redis(redis_server: RedisServer) -> None:
    h = Harness(redis_server.client(), PostponeToNext())
    view = claim(h)
    view.prefetch_samples(1)
    view.postpone_samples(with_partial(view, [1], [4]))
    assert ids(view) == [key(0), key(2), key(3), key(4)]
    view.commit()
    nxt = claim(h)
    assert nxt.sample_ids() == [key(1), key(5), key(6), key(7)]
    assert torch.equal(nxt.non_tensor_batch["prl_partial_tokens"][0], torch.arange(4))
    assert isinstance(nxt.non_tensor_batch["extra"], np.ndarray)


@pytest.mark.redis
def test_postponed_rows_survive_redis_restart(redis_server: RedisServer) -> None:
    h = Harness(redis_server.client(), PostponeToNext())
    view = claim(h)
    view.postpone_samples(with_partial(view, [0], [2]))
    view.commit()
    redis_server.restart()
    h2 = Harness(redis_server.client(), PostponeToNext())
    nxt = claim(h2)
    assert nxt.sample_ids()[0] == key(0)
    assert torch.equal(nxt.non_tensor_batch["prl_partial_tokens"][0], torch.arange(2))


def test_rows_moved_is_called_after_each_move_that_went_through(client: Any) -> None:
    """The hook a loader uses to read the next step ahead again: after a postpone, after a prefetch that
    moved rows; not after a refused move, a prefetch that found nothing, or a FixedBatch call."""
    h = Harness(client, PostponeToNext())
    calls: list[int] = []
    view = h.claim(rows_moved=lambda: calls.append(len(calls)))
    assert view is not None
    view.prefetch_samples(1)
    assert len(calls) == 1
    moved = view.select_idxs([0])
    view.postpone_samples(moved)
    assert len(calls) == 2
    with pytest.raises(RowsNotInStep):
        view.postpone_samples(moved)  # (not in the step any more)
    assert len(calls) == 2
    view.commit()
    for _ in range(S - 2):
        claim(h).commit()
    end = h.claim(rows_moved=lambda: calls.append(len(calls)))
    assert end is not None and end.step == S - 1
    assert len(end.prefetch_samples(2)) == 0 and len(calls) == 2  # (nothing later in the epoch)
    fixed = Harness(fakeredis.FakeRedis(server=fakeredis.FakeServer()), FixedBatch())
    view = fixed.claim(rows_moved=lambda: calls.append(len(calls)))
    assert view is not None
    assert view.postpone_samples(view.select_idxs([0])) is False and len(view.prefetch_samples(2)) == 0
    assert len(calls) == 2


def test_rows_moved_is_called_once_the_view_is_in_step(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader's read ahead, which the hook starts, runs once the move is done (not beside the rest of
    the move, for the GIL): the view already holds the rows a prefetch moved in and lacks those a postpone
    moved out; a move that fails after its store call went through still calls it."""
    h = Harness(client, PostponeToNext())
    seen: list[int] = []
    views: list[LinkedDataProto] = []
    view = h.claim(rows_moved=lambda: seen.append(len(views[0])))
    assert view is not None
    views.append(view)
    view.prefetch_samples(2)
    view.postpone_samples(view.select_idxs([0]))
    assert seen == [B + 2, B + 1]

    def broken(*args: Any) -> Any:
        raise RuntimeError("the view's columns could not be updated")

    monkeypatch.setattr(linked_module, "taken", broken)
    with pytest.raises(RuntimeError, match="columns"):
        view.postpone_samples(view.select_idxs([0]))
    assert seen == [B + 2, B + 1, B + 1]  # (the rows left in Redis: the loader must read the next step again)


def test_a_view_built_ahead_of_its_claim_is_the_claims_view(client: Any) -> None:
    """``ahead_of_claim`` over the rows read before the claim builds what ``from_claim`` builds from the
    claim of the same rows (``adopt_claim`` then binds the lease); a row the claim would dead-letter (not
    decoded ahead, or not a dict) leaves it to the claim."""
    h = Harness(client, PostponeToNext())
    h.materialise(0)
    rows = h.store.read_rows(0)
    samples = {row.ref_text: codec.decode_raw_tensors(row.buffer) for row in rows}
    ahead = LinkedDataProto.ahead_of_claim(rows, h.session(0), samples)
    assert ahead is not None and ahead.session is not None and ahead.session.lease_expiry == 0.0
    claimed = h.store.claim("c1", 60.0)
    assert claimed is not None and [row.ref_text for row in claimed.rows] == [row.ref_text for row in rows]
    ahead.adopt_claim(claimed)
    built = LinkedDataProto.from_claim(claimed, h.session(0))
    assert ahead.session.lease_expiry == built.session.lease_expiry == claimed.lease_expiry  # type: ignore[union-attr]
    assert ahead.sample_ids() == built.sample_ids()
    assert ahead.batch is not None and built.batch is not None
    columns = sorted(built.batch.keys())
    assert sorted(ahead.batch.keys()) == columns
    assert all(torch.equal(ahead.batch[k], built.batch[k]) for k in columns)
    assert {k: list(v) for k, v in ahead.non_tensor_batch.items()} == {
        k: list(v) for k, v in built.non_tensor_batch.items()
    }
    assert ahead.postpone_samples(ahead.select_idxs([0])) is True  # (bound: it moves rows like the claim's)
    with pytest.raises(StepStateError, match="does not match"):
        ahead.adopt_claim(replace(claimed, step=1))
    missing = dict(samples)
    del missing[rows[1].ref_text]
    assert LinkedDataProto.ahead_of_claim(rows, h.session(0), missing) is None
    not_a_dict = {**samples, rows[2].ref_text: [1, 2]}
    assert LinkedDataProto.ahead_of_claim(rows, h.session(0), not_a_dict) is None
    assert h.store.dead_letters() == []  # (building ahead never dead-letters: the claim has not happened)


def test_committed_is_called_after_a_commit_through_the_view(client: Any) -> None:
    """The hook a loader uses to claim the next step early: called once the view's commit went through,
    not when the commit is refused."""
    h = Harness(client, PostponeToNext())
    calls: list[int] = []
    view = h.claim(committed=lambda: calls.append(len(calls)))
    assert view is not None
    view.commit()
    assert calls == [0]
    with pytest.raises(StepStateError):
        view.commit()  # (already committed)
    assert calls == [0]


_ON_CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")


@pytest.mark.parametrize("device", ["meta", pytest.param("cuda", marks=_ON_CUDA)])
def test_rows_moved_into_a_view_on_an_accelerator_join_it_there(client: Any, device: str) -> None:
    """A view the user moved (``view.to(device)``) keeps its tensor columns there through prefetches and
    postpones: the new rows' tensors are moved to it (not left on the CPU, which would turn the column into
    objects), and the returned rows are on it too. ("meta" runs without a GPU: shapes and devices only.)"""
    h = Harness(client, PostponeToNext())
    view = claim(h).to(device)
    got = view.prefetch_samples(2)
    assert view.batch is not None and got.batch is not None
    assert view.batch["input_ids"].device.type == got.batch["input_ids"].device.type == device
    assert view.batch["input_ids"].shape == (B + 2, 3) and got.batch["input_ids"].shape == (2, 3)
    if device == "meta":
        return
    expected = torch.stack([torch.arange(i, i + 3) for i in range(B + 2)])
    assert torch.equal(view.batch["input_ids"].cpu(), expected)
    samples = with_partial(view, [5, 0], [3, 1])  # (a prefetched row and a fresh one, partial output added)
    assert samples.batch is not None and samples.batch["input_ids"].is_cuda
    assert view.postpone_samples(samples) is True
    assert ids(view) == [key(i) for i in (1, 2, 3, 4)] and view.batch["input_ids"].is_cuda
    got = view.prefetch_samples(1)
    assert ids(got) == [key(6)] and view.batch["input_ids"].is_cuda
    assert torch.equal(view.batch["input_ids"][-1].cpu(), torch.arange(6, 9))
    view.commit()
    nxt = claim(h)
    assert nxt.sample_ids()[:2] == [key(5), key(0)]
    assert nxt.batch is not None and torch.equal(nxt.batch["input_ids"][0], torch.arange(5, 8))
    assert torch.equal(nxt.non_tensor_batch["prl_partial_tokens"][0], torch.arange(3))


@pytest.mark.parametrize("device", ["cpu", "meta", pytest.param("cuda", marks=_ON_CUDA)])
def test_rows_prefetched_into_a_view_with_a_column_they_lack_are_assembled_row_by_row(
    client: Any, device: str
) -> None:
    """A tensor column the user added to the view (e.g. scores) that the new rows lack cannot be
    concatenated: the rows are assembled one by one (the column becomes objects, None in the new rows),
    on the view's device."""
    h = Harness(client, PostponeToNext())
    view = claim(h).to(device)
    assert view.batch is not None
    view.batch["score"] = torch.arange(B, dtype=torch.float32, device=device)
    got = view.prefetch_samples(2)
    assert ids(got) == [key(4), key(5)]
    assert view.batch is not None and "score" not in list(view.batch.keys())
    assert view.batch["input_ids"].device.type == device and view.batch["input_ids"].shape == (B + 2, 3)
    scores = view.non_tensor_batch["score"]
    assert [s is None for s in scores] == [False] * B + [True, True]
    assert all(s.device.type == device for s in scores[:B])
    if device != "meta":
        assert [float(s) for s in scores[:B]] == [0.0, 1.0, 2.0, 3.0]
        assert torch.equal(view.batch["input_ids"][-1].cpu(), torch.arange(5, 8))
