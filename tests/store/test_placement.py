"""Big rows' tensors received straight into batch columns (pr_loader.collate.ColumnPlacer through
pr_loader.store.wire), on real redis-servers: the same batches as decoding and collating, one copy less."""

from __future__ import annotations

import os
import pickle
import socket
from typing import Any

import numpy as np
import pytest
import redis
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader import codec
from pr_loader.codec import RawTensor
from pr_loader.collate import ColumnPlacer, collate_raw
from pr_loader.store import BatchStore, ClaimedStep, StoredRow
from tests.loader.conftest import assert_same, assert_same_epochs
from tests.servers import REDIS_SERVER, RedisServer
from tests.store.conftest import make_config

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")

BIG = 256 << 10  # bytes of a row's image


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
    """What the dataset's build gives."""
    return collate_raw([ColumnPlacer.decode(row) for row in claimed.rows])


def placed(claimed: ClaimedStep) -> list[bool]:
    """Per row, whether its tensors are where they were received (in their batch columns)."""
    out = []
    for row in claimed.rows:
        sample = ColumnPlacer.decode(row)
        tensor = next(value for value in sample.values() if isinstance(value, RawTensor))
        out.append(row.placed is not None and tensor.column is not None)
    return out


def columns(claimed: ClaimedStep) -> list[torch.Tensor]:
    """The batch columns the claim's rows were received into."""
    first = claimed.rows[0].placed
    assert first is not None
    return list(first.plan[1][0])


def test_big_rows_are_received_into_the_columns_the_collate_hands_out(own_server: RedisServer) -> None:
    samples = [big_sample(i) for i in range(5)]
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert placed(claimed) == [True] * 5
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    for key, column in zip(("image", "scores", "label", "mask"), columns(claimed)):  # (in payload order)
        assert batch[key] is column  # no copy: the column each row was received into
        assert batch[key]._base is None and batch[key].is_contiguous()
    # the payload is whole again on demand (and pickles whole): the tensors' bytes from their columns
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]
    sent = pickle.loads(pickle.dumps(claimed))
    assert [row.payload for row in sent.rows] == [row.payload for row in claimed.rows]


def test_a_row_of_another_layout_decodes_from_its_joined_bytes(
    own_server: RedisServer,
) -> None:
    """Row 2 holds its keys in another order (its tensors lie elsewhere in its raw area): it gets its bytes
    back and decodes as usual, the other rows are placed, and every column is copied (no column has all its
    rows in place)."""
    samples = [big_sample(i) for i in range(4)]
    samples[2] = dict(reversed(list(samples[2].items())))
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert placed(claimed) == [True, True, False, True]
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    assert not any(batch[key] is column for key in batch for column in columns(claimed))
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]


