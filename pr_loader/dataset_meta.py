"""What a run knows of its dataset and of its rank, checked before anything is stored: the rank and world
size (from torch.distributed when not given), the sampler that shards the dataset across ranks, and the
dataset's fingerprint for the run meta."""

from __future__ import annotations

import contextlib
import random
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.data as tud

from pr_loader.errors import ConfigError, DatasetError

__all__ = ["fingerprint", "positive_int", "rank_and_world", "read_item", "shard_sampler"]


def rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """Checked (rank, world_size); ``None`` takes the initialised process group's value (else 0 / 1)."""
    dist = torch.distributed
    initialised = dist.is_available() and dist.is_initialized()
    if rank is None:
        rank = dist.get_rank() if initialised else 0
    if world_size is None:
        world_size = dist.get_world_size() if initialised else 1
    world_size = positive_int("world_size", world_size)
    rank = positive_int("rank", rank, 0)
    if rank >= world_size:
        raise ConfigError(f"rank {rank} is not below world_size {world_size}")
    return rank, world_size


def positive_int(name: str, value: object, minimum: int = 1) -> int:
    """``value`` if it is an int >= ``minimum`` (not a bool), else a ConfigError naming ``name``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _structure(value: object) -> str:
    """Types, keys and tensor dtypes of a sample (not its values: random transforms stay stable)."""
    if isinstance(value, dict):
        return "{" + ",".join(f"{key!r}:{_structure(item)}" for key, item in value.items()) + "}"
    if isinstance(value, list | tuple):
        return type(value).__name__ + "(" + ",".join(_structure(item) for item in value[:8]) + ")"
    if isinstance(value, torch.Tensor | np.ndarray):
        return f"{type(value).__name__}[{value.dtype},{value.ndim}]"
    return type(value).__qualname__


def fingerprint(dataset: Any, index_sampler: object, length: int) -> str:
    """What identifies a dataset and its sampling for run meta: type, length, sampler types and the
    structure of three items (read with every RNG state preserved, so torch parity is kept). The batch size
    is not part of it (the run meta has its own field)."""
    kind = type(dataset)
    sampler = getattr(index_sampler, "sampler", None)
    probe = sorted({0, length // 2, length - 1}) if length else []
    with _rng_preserved():
        shapes = "|".join(_structure(read_item(dataset, i)) for i in probe)
    text = (
        f"{kind.__module__}.{kind.__qualname__}|{length}|{type(index_sampler).__qualname__}"
        f"|{type(sampler).__qualname__}|{getattr(index_sampler, 'drop_last', None)}|{shapes}"
    )
    return f"{kind.__qualname__}:{length}:{zlib.crc32(text.encode()):08x}"


@contextlib.contextmanager
def _rng_preserved() -> Iterator[None]:
    """Restore torch's, numpy's and Python's global RNG after reading items (a dataset may draw)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        yield
    random.setstate(py_state)
    np.random.set_state(np_state)


def read_item(dataset: Any, index: int) -> Any:
    """``dataset[index]``; a failure is a DatasetError naming the index."""
    try:
        return dataset[index]
    except Exception as exc:
        raise DatasetError(f"reading dataset index {index} failed: {exc!r}") from exc


def shard_sampler(
    dataset: Any,
    shuffle: bool | None,
    sampler: Any,
    batch_sampler: Any,
    drop_last: bool,
    generator: torch.Generator | None,
    rank: int,
    world_size: int,
) -> tuple[Any, bool | None, tud.DistributedSampler[Any] | None]:
    """(sampler, shuffle, built) for torch's loader: with ``world_size > 1`` and no sampler, a
    ``DistributedSampler`` (``built``, whose epoch pr_loader sets); a given sampler must be rank-aware."""
    if world_size == 1:
        return sampler, shuffle, None
    given = getattr(batch_sampler, "sampler", None) if batch_sampler is not None else sampler
    if sampler is not None or batch_sampler is not None:
        replicas, its_rank = getattr(given, "num_replicas", None), getattr(given, "rank", None)
        if (replicas, its_rank) != (world_size, rank):
            raise ConfigError(
                f"world_size={world_size}: pass sampler=None (pr_loader shards like DistributedSampler) or a "
                f"sampler with num_replicas={world_size} and rank={rank}; got num_replicas={replicas}, "
                f"rank={its_rank}"
            )
        return sampler, shuffle, None
    seed = 0 if generator is None else int(generator.initial_seed())
    built: tud.DistributedSampler[Any] = tud.DistributedSampler(
        dataset, num_replicas=world_size, rank=rank, shuffle=bool(shuffle), seed=seed, drop_last=drop_last
    )
    return built, None, built
