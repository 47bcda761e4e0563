"""The store on a local 3-master Redis Cluster: every script of a shard runs in the shard's slot."""

from __future__ import annotations

import pytest

from pr_loader.store import BatchStore
from tests.cluster import LocalCluster
from tests.store.conftest import fill, make_config

pytestmark = [pytest.mark.redis, pytest.mark.cluster]


def test_full_cycle_on_a_cluster(redis_cluster: LocalCluster) -> None:
    client = redis_cluster.client()
    stores = [BatchStore.open(client, make_config(run_id="clu", world_size=3, rank=r)) for r in range(3)]
    for s in stores:  # every key of a shard, also the names scripts build, is in the meta key's slot
        keys = s.keys
        names = [keys.meta, keys.batch(7), keys.payload("0:1:2:3"), keys.stage("op", 0), keys.op("x")]
        assert len({client.keyslot(n) for n in names}) == 1
    for store in stores:
        fill(store, range(6))
        claimed = store.claim("c", 10, now=0)
        assert claimed is not None and len(claimed.rows) == 4
        got = store.prefetch(0, "c", 2, 2, now=0)
        assert len(got.rows) == 2
        store.postpone(0, "c", [(claimed.rows[0].ref, b"x")], 2, now=0)
        store.dead_letter(0, claimed.rows[1].ref, "bad")
        store.commit(0, "c", now=0)
        store.rollback(-1)
        again = store.claim("c", 10, now=0)
        assert again is not None and again.step == 0 and len(again.rows) == 3
        assert store.stats().payloads == 23
        assert store.delete_run() > 0
    client.close()
