"""pr_loader.DataLoader on a local 3-master Redis Cluster: rank shards, resume, linked postponing."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest
import torch
import torch.utils.data as tud
from redis.cluster import RedisCluster

import pr_loader.dataloader as prl
from pr_loader.linked import LinkedDataProto
from pr_loader.store.keys import ShardKeys
from tests.cluster import LocalCluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

N = 24
DATA = [{"i": torch.tensor(i), "ids": torch.tensor([i, -i]), "prompt": f"p{i}"} for i in range(N)]


# ---------------------------------------------------------------------------------------------- helpers
def rank_loader(cluster: LocalCluster, run_id: str, rank: int, world: int, **options: Any) -> prl.DataLoader:
    """A loader of DATA for one rank of ``run_id`` on the cluster (``options``: any other loader argument)."""
    return prl.DataLoader(DATA, redis_url=cluster.url, run_id=run_id, rank=rank, world_size=world, **options)


def owner_of(client: RedisCluster, key: str) -> str:
    """host:port of the master that owns ``key``'s slot (CLUSTER KEYSLOT + CLUSTER SLOTS)."""
    slot = int(client.cluster_keyslot(key))
    for (first, last), info in client.cluster_slots().items():
        if int(first) <= slot <= int(last):
            host, port = info["primary"][:2]
            return f"{host}:{port}"
    raise AssertionError(f"slot {slot} has no master")


def run_keys(cluster: LocalCluster, run_id: str) -> dict[str, list[str]]:
    """Every key of a run on each master (SCAN on each node's own connection)."""
    pattern = "prl:{" + "".join("\\" + c if c in "*?[]\\" else c for c in run_id) + ":*"
    found: dict[str, list[str]] = {}
    for i, address in enumerate(cluster.addresses()):
        node = cluster.plain_client(i)
        try:
            names = sorted(k.decode() for k in node.scan_iter(match=pattern, count=1000))
        finally:
            node.close()
        if names:
            found[address] = names
    return found


def purge(cluster: LocalCluster, run_id: str) -> None:
    """Delete every key of a run (for tests that use a fixed run id to get a fixed placement)."""
    for address, names in run_keys(cluster, run_id).items():
        node = cluster.plain_client(cluster.addresses().index(address))
        try:
            for name in names:
                node.delete(name)
        finally:
            node.close()


def indices(batch: dict[str, Any]) -> list[int]:
    return [int(x) for x in batch["i"]]


