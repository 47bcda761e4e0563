"""Helpers of :mod:`pr_loader.protocol`: everything that is not a ``DataProto`` method.

Dict unions (with NaN-aware deep equality), tensor / TensorDict serialisation used by pickling,
row-index normalisation, the ``meta_info`` merge of :meth:`DataProto.concat`, and the module-level
row functions (padding, folding). The public names are re-exported by :mod:`pr_loader.protocol`,
the import path users should prefer.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar

import numpy as np
import numpy.typing as npt
import torch
from tensordict import NonTensorData, NonTensorStack, TensorDict, TensorDictBase

from pr_loader.errors import DataProtoError

if TYPE_CHECKING:
    from pr_loader.protocol import DataProto

logger = logging.getLogger(__name__)

P = TypeVar("P", bound="DataProto")

NDArray: TypeAlias = npt.NDArray[Any]
TensorCode: TypeAlias = tuple[str, tuple[int, ...], NDArray]
"""``(dtype name, shape, flat uint8 bytes)`` of one dense tensor."""
NestedCode: TypeAlias = tuple[str, list[TensorCode]]
"""``(layout name, codes of the components)`` of one nested tensor."""
TensorDictCode: TypeAlias = tuple[tuple[int, ...], str | None, dict[Any, TensorCode | NestedCode]]
"""``(batch size, device, {key: code})`` of a TensorDict; nested keys are tuples."""

METRICS_KEY = "metrics"


def deep_equal(a: Any, b: Any) -> bool:
    """Strict structural equality: same types, NaN equals NaN, arrays/tensors compared element-wise.

    Lists, tuples, dicts and object arrays are compared recursively; reference cycles are tolerated.
    """
    return _deep_equal(a, b, set())


def _deep_equal(a: Any, b: Any, seen: set[tuple[int, int]]) -> bool:
    if type(a) is not type(b):
        return False
    if a is b:
        return True
    pair = (id(a), id(b))
    if pair in seen:
        return True
    if isinstance(a, float | np.floating):
        return bool(a == b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, torch.Tensor):
        return a.dtype == b.dtype and a.shape == b.shape and bool(torch.equal(a.cpu(), b.cpu()))
    if isinstance(a, np.ndarray):
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.dtype != object:
            return bool(np.array_equal(a, b, equal_nan=a.dtype.kind in "fc"))
        seen.add(pair)
        return all(_deep_equal(x, y, seen) for x, y in zip(a.flat, b.flat))
    if isinstance(a, list | tuple):
        seen.add(pair)
        return len(a) == len(b) and all(_deep_equal(x, y, seen) for x, y in zip(a, b))
    if isinstance(a, dict):
        seen.add(pair)
        return a.keys() == b.keys() and all(_deep_equal(a[k], b[k], seen) for k in a)
    try:
        return bool(a == b)
    except (TypeError, ValueError):  # an __eq__ that returns something without a truth value
        return False


def union_tensor_dict(tensor_dict1: TensorDictBase, tensor_dict2: TensorDictBase) -> TensorDictBase:
    """Add the keys of ``tensor_dict2`` to ``tensor_dict1`` (in place) and return ``tensor_dict1``.

    Raises DataProtoError, before changing anything, if the batch sizes differ or a shared key holds
    different values.
    """
    if tensor_dict1.batch_size != tensor_dict2.batch_size:
        raise DataProtoError(
            f"cannot union TensorDicts with batch sizes {tuple(tensor_dict1.batch_size)} "
            f"and {tuple(tensor_dict2.batch_size)}"
        )
    keys1, keys2 = set(tensor_dict1.keys()), list(tensor_dict2.keys())
    for key in keys2:
        if key in keys1 and not _values_match(tensor_dict1.get(key), tensor_dict2.get(key)):
            raise DataProtoError(f"key {key!r} is in both TensorDicts with different values")
    for key in keys2:
        if key not in keys1:
            tensor_dict1.set(key, tensor_dict2.get(key))
    return tensor_dict1


def _values_match(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return a.shape == b.shape and bool(torch.equal(a, b))
    if isinstance(a, TensorDictBase) and isinstance(b, TensorDictBase):
        keys = set(a.keys())
        return keys == set(b.keys()) and all(_values_match(a.get(k), b.get(k)) for k in keys)
    return deep_equal(a, b)


def union_numpy_dict(
    tensor_dict1: dict[str, NDArray], tensor_dict2: Mapping[str, NDArray]
) -> dict[str, NDArray]:
    """Add the arrays of ``tensor_dict2`` to ``tensor_dict1`` (in place) and return ``tensor_dict1``.

    Shared keys must hold equal arrays (NaN-aware, object arrays compared deeply), else DataProtoError
    is raised before anything changes.
    """
    for key, val in tensor_dict2.items():
        if not isinstance(val, np.ndarray):
            raise DataProtoError(f"non-tensor value {key!r} must be a numpy array, got {type(val).__name__}")
        if key in tensor_dict1 and not deep_equal(tensor_dict1[key], val):
            raise DataProtoError(f"non-tensor key {key!r} is in both dicts with different values")
    tensor_dict1.update(tensor_dict2)
    return tensor_dict1


def union_two_dict(dict1: dict[str, Any], dict2: Mapping[str, Any]) -> dict[str, Any]:
    """Add the items of ``dict2`` to ``dict1`` (in place); shared keys must hold equal values."""
    for key, val in dict2.items():
        if key in dict1 and not deep_equal(dict1[key], val):
            raise DataProtoError(f"meta_info key {key!r} differs: {dict1[key]!r} vs {val!r}")
    dict1.update(dict2)
    return dict1


def list_of_dict_to_dict_of_list(list_of_dict: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    """``[{"a": 1}, {"a": 2}] -> {"a": [1, 2]}``; every dict must have the keys of the first one."""
    if not list_of_dict:
        return {}
    keys = list(list_of_dict[0].keys())
    output: dict[str, list[Any]] = {key: [] for key in keys}
    for position, item in enumerate(list_of_dict):
        if set(item.keys()) != set(keys):
            raise DataProtoError(f"dict {position} has keys {sorted(item)}, expected {sorted(keys)}")
        for key in keys:
            output[key].append(item[key])
    return output


def merge_meta_infos(meta_infos: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Merge the ``meta_info`` of several DataProtos (the rule of :meth:`DataProto.concat`).

    Non-metric keys must agree everywhere (else DataProtoError). ``"metrics"`` values (a dict per worker,
    or a list of such dicts) are gathered into one dict of lists: ``{"loss": [worker0, worker1, ...]}``.
    """
    merged: dict[str, Any] = {}
    metrics: list[Mapping[str, Any]] = []
    for meta in meta_infos:
        for key, val in meta.items():
            if key == METRICS_KEY:
                if isinstance(val, list):
                    metrics.extend(val)
                elif val is not None:
                    metrics.append(val)
            elif key in merged and not deep_equal(merged[key], val):
                raise DataProtoError(
                    f"conflicting values for meta_info key {key!r}: {merged[key]!r} vs {val!r}"
                )
            else:
                merged.setdefault(key, val)
    if metrics:
        merged[METRICS_KEY] = _merge_metrics(metrics)
    return merged


