"""Row assembly: per-row dicts <-> one :class:`~pr_loader.protocol.DataProto` (verl ``collate_fn`` semantics).

Rule (docs/architecture.md): a key whose value is a torch tensor of the same dtype, shape and device in
*every* row is stacked into ``batch``; any other key (missing in some rows, ragged shapes, mixed dtypes,
numpy arrays, strings, numbers, nested dicts, ...) becomes a 1-D object array in ``non_tensor_batch``, with
``None`` where a row lacks the key. :func:`dataproto_row` is the inverse for one row; it omits keys whose
value is ``None``, so "missing" and "explicitly None" assemble and disassemble alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import numpy as np
import torch
from tensordict import TensorDict, TensorDictBase

from pr_loader import batch_memory
from pr_loader.collate import materialise, stack_raw, uniform_raw
from pr_loader.errors import DataProtoError
from pr_loader.protocol import DataProto
from pr_loader.protocol_ops import NDArray, object_array

__all__ = [
    "FIELD_EPOCH",
    "FIELD_FIRST_STEP",
    "FIELD_INDEX",
    "FIELD_SAMPLE_ID",
    "FIELD_TIMES_POSTPONED",
    "RESERVED_FIELDS",
    "accelerator_device",
    "appended",
    "dataproto_row",
    "rows_to_dataproto",
    "taken",
]

FIELD_SAMPLE_ID = "prl_sample_id"  # str "<epoch>:<index>", stable across postpones
FIELD_INDEX = "prl_index"  # int, dataset index
FIELD_EPOCH = "prl_epoch"  # int, epoch of the sample (not of the step delivering it)
FIELD_TIMES_POSTPONED = "prl_times_postponed"  # int
FIELD_FIRST_STEP = "prl_first_step"  # int, the step that first delivered the row
RESERVED_FIELDS: tuple[str, ...] = (
    FIELD_SAMPLE_ID,
    FIELD_INDEX,
    FIELD_EPOCH,
    FIELD_TIMES_POSTPONED,
    FIELD_FIRST_STEP,
)

D = TypeVar("D", bound=DataProto)
_MISSING = object()


def _stackable(values: list[Any]) -> bool:
    first = values[0]
    if type(first) is not torch.Tensor or first.layout is not torch.strided:
        return False
    return all(
        type(v) is torch.Tensor
        and v.layout is torch.strided
        and v.dtype == first.dtype
        and v.shape == first.shape
        and v.device == first.device
        for v in values[1:]
    )


def rows_to_dataproto(
    cls: type[D],
    rows: Sequence[Mapping[str, Any]],
    *,
    meta_info: Mapping[str, Any] | None = None,
    raw_tensors: bool = False,
) -> D:
    """Assemble ``rows`` (one dict per row, keys are ``str``) into an instance of ``cls``.

    Keys keep their first-appearance order. Tensors are stacked (copied); other values are stored as they
    are (not copied). ``meta_info`` is copied shallowly. ``raw_tensors`` (internal): rows may hold the
    ``RawTensor`` records of ``codec.decode_raw_tensors``; a column of them is stacked with one copy, and in
    any other column they become tensors, at any depth.
    """
    keys: dict[str, None] = {}
    for position, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise DataProtoError(f"row {position} must be a dict, got {type(row).__name__}")
        if not all(map(str.__instancecheck__, row)):  # (isinstance(key, str) per key, in C)
            key = next(key for key in row if not isinstance(key, str))
            raise DataProtoError(f"row {position} has a non-str key {key!r}; row keys must be str")
        keys.update(dict.fromkeys(row))
    tensors: dict[str, torch.Tensor] = {}
    columns: dict[str, NDArray] = {}
    for key in keys:
        values = [row.get(key, _MISSING) for row in rows]
        if raw_tensors:
            if uniform_raw(values):  # (one copy per column, straight from the payloads)
                tensors[key] = stack_raw(values, values[0].dtype, values[0].shape)
                continue
            values = materialise(values)
        if _stackable(values):
            tensors[key] = torch.stack(values)
        else:
            columns[key] = object_array([None if v is _MISSING else v for v in values])
    batch: TensorDictBase | None = None
    if tensors or (rows and not columns):  # keep the row count even when rows hold no keys
        batch = TensorDict(tensors, batch_size=[len(rows)])
    return cls._from_parts(batch, columns, dict(meta_info or {}))


def appended(dp: DataProto, more: DataProto) -> tuple[TensorDictBase | None, dict[str, NDArray]] | None:
    """The batch and non-tensor columns of ``rows_to_dataproto`` over the rows of ``dp`` then those of
    ``more``, made by concatenating their columns (no per-row work: a prefetch of 16 rows into a 256-row view
    took 25-30 ms of CPU assembled row by row, measured), or None where a key is a tensor column on one side
    and not the other, or differs in dtype, row shape or device, or a column is not a 1-D object array (the
    caller then assembles the rows). Unlike row by row, a non-tensor column keeps its place and stays when
    all its values are None."""
    old: dict[str, Any] = {} if dp.batch is None else dict(dp.batch.items())
    new: dict[str, Any] = {} if more.batch is None else dict(more.batch.items())
    if old.keys() != new.keys() or not (old or dp.non_tensor_batch or more.non_tensor_batch):
        return None
    for key, tensor in old.items():
        other = new[key]
        if not (
            type(tensor) is type(other) is torch.Tensor
            and tensor.layout is other.layout is torch.strided
            and tensor.dtype == other.dtype
            and tensor.shape[1:] == other.shape[1:]
            and tensor.device == other.device
        ):
            return None
    columns = {**dict.fromkeys(dp.non_tensor_batch), **dict.fromkeys(more.non_tensor_batch)}
    for part in (dp.non_tensor_batch, more.non_tensor_batch):
        if any(column.dtype != object or column.ndim != 1 for column in part.values()):
            return None
    sizes = len(dp), len(more)
    merged: dict[str, NDArray] = {}
    for key in columns:
        pieces = [
            part.non_tensor_batch[key] if key in part.non_tensor_batch else np.full(size, None, dtype=object)
            for part, size in zip((dp, more), sizes)
        ]
        merged[key] = np.concatenate(pieces)
    batch = None
    if old:
        tensors = {key: _cat(tensor, new[key]) for key, tensor in old.items()}
        batch = TensorDict(tensors, batch_size=[sum(sizes)])
    return batch, merged


def taken(dp: DataProto, positions: list[int]) -> tuple[TensorDictBase | None, dict[str, NDArray]]:
    """The batch and non-tensor columns of ``dp.select_idxs(positions)``, its CPU tensors made in the current
    batch memory (:func:`batch_memory.empty`): what a postpone leaves of a view, where fresh tensors cost a
    256-row view's postpone 3-4 ms of page faults per 2 MiB column on a 2-core VM (measured)."""
    batch = dp.batch
    tensors: dict[str, Any] = {} if batch is None else dict(batch.items())
    if batch is None or not all(map(_plain_cpu, tensors.values())):
        kept = dp.select_idxs(positions)
        return kept.batch, kept.non_tensor_batch
    index = torch.tensor(positions, dtype=torch.int64)
    picked = {}
    for key, tensor in tensors.items():
        out = batch_memory.empty((len(positions), *tensor.shape[1:]), tensor.dtype)
        picked[key] = torch.index_select(tensor, 0, index, out=out)
    columns = {key: column[positions] for key, column in dp.non_tensor_batch.items()}
    return TensorDict(picked, batch_size=[len(positions)], device=batch.device), columns


