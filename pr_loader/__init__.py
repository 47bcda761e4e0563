"""pr_loader: a persistent, Redis-backed data loader for LLM RL with partial rollout.

The public names are imported lazily (PEP 562), so ``import pr_loader`` and the ``pr-loader`` CLI do not pay
for torch/tensordict until a name that needs them is used.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pr_loader.errors import PrLoaderError

if TYPE_CHECKING:
    from pr_loader.dataloader import DataLoader
    from pr_loader.dataset import RedisBatchDataset
    from pr_loader.linked import LinkedDataProto
    from pr_loader.policy import FixedBatch, Policy, PostponeToEpochEnd, PostponeToNext, get_policy
    from pr_loader.protocol import DataProto, DataProtoConfig, DataProtoItem
    from pr_loader.store import BatchStore, RunConfig

__version__ = "0.1.0"

_LAZY = {
    "DataProto": "pr_loader.protocol",
    "DataProtoConfig": "pr_loader.protocol",
    "DataProtoItem": "pr_loader.protocol",
    "LinkedDataProto": "pr_loader.linked",
    "Policy": "pr_loader.policy",
    "FixedBatch": "pr_loader.policy",
    "PostponeToNext": "pr_loader.policy",
    "PostponeToEpochEnd": "pr_loader.policy",
    "get_policy": "pr_loader.policy",
    "RedisBatchDataset": "pr_loader.dataset",
    "DataLoader": "pr_loader.dataloader",
    "BatchStore": "pr_loader.store",
    "RunConfig": "pr_loader.store",
}

__all__ = [
    "BatchStore",
    "DataLoader",
    "DataProto",
    "DataProtoConfig",
    "DataProtoItem",
    "FixedBatch",
    "LinkedDataProto",
    "Policy",
    "PostponeToEpochEnd",
    "PostponeToNext",
    "PrLoaderError",
    "RedisBatchDataset",
    "RunConfig",
    "__version__",
    "get_policy",
]


@contextlib.contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while our modules and their dependencies (redis-py, numpy,
    msgpack; torch too if the caller has not imported it yet) are imported, then restore it. An import
    creates tens of thousands of objects that all stay alive, and every collection triggered meanwhile
    walks all objects alive, the host's torch included: with torch imported first, ``from pr_loader import
    DataLoader`` took 134-183 ms with the collector running and 63-79 ms paused (measured; a resumed
    trainer's time to its first batch, ``benchmarks/bench_loader.py`` (d)). An import makes no garbage
    worth collecting."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pr_loader' has no attribute {name!r}")
    with _collector_paused():
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