@pytest.mark.parametrize(
    "first",
    [
        {"image": np.zeros((BIG,), dtype=np.uint8)},  # a numpy array in the raw area: decoded as usual
        {"image": torch.zeros(16)},  # small tensors: the scatter list would cost more than the copy
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
    assert [row.placed for row in claimed.rows] == [None, None, None]  # (row 0 sets the layout, or none)
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
    """The connection drops while the receive of the reply is planned: the claim is sent again (same op
    id) and its rows are placed in new columns; nothing of the first attempt is handed out."""
    samples = [big_sample(i) for i in range(3)]
    real_destinations, calls = ColumnPlacer.destinations, []

    def destinations_then_drop(self: ColumnPlacer, index: int, size: int) -> list[memoryview]:
        calls.append(index)
        if calls == [0, 1]:
            raise ConnectionError("dropped mid-reply")
        return real_destinations(self, index, size)

    monkeypatch.setattr(ColumnPlacer, "destinations", destinations_then_drop)
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert calls == [0, 1, 0, 1, 2]
    assert placed(claimed) == [True] * 3
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    assert batch["image"] is columns(claimed)[0]


def test_the_loader_hands_out_placed_columns_like_torch(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Side by side with torch's DataLoader over big rows, epoch after epoch; every column of every batch
    was handed out as received (four tensors with bytes per row, three steps per epoch)."""
    from pr_loader import collate

    handed_out: list[bool] = []
    real_placed_column = collate._placed_column

    def recording(batch: list[Any]) -> torch.Tensor | None:
        column = real_placed_column(batch)
        handed_out.append(column is not None)
        return column

    monkeypatch.setattr(collate, "_placed_column", recording)
    data = [big_sample(i) for i in range(12)]
    kwargs: dict[str, Any] = {"batch_size": 4, "shuffle": True}
    reference = tud.DataLoader(data, generator=torch.Generator().manual_seed(5), **kwargs)
    loader = prl.DataLoader(data, generator=torch.Generator().manual_seed(5), redis_url=own_server.url,
                            **kwargs)  # fmt: skip
    assert_same_epochs([list(reference) for _ in range(2)], [list(loader) for _ in range(2)])
    loader.close()
    assert handed_out == [True] * 24


@pytest.mark.parametrize("min_tail", [4 << 10, ColumnPlacer.min_tail])
def test_rl_prompt_rows_with_heads_of_many_sizes(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch, min_tail: int
) -> None:
    """Rows of three 8 KiB tensors and a prompt of varying length (heads of different sizes): placed where
    their 24 KiB of tensors reach ``min_tail`` (not by default: for rows this small the scatter list cost
    more than the copy it saved in ``bench_loader``'s (b)), each column then handed out as received."""
    monkeypatch.setattr(ColumnPlacer, "min_tail", min_tail)
    samples = [{"input_ids": torch.arange(1024) * i, "attention_mask": torch.ones(1024, dtype=torch.int64),
                "position_ids": torch.arange(1024), "prompt": "why? " * (i % 7), "index": i * 1000}
               for i in range(40)]  # fmt: skip
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    batch = collated(claimed)
    assert_same(tud.default_collate(samples), batch)
    if min_tail > 3 * 8192:
        assert [row.placed for row in claimed.rows] == [None] * 40
        return
    assert placed(claimed) == [True] * 40
    keys = ("input_ids", "attention_mask", "position_ids")
    assert all(batch[key] is column for key, column in zip(keys, columns(claimed)))


def test_rows_of_random_bytes_round_trip_through_the_placer(own_server: RedisServer) -> None:
    """Row 0's raw area starts inside what the reader had buffered with the replies before it (its first
    bytes are copied from there); rows 1.. have another shape: received as planned for row 0's, they decode
    from their joined bytes."""
    samples = [{"blob": torch.frombuffer(bytearray(os.urandom(BIG + 8)), dtype=torch.uint8)}]
    samples += [{"blob": torch.zeros(BIG, dtype=torch.uint8)} for _ in range(3)]
    claimed = claim_step(own_server.client(), samples, ColumnPlacer())
    assert placed(claimed) == [True, False, False, False]
    assert [row.payload for row in claimed.rows] == [codec.encode(s) for s in samples]


class DribblingSocket:
    """A socket that hands out a reply ``piece`` bytes per call at most, as a slow sender or a signal would
    cut a ``MSG_WAITALL`` receive short. It checks the rule that keeps a receive under ``SO_RCVLOWAT`` from
    waiting forever: a receive that asks for ``n`` bytes while the mark is above 1 must leave at least the
    mark's worth still to arrive after them (the kernel wakes a waiting receive when the bytes *queued* reach
    the mark)."""

    def __init__(self, data: bytes, piece: int, family: int = socket.AF_UNIX) -> None:
        self.data, self.at, self.piece, self.family = data, 0, piece, family
        self.lowat, self.marked_receives = 1, 0

    def setsockopt(self, level: int, option: int, value: int) -> None:
        assert (level, option) == (socket.SOL_SOCKET, socket.SO_RCVLOWAT)
        self.lowat = value

    def _give(self, n: int) -> bytes:
        chunk = self.data[self.at : self.at + min(n, self.piece)]
        self.at += len(chunk)
        return chunk

    def _take(self, n: int) -> bytes:
        if self.lowat > 1:
            assert len(self.data) - (self.at + n) >= self.lowat, "this receive could wait forever"
            self.marked_receives += 1
        return self._give(n)

    def recv(self, n: int) -> bytes:
        return self._take(n)

    def recv_into(self, buffer: memoryview, n: int, flags: int = 0) -> int:
        chunk = self._take(n)
        buffer[: len(chunk)] = chunk
        return len(chunk)

    def recvmsg_into(self, buffers: list[memoryview], ancbufsize: int = 0, flags: int = 0) -> tuple[Any, ...]:
        if self.lowat > 1:  # (what this receive asks for in all: MSG_WAITALL fills every buffer)
            assert len(self.data) - (self.at + sum(len(b) for b in buffers)) >= self.lowat
            self.marked_receives += 1
        got = 0
        for buffer in buffers:
            chunk = self._give(len(buffer))
            buffer[: len(chunk)] = chunk
            got += len(chunk)
            if len(chunk) < len(buffer):
                break
        return got, [], 0, None


@pytest.mark.parametrize("family", [socket.AF_UNIX, socket.AF_INET])
@pytest.mark.parametrize("piece", [7, 4096, 70_000, 1 << 30])
def test_the_scatter_receive_survives_short_reads(piece: int, family: int) -> None:
    """The placed receive off a socket that returns a few bytes at a time (and whose first bytes the
    reader buffered while parsing the array header): every payload whole again, every row in its column.
    On TCP its 1.7 MB go under the wakeup mark, never asking for bytes the mark could wait for forever."""
    from pr_loader.store import wire

    samples = [{"blob": torch.arange(70_000 + 1, dtype=torch.int64) * i, "i": i} for i in range(3)]
    payloads = [codec.encode(s) for s in samples]
    reply = b"*3\r\n" + b"".join(b"$%d\r\n%s\r\n" % (len(p), p) for p in payloads) + b"tail"
    total, offsets = wire._bulk_array(b" ".join(b"%d" % len(p) for p in payloads))
    sock = DribblingSocket(reply, piece, family)
    reader = wire._Reader(sock)  # type: ignore[arg-type]
    reader.peek()  # (buffers the reply's first bytes, as parsing the EXEC header before it does)
    placer = ColumnPlacer()
    rows = wire._slice_payloads(reader.exactly(total, offsets, placer), offsets)
    assert sorted(placer.placements) == [0, 1, 2]
    stored = [StoredRow(str(i), row, placer.placements[i]) for i, row in enumerate(rows) if row is not None]
    assert [row.payload for row in stored] == payloads
    batch = collate_raw([ColumnPlacer.decode(row) for row in stored])
    assert_same(tud.default_collate(samples), batch)
    assert batch["blob"] is placer.placements[0].plan[1][0][0]
    assert sock.lowat == 1 and (sock.marked_receives > 0) == (family == socket.AF_INET)


@pytest.mark.parametrize("size", [(1 << 20) - 1, 1 << 20, (1 << 20) + 1, 3 << 20])
@pytest.mark.parametrize("piece", [4096, 1 << 30])
def test_a_big_unplaced_reply_under_the_wakeup_mark(size: int, piece: int) -> None:
    """A reply received whole into one buffer (no placer) on TCP, at sizes around twice the mark: the mark
    is raised only where a receive leaves that much to come, and is back at 1 after."""
    from pr_loader.store import wire

    reply = os.urandom(size) + b":1\r\n"
    sock = DribblingSocket(reply, piece, socket.AF_INET)
    reader = wire._Reader(sock)  # type: ignore[arg-type]
    buffer, got = reader.exactly(size)
    assert got == size and bytes(buffer[:size]) == reply[:size]
    assert reader.value() == 1
    assert sock.lowat == 1 and (sock.marked_receives > 0) == (size >= 2 * wire._WAKE_BYTES)
