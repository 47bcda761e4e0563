"""Defects found while running the store and the loader on a Redis Cluster.

Each test states the contract it checks. Open defects are marked ``xfail(strict=True)``: the suite
reports XPASS (an error) once the code is fixed, so the marker must then be removed; fixed ones stay as
regression tests.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
import torch
from redis.cluster import RedisCluster

import pr_loader.dataloader as prl
import pr_loader.dataset as prl_dataset
from pr_loader.errors import ConfigError, StoreError
from pr_loader.store import BatchStore, RunConfig
from pr_loader.store.connection import DurabilityReport
from pr_loader.store.keys import ShardKeys
from tests.cluster import LocalCluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

DATA = [{"i": torch.tensor(i)} for i in range(8)]


def config(run_id: str) -> RunConfig:
    return RunConfig(run_id=run_id, batch_size=1, steps_per_epoch=4, dataset_fingerprint="fp", num_epochs=1)


def run_id_off_the_default_node(client: RedisCluster) -> tuple[str, str]:
    """A fresh run id whose rank-0 shard lives on a master other than the client's default node."""
    default = client.get_default_node().name
    for _ in range(100):  # two masters in three qualify
        run_id = f"off-{uuid.uuid4().hex[:10]}"
        node = client.get_node_from_key(ShardKeys.for_shard(run_id, 0).meta).name
        if node != default:
            return run_id, node
    raise AssertionError("every shard landed on the default node")


def test_stats_memory_is_the_shard_masters(cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    run_id, node = run_id_off_the_default_node(cluster_client)
    store = BatchStore.open(cluster_client, config(run_id))
    big = 8 * 1024 * 1024
    try:
        store.materialise(0, [(0, b"x" * big)])
        master = cluster.plain_client(cluster.addresses().index(node))
        try:
            master_used = int(master.info("memory")["used_memory"])
        finally:
            master.close()
        default_used = int(cluster_client.info("memory", target_nodes=cluster_client.get_default_node())[
            "used_memory"])  # fmt: skip
        assert master_used > big > default_used  # the precondition that makes the two tell apart
        reported = store.stats().server_memory_bytes
        assert reported is None or reported > big, (reported, master_used, default_used)
    finally:
        store.delete_run()


def test_store_error_names_the_masters_address(cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    run_id, node = run_id_off_the_default_node(cluster_client)
    store = BatchStore.open(cluster_client, config(run_id))
    master = cluster.plain_client(cluster.addresses().index(node))
    try:
        master.config_set("maxmemory", 1)  # every write of the shard is refused with OOM
        with pytest.raises(StoreError, match="maxmemory") as info:
            store.materialise(0, [(0, b"x")])
    finally:
        master.config_set("maxmemory", 0)
        master.close()
        store.delete_run()
    seed = cluster.addresses()[0]  # naming the address the client was opened with would do as well
    assert node in str(info.value) or seed in str(info.value), str(info.value)


def test_always_durability_is_honoured_or_refused_on_a_cluster(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The session's Redis 7.0 cluster has no WAITAOF; the report of a 7.2 server with appendfsync everysec
    (``needs_wait``) is what check_durability would give there."""
    report = DurabilityReport(mode="always", aof_enabled=True, appendfsync="everysec", waitaof=True)
    assert report.needs_wait
    waits: list[Any] = []

    def record_wait(client: Any, **kwargs: Any) -> bool:
        waits.append(client)
        return True

    monkeypatch.setattr(prl_dataset, "check_durability", lambda client, mode: report)
    monkeypatch.setattr(prl_dataset, "wait_durable", record_wait)
    run_id = f"durable-{uuid.uuid4().hex[:8]}"
    try:
        loader = prl.DataLoader(DATA, batch_size=2, redis_url=cluster.url, run_id=run_id, durability="always")
        batches = list(loader)
        state = loader.state_dict()
        loader.close()
    except ConfigError:
        return  # refusing the combination is a fix too
    assert len(batches) == 4 and state["step"] == 3
    assert len(waits) >= 4, f"{len(waits)} fsync waits for 4 commits"


def test_iter_survives_a_step_expired_by_another_consumer_meanwhile(
    cluster: LocalCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = f"race-{uuid.uuid4().hex[:8]}"

    def make() -> prl.DataLoader:
        return prl.DataLoader(DATA, batch_size=2, redis_url=cluster.url, run_id=run_id, lease_seconds=30)

    dead = make()  # a process that took a batch (and claimed ahead), then died
    first = next(iter(dead))
    dead.close()  # stops its background claims; what it still holds is now fixed
    held = dead.source.inflight_mine()
    assert 0 in held
    successor = make()  # same run and consumer id: its iter() gives the predecessor's steps back first
    try:
        # the interleaving: iter() lists the steps, then another consumer's claim expires their leases
        monkeypatch.setattr(successor.source, "inflight_mine", lambda: list(held))
        assert successor.source.shard().store.expire_leases(now=1e12) == held
        try:
            again = next(iter(successor))
        except Exception as exc:  # any error here is the defect
            raise AssertionError(f"iter() failed: {type(exc).__name__}: {exc}") from exc
        assert torch.equal(again["i"], first["i"])
    finally:
        successor.close()
