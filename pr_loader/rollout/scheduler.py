"""The partial-rollout scheduler: drives one step of generation over a :class:`LinkedDataProto` view.

One :meth:`Scheduler.run_step`:

1. tops the step up to ``target_size + oversample`` rows: asks the view to prefetch the missing rows from
   later steps (rows postponed into the step count; the policy decides how many it grants; FixedBatch:
   none). Like APRIL's over-provisioning, this keeps the same number of requests in flight every step,
   also after a step that finished more rows than ``target_size``;
2. submits every row to the engine; a row carrying partial output (``prl_partial_tokens``, ...) resumes
   from it (prompt + partial tokens are prefilled, the budget left is ``max_tokens - len(partial)``); rows
   that reached the policy's ``max_postpones`` are submitted first;
3. reports finished rows with ``view.mark_finished`` and stops as soon as ``view.should_stop_gen()`` says so;
4. aborts the requests still in flight and postpones those rows with their partial state through
   ``view.postpone_samples``; rows that may not be postponed (bound reached, or the policy refuses
   postponing: the synchronous baseline) are run to completion instead, never dropped;
5. returns the finished rows as the training batch: the rows' own fields plus padded ``responses``
   (int64), ``response_logprobs`` (float32), ``response_versions`` (int64, weights version of each token, -1
   on padding), ``response_mask`` and ``response_lengths``.

Several rows can finish in the same engine event, and bounded rows finish after the stop, so the batch
may hold more than ``target_size`` rows. Partial state written on postponed rows: ``prl_partial_tokens``
(int64 tensor), ``prl_partial_logprobs`` (float32 tensor), ``prl_partial_versions`` (int64 tensor).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pr_loader.errors import ConfigError, EngineError
from pr_loader.protocol import DataProto
from pr_loader.rollout.engine import (
    Engine,
    FloatArray,
    GenOutput,
    GenRequest,
    IntArray,
    SlotSpan,
    as_array,
    as_token_array,
)
from pr_loader.rollout.metrics import RunMetrics, StepMetrics, busy_slot_seconds, version_stats
from pr_loader.rows import FIELD_SAMPLE_ID, FIELD_TIMES_POSTPONED, dataproto_row, rows_to_dataproto

if TYPE_CHECKING:
    from pr_loader.linked import LinkedDataProto

__all__ = [
    "FIELD_PARTIAL_LOGPROBS",
    "FIELD_PARTIAL_TOKENS",
    "FIELD_PARTIAL_VERSIONS",
    "Scheduler",
    "StepResult",
]

logger = logging.getLogger(__name__)

FIELD_PARTIAL_TOKENS = "prl_partial_tokens"
FIELD_PARTIAL_LOGPROBS = "prl_partial_logprobs"
FIELD_PARTIAL_VERSIONS = "prl_partial_versions"
PARTIAL_FIELDS = (FIELD_PARTIAL_TOKENS, FIELD_PARTIAL_LOGPROBS, FIELD_PARTIAL_VERSIONS)


class _Stopwatch:
    """Accumulates wall time spent inside ``with`` blocks."""

    def __init__(self) -> None:
        self.total = 0.0
        self._t0 = 0.0

    def __enter__(self) -> None:
        self._t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        self.total += time.perf_counter() - self._t0


@dataclass
class _Row:
    """One row of the step: its fields, prompt, output so far, and its current request."""

    sample_id: str
    fields: dict[str, Any]
    prompt: IntArray
    budget: int
    times_postponed: int
    tokens: IntArray
    logprobs: FloatArray
    versions: IntArray
    resumed: bool = False
    attempt: int = 0

    def request(self, step: int, version: int) -> GenRequest:
        self.attempt += 1
        return GenRequest(
            request_id=f"{step}:{self.sample_id}:{self.attempt}",
            sample_id=self.sample_id,
            prompt_ids=self.prompt,
            max_new_tokens=max(0, self.budget - int(self.tokens.size)),
            prefix_ids=self.tokens,
            weights_version=version,
        )

    def absorb(self, out: GenOutput) -> int:
        """Append an output's tokens; returns how many were new."""
        n = int(out.token_ids.size)
        if n:
            self.tokens = np.concatenate([self.tokens, out.token_ids.astype(np.int64)])
            self.logprobs = np.concatenate([self.logprobs, out.logprobs.astype(np.float32)])
            self.versions = np.concatenate([self.versions, np.full(n, out.weights_version, dtype=np.int64)])
        return n

    def partial_fields(self) -> dict[str, Any]:
        """The row's fields with its output so far as partial state (for postponing)."""
        return {
            **self.fields,
            FIELD_PARTIAL_TOKENS: torch.from_numpy(self.tokens.copy()),
            FIELD_PARTIAL_LOGPROBS: torch.from_numpy(self.logprobs.copy()),
            FIELD_PARTIAL_VERSIONS: torch.from_numpy(self.versions.copy()),
        }


