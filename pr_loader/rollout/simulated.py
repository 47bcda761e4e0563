"""A deterministic, virtual-clock engine with long-tailed response lengths.

:class:`SimulatedEngine` models a continuous-batching decoder: at most ``num_slots`` sequences decode
together; one decode iteration costs ``decode_base_s + decode_per_seq_s * active`` seconds and yields one
token per active sequence; a request entering a slot first pays ``prefill_per_token_s`` per context token
(prompt plus any partial response it resumes from, so a resumed row pays its re-prefill). Waiting requests
queue FIFO.

Each sample wants a total response length drawn from a :class:`LengthDistribution` as a deterministic function
of ``(seed, sample id)``: a resumed row stops at the same total length as an uninterrupted one, and its tokens
and log-probs (a hash of sample id and position) are the same too. The clock jumps from one completion to the
next, so thousands of steps of hundreds of rows run in seconds.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from pr_loader.errors import ConfigError, EngineError
from pr_loader.rollout.engine import (
    FinishReason,
    FloatArray,
    GenOutput,
    GenRequest,
    IntArray,
    SlotEngine,
    SlotSpan,
    hash_key,
    splitmix64,
    unit_floats,
)

_Z99 = NormalDist().inv_cdf(0.99)


def _unit(seed: int, sample_id: str, salt: str) -> float:
    """A uniform number in (0, 1), deterministic in its arguments."""
    return ((hash_key(seed, salt, sample_id) >> 11) + 0.5) / 2.0**53


@dataclass(frozen=True)
class LengthComponent:
    """One log-normal component: ``weight`` (relative), ``median`` and ``p99`` in tokens."""

    weight: float
    median: float
    p99: float


class LengthDistribution:
    """Long-tailed response lengths: a mixture of log-normals, capped at ``max_tokens``, at least 1."""

    def __init__(self, components: Sequence[tuple[float, float, float]], *, max_tokens: int, seed: int = 0):
        if not components:
            raise ConfigError("LengthDistribution needs at least one (weight, median, p99) component")
        comps = [LengthComponent(float(w), float(m), float(p)) for w, m, p in components]
        for c in comps:
            if c.weight <= 0 or c.median < 1 or c.p99 < c.median:
                raise ConfigError(f"invalid length component {c}: need weight > 0, 1 <= median <= p99")
        if max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        total = sum(c.weight for c in comps)
        self.components = tuple(comps)
        self.max_tokens = int(max_tokens)
        self.seed = int(seed)
        self._cum = np.cumsum([c.weight / total for c in comps])

    @classmethod
    def lognormal(cls, median: float, p99: float, *, max_tokens: int, seed: int = 0) -> LengthDistribution:
        """A single log-normal with the given median and 99th percentile."""
        return cls([(1.0, median, p99)], max_tokens=max_tokens, seed=seed)

    def length_of(self, sample_id: str) -> int:
        """The total response length of ``sample_id`` (deterministic in seed and id)."""
        idx = 0
        if len(self.components) > 1:
            idx = min(int(np.searchsorted(self._cum, _unit(self.seed, sample_id, "mix"))), len(self._cum) - 1)
        comp = self.components[idx]
        sigma = math.log(comp.p99 / comp.median) / _Z99
        z = NormalDist().inv_cdf(_unit(self.seed, sample_id, "len"))
        raw = comp.median * math.exp(sigma * z)
        return max(1, min(self.max_tokens, math.ceil(raw)))

    def __call__(self, sample_id: str) -> int:
        return self.length_of(sample_id)


def hashed_tokens(
    seed: int, sample_id: str, start: int, stop: int, vocab_size: int
) -> tuple[IntArray, FloatArray]:
    """Token ids and log-probs of positions ``start..stop-1`` of a sample's response (deterministic)."""
    x = splitmix64(hash_key(seed, "tok", sample_id), np.arange(start, stop, dtype=np.uint64))
    tokens = (x % np.uint64(vocab_size)).astype(np.int64)
    logprobs = -(unit_floats(x) * 4.0 + 0.01)
    return tokens, logprobs.astype(np.float32)