def _merge_metrics(metrics: Sequence[Mapping[str, Any]]) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for position, item in enumerate(metrics):
        if not isinstance(item, Mapping):
            raise DataProtoError(
                f"meta_info['metrics'] entry {position} must be a dict, got {type(item).__name__}"
            )
        for key, val in item.items():
            out.setdefault(key, []).append(val)
    return out


def object_array(values: Sequence[Any]) -> NDArray:
    """A 1-D object array holding ``values`` as they are (lists and arrays are not turned into dims)."""
    return np.fromiter(values, dtype=object, count=len(values))  # (an item per element, never a dim)


def normalize_index(idxs: Any, length: int) -> NDArray:
    """Turn a list / ndarray / tensor of ints or bools into an int64 array of positions in ``[0, length)``.

    A bool mask must have exactly ``length`` entries; negative ints count from the end.
    """
    if isinstance(idxs, torch.Tensor):
        arr = idxs.detach().cpu().numpy()
    elif isinstance(idxs, np.ndarray):
        arr = idxs
    elif isinstance(idxs, list | tuple | range):
        arr = np.asarray(list(idxs)) if len(idxs) else np.zeros(0, dtype=np.int64)
    else:
        raise TypeError(f"indices must be a list, numpy array or tensor, got {type(idxs).__name__}")
    if arr.ndim != 1:
        raise DataProtoError(f"indices must be one-dimensional, got shape {arr.shape}")
    if arr.dtype == np.bool_:
        if arr.shape[0] != length:
            raise DataProtoError(f"boolean mask has {arr.shape[0]} entries for {length} rows")
        return np.flatnonzero(arr).astype(np.int64)
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataProtoError(f"indices must be integers or booleans, got dtype {arr.dtype}")
    positions = arr.astype(np.int64)
    if positions.size and (positions.min() < -length or positions.max() >= length):
        raise IndexError(f"index out of range for {length} rows")
    return np.where(positions < 0, positions + length, positions)


