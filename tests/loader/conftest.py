"""Shared helpers of the loader tests: exact side-by-side comparison of two loaders' outputs."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch


def assert_same(a: Any, b: Any, where: str = "batch") -> None:
    """``a`` and ``b`` are equal with the same types, dtypes and shapes, recursively."""
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert torch.equal(a, b), f"{where}: {a} != {b}"
        assert a.is_pinned() == b.is_pinned(), f"{where}: pinned {a.is_pinned()} != {b.is_pinned()}"
    elif isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, f"{where}: {a.dtype}{a.shape} != {b.dtype}{b.shape}"
        assert np.array_equal(a, b), f"{where}: {a} != {b}"
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: len {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_epochs(reference: list[list[Any]], got: list[list[Any]]) -> None:
    assert len(reference) == len(got)
    for e, (ref_epoch, got_epoch) in enumerate(zip(reference, got)):
        assert len(ref_epoch) == len(got_epoch), f"epoch {e}: {len(ref_epoch)} != {len(got_epoch)} batches"
        for i, (x, y) in enumerate(zip(ref_epoch, got_epoch)):
            assert_same(x, y, f"epoch {e} batch {i}")


def wait_for_claim_ahead(it: Any) -> None:
    """Wait until the loader iterator's claim ahead of the next step has run."""
    deadline = time.monotonic() + 10
    while it.claimed is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert it.claimed is not None, "no claim ahead ran"
