"""Big rows' tensors received straight into batch columns (pr_loader.collate.ColumnPlacer through
pr_loader.store.wire), on real redis-servers: the same batches as decoding and collating, one copy less."""

from __future__ import annotations

import os
import pickle
from typing import Any

import numpy as np
import pytest
import redis
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader import codec
from pr_loader.collate import ColumnPlacer, collate_raw
from pr_loader.store import BatchStore, ClaimedStep
from tests.loader.conftest import assert_same, assert_same_epochs
from tests.servers import REDIS_SERVER, RedisServer
from tests.store.conftest import make_config

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")

BIG = ColumnPlacer.min_payload  # bytes of a row's image: every such row is offered to the placer


def big_sample(i: int, image_bytes: int = BIG) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(i)
    return {
        "image": torch.randint(0, 256, (image_bytes // 64, 64), dtype=torch.uint8, generator=generator),
        "scores": torch.rand(300, dtype=torch.float64, generator=generator),
        "label": torch.tensor(i),
        "empty": torch.zeros(0, 3),
        "mask": torch.arange(7) % (i + 2) == 0,
        "name": f"row {i}",
    }


def claim_step(client: redis.Redis, samples: list[Any], placer: ColumnPlacer) -> ClaimedStep:
    store = BatchStore.open(client, make_config(batch_size=len(samples), steps_per_epoch=1))
    assert store._sized_reads
    store.materialise(0, [(i, codec.encode(s)) for i, s in enumerate(samples)])
    claimed = store.claim("c", 60, now=0, placer=placer)
    assert claimed is not None
    return claimed


def collated(claimed: ClaimedStep) -> Any:
    """What the dataset's build gives: placed rows' samples, the others decoded from their payloads."""
    return collate_raw([
        row.placed.sample if row.placed is not None else codec.decode_raw_tensors(row.buffer)
        for row in claimed.rows
    ])  # fmt: skip


def test_big_rows_are_received_into_the_columns_the_collate_hands_out(own_server: RedisServer) -> None:
    samples = [big_sample(i) for i in range(5)]
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert all(row.placed is not None for row in claimed.rows)
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    first = claimed.rows[0].placed
    assert first is not None
    for key in ("image", "scores", "label", "mask"):  # no copy: the column each row was received into
        assert batch[key] is first.sample[key].column[0]
        assert batch[key]._base is None and batch[key].is_contiguous()
    # the payload is whole again on demand (and pickles whole): the tensors' bytes from their columns
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]
    sent = pickle.loads(pickle.dumps(claimed))
    assert [row.payload for row in sent.rows] == [row.payload for row in claimed.rows]


def test_a_row_of_another_layout_ends_the_placing_and_the_batch_is_still_right(
    own_server: RedisServer,
) -> None:
    """Row 2 holds its keys in another order (its tensors lie elsewhere in its raw area): rows 0 and 1 are
    placed, the rest received as usual, and every column is copied (no column has all rows in place)."""
    samples = [big_sample(i) for i in range(4)]
    samples[2] = dict(reversed(list(samples[2].items())))
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert [row.placed is not None for row in claimed.rows] == [True, True, False, False]
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    first = claimed.rows[0].placed
    assert first is not None
    assert batch["image"] is not first.sample["image"].column[0]
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]


