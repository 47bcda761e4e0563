"""The drop-in loader on a local 3-node Redis Cluster: every key of a rank shard shares one slot."""

from __future__ import annotations

import uuid

import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from tests.cluster import LocalCluster
from tests.loader.conftest import assert_same_epochs

DATA = [{"ids": torch.tensor([i, 2 * i])} for i in range(20)]


@pytest.mark.cluster
def test_parity_and_resume_on_a_cluster(redis_cluster: LocalCluster) -> None:
    run_id = f"cl-{uuid.uuid4().hex}"

    def make() -> prl.DataLoader:
        generator = torch.Generator().manual_seed(8)  # DistributedSampler seed = generator.initial_seed()
        return prl.DataLoader(
            DATA, batch_size=3, shuffle=True, generator=generator, redis_url=redis_cluster.url, run_id=run_id,
            rank=1, world_size=2,
        )  # fmt: skip

    sampler = tud.DistributedSampler(DATA, num_replicas=2, rank=1, shuffle=True, seed=8)
    reference = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        reference += list(tud.DataLoader(DATA, batch_size=3, sampler=sampler))
    loader = make()
    it = iter(loader)
    got = [next(it), next(it)]
    state = loader.state_dict()
    loader.close()
    resumed = make()
    resumed.load_state_dict(state)
    got += list(resumed) + list(resumed)
    assert_same_epochs([reference], [got])