def serialize_single_tensor(obj: torch.Tensor) -> TensorCode:
    """Serialise a dense tensor to ``(dtype name, shape, flat uint8 numpy bytes)`` (moved to CPU)."""
    flat = obj.detach().cpu().contiguous().flatten()
    return str(obj.dtype).removeprefix("torch."), tuple(obj.shape), flat.view(torch.uint8).numpy()


def deserialize_single_tensor(arr: TensorCode) -> torch.Tensor:
    """Inverse of :func:`serialize_single_tensor`; the result owns a copy of the bytes."""
    dtype_name, shape, data = arr
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise DataProtoError(f"unknown tensor dtype {dtype_name!r}")
    raw = torch.from_numpy(np.frombuffer(data, dtype=np.uint8).copy())
    try:
        if raw.numel() == 0:  # an empty uint8 tensor cannot be viewed as a wider dtype
            return torch.empty(0, dtype=dtype).reshape(shape)
        return raw.view(dtype).reshape(shape)
    except RuntimeError as exc:
        raise DataProtoError(
            f"{raw.numel()} bytes do not hold a {dtype_name} tensor of shape {tuple(shape)}"
        ) from exc


def serialize_tensordict(batch: TensorDictBase) -> TensorDictCode:
    """Serialise a TensorDict to plain Python/numpy objects: ``(batch size, device, {key: code})``.

    Nested TensorDicts are flattened to tuple keys; nested (jagged) tensors are stored component-wise.
    """
    encoded: dict[Any, TensorCode | NestedCode] = {}
    for key, val in batch.items(include_nested=True, leaves_only=True):
        if not isinstance(val, torch.Tensor):
            raise DataProtoError(f"batch entry {key!r} is not a tensor ({type(val).__name__})")
        if val.is_nested:
            encoded[key] = (
                str(val.layout).removeprefix("torch."),
                [serialize_single_tensor(t) for t in val.unbind()],
            )
        else:
            encoded[key] = serialize_single_tensor(val)
    device = None if batch.device is None else str(batch.device)
    return tuple(batch.batch_size), device, encoded


def deserialize_tensordict(arr: TensorDictCode) -> TensorDict:
    """Inverse of :func:`serialize_tensordict`."""
    batch_size, device, encoded = arr
    out = TensorDict({}, batch_size=batch_size, device=device)
    for key, code in encoded.items():
        if len(code) == 2:
            layout_name, parts = code
            tensor = torch.nested.as_nested_tensor(
                [deserialize_single_tensor(part) for part in parts], layout=getattr(torch, layout_name)
            )
        elif len(code) == 3:
            tensor = deserialize_single_tensor(code)
        else:
            raise DataProtoError(
                f"bad encoding of batch entry {key!r}: expected 2 or 3 fields, got {len(code)}"
            )
        out.set(key, tensor)
    return out


AUTO_PADDING_ENV = "VERL_AUTO_PADDING"


class _DataProtoConfigMeta(type):
    _config: dict[str, bool] = {}  # noqa: RUF012 - process-wide settings, shared on purpose
    auto_padding_key = "_verl_auto_padding"

    @property
    def auto_padding(cls) -> bool:
        """True if auto padding is on globally (``DataProtoConfig.auto_padding = True`` or the env var)."""
        by_env = os.getenv(AUTO_PADDING_ENV, "FALSE").upper() in ("TRUE", "1")
        return by_env or cls._config.get(cls.auto_padding_key, False)

    @auto_padding.setter
    def auto_padding(cls, enabled: bool) -> None:
        if not isinstance(enabled, bool):
            raise DataProtoError(f"auto_padding must be a bool, got {enabled!r}")
        cls._config[cls.auto_padding_key] = enabled


