"""The loader's fast paths: zero-copy decode under default_collate, commits sent in the background."""

from __future__ import annotations

import multiprocessing
import threading
import time
from typing import Any

import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader import loader_iter
from pr_loader.errors import LeaseLost
from pr_loader.server import FAKE_URL
from tests.loader.conftest import assert_same_epochs, wait_for_claim_ahead
from tests.servers import RedisServer

POOL_THREADS = ("pr_loader-ahead", "pr_loader-write", "pr_loader-commit", "pr_loader-build")
DATA: Any = [{"x": torch.arange(4) + 10 * i, "y": torch.full((2, 3), float(i)), "i": i} for i in range(24)]
B = 4


def test_default_collate_batches_are_private_and_writable() -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=FAKE_URL)
    first = list(loader)
    for batch in first:  # stacked copies: writing them changes nothing stored
        batch["x"].add_(1000)
        batch["y"].mul_(-1)
    assert_same_epochs([list(tud.DataLoader(DATA, batch_size=B))], [list(loader)])


def test_other_collate_functions_get_owning_tensors() -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=FAKE_URL, collate_fn=list)
    for batch in loader:
        for sample in batch:
            sample["x"].add_(1)  # writable, and private: the next epoch reads the stored values
    again = [s["x"][0].item() for batch in loader for s in batch]
    assert again == [10 * i for i in range(24)]


def test_commit_is_sent_in_the_background_and_its_error_raised_later(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url, consumer_id="c")
    it = iter(loader)
    next(it)  # step 0
    next(it)  # commits step 0 in the background
    assert loader.state_dict()["step"] == 1  # waits for that commit, then commits step 1
    next(it)  # step 2
    store = loader.source.shard().store
    deadline = time.monotonic() + 10
    while loader.source.inflight_mine() != [2, 3, 4] and time.monotonic() < deadline:
        time.sleep(0.01)  # the claims ahead are done: they cannot take step 2 back
    assert loader.source.inflight_mine() == [2, 3, 4]  # CLAIMS_AHEAD steps beyond the one handed out
    store.renew(2, "c", 1e-3, now=time.time() - 3600)  # step 2's lease runs out ...
    taken = store.claim("d", 60)  # ... and another consumer takes it over (in one atomic claim)
    assert taken is not None and taken.step == 2
    next(it)  # hands step 3 out at once; committing step 2 fails meanwhile
    with pytest.raises(LeaseLost):
        loader.state_dict()
    loader.close()