@dataclass
class StepResult:
    """The training batch of one step, its metrics, and the slot timeline of the step."""

    batch: DataProto
    metrics: StepMetrics
    timeline: list[SlotSpan] = field(default_factory=list)
    postponed_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Partial-rollout driver over an :class:`~pr_loader.rollout.engine.Engine` (see the module docstring).

    ``max_tokens`` is the total response budget of a row, an int or a function of the sample id (e.g. a
    :class:`~pr_loader.rollout.simulated.LengthDistribution`, to force long-tailed lengths on an untrained
    model). ``prompt_key`` names the prompt token ids of a row (tensor, array or list; a padded stacked prompt
    is unpadded with the row's ``attention_mask``). ``weights_version`` is an int (``run`` adds 1 after every
    step, simulating a training update) or a callable returning the current version.
    """

    def __init__(
        self,
        engine: Engine,
        *,
        oversample: int = 0,
        weights_version: Callable[[], int] | int = 0,
        max_tokens: int | Callable[[str], int] = 16384,
        prompt_key: str = "input_ids",
        pad_token_id: int = 0,
    ) -> None:
        if not isinstance(oversample, int) or isinstance(oversample, bool) or oversample < 0:
            raise ConfigError(f"oversample must be an int >= 0, got {oversample!r}")
        if isinstance(max_tokens, int) and max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {max_tokens}")
        self.engine = engine
        self.oversample = oversample
        self.max_tokens = max_tokens
        self.prompt_key = prompt_key
        self.pad_token_id = pad_token_id
        self._version = weights_version

    @property
    def weights_version(self) -> int:
        """The weights version stamped on tokens generated now."""
        return int(self._version() if callable(self._version) else self._version)

    def advance_version(self) -> None:
        """Simulate a training update: +1 to an int weights version (no-op for a callable one)."""
        if not callable(self._version):
            self._version += 1

    # ----------------------------------------------------------------- rows
    def _budget(self, sample_id: str) -> int:
        budget = self.max_tokens(sample_id) if callable(self.max_tokens) else self.max_tokens
        if not isinstance(budget, int | np.integer) or budget < 1:
            raise ConfigError(f"max_tokens for {sample_id!r} must be an int >= 1, got {budget!r}")
        return int(budget)

    def _make_row(self, fields: dict[str, Any]) -> _Row:
        sid = fields.get(FIELD_SAMPLE_ID)
        if sid is None:
            raise EngineError(f"a row lacks the {FIELD_SAMPLE_ID!r} field")
        sid = str(sid)
        if self.prompt_key not in fields:
            raise EngineError(f"row {sid} has no prompt field {self.prompt_key!r}")
        prompt = as_token_array(fields[self.prompt_key], f"row {sid}: {self.prompt_key!r}")
        mask = fields.get("attention_mask")
        if mask is not None and np.shape(mask) == prompt.shape:
            prompt = prompt[as_array(mask, np.int64, f"row {sid}: attention_mask") != 0]
        partial = [fields.pop(name, None) for name in PARTIAL_FIELDS]
        tokens = as_token_array(
            [] if partial[0] is None else partial[0], f"row {sid}: {FIELD_PARTIAL_TOKENS}"
        )
        n = tokens.size
        logprobs = (
            np.zeros(n, np.float32)
            if partial[1] is None
            else as_array(partial[1], np.float32, f"row {sid}: {FIELD_PARTIAL_LOGPROBS}")
        )
        versions = (
            np.full(n, -1, np.int64)
            if partial[2] is None
            else as_array(partial[2], np.int64, f"row {sid}: {FIELD_PARTIAL_VERSIONS}")
        )
        if logprobs.size != n or versions.size != n:
            raise EngineError(f"row {sid}: partial tokens, logprobs and versions differ in length")
        return _Row(
            sample_id=sid,
            fields=fields,
            prompt=prompt,
            budget=self._budget(sid),
            times_postponed=int(fields.get(FIELD_TIMES_POSTPONED, 0) or 0),
            tokens=tokens,
            logprobs=logprobs,
            versions=versions,
            resumed=n > 0,
        )

    # ----------------------------------------------------------------- one step
    def run_step(self, view: LinkedDataProto) -> StepResult:
        """Generate for one step's view; return the finished rows as the training batch."""
        engine = self.engine
        if engine.num_pending():
            raise EngineError(f"the engine still has {engine.num_pending()} requests in flight")
        version = self.weights_version
        start, first_span = engine.clock, len(engine.timeline)
        data_path = _Stopwatch()
        with data_path:
            wanted = max(0, view.target_size + self.oversample - len(view))
            prefetched = len(view.prefetch_samples(wanted))
            rows = {
                r.sample_id: r for r in (self._make_row(dataproto_row(view, i)) for i in range(len(view)))
            }
        if len(rows) != len(view):
            raise EngineError(f"step {view.step}: the view holds duplicated sample ids")
        order = sorted(rows.values(), key=lambda r: -r.times_postponed)  # bounded rows start first
        live: dict[str, _Row] = {}
        finished: set[str] = set()
        generated = 0

        def submit(batch: Sequence[_Row]) -> None:
            reqs = [r.request(view.step, version) for r in batch]
            live.update((q.request_id, r) for q, r in zip(reqs, batch))
            engine.submit(reqs)

        def collect(outs: Sequence[GenOutput]) -> bool:
            nonlocal generated
            done = []
            for out in outs:
                row = live.pop(out.request_id)
                generated += row.absorb(out)
                if out.finished:
                    finished.add(row.sample_id)
                    done.append(row.sample_id)
            if not done:
                return False
            with data_path:
                view.mark_finished(done)
                return view.should_stop_gen()

        postponed: list[str] = []
        forced: list[_Row] = []
        try:
            submit(order)
            while engine.num_pending() and not collect(engine.step()):
                pass
            forced = [r for r in live.values() if not view.policy.may_postpone(r.times_postponed)]
            movable = [r for r in live.values() if view.policy.may_postpone(r.times_postponed)]
            if movable:
                moving = {r.sample_id for r in movable}
                collect(engine.abort([rid for rid, r in live.items() if r.sample_id in moving]))
                with data_path:
                    accepted = view.postpone_samples(
                        rows_to_dataproto(DataProto, [r.partial_fields() for r in movable])
                    )
                if accepted:
                    postponed = [r.sample_id for r in movable]
                else:
                    submit(movable)
                    forced += movable
            while engine.num_pending():
                collect(engine.step())
        except BaseException:
            # Leave the engine empty for the next step; the step's rows stay in the store (lease expiry or
            # a retry of the step brings them back), so nothing is lost.
            if live:
                with contextlib.suppress(EngineError):
                    engine.abort(list(live))
            raise
        with data_path:
            batch_rows = [rows[sid] for sid in view.sample_ids() if sid in finished]
            batch = self._batch(batch_rows, view.step, version)
        dropped = len(rows) - len(finished) - len(postponed)
        if dropped:
            logger.error("step %d: %d rows neither finished nor postponed", view.step, dropped)
        end = engine.clock
        spans = list(engine.timeline[first_span:])
        vstats = version_stats([r.versions for r in batch_rows], version)
        metrics = StepMetrics(
            step=view.step,
            weights_version=version,
            start=start,
            end=end,
            num_slots=engine.num_slots,
            generated_tokens=generated,
            busy_slot_seconds=busy_slot_seconds(spans, start, end),
            rows_submitted=len(rows),
            rows_prefetched=prefetched,
            rows_resumed=sum(r.resumed for r in rows.values()),
            rows_finished=len(batch_rows),
            rows_postponed=len(postponed),
            rows_forced=len(forced),
            rows_dropped=dropped,
            batch_partial_rows=sum(r.resumed for r in batch_rows),
            batch_tokens=vstats.tokens,
            off_policy_tokens=vstats.off_policy_tokens,
            max_version_span=vstats.max_version_span,
            data_path_s=data_path.total,
        )
        logger.debug(
            "step %d: %d finished, %d postponed, %d tokens in %.3fs",
            view.step,
            len(batch_rows),
            len(postponed),
            generated,
            metrics.duration,
        )
        return StepResult(batch, metrics, spans, postponed)

    def _batch(self, rows: Sequence[_Row], step: int, version: int) -> DataProto:
        base = rows_to_dataproto(
            DataProto, [r.fields for r in rows], meta_info={"step": step, "weights_version": version}
        )
        lengths = np.array([r.tokens.size for r in rows], dtype=np.int64)
        width = int(lengths.max(initial=0))

        def padded(parts: Iterable[np.ndarray], fill: float, dtype: type[np.generic]) -> torch.Tensor:
            out = np.full((len(rows), width), fill, dtype=dtype)
            for i, part in enumerate(parts):
                out[i, : part.size] = part
            return torch.from_numpy(out)

        tensors = {
            "responses": padded((r.tokens for r in rows), self.pad_token_id, np.int64),
            "response_logprobs": padded((r.logprobs for r in rows), 0.0, np.float32),
            "response_versions": padded((r.versions for r in rows), -1, np.int64),
            "response_mask": padded((np.ones(n, np.int64) for n in lengths), 0, np.int64),
            "response_lengths": torch.from_numpy(lengths),
        }
        if not rows:  # keep the documented columns in an empty batch
            base.non_tensor_batch[FIELD_SAMPLE_ID] = np.empty(0, dtype=object)
        return base.union(DataProto.from_dict(tensors=tensors))

    # ----------------------------------------------------------------- many steps
    def run(
        self,
        views: Iterable[LinkedDataProto],
        *,
        max_steps: int | None = None,
        on_batch: Callable[[StepResult], None] | None = None,
    ) -> RunMetrics:
        """Run steps over ``views`` (e.g. a linked ``DataLoader``); time spent fetching a view (claim, commit
        of the previous step, decoding) counts as data path. ``advance_version`` is called after each step."""
        metrics = RunMetrics()
        it = iter(views)
        for _ in itertools.count() if max_steps is None else range(max_steps):
            t0 = time.perf_counter()
            view = next(it, None)
            fetch_s = time.perf_counter() - t0
            if view is None:
                break
            result = self.run_step(view)
            result.metrics.data_path_s += fetch_s
            if on_batch is not None:
                on_batch(result)
            metrics.add(result.metrics, result.timeline)
            self.advance_version()
        return metrics
