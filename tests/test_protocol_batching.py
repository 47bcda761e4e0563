"""DataProto: chunk/split/concat, repeats, padding, folding, iteration, serialisation, pickling."""

from __future__ import annotations

import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from pr_loader.errors import DataProtoError
from pr_loader.protocol import (
    DataProto,
    DataProtoConfig,
    DataProtoItem,
    collate_fn,
    deserialize_single_tensor,
    deserialize_tensordict,
    fold_batch_dim,
    pad_dataproto_to_divisor,
    serialize_single_tensor,
    serialize_tensordict,
    unfold_batch_dim,
    unpad_dataproto,
)
from pr_loader.protocol_ops import object_array
from tests.test_protocol import make, uids


@pytest.fixture
def auto_padding() -> Iterator[None]:
    DataProtoConfig.auto_padding = True
    try:
        yield
    finally:
        DataProtoConfig.auto_padding = False


def row_ids(data: DataProto) -> list[int]:
    return [int(u[1:]) for u in uids(data)]


# ----------------------------------------------------------------------------- chunk / split
def test_chunk_equal_parts_share_meta_and_views() -> None:
    data = make(6)
    parts = data.chunk(3)
    assert [row_ids(p) for p in parts] == [[0, 1], [2, 3], [4, 5]]
    assert [p.batch["ids"][:, 0].tolist() for p in parts] == [[0, 3], [6, 9], [12, 15]]
    assert all(p.meta_info is data.meta_info for p in parts)
    parts[0].batch["ids"][0, 0] = -1  # views, as verl's TensorDict.chunk
    assert data.batch["ids"][0, 0] == -1
    assert [len(p) for p in make(3, tensors=False).chunk(3)] == [1, 1, 1]


def test_chunk_requires_divisible_without_padding() -> None:
    with pytest.raises(DataProtoError, match="5 rows into 2 chunks"):
        make(5).chunk(2)
    with pytest.raises(DataProtoError, match="positive"):
        make(4).chunk(0)


def test_chunk_with_auto_padding_config(auto_padding: None) -> None:
    data = make(5)
    assert data.is_padding_enabled()
    assert [row_ids(p) for p in data.chunk(2)] == [[0, 1, 2], [3, 4]]
    assert [len(p) for p in data.chunk(4)] == [2, 1, 1, 1]
    assert [len(p) for p in make(2).chunk(3)] == [1, 1, 0]


def test_chunk_with_per_object_padding_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    data = DataProto.from_dict(tensors={"x": torch.arange(5)}, auto_padding=True)
    assert [p.batch["x"].tolist() for p in data.chunk(2)] == [[0, 1, 2], [3, 4]]
    plain = make(5)
    monkeypatch.setenv("VERL_AUTO_PADDING", "1")
    assert plain.is_padding_enabled() and DataProtoConfig.auto_padding
    monkeypatch.setenv("VERL_AUTO_PADDING", "false")
    assert not plain.is_padding_enabled()
    with pytest.raises(DataProtoError, match="bool"):
        DataProtoConfig.auto_padding = 1  # type: ignore[assignment]


def test_padding_then_chunk() -> None:
    data = make(5)
    data.padding(3)
    assert row_ids(data) == [0, 1, 2, 3, 4, 4, 4, 4]
    assert data.batch["ids"][:, 0].tolist() == [0, 3, 6, 9, 12, 12, 12, 12]
    assert [row_ids(p) for p in data.chunk(4)] == [[0, 1], [2, 3], [4, 4], [4, 4]]
    first = make(2)
    first.padding(1, padding_candidate="first")
    assert row_ids(first) == [0, 1, 0]
    same = make(2)
    same.padding(0)
    assert len(same) == 2
    with pytest.raises(DataProtoError, match=">= 0"):
        same.padding(-1)
    with pytest.raises(DataProtoError, match="without rows"):
        make(0).padding(1)


def test_split() -> None:
    data = make(5)
    assert [row_ids(p) for p in data.split(2)] == [[0, 1], [2, 3], [4]]
    assert data.split(10)[0] is not data and len(data.split(10)) == 1
    assert make(0).split(2) == []
    with pytest.raises(DataProtoError, match="positive"):
        data.split(0)