@pytest.mark.parametrize(
    "first",
    [
        {"image": np.zeros((BIG,), dtype=np.uint8)},  # a numpy array in the raw area: decoded as usual
        {"image": torch.zeros(16)},  # a small payload: not worth a recv per tensor
        b"not a payload" * (BIG // 8),  # undecodable: received whole, dead-lettered by the loader
    ],
    ids=["numpy", "small", "undecodable"],
)
def test_what_is_not_placed_is_received_as_usual(own_server: RedisServer, first: Any) -> None:
    client = own_server.client()
    samples = [big_sample(i) for i in range(3)]
    store = BatchStore.open(client, make_config(batch_size=3, steps_per_epoch=1))
    payloads = [first if isinstance(first, bytes) else codec.encode(first)]
    payloads += [codec.encode(s) for s in samples[1:]]
    store.materialise(0, list(enumerate(payloads)))
    claimed = store.claim("c", 60, now=0, placer=ColumnPlacer())
    assert claimed is not None
    assert [row.placed for row in claimed.rows] == [None, None, None]  # (placing starts at row 0 or never)
    assert [bytes(row.buffer) for row in claimed.rows] == payloads


def test_pickled_rows_are_placed_only_where_pickle_is_allowed(own_server: RedisServer) -> None:
    samples = [{**big_sample(i), "extra": np.array([object(), i], dtype=object)} for i in range(2)]
    payloads = [codec.encode(s, allow_pickle=True) for s in samples]
    for allow, placed in ((False, [None, None]), (True, ["yes", "yes"])):
        client = own_server.client()
        store = BatchStore.open(client, make_config(batch_size=2, steps_per_epoch=1))
        store.materialise(0, list(enumerate(payloads)))
        claimed = store.claim("c", 60, now=0, placer=ColumnPlacer(allow_pickle=allow))
        assert claimed is not None
        assert [row.placed and "yes" for row in claimed.rows] == placed
        assert [row.payload for row in claimed.rows] == payloads


def test_a_retried_claim_places_afresh(own_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection drops after the first row was placed: the claim is sent again (same op id) and the
    rows are placed again, in new columns; nothing of the first attempt is handed out."""
    from pr_loader.store import wire

    samples = [big_sample(i) for i in range(3)]
    placer = ColumnPlacer()
    real_place, calls = ColumnPlacer.place, []

    def place_then_drop(self: ColumnPlacer, index: int, head: memoryview, size: int) -> Any:
        calls.append(index)
        if calls == [0, 1]:
            raise ConnectionError("dropped mid-reply")
        return real_place(self, index, head, size)

    monkeypatch.setattr(ColumnPlacer, "place", place_then_drop)
    claimed = claim_step(own_server.client(), samples, placer)
    assert calls == [0, 1, 0, 1, 2]
    assert all(row.placed is not None for row in claimed.rows)
    assert_same(tud.default_collate(samples), collated(claimed))
    assert wire.supports(own_server.client())


def test_the_loader_hands_out_placed_columns_like_torch(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side with torch's DataLoader over big rows (batches of 4 and a last one of 2), epoch after
    epoch; the rows were placed."""
    placed: list[bool] = []
    real_place = ColumnPlacer.place

    def counting(self: ColumnPlacer, index: int, head: memoryview, size: int) -> Any:
        pieces = real_place(self, index, head, size)
        placed.append(bool(pieces))
        return pieces

    monkeypatch.setattr(ColumnPlacer, "place", counting)
    data = [big_sample(i) for i in range(10)]
    kwargs = {"batch_size": 4, "shuffle": True}
    reference = tud.DataLoader(data, generator=torch.Generator().manual_seed(5), **kwargs)
    loader = prl.DataLoader(data, generator=torch.Generator().manual_seed(5), redis_url=own_server.url,
                            **kwargs)  # fmt: skip
    assert_same_epochs([list(reference) for _ in range(2)], [list(loader) for _ in range(2)])
    loader.close()
    assert placed.count(True) == 20, placed


def test_rows_of_random_bytes_round_trip_through_the_placer(own_server: RedisServer) -> None:
    """Row 0's raw area starts inside what the reader had buffered with the replies before it (its first
    bytes are copied from there); rows 1.. have another shape, so they end the placing."""
    samples = [{"blob": torch.frombuffer(bytearray(os.urandom(BIG + 8)), dtype=torch.uint8)}]
    samples += [{"blob": torch.zeros(BIG, dtype=torch.uint8)} for _ in range(3)]
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert [row.placed is not None for row in claimed.rows] == [True, False, False, False]
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]