class DataProtoConfig(metaclass=_DataProtoConfigMeta):
    """Process-wide DataProto settings: ``DataProtoConfig.auto_padding`` (also env ``VERL_AUTO_PADDING=1``).

    With auto padding on, :meth:`DataProto.chunk` accepts batches not divisible by the chunk count.
    """


def key_list(keys: str | Sequence[str] | None) -> list[str]:
    """Normalise a key argument (None, one string, or a list/tuple of strings) to a list."""
    if keys is None:
        return []
    if isinstance(keys, str):
        return [keys]
    if isinstance(keys, list | tuple):
        return list(keys)
    raise TypeError(f"keys must be a string or a list of strings, got {type(keys).__name__}")


def positions_array(rows: list[int]) -> NDArray:
    """collate_fn of :meth:`DataProto.make_iterator`'s loader (module level, so workers can pickle it)."""
    return np.asarray(rows, dtype=np.int64)


def dicts_to_parts(
    tensors: Mapping[str, torch.Tensor | TensorDictBase], non_tensors: Mapping[str, Any]
) -> tuple[TensorDict | None, dict[str, NDArray]]:
    """Check the inputs of ``DataProto.from_dict``; return its ``batch`` and non-tensor columns."""
    batch_size: int | None = None
    pivot = ""
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor | TensorDictBase) or tensor.dim() == 0:
            raise DataProtoError(f"tensor {key!r} must be a tensor (or TensorDict) with a batch dim")
        if batch_size is None:
            batch_size, pivot = tensor.shape[0], key
        elif tensor.shape[0] != batch_size:
            raise DataProtoError(
                f"tensors disagree on the batch size: {pivot!r} has {batch_size}, "
                f"{key!r} has {tensor.shape[0]}"
            )
    columns: dict[str, NDArray] = {}
    for key, val in non_tensors.items():
        if isinstance(val, np.ndarray):
            columns[key] = val
        elif isinstance(val, list | tuple):
            columns[key] = object_array(val)
        else:
            raise DataProtoError(
                f"non-tensor {key!r} must be a numpy array, list or tuple, got {type(val).__name__}"
            )
    batch = None if batch_size is None else TensorDict(dict(tensors), batch_size=[batch_size])
    return batch, columns


def tensordict_to_parts(
    tensor_dict: TensorDictBase, meta_info: dict[str, Any]
) -> tuple[TensorDict | None, dict[str, NDArray], dict[str, Any]]:
    """Split a TensorDict: tensors -> batch (None if there are none), NonTensorStack -> columns,
    NonTensorData -> added to ``meta_info``."""
    if len(tensor_dict.batch_size) != 1:
        raise DataProtoError(f"need a TensorDict with one batch dim, got {tuple(tensor_dict.batch_size)}")
    tensors: dict[str, Any] = {}
    columns: dict[str, NDArray] = {}
    for key, val in tensor_dict.items():
        if isinstance(val, NonTensorStack):
            columns[key] = object_array(val.tolist())
        elif isinstance(val, NonTensorData):
            meta_info[key] = val.data
        else:
            tensors[key] = val
    batch = TensorDict(tensors, batch_size=tensor_dict.batch_size) if tensors else None
    return batch, columns, meta_info


def parts_to_tensordict(
    batch: TensorDictBase | None, columns: Mapping[str, NDArray], meta_info: Mapping[str, Any], length: int
) -> TensorDict:
    """One TensorDict of ``length`` rows: tensors as they are, columns as NonTensorStack, meta_info
    values as NonTensorData. Raises DataProtoError when a key is used twice."""
    out = TensorDict({}, batch_size=[length])
    if batch is not None:
        out.update(batch)
    used = set(out.keys())
    extras: list[tuple[str, Any]] = [
        (key, NonTensorStack.from_list(list(val))) for key, val in columns.items()
    ]
    extras.extend((key, NonTensorData(val)) for key, val in meta_info.items())
    for key, wrapped in extras:
        if key in used:
            raise DataProtoError(f"key {key!r} is used by more than one part of the DataProto")
        used.add(key)
        out.set(key, wrapped)
    return out


