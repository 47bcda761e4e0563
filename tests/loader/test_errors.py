"""Bad data and lost writes: clear errors, dead letters, and no silent re-delivery."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch

import pr_loader.dataloader as prl
from pr_loader.errors import CommittedStepsLost, DatasetError, RunConfigMismatch, StoreError
from pr_loader.policy import PostponeToNext
from pr_loader.server import FAKE_URL
from tests.servers import RedisServer

DATA = [{"ids": torch.tensor([i]), "i": i} for i in range(12)]


def make(data: Any = DATA, **kwargs: Any) -> prl.DataLoader:
    kwargs.setdefault("batch_size", 3)
    return prl.DataLoader(data, redis_url=FAKE_URL, **kwargs)


def test_corrupt_payload_is_dead_lettered_and_the_batch_goes_on() -> None:
    loader = make()
    source = loader.source
    source.ensure_plan(0)
    source.materialise(0)
    ref = source.shard().store.read_rows(0)[1].ref
    source.shard().client.set(source.shard().keys.payload(ref.encode()), b"garbage")
    first = next(iter(loader))
    assert first["i"].tolist() == [0, 2]
    [letter] = source.shard().store.dead_letters()
    assert letter.ref == ref and "undecodable" in letter.reason


def indices(batch: Any) -> list[int]:
    """The "i" of a collated batch or of a linked view."""
    if isinstance(batch, dict):
        return [int(i) for i in batch["i"]]
    return [int(i) for i in batch.non_tensor_batch["i"]]


class Failing(torch.utils.data.Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict[str, Any]:
        if i == 10:
            raise OSError("disk read failed")
        return DATA[i]


@pytest.mark.parametrize("policy", ["FixedBatch", "PostponeToNext"], ids=["claim-ahead", "read-ahead"])
@pytest.mark.parametrize("threaded", [False, True])
def test_dataset_error_names_the_index_at_its_turn(
    redis_server: RedisServer, threaded: bool, policy: str
) -> None:
    """Steps are read ahead, but the error of step 2 comes when step 2 is asked for, not earlier."""
    url = redis_server.url if threaded else FAKE_URL
    linked = policy != "FixedBatch"
    it = iter(prl.DataLoader(Failing(), batch_size=4, redis_url=url, policy=policy, linked=linked))
    assert [indices(next(it)) for _ in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    with pytest.raises(DatasetError, match="index 10"):
        next(it)


def test_a_failed_read_ahead_only_costs_its_claim_the_reads(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under a postponing policy the next step is read ahead, best effort: when that read fails, the claim
    reads every payload itself and the batches are the same."""
    from pr_loader.store import BatchStore

    def loader() -> prl.DataLoader:
        return prl.DataLoader(DATA, batch_size=3, redis_url=redis_server.url, policy=PostponeToNext(),
                              linked=True, run_id=f"ahead-{uuid.uuid4().hex}")  # fmt: skip

    reference = [indices(view) for view in loader()]
    failed: list[int] = []

    def broken(self: BatchStore, step: int, **_: Any) -> Any:
        failed.append(step)
        raise StoreError("read refused")

    monkeypatch.setattr(BatchStore, "read_rows", broken)
    assert [indices(view) for view in loader()] == reference
    assert failed == [1, 2, 3]  # (every step after the first was read ahead, and failed)


def test_reopen_with_other_dataset_content_is_refused() -> None:
    run_id = f"content-{uuid.uuid4().hex}"
    list(make(run_id=run_id))
    other = [{"text": f"t{i}"} for i in range(12)]
    with pytest.raises(RunConfigMismatch, match="dataset_fingerprint"):
        list(make(other, run_id=run_id))


def test_reopen_with_other_batch_size_names_it() -> None:
    run_id = f"bs-{uuid.uuid4().hex}"
    list(make(run_id=run_id))
    with pytest.raises(RunConfigMismatch, match=r"batch_size|steps_per_epoch"):
        list(make(run_id=run_id, batch_size=4))


def test_checkpoint_ahead_of_the_store_is_reported() -> None:
    """Steps committed and checkpointed, then lost by Redis (simulated by a rollback behind our back)."""
    loader = make()
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()  # step 2
    loader.source.shard().store.rollback(0)
    with pytest.raises(CommittedStepsLost, match=r"steps 1\.\.2 were lost"):
        make().load_state_dict(state)
    with pytest.raises(CommittedStepsLost):  # the live loader notices too, instead of yielding step 1 again
        for _ in range(3):
            next(it)


def test_the_loaders_own_reads_retry_a_dropped_connection(
    monkeypatch: pytest.MonkeyPatch, redis_server: RedisServer
) -> None:
    """Besides the store's scripts, the loader reads the epoch plan and the shard's position itself; a
    connection lost under each of those reads is retried like the store's calls, not raised."""
    import redis

    failures = {"getrange": 1, "execute": 2}
    real_getrange = redis.Redis.getrange
    real_execute = redis.client.Pipeline.execute

    def getrange(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures["getrange"]:
            failures["getrange"] -= 1
            raise redis.ConnectionError("dropped")
        return real_getrange(self, *args, **kwargs)

    def execute(self: Any, *args: Any, **kwargs: Any) -> Any:
        if failures["execute"]:
            failures["execute"] -= 1
            raise redis.ConnectionError("dropped")
        return real_execute(self, *args, **kwargs)

    data = [{"x": torch.tensor(i)} for i in range(12)]
    loader = prl.DataLoader(data, batch_size=4, redis_url=redis_server.url)
    monkeypatch.setattr(redis.Redis, "getrange", getrange)
    monkeypatch.setattr(redis.client.Pipeline, "execute", execute)
    assert [b["x"].tolist() for b in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    loader.close()
    assert failures == {"getrange": 0, "execute": 0}