# ----------------------------------------------------------------------------- concat
def test_concat_rows_and_meta() -> None:
    parts = make(6).chunk(3)
    out = DataProto.concat(parts)
    assert row_ids(out) == list(range(6))
    assert out.batch["ids"][:, 0].tolist() == [0, 3, 6, 9, 12, 15]
    assert out.meta_info == {"temperature": 0.7}
    assert out.meta_info is not parts[0].meta_info
    no_tensors = DataProto.concat(make(4, tensors=False).chunk(2))
    assert no_tensors.batch is None and row_ids(no_tensors) == [0, 1, 2, 3]
    assert len(DataProto.concat([make(0), make(2)])) == 2


def test_concat_merges_metrics_per_worker() -> None:
    parts = make(4).chunk(2)
    parts[0].meta_info = {"temperature": 0.7, "metrics": {"loss": 1.0, "lr": 0.1}}
    parts[1].meta_info = {"metrics": [{"loss": 2.0}, {"loss": 3.0, "acc": 0.5}], "temperature": 0.7}
    out = DataProto.concat(parts)
    assert out.meta_info == {
        "temperature": 0.7,
        "metrics": {"loss": [1.0, 2.0, 3.0], "lr": [0.1], "acc": [0.5]},
    }
    none_metrics = make(2).chunk(2)
    none_metrics[0].meta_info = {"metrics": None}
    assert "metrics" not in DataProto.concat(none_metrics).meta_info


def test_concat_errors() -> None:
    left, right = make(2), make(2)
    right.meta_info = {"temperature": 1.0}
    with pytest.raises(DataProtoError, match="conflicting values for meta_info key 'temperature'"):
        DataProto.concat([left, right])
    with pytest.raises(DataProtoError, match="empty"):
        DataProto.concat([])
    with pytest.raises(DataProtoError, match="with and without tensors"):
        DataProto.concat([make(2), make(2, tensors=False)])
    with pytest.raises(DataProtoError, match="with and without tensors"):
        DataProto.concat([make(2, tensors=False), make(2)])
    with pytest.raises(DataProtoError, match="batch keys"):
        DataProto.concat([make(2), make(2).select(batch_keys=["ids"])])
    with pytest.raises(DataProtoError, match="keys"):
        DataProto.concat([make(2), make(2).select(non_tensor_batch_keys=["uid"])])
    bad = make(2)
    bad.meta_info = {"metrics": [1]}
    with pytest.raises(DataProtoError, match="must be a dict"):
        DataProto.concat([bad])


def test_concat_ragged_object_columns() -> None:
    a = DataProto(non_tensor_batch={"r": object_array([np.arange(2), np.arange(3)])})
    b = DataProto(non_tensor_batch={"r": object_array([np.arange(1)])})
    out = DataProto.concat([a, b])
    assert out.non_tensor_batch["r"].shape == (3,)
    assert [len(x) for x in out.non_tensor_batch["r"]] == [2, 3, 1]


# ----------------------------------------------------------------------------- reorder / repeat
def test_reorder_in_place() -> None:
    data = make(4)
    assert data.reorder(torch.tensor([3, 0, 2, 1])) is None
    assert row_ids(data) == [3, 0, 2, 1]
    assert data.batch["ids"][:, 0].tolist() == [9, 0, 6, 3]
    data.reorder(np.array([1, 0, 2, 3]))
    assert row_ids(data) == [0, 3, 2, 1]
    nt = make(3, tensors=False)
    nt.reorder([2, 1, 0])
    assert row_ids(nt) == [2, 1, 0]


def test_repeat_interleave_and_tile() -> None:
    data = make(2)
    inter = data.repeat(3)
    assert row_ids(inter) == [0, 0, 0, 1, 1, 1]
    assert inter.batch["ids"][:, 0].tolist() == [0, 0, 0, 3, 3, 3]
    tile = data.repeat(repeat_times=2, interleave=False)
    assert row_ids(tile) == [0, 1, 0, 1]
    assert tile.batch["mask"].shape == (4, 3)
    assert len(data.repeat(0)) == 0
    assert row_ids(make(2, tensors=False).repeat(2, interleave=False)) == [0, 1, 0, 1]
    with pytest.raises(DataProtoError, match=">= 0"):
        data.repeat(-1)


