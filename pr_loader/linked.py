"""LinkedDataProto: the view of one claimed step, with postpone / prefetch decided by a :class:`Policy`.

The loader builds views with :meth:`LinkedDataProto.from_claim`; the scheduler generates, reports finished
rows with :meth:`~LinkedDataProto.mark_finished`, asks :meth:`~LinkedDataProto.should_stop_gen`, moves
unfinished rows (with their partial output) out with :meth:`~LinkedDataProto.postpone_samples` and pulls
work forward with :meth:`~LinkedDataProto.prefetch_samples`. Every change is one atomic store call and is
applied to the view in place only after the store accepted it.

Rows are matched by the reserved field ``prl_sample_id`` (``"<epoch>:<index>"``), never by position.
Reserved fields (see :data:`pr_loader.rows.RESERVED_FIELDS`) are filled from the store's refs; a sample's
own values under those names are overwritten.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any

from tensordict import TensorDictBase

from pr_loader import batch_memory, codec
from pr_loader.batch_memory import BatchMemory
from pr_loader.errors import (
    CodecError,
    ConfigError,
    DataProtoError,
    PolicyError,
    RowsNotInStep,
    StepStateError,
)
from pr_loader.policy import FixedBatch, Policy, RunLayout
from pr_loader.protocol import DataProto
from pr_loader.protocol_ops import NDArray
from pr_loader.rows import (
    FIELD_EPOCH,
    FIELD_FIRST_STEP,
    FIELD_INDEX,
    FIELD_SAMPLE_ID,
    FIELD_TIMES_POSTPONED,
    RESERVED_FIELDS,
    accelerator_device,
    appended,
    dataproto_row,
    rows_to_dataproto,
    taken,
)
from pr_loader.store import BatchStore, ClaimedStep, PrefetchResult, RowRef, StoredRow

__all__ = ["LinkedDataProto", "MaterialiseFn", "StepSession"]

logger = logging.getLogger(__name__)

_TARGET_ATTEMPTS = 8  # postpone tries while other consumers keep claiming the target
MaterialiseFn = Callable[[int], object]
"""``materialise(step)``: write the fresh batch of regular step ``step`` into the store (idempotent)."""


def _is_row(sample: Any) -> bool:
    """Whether a decoded payload can be a row of a view: a dict with str keys (else it is dead-lettered)."""
    return isinstance(sample, dict) and all(map(str.__instancecheck__, sample))  # (isinstance per key, in C)


@dataclass
class StepSession:
    """Binds a view to one step of a :class:`BatchStore` and performs the store calls for it.

    ``policy.name`` must be the run's policy (``RunConfig.policy``). ``materialise`` is called with a step
    number when prefetch (or a ``next`` peek) meets a regular step that is not materialised yet.
    ``clock`` supplies the ``now`` of store calls (``None``: the store's ``time.time()``). A ``read_only``
    session (the one of a :attr:`LinkedDataProto.next` peek) refuses every mutation. ``rows_moved`` is
    called after a postpone or prefetch went through, once the view is in step again (the loader then reads
    and claims the next step ahead again: :meth:`moving`), ``committed`` after a commit through the view
    went through (the loader waits for its fsync there). ``hold`` (the loader's, when it claims the next
    step ahead) is entered around each postpone and prefetch and gives the step held ahead, which the store
    call names so that it is given back first (``BatchStore.postpone``'s ``held``). ``batch_memory`` (the
    loader's) makes the new tensors of a view's moves (a prefetch's rows added, what a postpone leaves), as
    it makes the loader's batches.
    """

    store: BatchStore
    step: int
    consumer_id: str
    policy: Policy
    lease_seconds: float = 60.0
    lease_expiry: float = 0.0
    materialise: MaterialiseFn | None = None
    allow_pickle: bool = False
    read_only: bool = False
    clock: Callable[[], float] | None = None
    rows_moved: Callable[[], None] | None = None
    committed: Callable[[], None] | None = None
    hold: Callable[[], AbstractContextManager[int | None]] | None = None
    batch_memory: BatchMemory | None = None
    layout: RunLayout = field(init=False)
    _deferring: bool = field(default=False, init=False, repr=False)
    _moved_meanwhile: bool = field(default=False, init=False, repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.step, int) or isinstance(self.step, bool) or self.step < 0:
            raise ConfigError(f"step must be an int >= 0, got {self.step!r}")
        if not isinstance(self.policy, Policy):
            raise ConfigError(f"policy must be a Policy instance, got {self.policy!r}")
        if self.policy.name != self.store.config.policy:
            raise ConfigError(
                f"policy {self.policy.name!r} differs from the run's policy {self.store.config.policy!r}"
            )
        if (
            not isinstance(self.lease_seconds, int | float)
            or not math.isfinite(self.lease_seconds)
            or (self.lease_seconds <= 0)
        ):
            raise ConfigError(f"lease_seconds must be a positive number, got {self.lease_seconds!r}")
        self.layout = RunLayout.from_config(self.store.config)

    def now(self) -> float | None:
        """The ``now`` passed to store calls."""
        return None if self.clock is None else self.clock()

    def check_writable(self, what: str) -> None:
        """StepStateError if this is a read-only peek session."""
        if self.read_only:
            raise StepStateError(f"{what}: the view of step {self.step} is a read-only peek")

    def renew(self) -> float:
        """Extend the lease by ``lease_seconds``; returns the new expiry (``LeaseLost`` if it is gone)."""
        self.check_writable("renew")
        self.lease_expiry = self.store.renew(self.step, self.consumer_id, self.lease_seconds, now=self.now())
        return self.lease_expiry

    def commit(self) -> None:
        """Commit the step: its current rows are delivered for good."""
        self.check_writable("commit")
        self.store.commit(self.step, self.consumer_id, now=self.now())
        if self.committed is not None:
            self.committed()

    def dead_letter(self, ref: RowRef, reason: str) -> None:
        """Take row ``ref`` out of the step into the dead-letter list."""
        self.check_writable("dead_letter")
        self.store.dead_letter(self.step, ref, reason)

    def postpone(self, rows: list[tuple[RowRef, bytes]], target_step: int) -> int:
        """``BatchStore.postpone`` for this step; returns the step the rows went to.

        If another consumer already claimed ``target_step``, the rows go to the first unclaimed later step
        instead (the store's cursor), so several consumers can share one shard.
        """
        self.check_writable("postpone")
        for _ in range(_TARGET_ATTEMPTS):
            try:
                with self._held() as held:
                    self.store.postpone(self.step, self.consumer_id, rows, target_step, now=self.now(),
                                        held=held)  # fmt: skip
                self._moved()
                return target_step
            except StepStateError:
                later = self._unclaimed_after(target_step)
                if later is None:
                    raise
                logger.info(
                    "step %d: target step %d is already claimed; postponing to %d instead",
                    self.step,
                    target_step,
                    later,
                )
                target_step = later
        raise StepStateError(
            f"step {self.step}: every postpone target up to {target_step} was claimed meanwhile"
        )

    def _unclaimed_after(self, target_step: int) -> int | None:
        """The store's cursor if ``target_step`` was refused for being claimed while this step is still
        held; None if the refusal had another cause."""
        stats = self.store.stats()
        held = any(lease.step == self.step and lease.owner == self.consumer_id for lease in stats.in_flight)
        if not held or target_step >= stats.next_step or target_step in stats.requeued:
            return None
        return stats.next_step

    def ensure_materialised(self, step: int) -> None:
        """Materialise regular step ``step`` through the callback if the store lacks it."""
        if self.layout.is_drain(step) or self.store.is_materialised(step):
            return
        if self.materialise is None:
            raise StepStateError(
                f"step {step} is not materialised and the session has no materialise callback"
            )
        self.materialise(step)
        if not self.store.is_materialised(step):
            raise StepStateError(f"the materialise callback did not materialise step {step}")

    def prefetch(self, count: int, last_source_step: int) -> PrefetchResult:
        """``BatchStore.prefetch`` for this step (one call; the view loops and materialises)."""
        self.check_writable("prefetch")
        with self._held() as held:
            result = self.store.prefetch(self.step, self.consumer_id, count, last_source_step,
                                         now=self.now(), held=held)  # fmt: skip
        if result.rows or held is not None:  # (a step held ahead was given back even if nothing came)
            self._moved()
        return result

    def _held(self) -> AbstractContextManager[int | None]:
        return contextlib.nullcontext() if self.hold is None else self.hold()

    def _moved(self) -> None:
        if self._deferring:
            self._moved_meanwhile = True
        elif self.rows_moved is not None:
            self.rows_moved()

    @contextlib.contextmanager
    def moving(self) -> Iterator[None]:
        """Around a view's move (its store calls, then its columns brought in step): ``rows_moved`` is called
        once, on the way out (an error included), not right after the store call, so that the read ahead it
        starts on the loader's thread does not compete with the rest of the move for the GIL."""
        outer, self._deferring = self._deferring, True
        try:
            yield
        finally:
            self._deferring = outer
            if not outer and self._moved_meanwhile:  # (nested: the outermost one calls it)
                self._moved_meanwhile = False
                self._moved()


class LinkedDataProto(DataProto):
    """The rows of one step, bound to a :class:`StepSession` (see the module docstring).

    Derived objects (``select``, ``slice``, ``select_idxs``, ``chunk``, ``concat``, ...) keep this type and
    the ``step`` / ``epoch`` / ``target_size`` / ``policy`` attributes but are not bound to the step: store
    operations on them raise :class:`StepStateError`. Pickling also drops the binding.
    """

    step: int
    epoch: int
    target_size: int
    policy: Policy

    def __post_init__(self) -> None:
        super().__post_init__()
        self.step = -1
        self.epoch = -1
        self.target_size = 0
        self.policy = FixedBatch()
        self._session: StepSession | None = None
        self._refs: dict[str, RowRef] = {}
        self._finished: set[str] = set()
        self._postponed: set[str] = set()
        self._next: LinkedDataProto | None = None
        self._next_loaded = False

    def _derive(
        self, batch: TensorDictBase | None, non_tensor_batch: dict[str, NDArray], meta_info: dict[str, Any]
    ) -> LinkedDataProto:
        out = type(self)._from_parts(batch, non_tensor_batch, meta_info)
        out.step = self.step
        out.epoch = self.epoch
        out.target_size = self.target_size
        out.policy = self.policy
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.update(
            _session=None, _refs={}, _finished=set(), _postponed=set(), _next=None, _next_loaded=False
        )
        return state

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_claim(
        cls, claimed: ClaimedStep, session: StepSession, ahead: Mapping[str, Any] | None = None
    ) -> LinkedDataProto:
        """The view of a claimed step: decodes every payload (an undecodable one, or one that is not a
        dict, is dead-lettered and skipped; ``ahead``: samples by ref, decoded with
        ``codec.decode_raw_tensors`` before the claim), fills the reserved fields, binds ``session``."""
        if claimed.step != session.step:
            raise StepStateError(
                f"claimed step {claimed.step} does not match the session's step {session.step}"
            )
        session.lease_expiry = claimed.lease_expiry
        return cls._from_stored(claimed.rows, session, ahead)

    @classmethod
    def ahead_of_claim(
        cls, stored: list[StoredRow], session: StepSession, samples: Mapping[str, Any]
    ) -> LinkedDataProto | None:
        """The view the claim of ``session.step`` would build if it returned exactly the rows ``stored``
        (read before the claim; ``samples``: theirs by ref, from ``decode_raw_tensors``), or None if some
        row is missing from ``samples`` or is not a dict with str keys (its claim dead-letters it).
        Bound to ``session``, whose ``lease_expiry`` the claim sets (:meth:`adopt_claim`)."""
        for row in stored:
            sample = samples.get(row.ref_text)
            if not _is_row(sample):
                return None
        return cls._from_stored(stored, session, samples)

    def adopt_claim(self, claimed: ClaimedStep) -> None:
        """Bind the lease of ``claimed``, the claim of exactly the rows this view was built from ahead
        (:meth:`ahead_of_claim`; the caller compares the refs)."""
        session = self._require_session("adopt_claim")
        if claimed.step != self.step:
            raise StepStateError(f"claimed step {claimed.step} does not match the view's step {self.step}")
        session.lease_expiry = claimed.lease_expiry

    @classmethod
    def _from_stored(
        cls, stored: Iterable[StoredRow], session: StepSession, ahead: Mapping[str, Any] | None = None
    ) -> LinkedDataProto:
        view = rows_to_dataproto(cls, [])
        view._bind(session)
        view._add_rows(view._decode(stored, ahead))
        return view

    def _bind(self, session: StepSession) -> None:
        self._session = session
        self.step = session.step
        self.epoch = session.layout.epoch_of(session.step)
        self.target_size = session.layout.batch_size
        self.policy = session.policy

    def _decode(
        self, stored: Iterable[StoredRow], ahead: Mapping[str, Any] | None = None
    ) -> list[tuple[RowRef, dict[str, Any]]]:
        session = self._require_session("decode")
        out = []
        # (tensors stay RawTensor records until rows_to_dataproto stacks each column with one copy)
        decode_row = codec.row_decoder(allow_pickle=session.allow_pickle, raw_tensors=True)
        for row in stored:
            try:
                sample = ahead[row.ref_text] if ahead and row.ref_text in ahead else decode_row(row.buffer)
            except CodecError as exc:
                reason = f"undecodable payload: {exc}"
            else:
                if _is_row(sample):
                    out.append((row.ref, sample))
                    continue
                reason = f"payload is not a dict with str keys (got {type(sample).__name__})"
            if session.read_only:
                logger.warning("step %d (peek): skipping row %s: %s", self.step, row.ref.encode(), reason)
            else:
                logger.warning("step %d: dead-lettering row %s: %s", self.step, row.ref.encode(), reason)
                session.dead_letter(row.ref, reason)
        return out

    def _add_rows(self, decoded: list[tuple[RowRef, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Append decoded rows to self (reserved fields filled); returns the new row dicts."""
        new_rows = []
        for ref, sample in decoded:
            row = dict(sample)
            row[FIELD_SAMPLE_ID] = ref.key()
            row[FIELD_INDEX] = ref.index
            row[FIELD_EPOCH] = ref.epoch
            row[FIELD_TIMES_POSTPONED] = ref.version
            row[FIELD_FIRST_STEP] = self.step if ref.first_step is None else ref.first_step
            self._refs[ref.key()] = ref
            new_rows.append(row)
        if new_rows:
            with self._batch_memory():
                more = self._on_device(rows_to_dataproto(DataProto, new_rows, raw_tensors=True))
                parts = appended(self, more) if len(self) else (more.batch, more.non_tensor_batch)
                if parts is None:  # (a key changes kind, e.g. a tensor in every row at last: row by row)
                    rows = [dataproto_row(view, i) for view in (self, more) for i in range(len(view))]
                    merged = rows_to_dataproto(DataProto, rows)
                    parts = merged.batch, merged.non_tensor_batch
            self.batch, self.non_tensor_batch = parts
        self._next_loaded = False
        return new_rows

    def _on_device(self, rows: DataProto) -> DataProto:
        """``rows`` moved to the accelerator every tensor of this view is on (the user's ``view.to("cuda")``),
        where new rows join it: left on the CPU they would not stack with its columns."""
        device = accelerator_device(self)
        return rows if device is None else rows.to(device)

    def _batch_memory(self) -> AbstractContextManager[None]:
        """Where this view's new tensors are made: its session's batch memory (the loader's), if any."""
        memory = None if self._session is None else self._session.batch_memory
        return contextlib.nullcontext() if memory is None else batch_memory.using(memory)

    # ----------------------------------------------------------------- row state
    @property
    def session(self) -> StepSession | None:
        """The binding to the store, or ``None`` for derived / unpickled objects."""
        return self._session

    def _require_session(self, what: str) -> StepSession:
        if self._session is None:
            raise StepStateError(
                f"{what}: this {type(self).__name__} is not bound to a step (derived or unpickled object)"
            )
        return self._session

    def sample_ids(self) -> list[str]:
        """``prl_sample_id`` of every row, in row order."""
        column = self.non_tensor_batch.get(FIELD_SAMPLE_ID)
        if column is None:
            if len(self):
                raise DataProtoError(f"the view of step {self.step} lost its {FIELD_SAMPLE_ID!r} column")
            return []
        return [str(sid) for sid in column]

    def _check_ids(self, ids: Iterable[str], what: str) -> list[str]:
        ids = [ids] if isinstance(ids, str) else list(ids)
        present = set(self.sample_ids())
        unknown = [sid for sid in ids if sid not in present]
        if unknown:
            gone = [sid for sid in unknown if sid in self._postponed]
            detail = f" (already postponed: {gone})" if gone else ""
            raise RowsNotInStep(f"{what}: rows not in step {self.step}: {unknown}{detail}")
        return ids

    def mark_finished(self, sample_ids: Iterable[str]) -> None:
        """Record that generation finished for these rows (one id or several; ``RowsNotInStep`` for ids
        not in the view)."""
        self._finished.update(self._check_ids(sample_ids, "mark_finished"))

    @property
    def num_finished(self) -> int:
        """Number of rows of the view marked finished."""
        return len(self._finished)

    def finished_ids(self) -> list[str]:
        """Ids of the finished rows, in row order."""
        return [sid for sid in self.sample_ids() if sid in self._finished]

    def _times_postponed(self) -> list[int]:
        """Times postponed of every row, in row order (from the refs; the column for unbound objects)."""
        column = self.non_tensor_batch.get(FIELD_TIMES_POSTPONED)
        out = []
        for position, sid in enumerate(self.sample_ids()):
            ref = self._refs.get(sid)
            if ref is not None:
                out.append(ref.version)
            elif column is not None:
                out.append(int(column[position]))
            else:
                raise DataProtoError(f"row {sid} has no {FIELD_TIMES_POSTPONED!r} value")
        return out

    def must_finish_ids(self) -> list[str]:
        """Unfinished rows that reached the policy's ``max_postpones``: the scheduler must finish them."""
        return [
            sid
            for sid, times in zip(self.sample_ids(), self._times_postponed())
            if sid not in self._finished and not self.policy.may_postpone(times)
        ]

    def should_stop_gen(self) -> bool:
        """The policy's answer: may the scheduler stop generating for this step now?"""
        answer = self.policy.should_stop_gen(self)
        if not isinstance(answer, bool):
            raise PolicyError(f"{self.policy!r}.should_stop_gen returned {answer!r}, not a bool")
        return answer

    # ----------------------------------------------------------------- moving rows
    def prefetch_samples(self, count: int) -> DataProto:
        """Move fresh rows of later steps into this step; the policy decides how many (``count`` is the
        request). Returns the new rows (also appended to self); FixedBatch: an empty DataProto. Where the
        view's tensors are all on one accelerator (``view.to("cuda")``), the new rows' tensors go there."""
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ConfigError(f"prefetch count must be an int >= 0, got {count!r}")
        session = self._require_session("prefetch_samples")
        session.check_writable("prefetch_samples")
        decided = self.policy.prefetch_count(self, count)
        if not isinstance(decided, int) or isinstance(decided, bool) or decided < 0:
            raise PolicyError(f"{self.policy!r}.prefetch_count returned {decided!r}, not an int >= 0")
        new_rows: list[dict[str, Any]] = []
        if decided:
            last = self.policy.prefetch_last_source_step(self.step, session.layout)
            if not isinstance(last, int) or isinstance(last, bool) or last < self.step:
                raise PolicyError(
                    f"{self.policy!r}.prefetch_last_source_step returned {last!r} for step {self.step}"
                )
            remaining = decided
            with session.moving():
                while remaining > 0:
                    # rows the store moved are added to self at once, so a failure below leaves both in sync
                    result = session.prefetch(remaining, last)
                    remaining -= len(result.rows)
                    new_rows += self._add_rows(self._decode(result.rows))
                    if result.needs_materialise is None:
                        break
                    session.ensure_materialised(result.needs_materialise)
            logger.info("step %d: prefetched %d of %d rows", self.step, len(new_rows), decided)
        fresh = self._on_device(rows_to_dataproto(DataProto, new_rows, raw_tensors=True))
        return self._derive(fresh.batch, fresh.non_tensor_batch, {})

    def postpone_samples(self, samples: DataProto) -> bool:
        """Move rows of this step (matched by ``prl_sample_id``, with the field values of ``samples``, e.g.
        partial outputs) to the later step the policy picks; they leave self.

        Returns False, changing nothing, if the policy never postpones (FixedBatch). All or nothing:
        ``RowsNotInStep`` names rows not in the step (or already postponed); ``PolicyError`` names rows
        that reached ``max_postpones`` (the scheduler must finish those; postpone the others).
        """
        session = self._require_session("postpone_samples")
        session.check_writable("postpone_samples")
        target = self.policy.postpone_target(self.step, session.layout)
        if target is None:
            return False
        if not isinstance(target, int) or isinstance(target, bool) or target <= self.step:
            raise PolicyError(f"{self.policy!r}.postpone_target returned {target!r} for step {self.step}")
        if not isinstance(samples, DataProto):
            raise DataProtoError(f"postpone_samples needs a DataProto, got {type(samples).__name__}")
        if len(samples) and FIELD_SAMPLE_ID not in samples.non_tensor_batch:
            raise DataProtoError(f"postpone_samples: samples lack the {FIELD_SAMPLE_ID!r} column")
        ids = [str(sid) for sid in samples.non_tensor_batch.get(FIELD_SAMPLE_ID, [])]
        if not ids:
            return True
        duplicated = sorted(sid for sid, n in Counter(ids).items() if n > 1)
        if duplicated:
            raise DataProtoError(f"postpone_samples: rows given more than once: {duplicated}")
        self._check_ids(ids, "postpone_samples")
        bounded = [sid for sid in ids if not self.policy.may_postpone(self._refs[sid].version)]
        if bounded:
            raise PolicyError(
                f"postpone_samples: rows {bounded} reached max_postpones={self.policy.max_postpones} "
                "and must be finished in this step; nothing was postponed"
            )
        moves = []
        for i, sid in enumerate(ids):
            payload = {k: v for k, v in dataproto_row(samples, i).items() if k not in RESERVED_FIELDS}
            try:
                moves.append((self._refs[sid], codec.encode(payload, allow_pickle=session.allow_pickle)))
            except CodecError as exc:
                raise CodecError(f"postpone_samples: row {sid}: {exc}") from exc
        with session.moving():
            target = session.postpone(moves, target)
            leaving = set(ids)
            keep = [i for i, sid in enumerate(self.sample_ids()) if sid not in leaving]
            with self._batch_memory():
                self.batch, self.non_tensor_batch = taken(self, keep)
            for sid in ids:
                del self._refs[sid]
            self._finished -= leaving
            self._postponed |= leaving
            self._next_loaded = False
        logger.info("step %d: postponed %d rows to step %d", self.step, len(ids), target)
        return True

    @property
    def next(self) -> LinkedDataProto | None:
        """Read-only peek at step ``step + 1`` (materialised through the callback if needed); ``None`` for an
        unbound object or when step + 1 is a drain step without rows. Loaded on first access and cached
        until this view postpones or prefetches (changes by other consumers are not tracked)."""
        if self._session is None:
            return None
        if not self._next_loaded:
            session = self._session
            peek = replace(session, step=session.step + 1, read_only=True, lease_expiry=0.0)
            if session.materialise is not None:
                peek.ensure_materialised(peek.step)
            stored = session.store.read_rows(peek.step)
            self._next = (
                None if not stored and session.layout.is_drain(peek.step) else self._from_stored(stored, peek)
            )
            self._next_loaded = True
        return self._next

    def commit(self) -> None:
        """Commit this step (normally done by the loader when the next step is asked for): its rows are
        delivered for good, and it can move no rows any more. A step committed before the training on it is
        not delivered again to a process that dies before its next checkpoint and restarts without
        ``load_state_dict`` (a restore from the checkpoint still replays it)."""
        self._require_session("commit").commit()
