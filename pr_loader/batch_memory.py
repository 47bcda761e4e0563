"""Recycled memory for big batch tensors.

Why: with glibc's defaults a batch tensor above glibc's mmap threshold (it adapts, up to 32 MiB) is an
``mmap`` of its own. The consumer frees it after its step, glibc unmaps it, and the next step's tensor is
faulted in afresh, each page zeroed by the kernel before the copy into it. Stacking 64 x 1 MiB rows into
a fresh tensor took 4.99-5.23 ms, into a recycled one 1.98-3.18 ms; 16 x 1 MiB, which glibc's heap
usually serves from memory it kept, 0.31-0.57 against 0.29-0.56 ms (``benchmarks/bench_batch_memory.py``,
three runs on this project's 2-core VM). Recycled memory leaves the copy alone.

:class:`BatchMemory` keeps the storages of the last few big batch tensors it made. A storage is reused only
when nothing but the pool holds it (no tensor, view, numpy array, DLPack capsule or Python storage object of
it is alive anywhere) and only for a tensor of exactly its size, so every tensor it hands out is
indistinguishable from a ``torch.empty`` one: its own contiguous, resizable storage, no ``_base``. The
strong count comes from ``torch._C._storage_Use_Count``; where a torch build lacks it, nothing is recycled.

A :class:`~pr_loader.dataset.RedisBatchDataset` owns one (the end of a DataLoader's epoch and ``close()``
empty it) and makes it the current one (:func:`using`) while it builds a batch; :func:`empty` draws from
the current one. DataLoader worker processes never recycle: their batches travel to the main process
through shared memory.

A pool set ``pinned`` (by a DataLoader with ``pin_memory=True`` where an accelerator is) makes every batch
tensor in page-locked memory instead, from torch's caching host allocator, which recycles such blocks
itself: pinning the batch then copies nothing (``Tensor.pin_memory`` returns a pinned tensor as it is),
where torch's DataLoader copies each batch once more into pinned memory.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import mmap
import sys
import threading
from collections.abc import Iterator
from math import prod
from typing import Any

import torch
from torch.utils.data import get_worker_info

__all__ = ["BatchMemory", "empty", "using"]

HUGE_BYTES = 4 << 20  # from this size a new batch tensor is advised onto transparent huge pages
_MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", None)
_madvise = getattr(ctypes.CDLL(None, use_errno=True), "madvise", None) if sys.platform == "linux" else None
if _madvise is not None:
    _madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
_use_count: Any = getattr(torch._C, "_storage_Use_Count", None)

_CURRENT: contextvars.ContextVar[BatchMemory | None] = contextvars.ContextVar(
    "pr_loader_batch_memory", default=None
)


def _fresh(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty``, advised onto transparent huge pages (``madvise(MADV_HUGEPAGE)``, as numpy does for its
    big arrays) when it is big: 4 KiB faults cost more than the copy into the tensor (filling a fresh 64 MiB
    batch took 25.7-26.7 ms as it is, 6.1-6.2 ms advised, on this project's 2-core VM). Advice only: where
    the kernel has no huge pages for it (THP off, not Linux) nothing changes."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.nbytes
    if nbytes >= HUGE_BYTES and _madvise is not None and _MADV_HUGEPAGE is not None:
        page = mmap.PAGESIZE
        start = -(-out.data_ptr() // page) * page
        end = (out.data_ptr() + nbytes) // page * page
        _madvise(start, end - start, _MADV_HUGEPAGE)  # (its error, e.g. EINVAL without THP, changes nothing)
    return out


def _contiguous_strides(shape: tuple[int, ...]) -> list[int]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= max(size, 1)
    return strides[::-1]


class _Keeper:
    """The pool's hold on one storage: a byte tensor of its own over it (one strong reference), and what
    :func:`_holders` reads when nothing else holds the storage (taken while the first tensor on it, ``out``,
    is alive). Both counts matter: tensors, views, numpy arrays and DLPack capsules hold the storage
    strongly, while torch's Python storage object, one per storage however many times it is asked for,
    counts once there however many references a program keeps to it."""

    def __init__(self, out: torch.Tensor) -> None:
        self.tensor = torch.empty((0,), dtype=torch.uint8).set_(out.untyped_storage())
        strong, python = _holders(self.tensor)
        self.free_at = (strong - 1, python)  # (less ``out``)

    def free(self) -> bool:
        return _holders(self.tensor) == self.free_at


def _holders(tensor: torch.Tensor) -> tuple[int, int]:
    """The strong references to ``tensor``'s storage, and the Python references to its storage object."""
    storage = tensor.untyped_storage()
    return _use_count(storage._cdata), sys.getrefcount(storage)


class BatchMemory:
    """Up to ``capacity`` storages of big batch tensors (from ``min_bytes``), each reused for a new tensor of
    its exact size once nothing but this pool holds it. Thread-safe.

    A storage that was moved to shared memory (``share_memory_()``, as ``torch.multiprocessing`` queues do
    with the tensors they send) is dropped from the pool, never reused: another process may still map it.
    """

    def __init__(self, capacity: int = 16, min_bytes: int = 1 << 20) -> None:
        self.capacity = capacity
        self.min_bytes = min_bytes
        self._keepers: list[_Keeper] = []
        self._lock = threading.Lock()
        self.reused = 0  # tensors made on a recycled storage (for tests and benchmarks)
        self.pinned = False  # tensors in page-locked memory (see the module doc); needs an accelerator

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor: pinned where the pool is, else on a recycled storage where one
        of its size is free."""
        if self.pinned:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        nbytes = prod(shape) * dtype.itemsize
        if nbytes < self.min_bytes or _use_count is None:
            return _fresh(shape, dtype)
        with self._lock:
            # (a storage moved to shared memory is dropped: see the class doc)
            self._keepers = [k for k in self._keepers if not k.tensor.untyped_storage().is_shared()]
            free = [k for k in self._keepers if k.free()]
            for keeper in free:
                if keeper.tensor.untyped_storage().nbytes() == nbytes:  # (a resize changes it)
                    self._drop(keeper)
                    self._keepers.append(keeper)  # (most recently used last)
                    self.reused += 1
                    return torch.empty((0,), dtype=dtype).set_(
                        keeper.tensor.untyped_storage(), 0, shape, _contiguous_strides(shape)
                    )
            out = _fresh(shape, dtype)
            if len(self._keepers) >= self.capacity:
                if not free:
                    return out  # (every pooled storage is in use: this one is not kept)
                self._drop(free[0])  # (the least recently used free one)
            self._keepers.append(_Keeper(out))
            return out

    def _drop(self, keeper: _Keeper) -> None:
        del self._keepers[next(i for i, k in enumerate(self._keepers) if k is keeper)]  # (not ==: tensors)

    def clear(self) -> None:
        """Forget every pooled storage (those still in use live on with their tensors)."""
        with self._lock:
            self._keepers.clear()

    def __len__(self) -> int:
        return len(self._keepers)


@contextlib.contextmanager
def using(memory: BatchMemory | None) -> Iterator[None]:
    """Make ``memory`` the pool :func:`empty` draws from in this context (thread / task)."""
    token = _CURRENT.set(memory)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """A batch tensor: from the current :class:`BatchMemory` (see :func:`using`) in the main process, else
    a fresh one."""
    memory = _CURRENT.get()
    if memory is None or get_worker_info() is not None:
        return _fresh(shape, dtype)
    return memory.empty(shape, dtype)
