"""pr_loader: a persistent, Redis-backed data loader for LLM RL with partial rollout."""

from __future__ import annotations

from pr_loader.errors import PrLoaderError
from pr_loader.protocol import DataProto, DataProtoConfig, DataProtoItem

__version__ = "0.1.0"

__all__ = [
    "DataProto",
    "DataProtoConfig",
    "DataProtoItem",
    "PrLoaderError",
    "__version__",
]
