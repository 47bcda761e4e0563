"""``default_collate`` for rows decoded by :func:`pr_loader.codec.decode_raw_tensors`: one copy per column.

Why: ``default_collate`` over ``codec.decode(copy=False)`` rows pays for one ``torch.frombuffer`` view per
tensor (~3 us) and then a ``torch.stack`` per column; for a step of many small rows (an RL step: 256 rows of
8 KiB tensors) that is several times the cost of copying the bytes. Here a tensor stays a
:class:`~pr_loader.codec.RawTensor` until its whole column is known; the rows' bytes are then joined straight
from the payloads into one buffer, seen as the tensor ``torch.stack`` would give (same dtype, shape and
strides, memory of its own: fresh, or recycled from a batch nothing holds any more, see
:mod:`pr_loader.batch_memory`). Big rows too: ``torch.stack``'s own copy of 16 x 1 MiB is ~0.2 ms faster
alone, but it wakes torch's intra-op threads, which then spin on the cores that the trainer and Redis need
(measured on ``bench_loader``'s (c) loop: 0.85-1.6 ms more CPU per step of this process, and lower
throughput).

Parity with ``default_collate`` holds by construction: torch's own recursion
(``torch.utils.data._utils.collate.collate``) walks the containers, with the handlers of torch's current
``default_collate_fn_map`` (registrations made there still apply), and off the fast path RawTensors become
real tensors before torch's own handlers see them, so results and errors are torch's:

* a column of RawTensors of one dtype and shape, in the main process, under torch's own tensor handler takes
  the fast path; otherwise (mixed values, different shapes, zero-size tensors, a DataLoader worker, which
  stacks into shared memory) zero-copy views go to ``collate_tensor_fn``, whose ``torch.stack`` copies;
* any other column's handler gets rows whose RawTensors are private tensors;
* a RawTensor where torch expects a container (a dict in row 0, a tensor in row 1) raises
  :class:`~pr_loader.codec.NeedsTensor`, and the batch starts over from real tensors.
"""

from __future__ import annotations

import ctypes
import functools
import mmap
import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.utils.data import default_collate, get_worker_info
from torch.utils.data._utils.collate import collate, collate_tensor_fn, default_collate_fn_map

from pr_loader import batch_memory, codec
from pr_loader.codec import NeedsTensor, RawTensor
from pr_loader.errors import CodecError
from pr_loader.store.records import Placed, StoredRow

__all__ = ["ColumnPlacer", "collate_raw", "materialise", "stack_raw", "uniform_raw"]

CollateFnMap = dict[type | tuple[type, ...], Callable[..., Any]]
Handlers = tuple[tuple[type | tuple[type, ...], Callable[..., Any]], ...]

_ATOMS = frozenset({str, bytes, int, float, bool, type(None)})


def materialise(obj: Any, copy: bool = True) -> Any:
    """``obj`` with every RawTensor in it made a tensor (a private copy, or with ``copy=False`` a read-only
    view of the payload); containers that hold none are returned as they are."""
    kind = type(obj)
    if kind is RawTensor:
        return obj.tensor(copy)
    if kind in _ATOMS:
        return obj
    if kind is dict:
        if _ATOMS.issuperset(map(type, obj.values())):  # (the common case, checked in C: no call per item)
            return obj
        values = [materialise(value, copy) for value in obj.values()]
        if all(new is old for new, old in zip(values, obj.values())):
            return obj
        return dict(zip(obj, values))
    if kind is list or kind is tuple:
        if _ATOMS.issuperset(map(type, obj)):
            return obj
        items = [materialise(item, copy) for item in obj]
        if all(new is old for new, old in zip(items, obj)):
            return obj
        return items if kind is list else tuple(items)
    if kind is np.ndarray and obj.dtype.hasobject:
        if _ATOMS.issuperset(map(type, obj.flat)):
            return obj
        items = [materialise(item, copy) for item in obj.flat]
        if all(new is old for new, old in zip(items, obj.flat)):
            return obj
        return np.fromiter(items, dtype=object, count=len(items)).reshape(obj.shape)
    return obj


def uniform_raw(values: list[Any]) -> bool:
    """Whether ``values`` are RawTensor records of one dtype and one non-empty shape (a column
    :func:`stack_raw` takes)."""
    first = values[0] if values else None
    if type(first) is not RawTensor or not first.data.nbytes:
        return False
    dtype, shape = first.dtype, first.shape
    return all(type(v) is RawTensor and v.dtype is dtype and v.shape == shape for v in values)