@pytest.mark.parametrize("counts", [[2, 0, 1], (2, 0, 1), np.array([2, 0, 1]), torch.tensor([2, 0, 1])])
def test_sample_level_repeat(counts: Any) -> None:
    out = make(3).sample_level_repeat(counts)
    assert row_ids(out) == [0, 0, 2]
    assert out.batch["ids"][:, 0].tolist() == [0, 0, 6]


def test_sample_level_repeat_errors() -> None:
    with pytest.raises(DataProtoError, match="3 entries"):
        make(3).sample_level_repeat([1, 1])
    with pytest.raises(DataProtoError, match="non-negative"):
        make(2).sample_level_repeat([1, -1])
    with pytest.raises(DataProtoError, match="non-negative integers"):
        make(2).sample_level_repeat([1.5, 1])


def test_unfold_column_chunks() -> None:
    data = DataProto.from_dict(
        tensors={"group": torch.arange(8).reshape(2, 4), "score": torch.tensor([10, 20])},
        non_tensors={"names": np.array([["a", "b"], ["c", "d"]], dtype=object), "uid": ["x", "y"]},
        meta_info={"m": 1},
    )
    out = data.unfold_column_chunks(2, split_keys=["group", "names"])
    assert out.batch["group"].tolist() == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert out.batch["score"].tolist() == [10, 10, 20, 20]
    assert out.non_tensor_batch["names"].tolist() == [["a"], ["b"], ["c"], ["d"]]
    assert list(out.non_tensor_batch["uid"]) == ["x", "x", "y", "y"]
    assert out.meta_info == {"m": 1}
    repeated = data.unfold_column_chunks(2)
    assert repeated.batch["group"].shape == (4, 4)
    with pytest.raises(DataProtoError, match="does not split into 3"):
        data.unfold_column_chunks(3, split_keys=["group"])
    with pytest.raises(DataProtoError, match="positive"):
        data.unfold_column_chunks(0)
    assert list(make(2, tensors=False).unfold_column_chunks(2).non_tensor_batch["uid"]) == [
        "u0",
        "u0",
        "u1",
        "u1",
    ]


# ----------------------------------------------------------------------------- padding helpers
def test_pad_and_unpad_to_divisor() -> None:
    data = make(5)
    padded, pad = pad_dataproto_to_divisor(data, 4)
    assert pad == 3
    assert row_ids(padded) == [0, 1, 2, 3, 4, 0, 1, 2]
    assert padded.batch["ids"][:, 0].tolist() == [0, 3, 6, 9, 12, 0, 3, 6]
    big, pad = pad_dataproto_to_divisor(make(2), 7)
    assert pad == 5 and row_ids(big) == [0, 1, 0, 1, 0, 1, 0]
    unpadded = unpad_dataproto(padded, 3)
    assert row_ids(unpadded) == [0, 1, 2, 3, 4]
    same, pad = pad_dataproto_to_divisor(data, 5)
    assert same is data and pad == 0
    assert unpad_dataproto(data, 0) is data
    with pytest.raises(DataProtoError, match="positive"):
        pad_dataproto_to_divisor(data, 0)
    with pytest.raises(DataProtoError, match=">= 0"):
        unpad_dataproto(data, -1)


def test_pad_empty_logs_warning(caplog: pytest.LogCaptureFixture) -> None:
    empty = make(0)
    out, pad = pad_dataproto_to_divisor(empty, 4)
    assert out is empty and pad == 0
    assert "no rows" in caplog.text