def test_close_waits_for_the_background_commit(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    it = iter(loader)
    got: list[Any] = [next(it), next(it)]
    loader.close()
    assert loader.source.position()[1] == 0  # step 0 committed, step 1 still in flight
    assert len(got) == 2


def test_new_iter_after_closing_the_last_one(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    it = iter(loader)
    got = [next(it), next(it)]
    it.close()
    got += list(loader)  # commits the batch handed out last, then continues
    assert_same_epochs([list(tud.DataLoader(DATA, batch_size=B))], [got])


def test_the_background_threads_last_from_epoch_to_epoch_until_close(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)

    def ours() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith(POOL_THREADS)}

    before = ours()
    first = list(loader)
    threads = ours() - before
    assert sorted(t.name.rsplit("_", 1)[0] for t in threads) == sorted(POOL_THREADS)
    second = list(loader)
    assert ours() - before == threads  # the same threads, no new ones
    assert_same_epochs([list(tud.DataLoader(DATA, batch_size=B))] * 2, [first, second])
    loader.close()
    for thread in threads:
        thread.join(10)
        assert not thread.is_alive()


def test_closing_an_iterator_waits_for_its_background_tasks(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    it = iter(loader)
    next(it)
    gate, finished = threading.Event(), threading.Event()
    pool = it.pools[0]
    assert pool is not None
    pool.submit(lambda: (gate.wait(10), finished.set()))  # a task of this iterator, still running
    closer = threading.Thread(target=it.close)
    closer.start()
    closer.join(0.2)
    assert closer.is_alive() and not finished.is_set()  # close() waits for it ...
    gate.set()
    closer.join(10)
    assert finished.is_set()  # ... and returns once it is done
    loader.close()


def _next_epoch_in_child(loader: prl.DataLoader, out: Any) -> None:
    out.put([batch["i"].tolist() for batch in loader])
    loader.close()


def test_a_forked_child_makes_its_own_threads(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    first = [batch["i"].tolist() for batch in loader]  # the parent's threads exist now
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_next_epoch_in_child, args=(loader, out))
    child.start()
    try:
        second = out.get(timeout=30)  # inherited pools without threads would never run the claim
        child.join(30)
        assert child.exitcode == 0
    finally:
        child.kill()
    assert first == second == [list(range(i, i + B)) for i in range(0, len(DATA), B)]
    loader.close()


def test_a_commit_is_sent_by_the_commit_thread_after_the_next_claims_read(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Step k's commit goes out once the claim of step k + 2 has read its payloads, so the server deletes
    the payloads that leave the retained window while the batch is built, not while a claim waits."""
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    store = loader.source.shard().store
    events: list[tuple[str, int, str]] = []
    claim, commit = store.claim, store.commit

    def claimed(*args: Any, **kwargs: Any) -> Any:
        got = claim(*args, **kwargs)
        events.append(("claim", -1 if got is None else got.step, threading.current_thread().name))
        return got

    def committed(step: int, *args: Any, **kwargs: Any) -> None:
        events.append(("commit", step, threading.current_thread().name))
        commit(step, *args, **kwargs)

    monkeypatch.setattr(store, "claim", claimed)
    monkeypatch.setattr(store, "commit", committed)
    got = list(loader)
    assert_same_epochs([list(tud.DataLoader(DATA, batch_size=B))], [got])
    steps = len(DATA) // B
    commits = [(i, step, thread) for i, (kind, step, thread) in enumerate(events) if kind == "commit"]
    assert [step for _, step, _ in commits] == list(range(steps))
    claims = {step: i for i, (kind, step, _) in enumerate(events) if kind == "claim"}
    for i, step, thread in commits[:-1]:  # (the last one is the end of the epoch's, on the caller's thread)
        assert thread.startswith("pr_loader-commit")
        if step + 2 < steps:
            assert i > claims[step + 2]
    loader.close()


def test_state_dict_does_not_wait_for_the_claim_that_carries_the_commit(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The commit of the step before is handed to the claim ahead; a state_dict() while that claim still
    waits (here: for a materialisation) sends the commit itself instead of waiting for the claim."""
    gate = threading.Event()
    materialise_ahead = loader_iter.LoaderIter._materialise_ahead

    def held(self: loader_iter.LoaderIter, step: int) -> None:
        gate.wait(30)
        materialise_ahead(self, step)

    monkeypatch.setattr(loader_iter.LoaderIter, "_materialise_ahead", held)
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url)
    it = iter(loader)
    next(it), next(it)  # the claim ahead of step 2 carries step 0's commit and waits for step 2's writing
    assert loader.source.position()[1] == -1  # nothing committed yet
    state: list[dict[str, Any]] = []
    checkpoint = threading.Thread(target=lambda: state.append(loader.state_dict()))
    checkpoint.start()
    checkpoint.join(10)
    try:
        assert not checkpoint.is_alive() and state[0]["step"] == 1  # steps 0 and 1 committed meanwhile
    finally:
        gate.set()
    rest = [batch["i"].tolist() for batch in it]
    assert rest == [list(range(i, i + B)) for i in range(2 * B, len(DATA), B)]
    loader.close()


@pytest.mark.parametrize("policy", ["FixedBatch", "PostponeToNext"])
@pytest.mark.parametrize("threaded", [True, False])
def test_a_batch_the_caller_drops_is_freed_at_once(
    redis_server: RedisServer, policy: str, threaded: bool
) -> None:
    """The loader keeps no reference to a batch it handed out: the caller's ``del`` frees it then, not
    inside the next ``next()`` (which would add the free of a whole batch to the wait). Linked views on
    threads: also once the work ahead has run (the next step read, built and claimed ahead), views
    handed out from a claim ahead included."""
    import weakref

    linked = policy != "FixedBatch"
    url = redis_server.url if threaded else FAKE_URL
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=url, linked=linked, policy=policy)
    it = iter(loader)
    for _ in range(3):
        batch = next(it)
        if linked and threaded and it.read_step >= 0:
            wait_for_claim_ahead(it)
        tensor = weakref.ref(batch.batch["x"] if linked else batch["x"])
        del batch
        assert tensor() is None
    loader.close()


@pytest.mark.parametrize("policy", ["FixedBatch", "PostponeToNext"])
def test_close_leaves_no_connection_to_redis_open(redis_server: RedisServer, policy: str) -> None:
    """After ``close()`` no connection of the loader is left open: neither the client's pool nor the
    connections kept for payload reads and uploads, by the background threads and by the caller's thread
    (a postpone runs there), even while the cyclic collector is off (it would free a pool kept alive by a
    reference cycle, and its connections with it, at some later time)."""
    import gc

    admin = redis_server.client()
    alone = int(admin.info("clients")["connected_clients"])
    loader = prl.DataLoader(DATA, batch_size=B, redis_url=redis_server.url, linked=policy != "FixedBatch",
                            policy=policy)  # fmt: skip
    collecting = gc.isenabled()
    gc.disable()
    try:
        for item in loader:
            if policy != "FixedBatch" and item.step == 0:
                assert item.postpone_samples(item.select_idxs([0])) is True
        assert int(admin.info("clients")["connected_clients"]) > alone
        loader.close()
        deadline = time.monotonic() + 5
        while int(admin.info("clients")["connected_clients"]) != alone:
            assert time.monotonic() < deadline, [(c["id"], c["cmd"], c["age"]) for c in admin.client_list()]
            time.sleep(0.01)
    finally:
        if collecting:
            gc.enable()
    admin.close()
