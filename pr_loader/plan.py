"""Epoch plans: which dataset indices each step of an epoch holds, computed from torch's own samplers.

An epoch plan is drawn exactly the way ``torch.utils.data.DataLoader.__iter__`` draws it, so a loader built
on it yields the same batches in the same order as torch's loader and leaves every random generator in the
same state: ``iter(index_sampler)`` is created first, then one ``int64`` base seed is drawn from the loader's
generator (the global RNG when it is ``None``), then the sampler is run to the end.  With
``persistent_workers`` and workers torch draws that base seed only for the first epoch; the plan does the
same for the run's epoch 0.

Plans are stored in Redis once per epoch (``PlanStore``): the indices as packed little-endian ``int64`` and
the batch offsets as packed ``int64`` (``steps + 1`` of them), so step ``b`` is one ``GETRANGE`` away and a
resume mid-epoch needs no replay.  Next to them the state of every explicit ``torch.Generator`` after the
draw is kept, so a new process continues the random sequence of later epochs where the old one left it.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from pr_loader.errors import ConfigError
from pr_loader.store.connection import Client

_I64 = np.dtype("<i8")
_T = TypeVar("_T")


class Retrying(Protocol):
    """Runs a call of idempotent Redis commands, retrying connection errors (``BatchStore.retrying``)."""

    def __call__(self, call: Callable[[], _T]) -> _T: ...


def _once(call: Callable[[], _T]) -> _T:
    return call()


@dataclass(frozen=True)
class EpochPlan:
    """The batches of one epoch: ``indices[offsets[b]:offsets[b + 1]]`` is batch ``b``."""

    indices: np.ndarray[Any, np.dtype[np.int64]]
    offsets: np.ndarray[Any, np.dtype[np.int64]]
    rng_state: dict[str, str]  # generator name -> base64 state after the epoch was drawn

    @property
    def num_steps(self) -> int:
        return len(self.offsets) - 1

    def batch(self, b: int) -> list[int]:
        return [int(i) for i in self.indices[int(self.offsets[b]) : int(self.offsets[b + 1])]]

    @classmethod
    def from_batches(cls, batches: Iterable[Sequence[int] | int], rng_state: dict[str, str]) -> EpochPlan:
        """A plan from torch's batches (lists of indices), or single indices when auto-collation is off."""
        flat: list[int] = []
        offsets = [0]
        for batch in batches:
            if isinstance(batch, (int, np.integer)) or (isinstance(batch, torch.Tensor) and batch.ndim == 0):
                flat.append(int(batch))
            else:
                flat.extend(int(i) for i in batch)
            offsets.append(len(flat))
        return cls(np.asarray(flat, dtype=np.int64), np.asarray(offsets, dtype=np.int64), rng_state)


def _generator_state(gen: torch.Generator) -> str:
    return base64.b64encode(gen.get_state().numpy().tobytes()).decode("ascii")


def _set_generator_state(gen: torch.Generator, state: str) -> None:
    raw = np.frombuffer(base64.b64decode(state), dtype=np.uint8).copy()
    gen.set_state(torch.from_numpy(raw))


class EpochPlanner:
    """Draws epoch plans from a torch index sampler (``batch_sampler`` or ``sampler``) like torch does.

    ``generators`` are the explicit ``torch.Generator`` objects whose state a resumed process must restore
    (the loader's and any sampler's own); the global RNG is never saved or restored.
    """

    def __init__(
        self,
        index_sampler: Iterable[Any],
        *,
        loader_generator: torch.Generator | None,
        base_seed_every_epoch: bool,
        dataset_len: int | None,
    ) -> None:
        self.index_sampler = index_sampler
        self.loader_generator = loader_generator
        self.base_seed_every_epoch = base_seed_every_epoch
        self.dataset_len = dataset_len
        self.generators = self._find_generators()

    def _find_generators(self) -> dict[str, torch.Generator]:
        found: dict[str, torch.Generator] = {}
        if self.loader_generator is not None:
            found["loader"] = self.loader_generator
        inner = getattr(self.index_sampler, "sampler", None)
        for name, obj in (("index_sampler", self.index_sampler), ("sampler", inner)):
            gen = getattr(obj, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found.values()):
                found[name] = gen
        return found

    def rng_state(self) -> dict[str, str]:
        return {name: _generator_state(gen) for name, gen in self.generators.items()}

    def restore_rng(self, state: dict[str, str]) -> None:
        """Put the explicit generators into a stored state (the one after the previous epoch's draw)."""
        for name, gen in self.generators.items():
            if name in state:
                _set_generator_state(gen, state[name])

    def set_epoch(self, epoch: int) -> None:
        """Forward the epoch to samplers that need it (``DistributedSampler``)."""
        for obj in (self.index_sampler, getattr(self.index_sampler, "sampler", None)):
            set_epoch = getattr(obj, "set_epoch", None)
            if callable(set_epoch):
                set_epoch(epoch)

    def draw(self, epoch: int) -> EpochPlan:
        """Draw the next plan, consuming random numbers exactly as one ``iter(torch DataLoader)`` does."""
        iterator = iter(self.index_sampler)
        if self.base_seed_every_epoch or epoch == 0:
            torch.empty((), dtype=torch.int64).random_(generator=self.loader_generator)
        batches = list(iterator)
        plan = EpochPlan.from_batches(batches, self.rng_state())  # the state after the whole draw
        if self.dataset_len is not None and len(plan.indices):
            low, high = int(plan.indices.min()), int(plan.indices.max())
            if low < 0 or high >= self.dataset_len:
                bad = low if low < 0 else high
                raise ConfigError(
                    f"the sampler yielded index {bad}, outside the dataset (len {self.dataset_len})"
                )
        return plan


