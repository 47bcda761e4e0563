"""verl-compatible :class:`DataProto`: a batch of rows split into tensors and non-tensor columns.

Independent implementation of the public API and semantics of ``verl/protocol.py`` (Apache-2.0).
Intentional differences (each keeps verl's call signatures):

* Bad input raises :class:`~pr_loader.errors.DataProtoError` (a ``ValueError``) instead of ``assert``
  (also for unknown ``select``/``rename`` batch keys, where verl let tensordict raise ``KeyError``).
* Every operation returning a new object builds it through :meth:`DataProto._derive`, so subclasses
  survive all operations (verl's ``pop`` always returned a plain ``DataProto``).
* Lists given as non-tensor columns become 1-D object arrays of the elements (verl's ``np.array(...,
  dtype=object)`` turned equal-length lists into a 2-D array).
* ``chunk`` with padding enabled splits a non-divisible batch into sizes like ``np.array_split``.
* ``concat`` requires every part to have the same keys; ``meta_info["metrics"]`` dicts with different
  keys are merged (each key lists the values of the workers that reported it).
* ``pad_dataproto_to_divisor`` indexes rows instead of concatenating, so ``meta_info`` is kept as is.
* ``make_iterator`` indexes whole mini-batches, so column dtypes are kept (verl's collate turned every
  non-tensor column into an object array); ``collate_fn`` itself still collates items like verl.
* Operations also work without tensors (``batch is None``); slices with a negative step work.
* Pickles hold the raw tensor bytes (verl's "numpy" serialisation), never a ``torch.save`` blob, and
  keep every instance attribute; ``load_from_disk`` checks the type of what it loaded.
"""

from __future__ import annotations

import copy
import os
import pickle
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast, overload

import numpy as np
import tensordict
import torch
from tensordict import TensorDict, TensorDictBase
from torch.utils.data import DataLoader, Dataset

from pr_loader.errors import DataProtoError
from pr_loader.protocol_ops import (
    DataProtoConfig,
    NDArray,
    P,
    describe,
    deserialize_single_tensor,
    deserialize_tensordict,
    dicts_to_parts,
    fold_batch_dim,
    key_list,
    list_of_dict_to_dict_of_list,
    merge_meta_infos,
    normalize_index,
    object_array,
    pad_dataproto_to_divisor,
    parts_to_tensordict,
    positions_array,
    serialize_single_tensor,
    serialize_tensordict,
    tensordict_to_parts,
    unfold_batch_dim,
    union_numpy_dict,
    union_tensor_dict,
    union_two_dict,
    unpad_dataproto,
)

__all__ = [
    "DataProto",
    "DataProtoConfig",
    "DataProtoItem",
    "collate_fn",
    "deserialize_single_tensor",
    "deserialize_tensordict",
    "fold_batch_dim",
    "pad_dataproto_to_divisor",
    "serialize_single_tensor",
    "serialize_tensordict",
    "unfold_batch_dim",
    "union_numpy_dict",
    "union_tensor_dict",
    "unpad_dataproto",
]


@dataclass
class DataProtoItem:
    """One row of a DataProto (``data[i]``): a TensorDict with empty batch size, per-key values, meta_info."""

    batch: TensorDictBase | None = None
    non_tensor_batch: dict[str, Any] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)


