"""The durable Redis batch store (see docs/architecture.md)."""

from pr_loader.store.batch_store import SCHEMA, BatchStore
from pr_loader.store.keys import ShardKeys
from pr_loader.store.records import (
    ClaimedStep,
    DeadLetter,
    PostponedRow,
    PrefetchResult,
    RowRef,
    RunConfig,
    StepLease,
    StoredRow,
    StoreStats,
)

__all__ = [
    "SCHEMA",
    "BatchStore",
    "ClaimedStep",
    "DeadLetter",
    "PostponedRow",
    "PrefetchResult",
    "RowRef",
    "RunConfig",
    "ShardKeys",
    "StepLease",
    "StoreStats",
    "StoredRow",
]