def describe(
    batch: TensorDictBase | None, non_tensor_batch: Mapping[str, NDArray], meta_info: Mapping[str, Any]
) -> str:
    """The text of :meth:`DataProto.get_data_info`."""
    info = ["batch"]
    if batch is not None:
        for key, tensor in batch.items():
            if isinstance(tensor, torch.Tensor):
                info.append(f"  {key}: {tuple(tensor.shape)} ({tensor.dtype}) {tensor.device}")
            else:
                info.append(f"  {key}: {type(tensor).__name__}")
    info.append("non_tensor_batch")
    info.extend(f"  {key}: ndarray{val.shape} ({val.dtype})" for key, val in non_tensor_batch.items())
    info.append("meta_info")
    info.extend(f"  {key}: {_type_info(val)}" for key, val in meta_info.items())
    return "\n".join(info)


def _type_info(value: Any) -> str:
    """Type description of a meta_info value, looking into containers (first 3 list items)."""
    if isinstance(value, list):
        kinds = sorted({_type_info(v) for v in value[:3]})
        return f"list[{'|'.join(kinds) if kinds else '...'}]"
    if isinstance(value, tuple):
        return f"tuple({', '.join(_type_info(v) for v in value)})"
    if isinstance(value, dict):
        if not value:
            return "dict"
        key, val = next(iter(value.items()))
        return f"dict[{_type_info(key)}: {_type_info(val)}]"
    if isinstance(value, np.ndarray):
        return f"ndarray{value.shape} ({value.dtype})"
    return type(value).__name__


def pad_dataproto_to_divisor(data: P, size_divisor: int) -> tuple[P, int]:
    """Pad ``data`` by cycling its rows from the start until ``len`` divides ``size_divisor``.

    Returns ``(padded, pad_size)``; ``data`` itself when nothing is needed.
    """
    if size_divisor <= 0:
        raise DataProtoError(f"size_divisor must be positive, got {size_divisor}")
    length = len(data)
    if length % size_divisor == 0:
        if length == 0:
            logger.warning("padding a DataProto with no rows: nothing changed")
        return data, 0
    pad_size = size_divisor - length % size_divisor
    return data._take(np.arange(length + pad_size) % length), pad_size


def unpad_dataproto(data: P, pad_size: int) -> P:
    """Drop the last ``pad_size`` rows (``data`` itself when ``pad_size`` is 0)."""
    if pad_size < 0:
        raise DataProtoError(f"pad_size must be >= 0, got {pad_size}")
    return data.slice(None, -pad_size) if pad_size else data


def fold_batch_dim(data: P, new_batch_size: int) -> P:
    """Reshape rows ``[bsz, ...]`` to ``[new_batch_size, bsz // new_batch_size, ...]`` (one batch dim)."""
    length = len(data)
    if new_batch_size <= 0 or length % new_batch_size != 0:
        raise DataProtoError(f"{length} rows cannot be folded into a batch of {new_batch_size}")
    batch = None
    if data.batch is not None:
        batch = data.batch.reshape(new_batch_size, -1)
        batch.auto_batch_size_(batch_dims=1)
    non_tensor = {
        key: np.reshape(val, (new_batch_size, -1, *val.shape[1:]))
        for key, val in data.non_tensor_batch.items()
    }
    return data._derive(batch, non_tensor, data.meta_info)


def unfold_batch_dim(data: P, batch_dims: int = 2) -> P:
    """Merge the first ``batch_dims`` dims of every column into the batch dim (inverse of fold)."""
    if batch_dims <= 0:
        raise DataProtoError(f"batch_dims must be positive, got {batch_dims}")
    batch = None
    shape: tuple[int, ...] | None = None
    if data.batch is not None:
        leaves = list(data.batch.values(include_nested=True, leaves_only=True))
        shapes = {tuple(t.shape[:batch_dims]) for t in leaves}
        if len(shapes) != 1 or len(next(iter(shapes))) != batch_dims:
            raise DataProtoError(f"tensors do not share {batch_dims} leading dims: {sorted(shapes)}")
        shape = next(iter(shapes))
        batch = data.batch.clone(recurse=False)
        batch.batch_size = torch.Size(shape)
        batch = batch.reshape(-1)
    non_tensor = {}
    for key, val in data.non_tensor_batch.items():
        lead = tuple(val.shape[:batch_dims])
        if len(lead) != batch_dims or (shape is not None and lead != shape):
            raise DataProtoError(
                f"non_tensor_batch[{key!r}] shape {val.shape} does not match leading dims {shape}"
            )
        non_tensor[key] = np.reshape(val, (-1, *val.shape[batch_dims:]))
    return data._derive(batch, non_tensor, data.meta_info)