# ----------------------------------------------------------------------------- fold / unfold
def test_fold_and_unfold_batch_dim() -> None:
    data = make(6)
    folded = fold_batch_dim(data, 2)
    assert tuple(folded.batch.batch_size) == (2,)
    assert folded.batch["ids"].shape == (2, 3, 3)
    assert folded.non_tensor_batch["uid"].shape == (2, 3)
    assert folded.non_tensor_batch["uid"][1].tolist() == ["u3", "u4", "u5"]
    assert tuple(data.batch.batch_size) == (6,)  # the input is untouched
    assert data.non_tensor_batch["uid"].shape == (6,)
    back = unfold_batch_dim(folded, batch_dims=2)
    assert row_ids(back) == list(range(6))
    assert torch.equal(back.batch["ids"], data.batch["ids"])
    assert back.meta_info == data.meta_info
    with pytest.raises(DataProtoError, match="folded"):
        fold_batch_dim(data, 4)
    with pytest.raises(DataProtoError, match="positive"):
        unfold_batch_dim(folded, batch_dims=0)
    nt = fold_batch_dim(make(4, tensors=False), 2)
    assert nt.batch is None and nt.non_tensor_batch["uid"].shape == (2, 2)
    assert row_ids(unfold_batch_dim(nt)) == [0, 1, 2, 3]


def test_unfold_batch_dim_shape_mismatch() -> None:
    bad = DataProto.from_dict(tensors={"a": torch.zeros(2, 3), "b": torch.zeros(2, 4)})
    with pytest.raises(DataProtoError, match="leading dims"):
        unfold_batch_dim(bad)
    mixed = DataProto.from_dict(tensors={"a": torch.zeros(2, 3)}, non_tensors={"n": np.zeros((2, 2))})
    with pytest.raises(DataProtoError, match="'n'"):
        unfold_batch_dim(mixed)


# ----------------------------------------------------------------------------- iteration / collate
def test_make_iterator_order_epochs_and_types() -> None:
    data = make(4)
    data.non_tensor_batch["score"] = np.array([0.5, 1.5, 2.5, 3.5])
    batches = list(data.make_iterator(mini_batch_size=2, epochs=2))
    assert [row_ids(b) for b in batches] == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert all(b.meta_info is data.meta_info for b in batches)
    assert batches[1].non_tensor_batch["score"].dtype == np.float64  # dtypes kept
    assert batches[1].batch["ids"][:, 0].tolist() == [6, 9]


def test_make_iterator_shuffle_is_seeded() -> None:
    data = make(8)
    kwargs = {"shuffle": True}
    first = [row_ids(b) for b in data.make_iterator(2, epochs=2, seed=3, dataloader_kwargs=kwargs)]
    again = [row_ids(b) for b in data.make_iterator(2, epochs=2, seed=3, dataloader_kwargs=kwargs)]
    assert first == again
    assert sorted(i for batch in first[:4] for i in batch) == list(range(8))
    assert first[:4] != [[0, 1], [2, 3], [4, 5], [6, 7]] or first[4:] != first[:4]
    with pytest.raises(DataProtoError, match="mini-batches of 3"):
        data.make_iterator(3, epochs=1)


def test_collate_fn() -> None:
    data = make(3)
    out = collate_fn([data[2], data[0]])
    assert type(out) is DataProto
    assert out.batch["ids"].tolist() == [[6, 7, 8], [0, 1, 2]]
    assert out.non_tensor_batch["uid"].tolist() == ["u2", "u0"]
    assert out.non_tensor_batch["obj"].shape == (2,)
    assert out.non_tensor_batch["obj"][0]["tokens"] == [0, 1]
    assert out.meta_info == {}
    nt = collate_fn([make(2, tensors=False)[1]])
    assert nt.batch is None and nt.non_tensor_batch["uid"].tolist() == ["u1"]
    with pytest.raises(DataProtoError, match="empty"):
        collate_fn([])
    with pytest.raises(DataProtoError, match="with and without"):
        collate_fn([data[0], DataProtoItem(non_tensor_batch=data[1].non_tensor_batch)])