class SimulatedEngine(SlotEngine):
    """Deterministic continuous-batching cost model with a virtual clock (see module docstring)."""

    def __init__(
        self,
        lengths: LengthDistribution,
        *,
        num_slots: int = 256,
        decode_base_s: float = 0.02,
        decode_per_seq_s: float = 5e-5,
        prefill_per_token_s: float = 2e-5,
        vocab_size: int = 32000,
        seed: int = 0,
    ) -> None:
        if num_slots < 1:
            raise ConfigError(f"num_slots must be >= 1, got {num_slots}")
        if (
            min(decode_base_s, decode_per_seq_s, prefill_per_token_s) < 0
            or decode_base_s + decode_per_seq_s <= 0
        ):
            raise ConfigError("decode/prefill costs must be >= 0 and a decode iteration must take time")
        if vocab_size < 2:
            raise ConfigError(f"vocab_size must be >= 2, got {vocab_size}")
        self.lengths = lengths
        self.decode_base_s = float(decode_base_s)
        self.decode_per_seq_s = float(decode_per_seq_s)
        self.prefill_per_token_s = float(prefill_per_token_s)
        self.vocab_size = int(vocab_size)
        self.seed = int(seed)
        super().__init__(num_slots)
        self._clock = 0.0
        self._slot_req: list[GenRequest | None] = [None] * num_slots
        self._start = np.zeros(num_slots)
        self._done = np.zeros(num_slots, dtype=np.int64)  # tokens generated by the slot's request
        self._todo = np.full(num_slots, -1, dtype=np.int64)  # tokens still to generate; -1 = free slot
        self._reason: list[FinishReason] = ["length"] * num_slots
        self.decode_iterations = 0

    @property
    def clock(self) -> float:
        """Virtual seconds since the engine was created."""
        return self._clock

    def submit(self, requests: Sequence[GenRequest]) -> None:
        """Queue requests (FIFO)."""
        self._book.add(requests)
        self._waiting.extend(requests)

    def _admit(self) -> None:
        free = np.flatnonzero(self._todo < 0)
        prefill_tokens = 0
        for slot in free[: len(self._waiting)]:
            req = self._waiting.popleft()
            target = self.lengths.length_of(req.sample_id)
            have = int(req.prefix_ids.size)
            todo = max(0, min(target - have, req.max_new_tokens))
            self._slot_req[slot] = req
            self._start[slot] = self._clock
            self._done[slot] = 0
            self._todo[slot] = todo
            self._reason[slot] = (
                "stop" if have + todo == target and target < self.lengths.max_tokens else "length"
            )
            prefill_tokens += req.context_len
        self._clock += prefill_tokens * self.prefill_per_token_s

    def step(self) -> list[GenOutput]:
        """Admit queued requests, then decode up to the next completion; return the finished outputs."""
        if not self._book:
            return []
        self._admit()
        active = self._todo >= 0
        n_active = int(active.sum())
        k = int(self._todo[active].min())
        if k > 0:
            self._clock += k * (self.decode_base_s + self.decode_per_seq_s * n_active)
            self._todo[active] -= k
            self._done[active] += k
            self.decode_iterations += k
        return [self._release(int(s), self._reason[int(s)]) for s in np.flatnonzero(self._todo == 0)]

    def abort(self, request_ids: Sequence[str]) -> list[GenOutput]:
        """Stop running or queued requests; return their partial outputs (queued ones have none)."""
        self._book.check(request_ids)
        wanted = set(request_ids)
        out: list[GenOutput] = []
        for slot, req in enumerate(self._slot_req):
            if req is not None and req.request_id in wanted:
                out.append(self._release(slot, "abort"))
        kept: deque[GenRequest] = deque()
        for req in self._waiting:
            if req.request_id in wanted:
                self._book.done(req.request_id)
                out.append(self._output(req, 0, "abort"))
            else:
                kept.append(req)
        self._waiting = kept
        return out

    def _output(self, req: GenRequest, count: int, reason: FinishReason) -> GenOutput:
        start = int(req.prefix_ids.size)
        tokens, logprobs = hashed_tokens(self.seed, req.sample_id, start, start + count, self.vocab_size)
        return GenOutput(req.request_id, req.sample_id, tokens, logprobs, reason, req.weights_version)

    def _release(self, slot: int, reason: FinishReason) -> GenOutput:
        req = self._slot_req[slot]
        if req is None:
            raise EngineError(f"slot {slot} is not busy")
        self._slot_req[slot] = None
        self._todo[slot] = -1
        self._book.done(req.request_id)
        span = SlotSpan(slot, float(self._start[slot]), self._clock, req.sample_id, req.request_id, reason)
        self._timeline.append(span)
        return self._output(req, int(self._done[slot]), reason)