def stack_raw(batch: list[RawTensor], dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """``torch.stack`` of the rows' tensors: each row's bytes copied once, straight from its payload, into a
    tensor of :func:`pr_loader.batch_memory.empty`, so that the result is ``torch.stack``'s in every respect
    (torch's own aligned, resizable storage: a bytearray's, or one numpy has seen, can never grow). The copy
    goes through a ctypes view of the new tensor's memory, which leaves the storage's flags alone. A column
    whose rows were all received into one tensor (:class:`ColumnPlacer`) is that tensor, not copied."""
    placed = _placed_column(batch)
    if placed is not None:
        return placed
    out = batch_memory.empty((len(batch), *shape), dtype)
    size = batch[0].data.nbytes
    dest = memoryview((ctypes.c_char * (size * len(batch))).from_address(out.data_ptr())).cast("B")
    for i, row in enumerate(batch):
        dest[i * size : (i + 1) * size] = row.data
    return out


def _placed_column(batch: list[RawTensor]) -> torch.Tensor | None:
    """The column every row of ``batch`` was received into, in order (:class:`ColumnPlacer`), or None."""
    first = batch[0].column
    if first is None or len(first[0]) != len(batch):
        return None
    column = first[0]
    for i, row in enumerate(batch):
        if row.column is None or row.column[0] is not column or row.column[1] != i:
            return None
    return column


def _collate_raw_column(batch: list[Any], *, collate_fn_map: CollateFnMap | None = None, stock: bool) -> Any:
    """A column whose first row is a RawTensor (``stock``: torch's own tensor handler is in use)."""
    if not stock:
        return collate(materialise(batch), collate_fn_map=collate_fn_map)
    if get_worker_info() is None and uniform_raw(batch):
        first: RawTensor = batch[0]
        return stack_raw(batch, first.dtype, first.shape)
    views = [row.tensor(copy=False) if type(row) is RawTensor else row for row in batch]
    return collate_tensor_fn(views, collate_fn_map=collate_fn_map)


def _with_tensors(handler: Callable[..., Any]) -> Callable[..., Any]:
    """``handler`` (of torch's map), given the column with its RawTensors made private tensors."""

    def wrapped(batch: list[Any], *, collate_fn_map: CollateFnMap | None = None) -> Any:
        if not _ATOMS.issuperset(map(type, batch)):  # (a cheap first look, in C: str / int columns)
            batch = materialise(batch)
        return handler(batch, collate_fn_map=collate_fn_map)

    return wrapped


@functools.lru_cache(maxsize=8)
def _fn_map(handlers: Handlers) -> CollateFnMap:
    """A RawTensor-aware copy of torch's ``default_collate_fn_map`` (given as its items)."""
    tensor_handler = next((fn for kind, fn in handlers if kind is torch.Tensor), None)
    if tensor_handler is None:  # torch falls back to the first handler of a base class
        tensor_handler = next((fn for kind, fn in handlers if issubclass(torch.Tensor, kind)), None)
    fn_map: CollateFnMap = {
        RawTensor: functools.partial(_collate_raw_column, stock=tensor_handler is collate_tensor_fn)
    }
    fn_map.update((kind, _with_tensors(fn)) for kind, fn in handlers)
    return fn_map


def collate_raw(rows: list[Any]) -> Any:
    """``default_collate(materialise(rows))`` for rows made by :func:`pr_loader.codec.decode_raw_tensors`,
    exactly (values, dtypes, containers, errors), but with one copy per tensor column."""
    fn_map = _fn_map(tuple(default_collate_fn_map.items()))
    try:
        return collate(rows, collate_fn_map=fn_map)
    except NeedsTensor:
        return default_collate(materialise(rows))


Layout = list[tuple[int, torch.dtype, tuple[int, ...]]]  # a row's tensors: raw offset, dtype, shape


def _layout_of(records: list[tuple[int, RawTensor]]) -> Layout:
    return [(offset, record.dtype, record.shape) for offset, record in records]


def _placeable(
    head: memoryview, size: int, allow_pickle: bool
) -> tuple[Any, list[tuple[int, RawTensor]]] | None:
    """A payload of ``size`` bytes decoded from its header and skeleton alone (``head``), before its raw
    area is received: the sample with its tensors as RawTensors, and those by raw offset, when tensors tile
    the whole raw area (their ``data`` views a stand-in: the placer points each at where it receives the
    tensor's bytes); None when anything else lives there (a numpy array), the sample needs real tensors, or
    the head does not decode."""
    raw_nbytes = size - len(head)
    decoder = codec.Decoder(allow_pickle, False, True)
    decoder.raw, decoder.raw_nbytes, decoder.records = _stand_in(raw_nbytes), raw_nbytes, []
    try:
        if codec.skeleton_end(head, allow_pickle) != len(head):
            return None
        sample = decoder.unpack(head[codec.HEAD_SIZE :])
    except Exception:  # (CodecError, NeedsTensor, or whatever msgpack raises for a corrupt head)
        return None
    records = sorted(decoder.records, key=lambda record: record[0])
    covered = 0
    for offset, record in records:
        if offset != covered:
            return None
        covered += record.data.nbytes
    return (sample, records) if covered == raw_nbytes else None


_STAND_IN_LOCK = threading.Lock()
_STAND_IN: list[memoryview] = [memoryview(b"")]


def _stand_in(nbytes: int) -> memoryview:
    """``nbytes`` of a read-only anonymous mapping, never written (untouched pages cost no memory)."""
    with _STAND_IN_LOCK:
        if _STAND_IN[0].nbytes < nbytes:
            _STAND_IN[0] = memoryview(mmap.mmap(-1, max(nbytes, 2 * _STAND_IN[0].nbytes))).toreadonly()
        return _STAND_IN[0][:nbytes]


class ColumnPlacer:
    """Receives the tensors of a claim's rows straight into the batch columns :func:`stack_raw` would copy
    them into (a :class:`pr_loader.store.records.Placer`), so that each byte is copied once, by the kernel,
    instead of into the receive buffer and then out of it.

    Why: the copy out of the receive buffer was a quarter of this process's CPU in ``bench_loader``'s (c).
    Placed, 16 x 1 MiB rows took 6.4-6.8 ms of this process's CPU per step against 8.1-10.5 ms, and (c)
    rose to 0.72-0.84x of the raw reads from 0.63-0.73x (four alternating rounds in one process, on the
    project's 2-core VM). For (b)'s 256 rows of 24 KiB of tensors it lost: a step took 16-19 against
    12-13 ms (the scatter list and the rows' plans are Python work, under the GIL the build thread needs),
    hence ``min_tail``.

    A codec payload ends with its tensors' bytes (:mod:`pr_loader.codec`), so row 0's head gives the layout
    of every row like it: a column per tensor (``batch_memory.empty((rows, *shape), dtype)``, in the batch
    memory current at the claim), and each row's last bytes, split at its tensors, received into its row of
    each column. :meth:`decode` checks a row against that layout as it decodes it from its head; a row of
    another layout (other tensors, a numpy array among them, undecodable) decodes from its bytes joined
    again, and :func:`stack_raw` copies a column unless every row of it was placed. Rows whose tensors hold
    under ``min_tail`` bytes are not placed.
    """

    head_size = codec.HEAD_SIZE
    min_tail = 256 << 10

    def __init__(self, allow_pickle: bool = False) -> None:
        self.allow_pickle = allow_pickle
        self.placements: dict[int, Placed] = {}
        self._count = 0
        self._columns: list[tuple[torch.Tensor, memoryview, int]] = []  # column, its bytes, bytes per row
        self._tail = 0  # bytes placed per row
        self._plan: tuple[list[torch.Tensor], Layout] = ([], [])  # what each row's Placed refers to

    def begin(self, count: int) -> None:
        """A reply of ``count`` payloads follows (0: forget the placements)."""
        self.placements, self._columns, self._tail, self._plan = {}, [], 0, ([], [])
        self._count = count

    def head_needed(self, head: memoryview, size: int) -> int:
        """Payload 0's bytes up to the end of its skeleton (0: not a payload to place)."""
        try:
            end = codec.skeleton_end(head, self.allow_pickle)
        except CodecError:
            return 0
        return end if end + self.min_tail <= size else 0

    def layout(self, head: memoryview, size: int) -> int:
        """The columns of payload 0's tensors; returns their bytes per row (0: payload 0 is not placeable)."""
        decoded = _placeable(head, size, self.allow_pickle)
        if decoded is None:
            return 0
        for _, record in decoded[1]:
            column = batch_memory.empty((self._count, *record.shape), record.dtype)
            column_bytes = column.reshape(-1).view(torch.uint8).numpy().data
            self._columns.append((column, column_bytes, record.data.nbytes))
        self._tail = size - len(head)
        self._plan = ([column for column, _, _ in self._columns], _layout_of(decoded[1]))
        return self._tail

    def destinations(self, index: int, size: int) -> list[memoryview]:
        """Row ``index`` of each column."""
        pieces = [data[index * nbytes : (index + 1) * nbytes] for _, data, nbytes in self._columns]
        self.placements[index] = Placed(size - self._tail, pieces, (index, self._plan))
        return pieces

    @staticmethod
    def decode(row: StoredRow, allow_pickle: bool = False) -> Any:
        """``codec.decode_raw_tensors`` of a placed row: its tensors RawTensors over their rows of the
        columns where it holds the layout planned for it, else (a copy of this row) over its joined bytes."""
        placed = row.placed
        if placed is None:
            return codec.decode_raw_tensors(row.buffer, allow_pickle=allow_pickle)
        index, (columns, layout) = placed.plan
        decoded = _placeable(memoryview(row.buffer)[: placed.start], len(row.buffer), allow_pickle)
        if decoded is None or _layout_of(decoded[1]) != layout:
            return codec.decode_raw_tensors(row.payload, allow_pickle=allow_pickle)
        for (_, record), piece, column in zip(decoded[1], placed.pieces, columns):
            record.data, record.column = piece, (column, index)
        return decoded[0]