# ----------------------------------------------------------------------------- serialisation
@pytest.mark.parametrize(
    "tensor",
    [
        torch.arange(6, dtype=torch.float32).reshape(2, 3),
        torch.tensor([1.5, -2.0], dtype=torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.zeros(0, 4, dtype=torch.int16),
        torch.tensor(7, dtype=torch.int64),
        torch.arange(12).reshape(3, 4)[:, ::2],  # non-contiguous
    ],
)
def test_single_tensor_round_trip(tensor: torch.Tensor) -> None:
    code = serialize_single_tensor(tensor)
    assert code[0] == str(tensor.dtype).removeprefix("torch.")
    assert code[1] == tuple(tensor.shape)
    back = deserialize_single_tensor(code)
    assert back.dtype == tensor.dtype and back.shape == tensor.shape
    assert torch.equal(back, tensor)
    back_from_bytes = deserialize_single_tensor(
        (code[0], code[1], np.frombuffer(code[2].tobytes(), np.uint8))
    )
    assert torch.equal(back_from_bytes, tensor)


def test_single_tensor_unknown_dtype() -> None:
    with pytest.raises(DataProtoError, match="unknown tensor dtype 'nope'"):
        deserialize_single_tensor(("nope", (1,), np.zeros(1, dtype=np.uint8)))
    with pytest.raises(DataProtoError, match="unknown tensor dtype"):
        deserialize_single_tensor(("nn", (1,), np.zeros(1, dtype=np.uint8)))
    with pytest.raises(DataProtoError, match="3 bytes do not hold a float32 tensor of shape"):
        deserialize_single_tensor(("float32", (1,), np.zeros(3, dtype=np.uint8)))
    with pytest.raises(DataProtoError, match="0 bytes"):
        deserialize_single_tensor(("float32", (2,), np.zeros(0, dtype=np.uint8)))


def test_tensordict_round_trip_nested_and_jagged() -> None:
    jagged = torch.nested.nested_tensor([torch.arange(2.0), torch.arange(3.0)], layout=torch.jagged)
    td = TensorDict(
        {"a": torch.arange(4).reshape(2, 2), "sub": TensorDict({"b": torch.ones(2, 1)}, [2]), "j": jagged},
        batch_size=[2],
    )
    code = serialize_tensordict(td)
    assert code[0] == (2,)
    back = deserialize_tensordict(code)
    assert torch.equal(back["a"], td["a"])
    assert torch.equal(back["sub", "b"], td["sub", "b"])
    assert back["j"].is_nested
    assert [t.tolist() for t in back["j"].unbind()] == [[0.0, 1.0], [0.0, 1.0, 2.0]]
    with pytest.raises(DataProtoError, match="expected 2 or 3 fields"):
        deserialize_tensordict(((1,), None, {"x": ("a",)}))  # type: ignore[dict-item]


def test_pickle_round_trip() -> None:
    data = make(3)
    data.batch["f"] = torch.tensor([0.5, float("nan"), 2.0], dtype=torch.bfloat16)
    back = pickle.loads(pickle.dumps(data))
    assert type(back) is DataProto
    assert sorted(back.batch.keys()) == ["f", "ids", "mask"]
    assert torch.equal(back.batch["ids"], data.batch["ids"])
    assert back.batch["mask"].dtype == torch.bool and torch.equal(back.batch["mask"], data.batch["mask"])
    assert back.batch["f"].dtype == torch.bfloat16
    assert torch.equal(torch.isnan(back.batch["f"]), torch.isnan(data.batch["f"]))
    assert uids(back) == ["u0", "u1", "u2"]
    assert back.non_tensor_batch["obj"][2]["arr"].tolist() == [0, 1]
    assert back.meta_info == {"temperature": 0.7}
    back.batch["ids"][0, 0] = 100  # the copy owns its memory
    assert data.batch["ids"][0, 0] == 0
    nt = pickle.loads(pickle.dumps(make(2, tensors=False)))
    assert nt.batch is None and uids(nt) == ["u0", "u1"]
    assert len(pickle.loads(pickle.dumps(DataProto()))) == 0


def test_save_and_load_from_disk(tmp_path: Path) -> None:
    data = make(3)
    path = tmp_path / "dp.pkl"
    data.save_to_disk(path)
    loaded = DataProto.load_from_disk(str(path))
    assert type(loaded) is DataProto
    assert torch.equal(loaded.batch["ids"], data.batch["ids"])
    assert uids(loaded) == uids(data)
    other = tmp_path / "other.pkl"
    other.write_bytes(pickle.dumps({"not": "a DataProto"}))
    with pytest.raises(DataProtoError, match="holds a dict"):
        DataProto.load_from_disk(other)