def _as_bytes(raw: object) -> bytes:
    if isinstance(raw, bytes):
        return raw
    raise ConfigError("the Redis client must not decode responses (decode_responses=False)")


class PlanStore:
    """Epoch plans of one run shard in Redis (keys ``<prefix>plan:<epoch>:{idx,off,rng}``).

    The first writer of an epoch wins (``SET NX`` in one ``MULTI``); every consumer then uses that plan.
    """

    def __init__(self, client: Client, prefix: str, retrying: Retrying = _once) -> None:
        self.client = client
        self.prefix = prefix
        self._retrying = retrying  # (every command here is idempotent, or its replay harmless: see save)
        self._offsets: dict[int, np.ndarray[Any, np.dtype[np.int64]]] = {}

    def _key(self, epoch: int, part: str) -> str:
        return f"{self.prefix}plan:{epoch}:{part}"

    def exists(self, epoch: int) -> bool:
        return bool(self._retrying(lambda: self.client.exists(self._key(epoch, "off"))))

    def save(self, epoch: int, plan: EpochPlan) -> bool:
        """Store ``plan`` unless epoch already has one; True if this call stored it (a replay after a lost
        reply says False: the plan stored is then this one, and the caller reads it back)."""
        pipe = self.client.pipeline(transaction=True)
        pipe.set(self._key(epoch, "idx"), plan.indices.astype(_I64).tobytes(), nx=True)
        pipe.set(self._key(epoch, "rng"), json.dumps(plan.rng_state), nx=True)
        pipe.set(self._key(epoch, "off"), plan.offsets.astype(_I64).tobytes(), nx=True)
        stored = bool(self._retrying(pipe.execute)[-1])
        if stored:
            self._offsets[epoch] = plan.offsets
        return stored

    def offsets(self, epoch: int) -> np.ndarray[Any, np.dtype[np.int64]] | None:
        cached = self._offsets.get(epoch)
        if cached is None:
            raw = self._retrying(lambda: self.client.get(self._key(epoch, "off")))
            if raw is None:
                return None
            cached = np.frombuffer(_as_bytes(raw), dtype=_I64).astype(np.int64)
            self._offsets[epoch] = cached
        return cached

    def rng_state(self, epoch: int) -> dict[str, str] | None:
        raw = self._retrying(lambda: self.client.get(self._key(epoch, "rng")))
        return None if raw is None else dict(json.loads(raw))

    def num_steps(self, epoch: int) -> int | None:
        offsets = self.offsets(epoch)
        return None if offsets is None else len(offsets) - 1

    def batches(self, epoch: int, first: int, last: int) -> list[list[int]]:
        """Batches ``first..last`` (inclusive) of the stored plan of ``epoch``, with one ``GETRANGE``."""
        offsets = self.offsets(epoch)
        if offsets is None:
            raise KeyError(epoch)
        start, end = int(offsets[first]), int(offsets[last + 1])
        if end == start:
            return [[] for _ in range(first, last + 1)]
        raw = self._retrying(lambda: self.client.getrange(self._key(epoch, "idx"), start * 8, end * 8 - 1))
        flat = np.frombuffer(_as_bytes(raw), dtype=_I64)
        return [
            [int(i) for i in flat[int(offsets[b]) - start : int(offsets[b + 1]) - start]]
            for b in range(first, last + 1)
        ]

    def delete_epoch(self, epoch: int) -> None:
        """Drop the plan of ``epoch`` (once rollback can no longer reach it)."""
        if epoch >= 0:
            keys = [self._key(epoch, p) for p in ("idx", "off", "rng")]
            self._retrying(lambda: self.client.delete(*keys))
        self._offsets.pop(epoch, None)