def accelerator_device(dp: DataProto) -> torch.device | None:
    """The device of every tensor of ``dp``'s batch when that is one device other than the CPU (a view the
    user moved, e.g. ``view.to("cuda")``), else None."""
    if dp.batch is None:
        return None
    devices = {tensor.device for tensor in dp.batch.values(include_nested=True, leaves_only=True)}
    if len(devices) != 1:
        return None
    (device,) = devices
    return None if device is None or device.type == "cpu" else device


def _plain_cpu(value: Any) -> bool:
    return type(value) is torch.Tensor and value.layout is torch.strided and value.device.type == "cpu"


def _cat(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """``torch.cat``, into a tensor of the current batch memory (:func:`batch_memory.empty`) on the CPU: a
    fresh 2 MiB tensor costs its page faults, 3-4 ms of a prefetch per column on a 2-core VM (measured)."""
    if not _plain_cpu(first):
        return torch.cat([first, second])
    out = batch_memory.empty((len(first) + len(second), *first.shape[1:]), first.dtype)
    return torch.cat([first, second], out=out)


def dataproto_row(dp: DataProto, i: int) -> dict[str, Any]:
    """Row ``i`` of ``dp`` as a dict (inverse of :func:`rows_to_dataproto` for one row).

    Tensors are views into ``dp``'s tensors; ``None`` values are omitted; nested TensorDicts become dicts.
    """
    length = len(dp)
    if not isinstance(i, int | np.integer) or isinstance(i, bool) or not -length <= i < length:
        raise DataProtoError(f"row index {i!r} out of range for {length} rows")
    row: dict[str, Any] = {}
    if dp.batch is not None:
        for key, value in dp.batch.items():
            item = value[i]
            row[key] = item.to_dict() if isinstance(item, TensorDictBase) else item
    for key, column in dp.non_tensor_batch.items():
        value = column[i]
        if value is not None:
            row[key] = value
    return row
