"""linked=True (LinkedDataProto views) and RedisBatchDataset on its own under torch's DataLoader."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader.dataset import RedisBatchDataset
from pr_loader.linked import LinkedDataProto
from pr_loader.server import FAKE_URL
from tests.loader.conftest import wait_for_claim_ahead
from tests.servers import RedisServer

N = 18
DATA = [{"input_ids": torch.arange(i, i + 4), "prompt": f"prompt {i}", "score": float(i)} for i in range(N)]


def check_views_equal_drop_in(views: list[Any], batches: list[Any]) -> None:
    assert len(views) == len(batches)
    for step, (view, batch) in enumerate(zip(views, batches)):
        assert isinstance(view, LinkedDataProto) and view.step == step
        assert torch.equal(view.batch["input_ids"], batch["input_ids"])
        assert list(view.non_tensor_batch["prompt"]) == batch["prompt"]
        assert [float(x) for x in view.non_tensor_batch["score"]] == batch["score"].tolist()
        assert view.sample_ids() == [f"{step // 4}:{int(i)}" for i in batch["input_ids"][:, 0]]
        assert view.non_tensor_batch["prompt"].dtype == np.object_


def loaders(url: str, **kwargs: Any) -> tuple[prl.DataLoader, tud.DataLoader[Any]]:
    generator = torch.Generator().manual_seed(4)
    ours = prl.DataLoader(
        DATA, batch_size=5, shuffle=True, generator=generator, redis_url=url, linked=True, **kwargs
    )
    theirs = tud.DataLoader(DATA, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4))
    return ours, theirs


def test_linked_fixed_batch_equals_drop_in() -> None:
    ours, theirs = loaders(FAKE_URL)
    views = [v for _ in range(2) for v in ours]
    batches = [b for _ in range(2) for b in theirs]
    check_views_equal_drop_in(views, batches)
    assert all(v.session is not None for v in views)


def test_linked_with_workers_gives_bound_views(redis_server: RedisServer) -> None:
    ours, theirs = loaders(redis_server.url, num_workers=2)
    views = list(ours)
    check_views_equal_drop_in(views, list(theirs))
    assert all(v.session is not None for v in views)
    assert ours.state_dict()["step"] == 3


def test_view_committed_by_its_user() -> None:
    ours, _ = loaders(FAKE_URL)
    for view in ours:
        view.commit()
    assert ours.state_dict()["step"] == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataset_alone_under_torch_dataloader(redis_server: RedisServer, num_workers: int) -> None:
    """Each worker claims whole steps and commits them as it moves on: every row once per epoch."""
    dataset = RedisBatchDataset(
        DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2), linked=False,
        redis_url=redis_server.url, run_id=f"alone-{uuid.uuid4().hex}",
    )  # fmt: skip
    for epoch in range(2):
        dataset.set_epoch(epoch)
        loader = tud.DataLoader(dataset, batch_size=None, num_workers=num_workers)
        rows = sorted(int(i) for batch in loader for i in batch["input_ids"][:, 0])
        assert rows == list(range(N))
    next_step, committed, _ = dataset.position()
    assert committed == next_step - 1 == 2 * 5 - 1


@pytest.mark.parametrize(("num_workers", "policy"), [(0, "fixed"), (0, "postpone"), (2, "fixed")])
def test_pin_memory_pins_linked_views(redis_server: RedisServer, num_workers: int, policy: str) -> None:
    """pin_memory=True pins each view's tensor batch, as torch pins its batches: only where an accelerator
    is (torch warns and pins nothing without one), on every path a view is built on (claimed ahead, read
    ahead for a postponing policy (which refuses workers), built from a worker's claim)."""
    from pr_loader.policy import FixedBatch, PostponeToNext

    chosen = FixedBatch() if policy == "fixed" else PostponeToNext()
    ours, theirs = loaders(redis_server.url, num_workers=num_workers, pin_memory=True, policy=chosen)
    views = []
    it = iter(ours)
    for view in it:
        views.append(view)
        if num_workers == 0 and it.read_step >= 0:  # (the next view is then the one read ahead)
            wait_for_claim_ahead(it)
    check_views_equal_drop_in(views, list(theirs))
    pinned = torch.accelerator.is_available()
    assert [view.batch["input_ids"].is_pinned() for view in views] == [pinned] * len(views)
    ours.close()


def test_data_proto_pin_memory_is_in_place() -> None:
    from pr_loader.protocol import DataProto

    data = DataProto.from_dict({"x": torch.arange(4)})
    if not torch.accelerator.is_available():
        with pytest.raises(RuntimeError):  # as torch.Tensor.pin_memory without an accelerator
            data.pin_memory()
        return
    assert data.pin_memory() is data and data.batch["x"].is_pinned()
    assert torch.equal(data.batch["x"], torch.arange(4))


def test_dataset_alone_yields_linked_views() -> None:
    dataset = RedisBatchDataset(DATA, batch_size=6, redis_url=FAKE_URL)
    views = list(dataset)
    assert [len(v) for v in views] == [6, 6, 6] and all(isinstance(v, LinkedDataProto) for v in views)
    assert dataset.position()[1] == 2


def _partial_trace(
    loader: prl.DataLoader, settle: Callable[[str], None] | None = None, commit: bool = False
) -> list[tuple[int, list[str], list[Any]]]:
    """Two epochs of a PostponeToNext loop: each step postpones its first two rows with a partial output
    (then, with ``commit``, commits its view); per step: ids and partial outputs. ``settle`` (steps that have
    a successor in the epoch): called with "read" before the postpone and with "moved" after it, to wait for
    the loader's reads ahead."""
    trace = []
    for _ in range(2):
        for view in loader:
            partial = view.non_tensor_batch.get("partial", np.full(len(view), None, dtype=object))
            trace.append((view.step, view.sample_ids(), list(partial)))
            movable = [i for i, t in enumerate(view.non_tensor_batch["prl_times_postponed"]) if t < 2][:2]
            ahead = settle is not None and (view.step + 1) % loader.source.steps_per_epoch
            if ahead:
                settle("read")
            rows = view.select_idxs(movable)
            rows.non_tensor_batch["partial"] = np.array([f"from step {view.step}"] * len(rows), dtype=object)
            view.postpone_samples(rows)
            if ahead:
                settle("moved")
            if commit:
                view.commit()
    loader.close()
    return trace


def test_postponing_policy_reads_and_claims_the_next_step_ahead(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While the caller works on a step, its successor's rows are read, decoded, built into its view and
    claimed ahead, again after each postpone (which gives the step claimed ahead back); ``next()`` then
    hands that view out without a claim of its own. The views are those of a loader that reads and claims
    nothing ahead (the in-process store runs inline and does not), also when the caller asks for the next
    step at once (reads and claims ahead cut short) and when it commits each view after its postpone."""
    import queue
    import threading

    from pr_loader import loader_iter
    from pr_loader.policy import PostponeToNext
    from pr_loader.store import BatchStore

    def make(url: str) -> prl.DataLoader:
        return prl.DataLoader(
            DATA, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4), redis_url=url,
            linked=True, policy=PostponeToNext(max_postpones=2), run_id=f"ahead-{uuid.uuid4().hex}",
        )  # fmt: skip

    reads: queue.Queue[str] = queue.Queue()
    read_ahead = loader_iter.LoaderIter._read_ahead
    claim_ahead = loader_iter.LoaderIter._claim_ahead
    claim = BatchStore.claim
    adopt_claim = LinkedDataProto.adopt_claim
    given: dict[int, tuple[int, int]] = {}  # step -> (rows whose payloads its last claim was given, rows)
    on_caller: dict[int, bool] = {}  # step -> whether its last claim ran on the caller's thread
    adopted: list[int] = []

    def spied_read_ahead(self: Any, step: int, payloads: Any, generation: int, first: bool) -> None:
        read_ahead(self, step, payloads, generation, first)
        reads.put("read" if first else "moved")

    def spied_claim_ahead(self: Any, claims: Any, generation: int) -> None:
        claim_ahead(self, claims, generation)
        reads.put("claimed")

    def spied_claim(self: BatchStore, *args: Any, known: Any = None, **kwargs: Any) -> Any:
        claimed = claim(self, *args, known=known, **kwargs)
        if claimed is not None:
            known_rows = sum(row.ref_text in (known or {}) for row in claimed.rows)
            given[claimed.step] = (known_rows, len(claimed.rows))
            on_caller[claimed.step] = threading.current_thread() is threading.main_thread()
        return claimed

    def spied_adopt(self: LinkedDataProto, claimed: Any) -> None:
        adopted.append(claimed.step)
        adopt_claim(self, claimed)

    def settle(what: str) -> None:
        assert reads.get(timeout=10) == what
        assert reads.get(timeout=10) == "claimed"

    monkeypatch.setattr(loader_iter.LoaderIter, "_read_ahead", spied_read_ahead)
    monkeypatch.setattr(loader_iter.LoaderIter, "_claim_ahead", spied_claim_ahead)
    monkeypatch.setattr(BatchStore, "claim", spied_claim)
    monkeypatch.setattr(LinkedDataProto, "adopt_claim", spied_adopt)
    with_ahead = _partial_trace(make(redis_server.url), settle)
    # a step read ahead (not an epoch's first) was claimed ahead (before and after the postpone) with every
    # row's payload, postponed ones too, took its view as built, and was handed out without another claim
    later = [1, 2, 3, 5, 6, 7]  # (two epochs of four steps)
    assert sorted(step for step in given if step % 4) == later
    assert sorted(adopted) == sorted(later * 2)
    assert all(given[step][0] == given[step][1] > 0 for step in later), given
    assert on_caller == {s: not s % 4 for s in range(8)}, on_caller
    assert given[0][0] == given[4][0] == 0, given
    unsettled = _partial_trace(make(redis_server.url))
    committed = _partial_trace(make(redis_server.url), commit=True)
    monkeypatch.undo()
    assert with_ahead == unsettled == committed == _partial_trace(make(FAKE_URL))
    assert any(partial for _, _, partial in with_ahead if any(p is not None for p in partial))


def test_a_move_of_an_earlier_step_reads_nothing_ahead(redis_server: RedisServer) -> None:
    """Only a move of the step handed out last names the step claimed ahead (to give it back) and re-reads
    its successor: the view of an earlier step (kept by the caller) names a step that is claimed already."""
    from pr_loader.policy import PostponeToNext

    loader = prl.DataLoader(DATA, batch_size=5, redis_url=redis_server.url, linked=True,
                            policy=PostponeToNext(), run_id=f"moved-{uuid.uuid4().hex}")  # fmt: skip
    it = iter(loader)
    first, second = next(it), next(it)
    assert first.session is not None and second.session is not None
    assert first.session.rows_moved is not None and second.session.rows_moved is not None
    assert first.session.hold is not None and second.session.hold is not None
    wait_for_claim_ahead(it)
    with first.session.hold() as named:
        assert named is None
    with second.session.hold() as named:
        assert named == it.held == second.step + 1
    queued = len(it.reads)
    first.session.rows_moved()
    assert len(it.reads) == queued
    second.session.rows_moved()
    assert len(it.reads) == queued + 2  # (a read and a claim ahead)
    loader.close()


def test_a_claim_aheads_error_comes_at_next(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The claim ahead runs in the background: its error is raised by the next ``next()``."""
    import threading

    from pr_loader.errors import StoreError
    from pr_loader.policy import PostponeToNext
    from pr_loader.store import BatchStore

    claim = BatchStore.claim
    callers: list[bool] = []  # whether each claim ran on the caller's thread

    def refused_ahead(self: BatchStore, *args: Any, **kwargs: Any) -> Any:
        callers.append(threading.current_thread() is threading.main_thread())
        if not callers[-1]:
            raise StoreError("claim refused")
        return claim(self, *args, **kwargs)

    monkeypatch.setattr(BatchStore, "claim", refused_ahead)
    loader = prl.DataLoader(DATA, batch_size=5, redis_url=redis_server.url, linked=True,
                            policy=PostponeToNext(), run_id=f"ahead-error-{uuid.uuid4().hex}")  # fmt: skip
    it = iter(loader)
    next(it)
    wait_for_claim_ahead(it)
    with pytest.raises(StoreError, match="claim refused"):
        next(it)
    assert callers[-1] is False and callers.count(False) == 1  # (the claim ahead failed, and only it ran)
    loader.close()


@pytest.mark.parametrize("policy", ["FixedBatch", "PostponeToNext"])
def test_a_commit_through_a_view_waits_for_its_fsync(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """Where ``durability`` needs a wait after each write, a view's commit waits like the loader's own
    commit: on the caller's thread (WAITAOF covers the writes of the connection it is sent on)."""
    import threading

    import pr_loader.dataset as dataset_module

    waits: list[str] = []
    monkeypatch.setattr(
        dataset_module, "wait_durable", lambda client: waits.append(threading.current_thread().name)
    )
    loader = prl.DataLoader(DATA, batch_size=5, redis_url=redis_server.url, linked=True, policy=policy,
                            run_id=f"durable-{uuid.uuid4().hex}")  # fmt: skip
    loader.source.shard()
    loader.source.wait_durable = True  # (this server fsyncs every write itself: no wait would be needed)
    it = iter(loader)
    view = next(it)
    waits.clear()
    view.commit()
    assert waits == [threading.current_thread().name]
    assert len(next(it)) == 5
    loader.close()


def test_competing_consumers_claiming_ahead_lose_and_repeat_nothing(redis_server: RedisServer) -> None:
    """Two linked loaders with their own consumer ids on one run, taking turns: each claims its next step
    ahead and gives it back on its moves, while the other claims and postpones into the steps around it.
    At the end of the epoch every row of it was committed once, or waits postponed into a later step."""
    from pr_loader.policy import PostponeToNext

    run_id = f"compete-{uuid.uuid4().hex}"
    def consumer(name: str) -> prl.DataLoader:
        return prl.DataLoader(
            DATA, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(6),
            redis_url=redis_server.url, linked=True, policy=PostponeToNext(max_postpones=1), run_id=run_id,
            consumer_id=name,
        )  # fmt: skip

    loaders = [consumer("a"), consumer("b")]
    live = [iter(loader) for loader in loaders]
    committed: list[str] = []  # the rows each view still held when its consumer asked for the next one
    steps: list[int] = []
    while live:
        for it in list(live):
            view = next(it, None)
            if view is None:
                live.remove(it)
                continue
            steps.append(view.step)
            fresh = [i for i, t in enumerate(view.non_tensor_batch["prl_times_postponed"]) if t == 0][:2]
            if fresh:
                assert view.postpone_samples(view.select_idxs(fresh)) is True
            committed += view.sample_ids()
    for loader in loaders:
        loader.close()
    stats = loaders[0].source.shard().store.stats()
    waiting = [row.ref.key() for row in stats.postponed]
    assert sorted(steps) == list(range(len(loaders[0])))  # (each step of the epoch handed out once)
    assert len(committed) == len(set(committed)) and not set(committed) & set(waiting)
    assert sorted(committed + waiting) == sorted(f"0:{i}" for i in range(N))
    assert not stats.in_flight and stats.committed_upto == len(loaders[0]) - 1
