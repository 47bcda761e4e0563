"""state_dict / load_state_dict, resume in a new loader, ranks, competing consumers, heartbeat."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader.errors import RollbackOutOfRange, StateDictError
from pr_loader.server import FAKE_URL
from tests.loader.conftest import assert_same, assert_same_epochs
from tests.servers import RedisServer

N, B = 22, 4  # 6 steps per epoch, the last one short
S = 6
DATA = [{"ids": torch.tensor([i, -i]), "i": i} for i in range(N)]


def make(url: str = FAKE_URL, **kwargs: Any) -> prl.DataLoader:
    kwargs.setdefault("batch_size", B)
    kwargs.setdefault("shuffle", True)
    kwargs.setdefault("generator", torch.Generator().manual_seed(1234))
    return prl.DataLoader(DATA, redis_url=url, **kwargs)


def reference(epochs: int) -> list[Any]:
    """The batches of an uninterrupted run, flattened over epochs."""
    loader = tud.DataLoader(DATA, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(1234))
    return [batch for _ in range(epochs) for batch in loader]


def consume(loader: prl.DataLoader, steps: int) -> tuple[list[Any], dict[str, Any]]:
    """Take ``steps`` batches (across epochs) and return them with the state after the last one."""
    out: list[Any] = []
    while len(out) < steps:
        for batch in loader:
            out.append(batch)
            if len(out) == steps:
                break
    state = json.loads(json.dumps(loader.state_dict()))
    loader.close()  # the process ends here (its worker processes too)
    return out, state


def rest(loader: prl.DataLoader, total: int, done: int) -> list[Any]:
    out: list[Any] = []
    while done + len(out) < total:
        out.extend(loader)
    return out


def test_state_dict_small_versioned_json() -> None:
    loader = make()
    _, state = consume(loader, 3)
    assert state["version"] == 1 and state["step"] == 2 and state["epoch"] == 0
    assert len(json.dumps(state)) < 400


@pytest.mark.parametrize("stop", [1, 3, S - 1, S, S + 2, 2 * S - 1])
def test_resume_in_new_loader(stop: int) -> None:
    """A new loader (new process: fresh generator) continues exactly; S - 1 / 2S - 1 are epoch boundaries."""
    total = 3 * S
    first, state = consume(make(), stop)
    assert state["epoch"] == stop // S
    resumed = make()  # no run_id: adopts the state's run
    resumed.load_state_dict(state)
    got = first + rest(resumed, total, stop)
    assert_same_epochs([reference(3)], [got])


def test_epoch_boundary_checkpoint_yields_the_next_epoch() -> None:
    _, state = consume(make(), S)
    resumed = make()
    resumed.load_state_dict(state)
    nxt = list(resumed)
    assert len(nxt) == S  # not an empty epoch (verl #5725)
    assert_same_epochs([reference(2)[S:]], [nxt])


def test_restore_older_checkpoint() -> None:
    loader = make(retain_steps=16)
    _, old = consume(loader, 2)
    consume(loader, 7)  # now at step 8, in epoch 1 (close() keeps the connection reopenable)
    newer = make()
    newer.load_state_dict(old)
    got = rest(newer, 2 * S, 2)
    assert_same_epochs([reference(2)[2:]], [got])


def test_checkpoint_outside_retain_steps() -> None:
    loader = make(retain_steps=2)
    _, old = consume(loader, 1)
    consume(loader, 8)
    with pytest.raises(RollbackOutOfRange):
        make().load_state_dict(old)


def test_state_of_another_run_or_dataset() -> None:
    _, state = consume(make(), 2)
    with pytest.raises(StateDictError, match="belongs to run"):
        make(run_id=f"other-{uuid.uuid4().hex}").load_state_dict(state)
    with pytest.raises(StateDictError, match=r"fingerprint|steps_per_epoch"):
        prl.DataLoader(DATA[:10], batch_size=B, redis_url=FAKE_URL).load_state_dict(state)
    with pytest.raises(StateDictError, match="version"):
        make().load_state_dict({**state, "version": 2})
    with pytest.raises(StateDictError, match="lacks"):
        make().load_state_dict({"version": 1})
    with pytest.raises(StateDictError, match="not in this store"):
        make().load_state_dict({**state, "run_id": f"gone-{uuid.uuid4().hex}"})


def test_same_consumer_takes_over_inflight_step() -> None:
    """A new incarnation (same run_id and consumer_id) gets its dead predecessor's in-flight step at once."""
    run_id = f"r-{uuid.uuid4().hex}"
    dead = make(run_id=run_id)
    it = iter(dead)
    seen = [next(it) for _ in range(3)]  # steps 0, 1 committed; step 2 in flight
    it.close()
    alive = make(run_id=run_id)
    got = seen[:2] + list(alive)
    assert_same_epochs([reference(1)], [got])