def same_batches(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> None:
    assert len(a) == len(b), (len(a), len(b))
    for n, (x, y) in enumerate(zip(a, b)):
        assert list(x) == list(y), n
        assert torch.equal(x["i"], y["i"]) and torch.equal(x["ids"], y["ids"]), n
        assert x["ids"].dtype == y["ids"].dtype == torch.int64
        assert x["prompt"] == y["prompt"], n


def consume(loader: prl.DataLoader, steps: int) -> list[dict[str, Any]]:
    """The next ``steps`` batches, across epoch ends."""
    out: list[dict[str, Any]] = []
    for _ in range(steps):  # each pass of the outer loop yields at least one batch
        for batch in loader:
            out.append(batch)
            if len(out) == steps:
                return out
    raise AssertionError(f"only {len(out)} of {steps} batches")


def distributed_reference(rank: int, world: int, batch_size: int, epochs: int) -> list[list[dict[str, Any]]]:
    """torch's batches of one rank (DistributedSampler, shuffled, seed 0) per epoch."""
    sampler = tud.DistributedSampler(DATA, num_replicas=world, rank=rank, shuffle=True, seed=0)
    loader = tud.DataLoader(DATA, batch_size=batch_size, sampler=sampler)
    out = []
    for epoch in range(epochs):
        sampler.set_epoch(epoch)
        out.append(list(loader))
    return out


# ------------------------------------------------------------------------------------------------ tests
def test_ranks_yield_disjoint_distributed_shards_spread_over_masters(
    cluster: LocalCluster, cluster_client: RedisCluster
) -> None:
    world, batch_size, epochs = 4, 2, 2
    run_id = "loader-ranks-w4"  # fixed, so the placement of its shards is too; purged first
    purge(cluster, run_id)
    got: dict[int, list[list[dict[str, Any]]]] = {}
    for rank in range(world):
        loader = rank_loader(cluster, run_id, rank, world, batch_size=batch_size, shuffle=True)
        try:
            got[rank] = [list(loader) for _ in range(epochs)]
            assert loader.state_dict()["step"] == epochs * len(loader) - 1
        finally:
            loader.close()
        reference = distributed_reference(rank, world, batch_size, epochs)
        for epoch in range(epochs):
            same_batches(got[rank][epoch], reference[epoch])
    for epoch in range(epochs):
        shards = [sorted(i for b in got[r][epoch] for i in indices(b)) for r in range(world)]
        flat = [i for shard in shards for i in shard]
        assert len(flat) == len(set(flat)) == N, f"epoch {epoch}: shards overlap or miss rows"
        assert set(flat) == set(range(N))
    # every key the loader wrote (store, plans, ...) is in its rank shard's slot, on that slot's master
    placed = run_keys(cluster, run_id)
    masters = {}
    for rank in range(world):
        prefix = ShardKeys.for_shard(run_id, rank).prefix
        where = {address for address, names in placed.items() for n in names if n.startswith(prefix)}
        names = [n for ns in placed.values() for n in ns if n.startswith(prefix)]
        assert len(where) == 1 and len({int(cluster_client.cluster_keyslot(n)) for n in names}) == 1
        assert where == {owner_of(cluster_client, prefix + "meta")}
        assert any(n.endswith("plan:0:idx") for n in names)
        masters[rank] = where.pop()
    assert sum(len(ns) for ns in placed.values()) == sum(
        1
        for ns in placed.values()
        for n in ns
        if any(n.startswith(ShardKeys.for_shard(run_id, r).prefix) for r in range(world))
    ), "a key of the run outside every rank shard"
    spread = Counter(masters.values())
    print(f"\nloader run {run_id}: rank -> master {masters}")
    assert len(spread) >= 2, f"all {world} rank shards on one master: {masters}"
    purge(cluster, run_id)


@pytest.mark.parametrize("stop", [3, 5])  # at an epoch end (3 steps per epoch) and inside epoch 1
def test_resume_with_state_dict_equals_an_uninterrupted_run(
    cluster: LocalCluster, run_id: str, stop: int
) -> None:
    world, rank, batch_size, epochs = 2, 1, 4, 3
    total = epochs * N // world // batch_size

    def make(run: str) -> prl.DataLoader:
        return rank_loader(cluster, run, rank, world, batch_size=batch_size, shuffle=True, retain_steps=4)

    straight = make(run_id + "-straight")
    try:
        uninterrupted = consume(straight, total)
    finally:
        straight.close()
    reference = distributed_reference(rank, world, batch_size, epochs)
    same_batches(uninterrupted, [batch for epoch in reference for batch in epoch])

    first = make(run_id)
    try:
        head = consume(first, stop)
        state = json.loads(json.dumps(first.state_dict()))
        assert state["step"] == stop - 1 and state["rank"] == rank
        consume(first, 2)  # progress after the checkpoint that the restore must undo
    finally:
        first.close()
    resumed = make(run_id)
    try:
        resumed.load_state_dict(state)
        tail = consume(resumed, total - stop)
        assert resumed.state_dict()["step"] == total - 1
    finally:
        resumed.close()
    same_batches(head + tail, uninterrupted)


def test_linked_postpone_to_next_across_steps(cluster: LocalCluster, run_id: str) -> None:
    world, batch_size = 2, 4
    for rank in range(world):
        shard = list(tud.DistributedSampler(DATA, num_replicas=world, rank=rank, shuffle=False))
        plan = [shard[s * batch_size : (s + 1) * batch_size] for s in range(len(shard) // batch_size)]
        loader = rank_loader(
            cluster, run_id, rank, world, batch_size=batch_size, shuffle=False, linked=True,
            policy="PostponeToNext",
        )
        try:
            it = iter(loader)
            v0 = next(it)
            assert isinstance(v0, LinkedDataProto) and v0.step == 0
            assert v0.sample_ids() == [f"0:{i}" for i in plan[0]]
            assert v0.postpone_samples(v0.select_idxs([3, 1])) is True
            assert v0.sample_ids() == [f"0:{plan[0][0]}", f"0:{plan[0][2]}"]
            store = loader.source.shard().store  # (step 1 may be claimed ahead already: its rows either way)
            assert [row.ref.key() for row in store.read_rows(1)[:2]] == [f"0:{plan[0][3]}", f"0:{plan[0][1]}"]
            assert [(p.ref.key(), p.target_step) for p in store.stats().postponed] == [
                (f"0:{plan[0][3]}", 1), (f"0:{plan[0][1]}", 1)]  # fmt: skip

            v1 = next(it)  # commits step 0; the postponed rows come first, in postpone order
            assert v1.step == 1
            assert v1.sample_ids() == [f"0:{plan[0][3]}", f"0:{plan[0][1]}"] + [f"0:{i}" for i in plan[1]]
            assert list(v1.non_tensor_batch["prl_times_postponed"]) == [1, 1, 0, 0, 0, 0]
            assert list(v1.non_tensor_batch["prl_first_step"]) == [0, 0, 1, 1, 1, 1]
            assert v1.batch is not None
            order = [plan[0][3], plan[0][1], *plan[1]]
            assert [int(x) for x in v1.batch["i"]] == order
            assert list(v1.non_tensor_batch["prompt"]) == [f"p{i}" for i in order]
            assert v1.postpone_samples(v1.select_idxs([0])) is True  # postponed a second time

            v2 = next(it)
            assert v2.step == 2 and v2.sample_ids()[0] == f"0:{plan[0][3]}"
            assert int(v2.non_tensor_batch["prl_times_postponed"][0]) == 2
            assert int(v2.non_tensor_batch["prl_first_step"][0]) == 0
            with pytest.raises(StopIteration):
                next(it)  # 3 steps per epoch
            delivered = v0.sample_ids() + v1.sample_ids() + v2.sample_ids()
            assert sorted(delivered) == sorted(f"0:{i}" for i in shard) and len(set(delivered)) == len(shard)
            assert loader.state_dict()["step"] == 2 and store.stats().postponed == []
        finally:
            loader.close()