@dataclass(eq=False)
class DataProto:
    """A batch of rows: ``batch`` (TensorDict, one batch dim), ``non_tensor_batch`` (name -> numpy array
    with the rows on axis 0, usually dtype object) and ``meta_info`` (batch-wide values).

    Subclassing: every operation that returns a new DataProto calls ``self._derive(batch,
    non_tensor_batch, meta_info)``, and class-level constructors (``from_dict``...) call
    ``cls._from_parts(batch, non_tensor_batch, meta_info)``. The default ``_derive`` calls
    ``type(self)._from_parts``, which calls ``cls(batch=..., non_tensor_batch=..., meta_info=...)``.
    A subclass with extra state overrides ``_derive`` (to carry that state to derived objects) and, if
    its constructor needs more arguments, ``_from_parts``. ``DataProto.concat`` derives from its first
    element. Pickling keeps every instance attribute, so picklable extra state survives it.
    """

    batch: TensorDictBase | None = None
    non_tensor_batch: dict[str, NDArray] = field(default_factory=dict)
    meta_info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check_consistency()

    # ----------------------------------------------------------------- construction hooks
    @classmethod
    def _from_parts(
        cls: type[P],
        batch: TensorDictBase | None,
        non_tensor_batch: dict[str, NDArray],
        meta_info: dict[str, Any],
    ) -> P:
        """Build an instance of ``cls`` from its three parts (hook for class-level constructors)."""
        return cls(batch=batch, non_tensor_batch=non_tensor_batch, meta_info=meta_info)

    def _derive(
        self: P, batch: TensorDictBase | None, non_tensor_batch: dict[str, NDArray], meta_info: dict[str, Any]
    ) -> P:
        """Build the result of an operation on ``self`` (hook; override to carry subclass state)."""
        return type(self)._from_parts(batch, non_tensor_batch, meta_info)

    # ----------------------------------------------------------------- basics
    def __len__(self) -> int:
        if self.batch is not None:
            return int(self.batch.batch_size[0])
        for val in self.non_tensor_batch.values():
            return int(val.shape[0])
        return 0

    @overload
    def __getitem__(self, item: int | np.integer[Any]) -> DataProtoItem: ...

    @overload
    def __getitem__(self: P, item: slice | Sequence[int] | Sequence[bool] | NDArray | torch.Tensor) -> P: ...

    def __getitem__(self: P, item: Any) -> DataProtoItem | P:
        """``int`` -> :class:`DataProtoItem`; slice, list/ndarray/tensor of ints or bools -> DataProto."""
        if isinstance(item, slice):
            return self.slice(item.start, item.stop, item.step)
        if isinstance(item, list | tuple | np.ndarray | torch.Tensor):
            return self.select_idxs(item)
        if isinstance(item, int | np.integer) and not isinstance(item, bool):
            length = len(self)
            if not -length <= item < length:
                raise IndexError(f"index {item} out of range for {length} rows")
            return DataProtoItem(
                batch=None if self.batch is None else self.batch[int(item)],
                non_tensor_batch={key: val[item] for key, val in self.non_tensor_batch.items()},
                meta_info=self.meta_info,
            )
        raise TypeError(f"indexing a DataProto with {type(item).__name__} is not supported")

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["batch"] = None if self.batch is None else serialize_tensordict(self.batch)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        code = state.pop("batch")
        self.__dict__.update(state)
        self.batch = None if code is None else deserialize_tensordict(code)

    def save_to_disk(self, filepath: str | os.PathLike[str]) -> None:
        """Pickle this object to ``filepath``."""
        with open(filepath, "wb") as f:
            pickle.dump(self, f)

    @classmethod
    def load_from_disk(cls: type[P], filepath: str | os.PathLike[str]) -> P:
        """Load an object written by :meth:`save_to_disk` (only from trusted files: it unpickles)."""
        with open(filepath, "rb") as f:
            data = pickle.load(f)
        if not isinstance(data, cls):
            raise DataProtoError(
                f"{os.fspath(filepath)!r} holds a {type(data).__name__}, not a {cls.__name__}"
            )
        return data

    def print_size(self, prefix: str = "") -> None:
        """Print the memory held by tensors and numpy arrays, in GB."""
        tensor_bytes = 0
        if self.batch is not None:
            for tensor in self.batch.values(include_nested=True, leaves_only=True):
                if isinstance(tensor, torch.Tensor):
                    tensor_bytes += tensor.element_size() * tensor.numel()
        numpy_bytes = sum(val.nbytes for val in self.non_tensor_batch.values())
        message = (
            f"Size of tensordict: {tensor_bytes / 1024**3} GB, "
            f"size of non_tensor_batch: {numpy_bytes / 1024**3} GB"
        )
        print(f"{prefix}, {message}" if prefix else message)

    def check_consistency(self) -> None:
        """Check types and that every column has ``len(self)`` rows; raise DataProtoError if not."""
        if self.batch is not None:
            if not isinstance(self.batch, TensorDictBase):
                raise DataProtoError(f"batch must be a TensorDict or None, got {type(self.batch).__name__}")
            if len(self.batch.batch_size) != 1:
                raise DataProtoError(
                    f"batch must have one batch dim, got batch_size {tuple(self.batch.batch_size)}"
                )
        if not isinstance(self.non_tensor_batch, dict):
            raise DataProtoError(
                f"non_tensor_batch must be a dict, got {type(self.non_tensor_batch).__name__}"
            )
        if not isinstance(self.meta_info, dict):
            raise DataProtoError(f"meta_info must be a dict, got {type(self.meta_info).__name__}")
        length = None if self.batch is None else int(self.batch.batch_size[0])
        for key, val in self.non_tensor_batch.items():
            if not isinstance(val, np.ndarray) or val.ndim == 0:
                raise DataProtoError(
                    f"non_tensor_batch[{key!r}] must be a numpy array with a row axis (dtype=object), "
                    f"got {type(val).__name__}"
                )
            if length is None:
                length = val.shape[0]
            elif val.shape[0] != length:
                raise DataProtoError(f"non_tensor_batch[{key!r}] has {val.shape[0]} rows, expected {length}")

    # ----------------------------------------------------------------- constructors
    @classmethod
    def from_single_dict(
        cls: type[P],
        data: Mapping[str, torch.Tensor | NDArray],
        meta_info: dict[str, Any] | None = None,
        auto_padding: bool = False,
    ) -> P:
        """Build from one dict: tensors go to ``batch``, numpy arrays to ``non_tensor_batch``."""
        tensors: dict[str, torch.Tensor] = {}
        non_tensors: dict[str, NDArray] = {}
        for key, val in data.items():
            if isinstance(val, torch.Tensor):
                tensors[key] = val
            elif isinstance(val, np.ndarray):
                non_tensors[key] = val
            else:
                raise DataProtoError(
                    f"value of {key!r} must be a tensor or numpy array, got {type(val).__name__}"
                )
        return cls.from_dict(
            tensors=tensors, non_tensors=non_tensors, meta_info=meta_info, auto_padding=auto_padding
        )

    @classmethod
    def from_dict(
        cls: type[P],
        tensors: Mapping[str, torch.Tensor | TensorDictBase] | TensorDictBase | None = None,
        non_tensors: Mapping[str, Any] | None = None,
        meta_info: dict[str, Any] | None = None,
        num_batch_dims: int = 1,
        auto_padding: bool = False,
    ) -> P:
        """Build from tensors (sharing dim 0), non-tensor columns (arrays or sequences) and meta_info.

        ``num_batch_dims`` exists for verl compatibility; a DataProto has exactly one batch dim.
        """
        if num_batch_dims != 1:
            raise DataProtoError(
                f"a DataProto has exactly one batch dim, got num_batch_dims={num_batch_dims}"
            )
        source: dict[str, Any] = {} if tensors is None else dict(tensors.items())
        batch, columns = dicts_to_parts(source, non_tensors or {})
        meta = dict(meta_info or {})
        if auto_padding:
            meta[DataProtoConfig.auto_padding_key] = True
        return cls._from_parts(batch, columns, meta)

    @classmethod
    def from_tensordict(
        cls: type[P],
        tensor_dict: TensorDictBase,
        meta_info: dict[str, Any] | None = None,
        num_batch_dims: int = 1,
    ) -> P:
        """Inverse of :meth:`to_tensordict`: tensors -> batch, NonTensorStack -> columns,
        NonTensorData -> meta_info. ``batch`` is None when there are no tensors."""
        if num_batch_dims != 1 or len(tensor_dict.batch_size) != 1:
            raise DataProtoError(f"need a TensorDict with one batch dim, got {tuple(tensor_dict.batch_size)}")
        return cls._from_parts(*tensordict_to_parts(tensor_dict, dict(meta_info or {})))

    def to_tensordict(self) -> TensorDict:
        """One TensorDict: tensors as they are, columns as NonTensorStack, meta_info as NonTensorData."""
        return parts_to_tensordict(self.batch, self.non_tensor_batch, self.meta_info, len(self))

    # ----------------------------------------------------------------- in-place ops
    def to(self: P, device: str | torch.device, *, non_blocking: bool = False) -> P:
        """Move ``batch`` to ``device`` (in place) and return self; ``non_blocking``: copy asynchronously
        where torch can (from pinned memory to a GPU: see :meth:`pin_memory`)."""
        if self.batch is not None:
            self.batch = self.batch.to(device, non_blocking=non_blocking)
        return self

    def pin_memory(self: P) -> P:
        """Move ``batch`` to page-locked memory (in place, like :meth:`to`) and return self.

        Needs an accelerator, as :meth:`torch.Tensor.pin_memory` does. A DataLoader with ``pin_memory=True``
        calls this for each batch it hands out; a batch that later grows (prefetch) or is rebuilt is not
        pinned again."""
        if self.batch is not None:
            self.batch = self.batch.pin_memory()
        return self

    def rename(
        self: P, old_keys: str | Sequence[str] | None = None, new_keys: str | Sequence[str] | None = None
    ) -> P:
        """Rename ``batch`` keys in place and return self."""
        old, new = key_list(old_keys), key_list(new_keys)
        if len(old) != len(new):
            raise DataProtoError(f"old_keys and new_keys differ in length: {len(old)} vs {len(new)}")
        if not old:
            return self
        if self.batch is None:
            raise DataProtoError("cannot rename keys of a DataProto without tensors")
        present = set(self.batch.keys())
        missing = [key for key in old if key not in present]
        if missing:
            raise DataProtoError(f"keys not in batch: {missing}")
        clashes = [key for key in new if key in present - set(old)]
        if clashes or len(set(new)) != len(new):
            raise DataProtoError(f"new keys must be unique and unused, got {new}")
        values = [self.batch.pop(key) for key in old]
        for key, val in zip(new, values):
            self.batch.set(key, val)
        return self

    def union(self: P, other: DataProto) -> P:
        """Merge ``other`` into self (in place): new keys are added, shared keys must hold equal values."""
        if len(self) != len(other) and _has_rows(self) and _has_rows(other):
            raise DataProtoError(f"cannot union DataProtos of {len(self)} and {len(other)} rows")
        if self.batch is not None and other.batch is not None:
            self.batch = union_tensor_dict(self.batch, other.batch)
        elif other.batch is not None:
            self.batch = other.batch
        self.non_tensor_batch = union_numpy_dict(self.non_tensor_batch, other.non_tensor_batch)
        self.meta_info = union_two_dict(self.meta_info, other.meta_info)
        return self

    def reorder(self, indices: Any) -> None:
        """Permute/select rows in place by positions (tensor, ndarray or list of ints or bools)."""
        taken = self.select_idxs(indices)
        self.batch, self.non_tensor_batch = taken.batch, taken.non_tensor_batch

    def is_padding_enabled(self) -> bool:
        """True if this object's meta_info or :class:`DataProtoConfig` enables auto padding."""
        return (
            bool(self.meta_info.get(DataProtoConfig.auto_padding_key, False)) or DataProtoConfig.auto_padding
        )

    def padding(self, padding_size: int, padding_candidate: str = "") -> None:
        """Append ``padding_size`` copies of the first (``"first"``) or last row, in place."""
        if padding_size < 0:
            raise DataProtoError(f"padding_size must be >= 0, got {padding_size}")
        if padding_size == 0:
            return
        length = len(self)
        if length == 0:
            raise DataProtoError("cannot pad a DataProto without rows")
        row = 0 if padding_candidate == "first" else length - 1
        self.reorder(np.concatenate([np.arange(length), np.full(padding_size, row)]))

    # ----------------------------------------------------------------- row selection
    def select(
        self: P,
        batch_keys: Sequence[str] | None = None,
        non_tensor_batch_keys: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
        deepcopy: bool = False,
    ) -> P:
        """Keep some keys (None keeps all). Unknown batch keys raise; unknown others are ignored (as verl)."""
        batch = self.batch
        if batch_keys is not None:
            if batch is None:
                if batch_keys:
                    raise DataProtoError(
                        f"cannot select batch keys {list(batch_keys)}: the DataProto has no tensors"
                    )
            else:
                present = set(batch.keys())
                missing = [key for key in batch_keys if key not in present]
                if missing:
                    raise DataProtoError(f"keys not in batch: {missing}")
                batch = batch.select(*batch_keys)
        non_tensor = self.non_tensor_batch
        if non_tensor_batch_keys is not None:
            non_tensor = {key: val for key, val in non_tensor.items() if key in non_tensor_batch_keys}
        meta = self.meta_info
        if meta_info_keys is not None:
            meta = {key: val for key, val in meta.items() if key in meta_info_keys}
        if deepcopy:
            non_tensor, meta = copy.deepcopy(non_tensor), copy.deepcopy(meta)
        return self._derive(batch, non_tensor, meta)

    def select_idxs(self: P, idxs: Any) -> P:
        """Rows at the given positions (list/ndarray/tensor of ints, or a bool mask of ``len(self)``)."""
        return self._take(normalize_index(idxs, len(self)))

    def _take(self: P, positions: NDArray) -> P:
        batch = None
        if self.batch is not None:
            index = torch.from_numpy(np.ascontiguousarray(positions, dtype=np.int64))
            batch = self.batch[index.to(self.batch.device) if self.batch.device is not None else index]
        non_tensor = {key: val[positions] for key, val in self.non_tensor_batch.items()}
        return self._derive(batch, non_tensor, self.meta_info)

    def slice(self: P, start: int | None = None, end: int | None = None, step: int | None = None) -> P:
        """Rows ``start:end:step`` (views of the data where the step is positive)."""
        slice_obj = slice(start, end, step)
        if step is not None and step < 0:  # torch cannot slice backwards
            return self._take(np.arange(len(self))[slice_obj])
        batch = None if self.batch is None else self.batch[slice_obj]
        non_tensor = {key: val[slice_obj] for key, val in self.non_tensor_batch.items()}
        return self._derive(batch, non_tensor, self.meta_info)

    def pop(
        self: P,
        batch_keys: Sequence[str] | None = None,
        non_tensor_batch_keys: Sequence[str] | None = None,
        meta_info_keys: Sequence[str] | None = None,
    ) -> P:
        """Remove the given keys from self and return them as a new object (keys must exist)."""
        batch_keys, non_tensor_batch_keys = list(batch_keys or []), list(non_tensor_batch_keys or [])
        meta_info_keys = list(meta_info_keys or [])
        have = set() if self.batch is None else set(self.batch.keys())
        for group, keys, present in (
            ("batch", batch_keys, have),
            ("non_tensor_batch", non_tensor_batch_keys, self.non_tensor_batch.keys()),
            ("meta_info", meta_info_keys, self.meta_info.keys()),
        ):
            missing = [key for key in keys if key not in present]
            if missing:
                raise DataProtoError(f"cannot pop keys not in {group}: {missing}")
        batch = None
        if self.batch is not None and batch_keys:
            batch = TensorDict(
                {key: self.batch.pop(key) for key in batch_keys},
                batch_size=self.batch.batch_size,
                device=self.batch.device,
            )
        non_tensor = {key: self.non_tensor_batch.pop(key) for key in non_tensor_batch_keys}
        meta = {key: self.meta_info.pop(key) for key in meta_info_keys}
        return self._derive(batch, non_tensor, meta)

    # ----------------------------------------------------------------- splitting and joining
    def make_iterator(
        self: P,
        mini_batch_size: int,
        epochs: int,
        seed: int | None = None,
        dataloader_kwargs: dict[str, Any] | None = None,
    ) -> Iterator[P]:
        """Yield mini-batches for ``epochs`` epochs; ``dataloader_kwargs`` go to a torch DataLoader over the
        row positions (e.g. ``shuffle=True``), seeded by ``seed``. ``len(self)`` must divide evenly."""
        if mini_batch_size <= 0 or len(self) % mini_batch_size != 0:
            raise DataProtoError(f"{len(self)} rows cannot be split into mini-batches of {mini_batch_size}")
        generator = None
        if seed is not None:
            generator = torch.Generator()
            generator.manual_seed(seed)
        loader: DataLoader[int] = DataLoader(
            cast("Dataset[int]", list(range(len(self)))),
            batch_size=mini_batch_size,
            collate_fn=positions_array,
            generator=generator,
            **(dataloader_kwargs or {}),
        )

        def batches() -> Iterator[P]:
            for _ in range(epochs):
                for positions in loader:
                    yield self._take(positions)

        return batches()

    def chunk(self: P, chunks: int) -> list[P]:
        """Split into ``chunks`` parts (views) sharing meta_info. Without padding enabled the length must
        be divisible; with it, the first ``len % chunks`` parts get one extra row."""
        if chunks <= 0:
            raise DataProtoError(f"chunks must be positive, got {chunks}")
        length = len(self)
        if length % chunks != 0 and not self.is_padding_enabled():
            raise DataProtoError(f"only equal chunks are supported: {length} rows into {chunks} chunks")
        base, extra = divmod(length, chunks)
        out, start = [], 0
        for i in range(chunks):
            size = base + (1 if i < extra else 0)
            out.append(self.slice(start, start + size))
            start += size
        return out

    def split(self: P, split_size: int) -> list[P]:
        """Consecutive parts of ``split_size`` rows (the last may be shorter)."""
        if split_size <= 0:
            raise DataProtoError(f"split_size must be positive, got {split_size}")
        return [self.slice(i, i + split_size) for i in range(0, len(self), split_size)]

    @staticmethod
    def concat(data: Sequence[P]) -> P:
        """Concatenate rows of DataProtos with the same keys; the result derives from ``data[0]``.

        meta_info is merged: ``"metrics"`` dicts are gathered into a dict of lists (one entry per part),
        other keys must agree in every part.
        """
        if not data:
            raise DataProtoError("cannot concat an empty list of DataProtos")
        first = data[0]
        batches = [part.batch for part in data if part.batch is not None]
        if batches and len(batches) != len(data):
            raise DataProtoError("cannot concat DataProtos with and without tensors")
        for position, part_batch in enumerate(batches):
            if set(part_batch.keys()) != set(batches[0].keys()):
                raise DataProtoError(
                    f"part {position} has batch keys {sorted(part_batch.keys())}, "
                    f"expected {sorted(batches[0].keys())}"
                )
        batch = tensordict.cat(batches, dim=0) if batches else None
        columns = list_of_dict_to_dict_of_list([part.non_tensor_batch for part in data])
        non_tensor = {key: np.concatenate(arrays, axis=0) for key, arrays in columns.items()}
        return first._derive(batch, non_tensor, merge_meta_infos(part.meta_info for part in data))

    def repeat(self: P, repeat_times: int = 2, interleave: bool = True) -> P:
        """Repeat every row ``repeat_times`` times: ``aabb`` (interleave) or ``abab`` (tile)."""
        if repeat_times < 0:
            raise DataProtoError(f"repeat_times must be >= 0, got {repeat_times}")
        rows = np.arange(len(self))
        return self._take(np.repeat(rows, repeat_times) if interleave else np.tile(rows, repeat_times))

    def sample_level_repeat(self: P, repeat_times: Sequence[int] | NDArray | torch.Tensor) -> P:
        """Repeat row ``i`` ``repeat_times[i]`` times (a list, ndarray or tensor of ``len(self)`` ints)."""
        if isinstance(repeat_times, torch.Tensor):
            counts = repeat_times.detach().cpu().numpy()
        else:
            counts = np.asarray(repeat_times)
        if counts.ndim != 1 or counts.shape[0] != len(self):
            raise DataProtoError(
                f"repeat_times must be 1-D with {len(self)} entries, got shape {counts.shape}"
            )
        if counts.size and (not np.issubdtype(counts.dtype, np.integer) or counts.min() < 0):
            raise DataProtoError("repeat_times must hold non-negative integers")
        return self._take(np.repeat(np.arange(len(self)), counts.astype(np.int64)))

    def unfold_column_chunks(self: P, n_split: int, split_keys: Sequence[str] | None = None) -> P:
        """Cut dim 1 of each ``split_keys`` column into ``n_split`` parts that become rows; other columns
        are repeated (interleaved) ``n_split`` times to match."""
        if n_split <= 0:
            raise DataProtoError(f"n_split must be positive, got {n_split}")
        keys = set(split_keys or ())

        def unfold(key: str, val: Any, repeat: Callable[[Any], Any]) -> Any:
            if key not in keys:
                return repeat(val)
            if val.ndim < 2 or val.shape[1] % n_split != 0:
                raise DataProtoError(
                    f"dim 1 of {key!r} (shape {tuple(val.shape)}) does not split into {n_split}"
                )
            return val.reshape(val.shape[0] * n_split, val.shape[1] // n_split, *val.shape[2:])

        batch = None
        if self.batch is not None:
            batch = TensorDict(
                {
                    key: unfold(key, val, lambda t: t.repeat_interleave(n_split, dim=0))
                    for key, val in self.batch.items()
                },
                batch_size=[len(self) * n_split],
                device=self.batch.device,
            )
        non_tensor = {
            key: unfold(key, val, lambda a: np.repeat(a, n_split, axis=0))
            for key, val in self.non_tensor_batch.items()
        }
        return self._derive(batch, non_tensor, self.meta_info)

    # ----------------------------------------------------------------- description
    def get_data_info(self) -> str:
        """A multi-line description: tensor shapes/dtypes/devices, column shapes, meta_info value types."""
        return describe(self.batch, self.non_tensor_batch, self.meta_info)


def _has_rows(data: DataProto) -> bool:
    return data.batch is not None or bool(data.non_tensor_batch)


def collate_fn(x: Sequence[DataProtoItem]) -> DataProto:
    """Collate DataProtoItems into a DataProto: stack the TensorDicts, gather non-tensor values into 1-D
    object arrays. meta_info is left empty (as verl)."""
    if not x:
        raise DataProtoError("cannot collate an empty list of items")
    batches = [item.batch for item in x if item.batch is not None]
    if batches and len(batches) != len(x):
        raise DataProtoError("cannot collate items with and without tensors")
    batch = tensordict.stack(batches).contiguous() if batches else None
    columns = list_of_dict_to_dict_of_list([item.non_tensor_batch for item in x])
    return DataProto(batch=batch, non_tensor_batch={key: object_array(val) for key, val in columns.items()})