def test_new_iter_moves_past_the_last_batch_handed_out() -> None:
    loader = make(shuffle=False)
    it = iter(loader)
    got = [next(it) for _ in range(S)]  # the whole epoch, without the final StopIteration
    got += [next(iter(loader))]  # like torch: a new iter() starts the next epoch
    assert loader.state_dict()["step"] == S
    reference = list(tud.DataLoader(DATA, batch_size=B))
    assert_same_epochs([reference + reference[:1]], [got])


def test_different_num_workers_on_resume(redis_server: RedisServer) -> None:
    first, state = consume(make(redis_server.url), 4)
    resumed = make(redis_server.url, num_workers=2)
    resumed.load_state_dict(state)
    got = first + rest(resumed, 2 * S, 4)
    assert_same_epochs([reference(2)], [got])
    first, state = consume(make(redis_server.url, num_workers=2), S + 1)
    resumed = make(redis_server.url)
    resumed.load_state_dict(state)
    assert_same_epochs([reference(2)], [first + rest(resumed, 2 * S, S + 1)])


@pytest.mark.parametrize("drop_last", [False, True])
def test_ranks_are_disjoint_distributed_shards(drop_last: bool) -> None:
    run_id = f"ranks-{uuid.uuid4().hex}"
    for rank in (0, 1):
        sampler = tud.DistributedSampler(
            DATA, num_replicas=2, rank=rank, shuffle=True, seed=0, drop_last=drop_last
        )
        ref_loader = tud.DataLoader(DATA, batch_size=3, sampler=sampler, drop_last=drop_last)
        reference_epochs = []
        for epoch in range(2):
            sampler.set_epoch(epoch)
            reference_epochs.append(list(ref_loader))
        loader = prl.DataLoader(
            DATA, batch_size=3, shuffle=True, drop_last=drop_last, redis_url=FAKE_URL, run_id=run_id,
            rank=rank, world_size=2,
        )  # fmt: skip
        assert_same_epochs(reference_epochs, [list(loader), list(loader)])
        assert loader.state_dict()["rank"] == rank


def test_competing_consumers_and_lease_expiry() -> None:
    run_id = f"cc-{uuid.uuid4().hex}"
    a = make(run_id=run_id, consumer_id="a", shuffle=False, lease_seconds=30)
    b = make(run_id=run_id, consumer_id="b", shuffle=False, lease_seconds=30)
    it_a = iter(a)
    held = next(it_a)  # consumer a works on step 0 (and has claimed steps ahead), then dies
    it_a.close()
    held_steps = a.source.inflight_mine()
    assert held_steps == list(range(len(held_steps))) and len(held_steps) >= 2
    got = list(b)
    assert len(got) == S - len(held_steps) and not any(torch.equal(held["i"], g["i"]) for g in got)
    store = b.source.shard().store
    assert store.expire_leases(now=time.time() + 31) == held_steps  # a's leases ran out
    redelivered = list(b)
    assert len(redelivered) == len(held_steps)
    assert_same(held, redelivered[0])
    assert b.state_dict()["step"] == S - 1


def test_heartbeat_keeps_a_slow_step(redis_server: RedisServer) -> None:
    loader = make(redis_server.url, lease_seconds=0.09)
    it = iter(loader)
    next(it)
    store = loader.source.shard().store
    client, keys = loader.source.shard().client, loader.source.shard().keys
    first = client.zscore(keys.leases, 0)
    deadline = time.monotonic() + 5
    while client.zscore(keys.leases, 0) == first and time.monotonic() < deadline:
        time.sleep(0.01)  # poll until the heartbeat renewed the lease
    assert client.zscore(keys.leases, 0) != first
    store.expire_leases()
    next(it)  # step 0 is still ours: committing it works
    it.close()
