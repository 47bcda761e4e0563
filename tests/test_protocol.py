"""DataProto: construction, consistency, indexing, key operations, dict helpers, description."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
import torch
from tensordict import NonTensorData, TensorDict

from pr_loader.errors import DataProtoError, PrLoaderError
from pr_loader.protocol import (
    DataProto,
    DataProtoConfig,
    DataProtoItem,
    union_numpy_dict,
    union_tensor_dict,
)
from pr_loader.protocol_ops import deep_equal, list_of_dict_to_dict_of_list, normalize_index, object_array


def make(n: int = 4, *, tensors: bool = True) -> DataProto:
    """n rows: ids [n,3], mask [n,3] (bool), uid strings, obj nested dicts with ragged lists."""
    tensor_part = {
        "ids": torch.arange(n * 3).reshape(n, 3),
        "mask": torch.arange(n * 3).reshape(n, 3) % 2 == 0,
    }
    return DataProto.from_dict(
        tensors=tensor_part if tensors else None,
        non_tensors={
            "uid": [f"u{i}" for i in range(n)],
            "obj": [{"i": i, "tokens": list(range(i)), "arr": np.arange(i)} for i in range(n)],
        },
        meta_info={"temperature": 0.7},
    )


def uids(data: DataProto) -> list[str]:
    return list(data.non_tensor_batch["uid"])


# ----------------------------------------------------------------------------- construction
def test_from_dict_splits_parts_and_builds_object_arrays() -> None:
    data = make(3)
    assert len(data) == 3
    assert isinstance(data.batch, TensorDict)
    assert tuple(data.batch.batch_size) == (3,)
    assert sorted(data.batch.keys()) == ["ids", "mask"]
    assert data.non_tensor_batch["uid"].dtype == object
    assert data.non_tensor_batch["uid"].shape == (3,)
    # equal-length lists stay elements of a 1-D object array
    obj = data.non_tensor_batch["obj"]
    assert obj.shape == (3,)
    assert obj[2]["tokens"] == [0, 1]
    assert data.meta_info == {"temperature": 0.7}


def test_from_dict_lists_of_equal_length_are_not_a_second_dim() -> None:
    data = DataProto.from_dict(non_tensors={"pairs": [[1, 2], [3, 4]], "tup": ((1,), (2,))})
    assert data.non_tensor_batch["pairs"].shape == (2,)
    assert data.non_tensor_batch["pairs"][1] == [3, 4]
    assert data.non_tensor_batch["tup"][0] == (1,)


def test_from_dict_does_not_mutate_meta_info_and_sets_auto_padding() -> None:
    meta: dict[str, Any] = {"a": 1}
    data = DataProto.from_dict(tensors={"x": torch.zeros(2)}, meta_info=meta, auto_padding=True)
    assert meta == {"a": 1}
    assert data.meta_info == {"a": 1, DataProtoConfig.auto_padding_key: True}
    assert data.is_padding_enabled()


def test_from_dict_accepts_a_tensordict_and_nested_values() -> None:
    source = TensorDict({"a": torch.arange(2), "sub": TensorDict({"b": torch.ones(2, 2)}, [2])}, [2])
    data = DataProto.from_dict(tensors=source)
    assert tuple(data.batch.batch_size) == (2,)
    assert torch.equal(data.batch["sub", "b"], torch.ones(2, 2))
    assert data[1].batch["a"].item() == 1


def test_from_dict_rejects_bad_input() -> None:
    with pytest.raises(DataProtoError, match="batch size"):
        DataProto.from_dict(tensors={"a": torch.zeros(2), "b": torch.zeros(3)})
    with pytest.raises(DataProtoError, match="batch dim"):
        DataProto.from_dict(tensors={"a": torch.tensor(1.0)})
    with pytest.raises(DataProtoError, match="non-tensor 'n'"):
        DataProto.from_dict(non_tensors={"n": 5})
    with pytest.raises(DataProtoError, match="num_batch_dims"):
        DataProto.from_dict(tensors={"a": torch.zeros(2, 2)}, num_batch_dims=2)
    with pytest.raises(DataProtoError, match="rows"):
        DataProto.from_dict(tensors={"a": torch.zeros(2)}, non_tensors={"n": ["x"]})


def test_errors_are_value_errors_and_pr_loader_errors() -> None:
    with pytest.raises(ValueError):
        DataProto.from_dict(tensors={"a": torch.zeros(2), "b": torch.zeros(3)})
    assert issubclass(DataProtoError, PrLoaderError)


def test_from_single_dict() -> None:
    data = DataProto.from_single_dict(
        {"x": torch.arange(3), "s": np.array(["a", "b", "c"], dtype=object)}, meta_info={"k": 1}
    )
    assert torch.equal(data.batch["x"], torch.arange(3))
    assert list(data.non_tensor_batch["s"]) == ["a", "b", "c"]
    assert data.meta_info == {"k": 1}
    assert not data.is_padding_enabled()
    with pytest.raises(DataProtoError, match="'bad'"):
        DataProto.from_single_dict({"bad": [1, 2]})  # type: ignore[dict-item]


def test_no_tensors_and_empty() -> None:
    data = make(3, tensors=False)
    assert data.batch is None
    assert len(data) == 3
    empty = DataProto()
    assert len(empty) == 0
    assert empty.batch is None and empty.non_tensor_batch == {} and empty.meta_info == {}
    zero = make(0)
    assert len(zero) == 0
    assert zero.batch["ids"].shape == (0, 3)


def test_check_consistency() -> None:
    with pytest.raises(DataProtoError, match="one batch dim"):
        DataProto(batch=TensorDict({"a": torch.zeros(2, 3)}, batch_size=[2, 3]))
    with pytest.raises(DataProtoError, match="TensorDict"):
        DataProto(batch={"a": torch.zeros(2)})  # type: ignore[arg-type]
    with pytest.raises(DataProtoError, match="numpy array"):
        DataProto(non_tensor_batch={"a": [1, 2]})  # type: ignore[dict-item]
    with pytest.raises(DataProtoError, match="numpy array"):
        DataProto(non_tensor_batch={"a": np.array(3)})
    with pytest.raises(DataProtoError, match="has 3 rows, expected 2"):
        DataProto(non_tensor_batch={"a": np.zeros(2), "b": np.zeros(3)})
    with pytest.raises(DataProtoError, match="meta_info"):
        DataProto(meta_info=[1])  # type: ignore[arg-type]
    data = make(2)
    data.non_tensor_batch["uid"] = np.array(["only one"], dtype=object)
    with pytest.raises(DataProtoError, match=r"\['uid'\] has 1 rows, expected 2"):
        data.check_consistency()


# ----------------------------------------------------------------------------- indexing
def test_getitem_int_returns_item() -> None:
    data = make(4)
    item = data[1]
    assert isinstance(item, DataProtoItem)
    assert torch.equal(item.batch["ids"], torch.tensor([3, 4, 5]))
    assert item.non_tensor_batch["uid"] == "u1"
    assert item.non_tensor_batch["obj"]["tokens"] == [0]
    assert item.meta_info is data.meta_info
    assert data[-1].non_tensor_batch["uid"] == "u3"
    assert data[np.int64(2)].non_tensor_batch["uid"] == "u2"
    assert make(2, tensors=False)[0].batch is None
    with pytest.raises(IndexError):
        data[4]
    with pytest.raises(TypeError):
        data["ids"]
    with pytest.raises(TypeError):
        data[True]


def test_getitem_slice_and_negative_step() -> None:
    data = make(5)
    part = data[1:4]
    assert uids(part) == ["u1", "u2", "u3"]
    assert torch.equal(part.batch["ids"][:, 0], torch.tensor([3, 6, 9]))
    assert uids(data[::2]) == ["u0", "u2", "u4"]
    back = data[::-2]
    assert uids(back) == ["u4", "u2", "u0"]
    assert torch.equal(back.batch["ids"][:, 0], torch.tensor([12, 6, 0]))
    assert uids(data.slice(3)) == ["u3", "u4"]
    assert uids(data.slice(None, 2)) == ["u0", "u1"]
    assert len(data[5:]) == 0


@pytest.mark.parametrize(
    ("index", "expected"),
    [
        ([2, 0], [2, 0]),
        (np.array([2, 0]), [2, 0]),
        (torch.tensor([2, 0]), [2, 0]),
        ([-2, 0], [3, 0]),
        ([False, False, True, False, False], [2]),
        (np.array([True, False, True, False, False, False])[:5], [0, 2]),  # a view
        (torch.tensor([True, False, False, False, True]), [0, 4]),
        (np.array([], dtype=bool).reshape(0)[:0].tolist(), []),
    ],
)
def test_getitem_index_arrays_and_masks(index: Any, expected: list[int]) -> None:
    data = make(5)
    out = data[index]
    assert type(out) is DataProto
    assert uids(out) == [f"u{i}" for i in expected]
    assert torch.equal(out.batch["ids"][:, 0], torch.tensor([i * 3 for i in expected], dtype=torch.int64))
    assert out.batch["mask"].dtype == torch.bool
    assert [o["i"] for o in out.non_tensor_batch["obj"]] == expected
    assert out.meta_info is data.meta_info


def test_select_idxs_exact_and_errors() -> None:
    data = make(4)
    assert uids(data.select_idxs([3, 1, 1])) == ["u3", "u1", "u1"]
    assert uids(data.select_idxs(np.array([True, False, False, True]))) == ["u0", "u3"]
    empty = data.select_idxs([])
    assert len(empty) == 0 and empty.batch["ids"].shape == (0, 3)
    assert uids(make(3, tensors=False).select_idxs([2])) == ["u2"]
    with pytest.raises(DataProtoError, match="mask has 2 entries for 4 rows"):
        data.select_idxs([True, False])
    with pytest.raises(DataProtoError, match="integers or booleans"):
        data.select_idxs(np.array([0.5]))
    with pytest.raises(DataProtoError, match="one-dimensional"):
        data.select_idxs(np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(IndexError):
        data.select_idxs([4])
    with pytest.raises(TypeError):
        data.select_idxs("0")


def test_normalize_index() -> None:
    assert normalize_index([-1, 0], 3).tolist() == [2, 0]
    assert normalize_index(range(2), 3).tolist() == [0, 1]
    assert normalize_index(torch.tensor([True, False, True]), 3).tolist() == [0, 2]
    assert normalize_index([], 0).dtype == np.int64


def test_ragged_object_arrays_index() -> None:
    ragged = object_array([np.arange(1), np.arange(3), np.arange(2)])
    data = DataProto(non_tensor_batch={"r": ragged})
    out = data[[2, 0]]
    assert [len(x) for x in out.non_tensor_batch["r"]] == [2, 1]
    assert data[1].non_tensor_batch["r"].tolist() == [0, 1, 2]


# ----------------------------------------------------------------------------- key operations
def test_select_keys() -> None:
    data = make(3)
    out = data.select(batch_keys=["ids"], non_tensor_batch_keys=["uid", "missing"], meta_info_keys=[])
    assert list(out.batch.keys()) == ["ids"]
    assert list(out.non_tensor_batch) == ["uid"]
    assert out.meta_info == {}
    same = data.select()
    assert same.batch is data.batch and same.non_tensor_batch is data.non_tensor_batch
    deep = data.select(deepcopy=True)
    deep.non_tensor_batch["obj"][0]["i"] = 99
    deep.meta_info["temperature"] = 2.0
    assert data.non_tensor_batch["obj"][0]["i"] == 0 and data.meta_info["temperature"] == 0.7
    with pytest.raises(DataProtoError, match="nope"):
        data.select(batch_keys=["nope"])
    with pytest.raises(DataProtoError, match="no tensors"):
        make(2, tensors=False).select(batch_keys=["ids"])
    assert make(2, tensors=False).select(batch_keys=[]).batch is None


def test_pop() -> None:
    data = make(3)
    popped = data.pop(batch_keys=["mask"], non_tensor_batch_keys=["obj"], meta_info_keys=["temperature"])
    assert list(data.batch.keys()) == ["ids"]
    assert list(data.non_tensor_batch) == ["uid"]
    assert data.meta_info == {}
    assert list(popped.batch.keys()) == ["mask"] and tuple(popped.batch.batch_size) == (3,)
    assert popped.non_tensor_batch["obj"][1]["i"] == 1
    assert popped.meta_info == {"temperature": 0.7}
    only_meta = make(2).pop(meta_info_keys=["temperature"])
    assert only_meta.batch is None and len(only_meta) == 0
    keep = make(2)
    with pytest.raises(DataProtoError, match="not in non_tensor_batch"):
        keep.pop(batch_keys=["ids"], non_tensor_batch_keys=["zzz"])
    assert "ids" in set(keep.batch.keys())  # nothing was removed by the failed call


def test_rename() -> None:
    data = make(2)
    ids = data.batch["ids"]
    assert data.rename("ids", "input_ids") is data
    assert sorted(data.batch.keys()) == ["input_ids", "mask"]
    assert data.batch["input_ids"] is ids
    data.rename(["input_ids", "mask"], ["mask", "input_ids"])  # a swap
    assert data.batch["mask"] is ids
    assert data.rename() is data
    with pytest.raises(DataProtoError, match="differ in length"):
        data.rename(["mask"], ["a", "b"])
    with pytest.raises(DataProtoError, match="not in batch"):
        data.rename("zzz", "y")
    with pytest.raises(DataProtoError, match="unused"):
        data.rename("mask", "input_ids")
    with pytest.raises(TypeError):
        data.rename(1, "x")  # type: ignore[arg-type]
    with pytest.raises(DataProtoError, match="without tensors"):
        make(2, tensors=False).rename("a", "b")


def test_union() -> None:
    left = make(3).select(batch_keys=["ids"], non_tensor_batch_keys=["uid"])
    right = make(3).select(batch_keys=["ids", "mask"], non_tensor_batch_keys=["uid", "obj"])
    right.meta_info = {"temperature": 0.7, "extra": [1]}
    out = left.union(right)
    assert out is left
    assert sorted(out.batch.keys()) == ["ids", "mask"]
    assert sorted(out.non_tensor_batch) == ["obj", "uid"]
    assert out.meta_info == {"temperature": 0.7, "extra": [1]}
    no_tensors = make(3, tensors=False).union(make(3))
    assert sorted(no_tensors.batch.keys()) == ["ids", "mask"]


def test_union_conflicts_change_nothing() -> None:
    left, right = make(2), make(2)
    right.batch["ids"] = right.batch["ids"] + 1
    right.batch["new"] = torch.zeros(2)
    with pytest.raises(DataProtoError, match="'ids'"):
        left.union(right)
    assert "new" not in set(left.batch.keys())
    other = make(2)
    other.non_tensor_batch["uid"] = object_array(["x", "y"])
    with pytest.raises(DataProtoError, match="'uid'"):
        make(2).union(other)
    with pytest.raises(DataProtoError, match="temperature"):
        make(2).union(DataProto(meta_info={"temperature": 1.0}))
    with pytest.raises(DataProtoError, match="2 and 3 rows"):
        make(2).union(make(3))


def test_union_helpers() -> None:
    td1 = TensorDict({"a": torch.ones(2)}, batch_size=[2])
    td2 = TensorDict({"a": torch.ones(2), "b": torch.zeros(2)}, batch_size=[2])
    assert union_tensor_dict(td1, td2) is td1
    assert sorted(td1.keys()) == ["a", "b"]
    with pytest.raises(DataProtoError, match="batch sizes"):
        union_tensor_dict(td1, TensorDict({}, batch_size=[3]))
    nested1 = TensorDict({"n": TensorDict({"x": torch.ones(2)}, [2])}, [2])
    nested2 = TensorDict({"n": TensorDict({"x": torch.zeros(2)}, [2])}, [2])
    with pytest.raises(DataProtoError, match="'n'"):
        union_tensor_dict(nested1, nested2)
    nan = {"f": np.array([np.nan, 1.0]), "o": object_array([{"k": float("nan")}, [np.arange(2)]])}
    merged = union_numpy_dict(dict(nan), copy.deepcopy(nan))
    assert sorted(merged) == ["f", "o"]
    with pytest.raises(DataProtoError, match="numpy array"):
        union_numpy_dict({}, {"x": [1]})  # type: ignore[dict-item]
    with pytest.raises(DataProtoError, match="'f'"):
        union_numpy_dict(dict(nan), {"f": np.array([np.nan, 2.0])})


def test_deep_equal() -> None:
    assert deep_equal(float("nan"), float("nan"))
    assert deep_equal(np.float32("nan"), np.float32("nan"))
    assert not deep_equal(1, 1.0)
    assert not deep_equal(np.zeros(2), np.zeros(3))
    assert not deep_equal(np.zeros(2, dtype=np.int32), np.zeros(2, dtype=np.int64))
    assert deep_equal(np.array(["a"]), np.array(["a"]))
    assert deep_equal(torch.ones(2), torch.ones(2)) and not deep_equal(torch.ones(2), torch.zeros(2))
    assert deep_equal({"a": [1, (2, np.arange(2))]}, {"a": [1, (2, np.arange(2))]})
    assert not deep_equal({"a": 1}, {"b": 1})
    loop_a: list[Any] = [1]
    loop_a.append(loop_a)
    loop_b: list[Any] = [1]
    loop_b.append(loop_b)
    assert deep_equal(loop_a, loop_b)

    class NoBool:
        def __eq__(self, other: object) -> bool:
            raise TypeError("no")

        __hash__ = object.__hash__

    assert not deep_equal(NoBool(), NoBool())


def test_list_of_dict_to_dict_of_list() -> None:
    assert list_of_dict_to_dict_of_list([{"a": 1, "b": 2}, {"b": 3, "a": 4}]) == {"a": [1, 4], "b": [2, 3]}
    assert list_of_dict_to_dict_of_list([]) == {}
    with pytest.raises(DataProtoError, match="dict 1"):
        list_of_dict_to_dict_of_list([{"a": 1}, {"c": 1}])


# ----------------------------------------------------------------------------- tensordict conversion
def test_to_tensordict_round_trip() -> None:
    data = make(3)
    data.meta_info["cfg"] = {"k": [1, 2]}
    td = data.to_tensordict()
    assert tuple(td.batch_size) == (3,)
    assert torch.equal(td["ids"], data.batch["ids"])
    assert isinstance(td.get("cfg"), NonTensorData)
    back = DataProto.from_tensordict(td, meta_info={"extra": True})
    assert sorted(back.batch.keys()) == ["ids", "mask"]
    assert uids(back) == ["u0", "u1", "u2"]
    assert back.non_tensor_batch["obj"][2]["tokens"] == [0, 1]
    assert back.meta_info == {"temperature": 0.7, "cfg": {"k": [1, 2]}, "extra": True}
    same_values = DataProto.from_dict(non_tensors={"s": ["a", "a"]})
    again = DataProto.from_tensordict(same_values.to_tensordict())
    assert again.batch is None
    assert list(again.non_tensor_batch["s"]) == ["a", "a"]


def test_to_tensordict_errors() -> None:
    data = make(2)
    data.meta_info["ids"] = 1
    with pytest.raises(DataProtoError, match="'ids'"):
        data.to_tensordict()
    with pytest.raises(DataProtoError, match="one batch dim"):
        DataProto.from_tensordict(TensorDict({"a": torch.zeros(2, 2)}, batch_size=[2, 2]))


# ----------------------------------------------------------------------------- device, description
def test_to_device_in_place() -> None:
    data = make(2)
    assert data.to("cpu") is data
    assert data.batch.device == torch.device("cpu")
    assert make(1, tensors=False).to(torch.device("cpu")).batch is None


def test_to_passes_non_blocking_on(monkeypatch: pytest.MonkeyPatch) -> None:
    data = make(2)
    seen: list[Any] = []
    original = type(data.batch).to

    def recording_to(self: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(kwargs.get("non_blocking"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(type(data.batch), "to", recording_to)
    data.to("cpu", non_blocking=True)
    data.to("cpu")
    assert seen == [True, False]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_pinned_batch_to_cuda_without_blocking() -> None:
    data = make(3)
    expected = data.batch["ids"].clone()
    assert data.pin_memory() is data and data.batch["ids"].is_pinned()
    data.to("cuda", non_blocking=True)
    torch.cuda.synchronize()
    assert data.batch["ids"].is_cuda and torch.equal(data.batch["ids"].cpu(), expected)


def test_get_data_info() -> None:
    data = make(2)
    data.meta_info.update({"lst": [1, "a"], "tup": (1, 2.0), "d": {"k": np.zeros(2)}, "e": {}, "n": []})
    info = data.get_data_info().splitlines()
    assert info[0] == "batch"
    assert "  ids: (2, 3) (torch.int64) cpu" in info
    assert "  mask: (2, 3) (torch.bool) cpu" in info
    assert "  uid: ndarray(2,) (object)" in info
    assert "  temperature: float" in info
    assert "  lst: list[int|str]" in info
    assert "  tup: tuple(int, float)" in info
    assert "  d: dict[str: ndarray(2,) (float64)]" in info
    assert "  e: dict" in info and "  n: list[...]" in info
    assert make(1, tensors=False).get_data_info().startswith("batch\nnon_tensor_batch\n")


def test_print_size(capsys: pytest.CaptureFixture[str]) -> None:
    data = DataProto.from_dict(tensors={"x": torch.zeros(1024**2 // 4, dtype=torch.float32)})
    data.print_size(prefix="step 1")
    out = capsys.readouterr().out.strip()
    assert out.startswith("step 1, Size of tensordict: ")
    assert math.isclose(float(out.split("tensordict: ")[1].split(" GB")[0]), 1 / 1024)
    DataProto().print_size()
    assert capsys.readouterr().out.strip() == "Size of tensordict: 0.0 GB, size of non_tensor_batch: 0.0 GB"
