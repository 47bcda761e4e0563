"""Bad input matrix (DESIGN invariant 5): each case raises a PrLoaderError subclass that names the thing at
fault, and the data stored in Redis is unchanged by the failing call (keys dumped before and after).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch

from pr_loader import codec
from pr_loader.dataloader import DataLoader
from pr_loader.dataset import RedisBatchDataset
from pr_loader.errors import (
    CodecError,
    DatasetError,
    DurabilityError,
    RollbackOutOfRange,
    RowsNotInStep,
    RunConfigMismatch,
    StateDictError,
    StoreAuthError,
    StoreUnavailable,
)
from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import check_durability, connect
from pr_loader.store.records import RunConfig
from tests.chaos.helpers import check_exactly_once, diff_snapshots, snapshot
from tests.servers import REDIS_SERVER, RedisServer, free_port

pytestmark = [pytest.mark.redis]

PASSWORD = "correct-horse-battery"


def _data(n: int = 16) -> list[dict[str, Any]]:
    return [{"i": i, "x": torch.tensor([float(i)])} for i in range(n)]


def _loader(url: str, run_id: str, data: Any = None, **kwargs: Any) -> DataLoader:
    kwargs.setdefault("batch_size", 4)
    return DataLoader(_data() if data is None else data, redis_url=url, run_id=run_id, **kwargs)


class _Dump:
    """Snapshot of every pr_loader key of a server, for 'unchanged' assertions."""

    def __init__(self, server: RedisServer) -> None:
        self.client = server.client()

    def __call__(self) -> dict[str, tuple[str, Any]]:
        return snapshot(self.client, "prl:*")

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def dump(redis_server: RedisServer) -> Iterator[_Dump]:
    d = _Dump(redis_server)
    yield d
    d.close()


def _mentions(message: str, *words: object) -> bool:
    return all(re.search(rf"(?<![\w]){re.escape(str(w))}(?![\w])", message) for w in words)


# ---------------------------------------------------------------------------------------------------
# corrupt or foreign bytes in a batch


def _corrupt_step0(url: str, run_id: str, linked: bool) -> tuple[DataLoader, dict[str, bytes]]:
    loader = _loader(url, run_id, linked=linked)
    source = loader.source
    source.materialise(0)
    shard = source.shard()
    rows = shard.store.read_rows(0)
    bad = {
        rows[0].ref.encode(): b"\x00\xffnot a pr_loader payload",
        rows[1].ref.encode(): codec.MAGIC + b"\x01\x00" + b"\xff" * 8 + b"truncated",
    }
    if linked:  # a valid codec payload that is not a row (dict): bad for a linked view only
        bad[rows[2].ref.encode()] = codec.encode([1, 2, 3])
    keys = shard.keys
    if hasattr(keys, "payload"):  # one string key per payload
        for ref, data in bad.items():
            shard.client.set(keys.payload(ref), data)
    else:  # one hash of payloads
        shard.client.hset(keys.payloads, mapping=bad)
    return loader, bad


def test_corrupt_payloads_are_dead_lettered_and_the_step_continues(redis_server: RedisServer) -> None:
    loader, bad = _corrupt_step0(redis_server.url, "corrupt-linked", linked=True)
    try:
        seen: list[str] = []
        first = True
        for view in loader:
            ids = view.sample_ids()
            if first:
                assert len(ids) == 1, f"step 0 should keep only its one good row, got {ids}"
                first = False
            seen += ids
        store = loader.source.shard().store
        dead = store.dead_letters()
        assert {d.ref.encode(): d.payload for d in dead} == bad, "dead letters must keep the exact bytes"
        assert all(d.step == 0 and d.reason for d in dead)
        assert store.stats().dead_letters == 3
        report = check_exactly_once(
            seen + [d.ref.key() for d in dead], [f"0:{i}" for i in range(16)], tally=None
        )
        assert report.ok, report.describe()
    finally:
        loader.close()


def test_corrupt_payload_in_plain_loader_is_dead_lettered(redis_server: RedisServer) -> None:
    """The drop-in (linked=False) loader meets the same corrupt bytes: dead letter + the step goes on,
    not an exception that leaves the step in flight forever."""
    loader, bad = _corrupt_step0(redis_server.url, "corrupt-plain", linked=False)
    try:
        batches = []
        for batch in loader:
            batches.append(batch["i"].tolist())
        store = loader.source.shard().store
        assert {d.ref.encode(): d.payload for d in store.dead_letters()} == bad
        assert len(batches[0]) == 2
        seen = [i for batch in batches for i in batch] + [d.ref.index for d in store.dead_letters()]
        assert sorted(seen) == list(range(16))
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------------
# re-opening a run with other settings


def _make_run(url: str, run_id: str) -> None:
    loader = _loader(url, run_id, shuffle=True, generator=torch.Generator().manual_seed(1))
    try:
        next(iter(loader))
        loader.state_dict()  # commits step 0
    finally:
        loader.close()


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ("dataset_content", "dataset_fingerprint"),
        ("dataset_length", "dataset_fingerprint"),
        ("batch_size", "batch_size"),
        ("seed", "seed"),
    ],
)
def test_reopen_with_other_settings(redis_server: RedisServer, dump: _Dump, change: str, field: str) -> None:
    run_id = f"reopen-{change}"
    _make_run(redis_server.url, run_id)
    kwargs: dict[str, Any] = {"shuffle": True, "generator": torch.Generator().manual_seed(1)}
    data = _data()
    if change == "dataset_content":
        data = [{"text": f"another dataset {i}"} for i in range(16)]  # same type and length, other rows
    elif change == "dataset_length":
        data = _data(20)
    elif change == "batch_size":
        kwargs["batch_size"] = 8
    elif change == "seed":
        kwargs["generator"] = torch.Generator().manual_seed(2)
    before = dump()
    loader = _loader(redis_server.url, run_id, data, **kwargs)
    try:
        with pytest.raises(RunConfigMismatch) as info:
            next(iter(loader))
        assert info.value.field == field, f"the error names {info.value.field!r}, the change was {change}"
        assert field in str(info.value)
    finally:
        loader.close()
    assert diff_snapshots(before, dump()) == []


def test_reopen_store_with_other_config(redis_server: RedisServer, dump: _Dump) -> None:
    """The same at the store level, for every identity field of RunConfig."""
    client = connect(redis_server.url)
    base = RunConfig(
        "store-reopen", batch_size=4, steps_per_epoch=3, dataset_fingerprint="fp", seed=1, num_epochs=2
    )
    try:
        BatchStore.open(client, base).materialise(0, [(i, b"x") for i in range(4)])
        before = dump()
        for name, value in [
            ("batch_size", 5),
            ("steps_per_epoch", 4),
            ("dataset_fingerprint", "other"),
            ("seed", 2),
            ("policy", "PostponeToNext"),
            ("num_epochs", 3),
        ]:
            changed = RunConfig(**{**base.__dict__, name: value})
            with pytest.raises(RunConfigMismatch) as info:
                BatchStore.open(client, changed)
            assert info.value.field == name and name in str(info.value)
        assert diff_snapshots(before, dump()) == []
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------
# postpone_samples with rows that are not in the batch


def test_postpone_rows_not_in_step_or_already_postponed(redis_server: RedisServer, dump: _Dump) -> None:
    # RedisBatchDataset (no read-ahead thread writing in the background between the snapshots)
    loader = RedisBatchDataset(
        _data(), batch_size=4, redis_url=redis_server.url, run_id="postpone-bad", policy="PostponeToNext"
    )
    try:
        view = next(iter(loader))
        first = view.select_idxs([0])
        assert view.postpone_samples(first) is True
        before = dump()
        with pytest.raises(RowsNotInStep) as info:
            view.postpone_samples(first)  # already postponed
        assert first.non_tensor_batch["prl_sample_id"][0] in str(info.value)
        assert "already postponed" in str(info.value)
        foreign = view.select_idxs([0])
        foreign.non_tensor_batch["prl_sample_id"] = np.array(["0:999"], dtype=object)
        with pytest.raises(RowsNotInStep) as info:
            view.postpone_samples(foreign)
        assert "0:999" in str(info.value)
        # all or nothing: one good row and one foreign row postpone neither
        mixed = view.select_idxs([0, 1])
        mixed.non_tensor_batch["prl_sample_id"] = np.array([view.sample_ids()[0], "0:998"], dtype=object)
        with pytest.raises(RowsNotInStep):
            view.postpone_samples(mixed)
        assert diff_snapshots(before, dump()) == []
    finally:
        loader.close()


def test_store_postpone_refs_not_in_step(redis_server: RedisServer, dump: _Dump) -> None:
    client = connect(redis_server.url)
    config = RunConfig(
        "store-postpone",
        batch_size=2,
        steps_per_epoch=3,
        dataset_fingerprint="fp",
        num_epochs=1,
        policy="PostponeToNext",
    )
    try:
        store = BatchStore.open(client, config)
        for s in range(3):
            store.materialise(s, [(2 * s, b"a"), (2 * s + 1, b"b")])
        claimed = store.claim("c", 60, now=0.0)
        assert claimed is not None
        other = store.read_rows(1)[0]
        before = dump()
        with pytest.raises(RowsNotInStep) as info:
            store.postpone(0, "c", [(claimed.rows[0].ref, b"p"), (other.ref, b"p")], 2, now=1.0)
        assert other.ref.encode() in str(info.value)
        assert diff_snapshots(before, dump()) == []
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------
# state_dict problems


def test_state_dict_of_another_run(redis_server: RedisServer, dump: _Dump) -> None:
    a = _loader(redis_server.url, "state-a")
    b = _loader(redis_server.url, "state-b")
    try:
        next(iter(a))
        state = a.state_dict()
        a.close()  # stops the read-ahead thread, which would materialise in the background
        b.state_dict()  # creates run b without an iterator
        before = dump()
        with pytest.raises(StateDictError) as info:
            b.load_state_dict(state)
        assert "state-a" in str(info.value) and "state-b" in str(info.value)
        with pytest.raises(StateDictError):
            b.load_state_dict({**state, "run_id": "state-b", "fingerprint": "list:99:00000000"})
        with pytest.raises(StateDictError):
            b.load_state_dict({"version": 99})
        assert diff_snapshots(before, dump()) == []
    finally:
        a.close()
        b.close()


def test_state_dict_older_than_retain_steps(redis_server: RedisServer, dump: _Dump) -> None:
    loader = _loader(redis_server.url, "state-old", batch_size=2, retain_steps=2)
    try:
        it = iter(loader)
        next(it)
        old = loader.state_dict()
        assert old["step"] == 0
        for _ in range(5):
            next(it)
        now_state = loader.state_dict()
        assert now_state["step"] == 5
        loader.close()  # stop the read-ahead thread before the snapshots
        before = dump()
        with pytest.raises(RollbackOutOfRange) as info:
            loader.load_state_dict(old)
        assert _mentions(str(info.value), 0), str(info.value)
        assert diff_snapshots(before, dump()) == []
        loader.load_state_dict(now_state)  # a recent one still works
    finally:
        loader.close()


# ---------------------------------------------------------------------------------------------------
# the server: unreachable, wrong password, no AOF


def test_unreachable_redis_names_the_address() -> None:
    port = free_port()
    with pytest.raises(StoreUnavailable) as info:
        connect(f"redis://127.0.0.1:{port}/0", retry_seconds=0.3)
    assert f"127.0.0.1:{port}" in str(info.value)


def test_redis_dies_under_an_open_store(redis_server: RedisServer, dump: _Dump) -> None:
    client = connect(redis_server.url)
    config = RunConfig("dies", batch_size=2, steps_per_epoch=2, dataset_fingerprint="fp", num_epochs=1)
    store = BatchStore.open(client, config, retry_seconds=0.5)
    store.materialise(0, [(0, b"a"), (1, b"b")])
    before = dump()
    redis_server.kill()
    try:
        with pytest.raises(StoreUnavailable) as info:
            store.claim("c", 60, now=0.0)
        assert str(redis_server.port) in str(info.value)
    finally:
        redis_server.start()
        client.close()
    assert diff_snapshots(before, dump()) == []


class _PasswordServer(RedisServer):
    def client(self, **kwargs: object) -> redis.Redis:
        return super().client(password=PASSWORD, **kwargs)


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = _PasswordServer(tmp_path / "auth", extra_args=["--requirepass", PASSWORD]).start()
    yield server
    server.stop()


@pytest.mark.parametrize("given", ["wrong-password", None])
def test_wrong_password(password_server: RedisServer, given: str | None) -> None:
    url = f"redis://127.0.0.1:{password_server.port}/0"
    with pytest.raises(StoreAuthError) as info:
        connect(url, password=given, retry_seconds=0.5)
    message = str(info.value)
    assert f"127.0.0.1:{password_server.port}" in message
    assert PASSWORD not in message and (given is None or given not in message)
    connect(url, password=PASSWORD).close()  # the right one works


@pytest.fixture
def no_aof_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "noaof", appendonly=False).start()
    yield server
    server.stop()


def test_durability_always_without_aof_connection_check(no_aof_server: RedisServer) -> None:
    client = connect(no_aof_server.url)
    try:
        with pytest.raises(DurabilityError) as info:
            check_durability(client, "always")
        assert "appendonly" in str(info.value)
    finally:
        client.close()


def test_durability_always_without_aof_loader(no_aof_server: RedisServer) -> None:
    """DataLoader(durability="always") on a server without AOF must refuse before storing anything."""
    dump = _Dump(no_aof_server)
    loader = _loader(no_aof_server.url, "durable", durability="always")
    try:
        with pytest.raises(DurabilityError) as info:
            next(iter(loader))
        assert "appendonly" in str(info.value)
        assert dump() == {}, "nothing may be stored on a server that cannot give the asked durability"
    finally:
        loader.close()
        dump.close()


# ---------------------------------------------------------------------------------------------------
# the dataset: unsupported types, __getitem__ raising


class _Opaque:
    pass


@pytest.mark.parametrize("bad", [{1, 2}, _Opaque(), lambda: 0])
def test_unsupported_sample_types(redis_server: RedisServer, dump: _Dump, bad: object) -> None:
    data: list[Any] = [{"i": i} for i in range(8)]
    data[2] = {"i": 2, "extra": {"nested": bad}}
    _make_plain = _loader(redis_server.url, f"types-{type(bad).__name__}", data, batch_size=4)
    try:
        before = dump()
        with pytest.raises(CodecError) as info:
            next(iter(_make_plain))
        message = str(info.value)
        assert type(bad).__name__ in message and "nested" in message, message
        after = dump()
        # the plan may be written; no batch, row or payload of the failed step may be
        assert not [k for k in diff_snapshots(before, after) if re.search(r":(batch|rows|payloads|steps)", k)]
    finally:
        _make_plain.close()


class _FlakyDataset(torch.utils.data.Dataset[dict[str, Any]]):
    def __init__(self, n: int, bad_index: int) -> None:
        self.n = n
        self.bad_index = bad_index
        self.broken = True

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict[str, Any]:
        if self.broken and index == self.bad_index:
            raise OSError("disk read failed")  # says nothing about the index itself
        return {"i": index}


@pytest.mark.parametrize("bad_index", [18, 28])  # positions 2 and 12 of batch 1 (indices 16..31)
def test_dataset_getitem_raises(redis_server: RedisServer, dump: _Dump, bad_index: int) -> None:
    data = _FlakyDataset(32, bad_index=bad_index)
    loader = _loader(redis_server.url, f"flaky-{bad_index}", data, batch_size=16)
    try:
        it = iter(loader)
        first = next(it)["i"].tolist()
        loader.state_dict()
        before = dump()
        with pytest.raises(DatasetError) as info:
            next(it)
        assert diff_snapshots(before, dump()) == [], "a failed read must leave the run as it was"
        data.broken = False
        rest = [b["i"].tolist() for b in loader]
        seen = [i for batch in [first, *rest] for i in batch]
        assert sorted(seen) == list(range(32)), seen
        # last: the error names the index that failed (not only the first few of its batch)
        assert _mentions(str(info.value), bad_index), f"the error must name index {bad_index}: {info.value}"
    finally:
        loader.close()
