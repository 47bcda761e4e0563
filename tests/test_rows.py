from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from tensordict import TensorDict

from pr_loader import batch_memory, codec
from pr_loader.batch_memory import BatchMemory
from pr_loader.codec import RawTensor
from pr_loader.errors import DataProtoError
from pr_loader.protocol import DataProto
from pr_loader.rows import (
    RESERVED_FIELDS,
    accelerator_device,
    appended,
    dataproto_row,
    rows_to_dataproto,
    taken,
)


class MyProto(DataProto):
    pass


def test_reserved_fields() -> None:
    assert RESERVED_FIELDS == (
        "prl_sample_id",
        "prl_index",
        "prl_epoch",
        "prl_times_postponed",
        "prl_first_step",
    )


def test_uniform_tensors_are_stacked_and_others_are_objects() -> None:
    rows = [
        {"ids": torch.tensor([1, 2, 3]), "text": "a", "n": 1, "arr": np.zeros(2), "meta": {"k": 1}},
        {"ids": torch.tensor([4, 5, 6]), "text": "b", "n": 2, "arr": np.ones(2), "meta": {"k": 2}},
    ]
    dp = rows_to_dataproto(DataProto, rows, meta_info={"m": 1})
    assert len(dp) == 2
    assert dp.batch is not None
    assert list(dp.batch.keys()) == ["ids"]
    assert torch.equal(dp.batch["ids"], torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert list(dp.non_tensor_batch) == ["text", "n", "arr", "meta"]
    for column in dp.non_tensor_batch.values():
        assert column.dtype == object and column.shape == (2,)
    # equal-shape numpy arrays stay per-row objects (not a 2-D array)
    assert isinstance(dp.non_tensor_batch["arr"][1], np.ndarray)
    assert np.array_equal(dp.non_tensor_batch["arr"][1], np.ones(2))
    assert dp.non_tensor_batch["meta"][0] == {"k": 1}
    assert dp.meta_info == {"m": 1}


def test_missing_keys_ragged_and_dtype_mismatch_go_to_objects() -> None:
    rows: list[dict[str, Any]] = [
        {"ids": torch.tensor([1, 2]), "ragged": torch.tensor([1]), "dt": torch.tensor([1.0]), "x": 0},
        {
            "ids": torch.tensor([3, 4]),
            "ragged": torch.tensor([1, 2]),
            "dt": torch.tensor([1]),
            "partial": "p",
        },
        {"ids": torch.tensor([5, 6]), "ragged": torch.tensor([1, 2, 3]), "dt": torch.tensor([2.0]), "x": 2},
    ]
    dp = rows_to_dataproto(DataProto, rows)
    assert dp.batch is not None and list(dp.batch.keys()) == ["ids"]
    assert set(dp.non_tensor_batch) == {"ragged", "dt", "x", "partial"}
    assert [t.tolist() for t in dp.non_tensor_batch["ragged"]] == [[1], [1, 2], [1, 2, 3]]
    assert dp.non_tensor_batch["dt"][1].dtype == torch.int64
    assert list(dp.non_tensor_batch["x"]) == [0, None, 2]
    assert list(dp.non_tensor_batch["partial"]) == [None, "p", None]


def test_tensor_missing_in_one_row_is_an_object_column() -> None:
    dp = rows_to_dataproto(DataProto, [{"t": torch.ones(2)}, {"u": 1}])
    assert dp.batch is None
    assert dp.non_tensor_batch["t"][1] is None
    assert torch.equal(dp.non_tensor_batch["t"][0], torch.ones(2))


def test_scalar_tensors_stack_to_one_dim() -> None:
    dp = rows_to_dataproto(DataProto, [{"r": torch.tensor(1.5)}, {"r": torch.tensor(2.5)}])
    assert dp.batch is not None
    assert dp.batch["r"].shape == (2,)


def test_empty_and_keyless_rows() -> None:
    empty = rows_to_dataproto(MyProto, [])
    assert type(empty) is MyProto and len(empty) == 0
    keyless = rows_to_dataproto(DataProto, [{}, {}, {}])
    assert len(keyless) == 3


def test_subclass_is_kept() -> None:
    dp = rows_to_dataproto(MyProto, [{"a": torch.zeros(1)}])
    assert type(dp) is MyProto
    assert type(dp.select_idxs([0])) is MyProto


@pytest.mark.parametrize(
    ("rows", "match"),
    [
        ([{"a": 1}, ["a"]], "row 1 must be a dict"),
        ([{1: 1}], "non-str key 1"),
    ],
)
def test_bad_rows(rows: Any, match: str) -> None:
    with pytest.raises(DataProtoError, match=match):
        rows_to_dataproto(DataProto, rows)


def test_row_roundtrip() -> None:
    rows: list[dict[str, Any]] = [
        {"ids": torch.tensor([1, 2]), "text": "a", "partial": torch.tensor([9, 9, 9])},
        {"ids": torch.tensor([3, 4]), "text": "b"},
    ]
    dp = rows_to_dataproto(DataProto, rows)
    back = [dataproto_row(dp, i) for i in range(len(dp))]
    assert set(back[0]) == {"ids", "text", "partial"}
    assert set(back[1]) == {"ids", "text"}  # None (missing) is omitted
    assert torch.equal(back[0]["ids"], rows[0]["ids"])
    assert torch.equal(back[0]["partial"], rows[0]["partial"])
    again = rows_to_dataproto(DataProto, back)
    assert again.batch is not None
    assert torch.equal(again.batch["ids"], dp.batch["ids"])  # type: ignore[index]
    assert list(again.non_tensor_batch["partial"])[1] is None
    assert dataproto_row(dp, -1)["text"] == "b"


def test_row_of_typed_columns_and_nested_tensordict() -> None:
    dp = DataProto.from_dict(
        tensors={"x": torch.arange(6).reshape(3, 2)},
        non_tensors={"n": np.array([1, 2, 3]), "m": np.arange(6).reshape(3, 2)},
    )
    row = dataproto_row(dp, 1)
    assert torch.equal(row["x"], torch.tensor([2, 3]))
    assert row["n"] == 2
    assert np.array_equal(row["m"], np.array([2, 3]))
    assert dp.batch is not None
    dp.batch["nested"] = dp.batch.select("x").clone()
    nested = dataproto_row(dp, 2)["nested"]
    assert isinstance(nested, dict) and torch.equal(nested["x"], torch.tensor([4, 5]))


@pytest.mark.parametrize("bad", [3, -4, 1.0, True, "0"])
def test_row_index_checked(bad: Any) -> None:
    dp = rows_to_dataproto(DataProto, [{"a": 1}, {"a": 2}, {"a": 3}])
    with pytest.raises(DataProtoError, match="out of range"):
        dataproto_row(dp, bad)


# --- rows decoded with codec.decode_raw_tensors (the loader's linked views) -------------------------------


def _walk(obj: Any) -> list[Any]:
    """Every value inside ``obj`` (containers and object arrays opened)."""
    out = [obj]
    if isinstance(obj, dict):
        for value in obj.values():
            out += _walk(value)
    elif isinstance(obj, list | tuple) or (isinstance(obj, np.ndarray) and obj.dtype == object):
        for item in obj:
            out += _walk(item)
    return out


def _same(got: DataProto, want: DataProto) -> None:
    assert (got.batch is None) == (want.batch is None)
    if want.batch is not None:
        assert got.batch is not None and list(got.batch.keys()) == list(want.batch.keys())
        for key, w in want.batch.items():
            g = got.batch[key]
            assert (g.dtype, g.shape, g.stride(), g.is_contiguous()) == (w.dtype, w.shape, w.stride(), True)
            assert g.untyped_storage().resizable() == w.untyped_storage().resizable()
            assert torch.equal(g, w)
    assert list(got.non_tensor_batch) == list(want.non_tensor_batch)
    for key, w_col in want.non_tensor_batch.items():
        g_col = got.non_tensor_batch[key]
        assert g_col.shape == w_col.shape
        for g_val, w_val in zip(_walk(g_col.tolist()), _walk(w_col.tolist()), strict=True):
            assert type(g_val) is type(w_val)
            if isinstance(w_val, torch.Tensor):
                assert g_val.dtype == w_val.dtype and torch.equal(g_val, w_val)


def _rl_rows() -> list[dict[str, Any]]:
    return [
        {"ids": torch.arange(1024) + i, "mask": torch.ones(1024, dtype=torch.int64), "text": f"p{i}", "n": i}
        for i in range(16)
    ]


def _ragged_rows() -> list[dict[str, Any]]:
    dtypes = (torch.float32, torch.float16, torch.float16)
    return [{"ids": torch.arange(3 + i), "x": torch.zeros(2, dtype=dtypes[i])} for i in range(3)]


def _nested_rows() -> list[dict[str, Any]]:
    return [
        {"t": torch.ones(4)},
        {"t": torch.ones(4), "extra": torch.zeros(2)},
        {"u": [torch.ones(1), {"k": torch.ones(2)}]},
    ]


RAW_ROWS = [
    pytest.param(_rl_rows(), id="rl-rows"),
    pytest.param(_ragged_rows(), id="ragged-and-mixed-dtypes"),
    pytest.param(_nested_rows(), id="missing-keys-and-nested-tensors"),
    pytest.param([{"e": torch.empty(0, 3)} for _ in range(4)], id="zero-size"),
    pytest.param([{"s": torch.tensor(float(i))} for i in range(5)], id="scalars"),
]


@pytest.mark.parametrize("rows", RAW_ROWS)
def test_raw_tensor_rows_assemble_like_decoded_rows(rows: list[dict[str, Any]]) -> None:
    """Rows decoded to RawTensor records assemble into exactly what the same rows decoded to tensors give;
    no RawTensor is left anywhere, and no tensor shares memory with the payloads."""
    payloads = [codec.encode(row) for row in rows]
    want = rows_to_dataproto(DataProto, [codec.decode(p) for p in payloads])
    raw = [codec.decode_raw_tensors(p) for p in payloads]
    assert any(type(v) is RawTensor for row in raw for v in _walk(row))  # (the records are really there)
    got = rows_to_dataproto(DataProto, raw, raw_tensors=True)
    _same(got, want)
    values = _walk(got.non_tensor_batch) + ([] if got.batch is None else list(got.batch.values()))
    assert not any(type(v) is RawTensor for v in values)
    spans = [(np.frombuffer(p, np.uint8).ctypes.data, len(p)) for p in payloads]
    for t in (v for v in values if isinstance(v, torch.Tensor) and v.numel()):
        assert not any(start <= t.untyped_storage().data_ptr() < start + n for start, n in spans)


def test_raw_tensor_rows_beside_tensor_rows() -> None:
    """A column mixing RawTensor records (rows just read) and tensors (rows already in a view) stacks as the
    tensors alone would (what prefetch_samples does)."""
    rows = [{"ids": torch.arange(4) + i, "text": str(i)} for i in range(6)]
    raw = [codec.decode_raw_tensors(codec.encode(row)) for row in rows[3:]]
    _same(rows_to_dataproto(DataProto, rows[:3] + raw, raw_tensors=True), rows_to_dataproto(DataProto, rows))


def _assembled(first: list[dict[str, Any]], more: list[dict[str, Any]]) -> tuple[DataProto, DataProto]:
    return rows_to_dataproto(DataProto, first), rows_to_dataproto(DataProto, more)


def test_appended_columns_equal_the_rows_assembled_one_after_the_other() -> None:
    """What a prefetch does to a view: its columns and the new rows' concatenated, as assembling every row
    again gives (keys missing on one side are None there), in the batch memory current."""
    rows = _rl_rows()
    rows[0]["partial"] = "half"  # (a postponed row first, as PostponeToNext delivers them)
    rows[12]["late"] = [1, 2]  # (a key only the new rows have)
    dp, more = _assembled(rows[:10], rows[10:])
    memory = BatchMemory(min_bytes=1)
    with batch_memory.using(memory):
        parts = appended(dp, more)
    assert parts is not None
    _same(DataProto(batch=parts[0], non_tensor_batch=parts[1]), rows_to_dataproto(DataProto, rows))
    assert len(memory) == 2  # (ids and mask were made by the pool)
    texts = [{"text": str(i)} for i in range(4)]  # (no tensors at all: no batch either way)
    parts = appended(*_assembled(texts[:1], texts[1:]))
    assert parts is not None and parts[0] is None
    _same(DataProto(batch=None, non_tensor_batch=parts[1]), rows_to_dataproto(DataProto, texts))


@pytest.mark.parametrize(
    ("first", "more"),
    [
        pytest.param(
            [{"a": torch.ones(2)}], [{"a": torch.ones(2), "b": torch.ones(1)}], id="tensor-key-on-one-side"
        ),
        pytest.param([{"a": torch.ones(2)}], [{"a": torch.ones(2, dtype=torch.int64)}], id="dtype"),
        pytest.param([{"a": torch.ones(2)}], [{"a": torch.ones(3)}], id="row-shape"),
        pytest.param([{"a": torch.ones(2)}], [{"a": "not a tensor"}], id="tensor-then-object"),
        pytest.param([{"a": torch.ones(2)}, {}], [{"a": torch.ones(2)}], id="object-then-tensor"),
        pytest.param([{}], [{}], id="keyless-rows"),
    ],
)
def test_appended_leaves_keys_that_change_kind_to_the_rows(first: list[Any], more: list[Any]) -> None:
    """Where concatenation would not give what assembling the rows gives, it declines."""
    assert appended(*_assembled(first, more)) is None


def test_appended_keeps_a_column_of_none_and_declines_typed_columns() -> None:
    dp, more = _assembled([{"t": "x", "p": "half"}, {"t": "y"}], [{"t": "z"}])
    dp = dp.select_idxs([1])  # (the one row with "p" left: the column holds None alone)
    parts = appended(dp, more)
    assert parts is not None and parts[1]["p"].tolist() == [None, None]  # (assembled row by row, it goes)
    dp.non_tensor_batch["t"] = np.array(["y"])  # (a str column, not an object one)
    assert appended(dp, more) is None


@pytest.mark.parametrize("positions", [[0, 3, 4, 15], [], list(range(16))])
def test_taken_equals_select_idxs_in_the_batch_memory(positions: list[int]) -> None:
    """What a postpone leaves of a view: select_idxs's rows, with tensors the batch memory made."""
    rows = [{**row, "p": None if i % 2 else "x"} for i, row in enumerate(_rl_rows())]
    dp = rows_to_dataproto(DataProto, rows)
    memory = BatchMemory(min_bytes=1)
    with batch_memory.using(memory):
        batch, columns = taken(dp, positions)
    _same(DataProto(batch=batch, non_tensor_batch=columns), dp.select_idxs(positions))
    assert len(memory) == (2 if positions else 0)  # (ids and mask; an empty tensor is never pooled)


def test_accelerator_device_is_the_one_device_of_a_moved_batch() -> None:
    dp = rows_to_dataproto(DataProto, [{"a": torch.ones(2), "t": "x"}] * 3)
    assert accelerator_device(dp) is None  # (the CPU)
    assert accelerator_device(dp.to("meta")) == torch.device("meta")
    nested = TensorDict({"a": torch.ones(3, device="meta"), "n": {"b": torch.zeros(3, device="meta")}}, [3])
    assert nested.device is None and accelerator_device(DataProto(batch=nested)) == torch.device("meta")
    nested["n", "b"] = torch.zeros(3)  # (one leaf on the CPU: no one device)
    assert accelerator_device(DataProto(batch=nested)) is None
    assert accelerator_device(rows_to_dataproto(DataProto, [{"t": "x"}])) is None
