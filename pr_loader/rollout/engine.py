"""The generation-engine interface the scheduler drives, and its request/output records.

An engine runs requests with continuous batching on a fixed number of *slots* (concurrent sequences).
A request continues a sample: ``prompt_ids`` plus ``prefix_ids`` (response tokens generated earlier, e.g.
before a postpone) are prefilled, then at most ``max_new_tokens`` new tokens are decoded. ``step`` advances
the engine and returns the requests that finished; ``abort`` stops requests and returns what they produced
so far. ``clock`` is the engine's time in seconds (virtual for :class:`SimulatedEngine`, wall for
:class:`TorchEngine`).
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from pr_loader.errors import EngineError

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float32]
FinishReason = Literal["stop", "length", "abort"]


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def hash_key(*parts: object) -> int:
    """A 64-bit key from the str forms of ``parts`` (blake2b): the same in every process and run."""
    text = "\x00".join(str(p) for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")


def splitmix64(key: int, counters: np.ndarray) -> np.ndarray:
    """SplitMix64 output number ``counters`` (uint64 array) of the stream seeded with ``key``."""
    with np.errstate(over="ignore"):
        x = np.uint64(key) + (counters.astype(np.uint64) + np.uint64(1)) * _GOLDEN
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        out: np.ndarray = x ^ (x >> np.uint64(31))
    return out


def unit_floats(bits: np.ndarray) -> np.ndarray:
    """Uniform floats in (0, 1) from 64-bit random values (their top 53 bits)."""
    out: np.ndarray = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) / float(1 << 53)
    return out


def as_array(values: object, dtype: type[np.generic], what: str) -> np.ndarray:
    """``values`` (list, ndarray or CPU tensor) as a 1-D array of ``dtype``; EngineError names ``what``."""
    try:
        arr = np.asarray(values, dtype=dtype)
    except (TypeError, ValueError, OverflowError, RuntimeError) as exc:
        raise EngineError(f"{what} must be a 1-D numeric sequence, got {type(values).__name__}") from exc
    if arr.ndim != 1:
        raise EngineError(f"{what} must be 1-D, got shape {arr.shape}")
    return arr


def as_token_array(values: object, what: str) -> IntArray:
    """``values`` as a 1-D int64 array of token ids (see :func:`as_array`)."""
    return as_array(values, np.int64, what)


@dataclass(frozen=True)
class GenRequest:
    """One generation request (one sample, possibly resumed from a partial response)."""

    request_id: str
    sample_id: str
    prompt_ids: IntArray
    max_new_tokens: int
    prefix_ids: IntArray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    weights_version: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", as_token_array(self.prompt_ids, "prompt_ids"))
        object.__setattr__(self, "prefix_ids", as_token_array(self.prefix_ids, "prefix_ids"))
        if self.max_new_tokens < 0:
            raise EngineError(f"request {self.request_id!r}: max_new_tokens must be >= 0")

    @property
    def context_len(self) -> int:
        """Tokens prefilled before decoding: prompt plus prefix."""
        return int(self.prompt_ids.size + self.prefix_ids.size)


@dataclass
class GenOutput:
    """What one request generated (new tokens only; the request's prefix is not repeated)."""

    request_id: str
    sample_id: str
    token_ids: IntArray
    logprobs: FloatArray
    finish_reason: FinishReason
    weights_version: int

    @property
    def finished(self) -> bool:
        """True when generation ended (EOS or token budget), False when it was aborted."""
        return self.finish_reason != "abort"


@dataclass(frozen=True)
class SlotSpan:
    """A slot busy with one request from ``start`` to ``end`` (engine clock), for timelines."""

    slot: int
    start: float
    end: float
    sample_id: str
    request_id: str
    finish_reason: FinishReason


@runtime_checkable
class Engine(Protocol):
    """The small interface the :class:`~pr_loader.rollout.Scheduler` needs from an engine."""

    @property
    def clock(self) -> float:
        """Engine time in seconds (virtual or wall)."""

    @property
    def num_slots(self) -> int:
        """Maximum number of concurrently decoded sequences."""

    @property
    def timeline(self) -> Sequence[SlotSpan]:
        """Every finished or aborted slot occupancy so far, in completion order."""

    def num_pending(self) -> int:
        """Requests submitted and neither finished nor aborted (running or queued)."""

    def submit(self, requests: Sequence[GenRequest]) -> None:
        """Queue requests; they start when a slot is free (FIFO)."""

    def step(self) -> list[GenOutput]:
        """Advance the engine; return the outputs of requests that finished (possibly none)."""

    def abort(self, request_ids: Sequence[str]) -> list[GenOutput]:
        """Stop requests (running or queued); return their partial outputs."""


class RequestBook:
    """Request-id bookkeeping shared by the engines: rejects duplicates, checks abort ids."""

    def __init__(self) -> None:
        self._live: set[str] = set()

    def __len__(self) -> int:
        return len(self._live)

    def add(self, requests: Sequence[GenRequest]) -> None:
        """Register new requests; EngineError on a duplicate id."""
        ids = [r.request_id for r in requests]
        dup = self._live.intersection(ids)
        if dup or len(set(ids)) != len(ids):
            name = sorted(dup)[0] if dup else next(i for i in ids if ids.count(i) > 1)
            raise EngineError(f"request id {name!r} is already in flight")
        self._live.update(ids)

    def check(self, request_ids: Sequence[str]) -> None:
        """EngineError if any id is not in flight."""
        for rid in request_ids:
            if rid not in self._live:
                raise EngineError(f"request {rid!r} is not in flight")

    def done(self, request_id: str) -> None:
        """Forget a finished or aborted request."""
        self._live.discard(request_id)


class SlotEngine:
    """State both engines share: the slot count, the request book, the FIFO queue and the slot timeline."""

    def __init__(self, num_slots: int) -> None:
        self._num_slots = int(num_slots)
        self._book = RequestBook()
        self._waiting: deque[GenRequest] = deque()
        self._timeline: list[SlotSpan] = []

    @property
    def num_slots(self) -> int:
        """Maximum concurrent sequences."""
        return self._num_slots

    @property
    def timeline(self) -> Sequence[SlotSpan]:
        """Finished and aborted slot occupancies."""
        return self._timeline

    def num_pending(self) -> int:
        """Running plus queued requests."""
        return len(self._book)
