"""One epoch of a :class:`pr_loader.DataLoader` (internal): where steps come from (the claim-ahead pipeline
for ``FixedBatch``, reads and claims ahead that moves give back for postponing policies, worker processes),
the commit points, and the background threads (:mod:`pr_loader.background`). :mod:`pr_loader.dataloader`'s
docstring has the user's view.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pr_loader.background import Background, DeferredCommit, Heartbeat, no_op
from pr_loader.dataset import EmptyStep
from pr_loader.errors import LeaseLost, StepStateError
from pr_loader.policy import FixedBatch
from pr_loader.store import ClaimedStep

if TYPE_CHECKING:
    from pr_loader.dataloader import DataLoader

__all__ = ["CLAIMS_AHEAD", "LoaderIter", "Pools", "stop_workers"]

logger = logging.getLogger(__name__)


def stop_workers(iterator: object) -> None:
    """Shut the worker processes of a torch loader iterator down now (not at garbage collection), so that
    they claim nothing more."""
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if callable(shutdown):
        shutdown()


@dataclass
class ClaimAhead:
    """A claim made ahead of ``next()`` (see :meth:`LoaderIter._claim_ahead`): valid while ``generation`` is
    current (no move since it was sent); ``error`` is raised at ``next()`` in any case."""

    generation: int
    claimed: ClaimedStep | None = None
    item: Any = None
    error: BaseException | None = None


@dataclass
class ReadAhead:
    """The rows of a step read before its claim: their refs in order, samples by ref, and (linked views)
    the view built from exactly them, which the claim adopts if it holds the same rows."""

    step: int
    refs: list[str]
    samples: dict[str, Any]
    view: Any = None


_END = object()

Pools = tuple[ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor, ThreadPoolExecutor]
CLAIMS_AHEAD = 2  # steps claimed ahead of the one handed out, with FixedBatch (see _claimed_ahead)


class LoaderIter:
    """One epoch of a :class:`DataLoader` (commit points: :mod:`pr_loader.dataloader`'s docstring)."""

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.source = source = loader.source
        source.release_inflight()
        self.epoch = source.current_epoch()
        source.ensure_plan(self.epoch)
        self.epoch_end = (self.epoch + 1) * source.steps_per_epoch
        self.pending: int | None = None
        self.ahead: Callable[[], None] | None = None  # work to start once the current step is handed out
        self.yielded: set[int] = set()
        self.done = False
        self.worker_iter: Iterator[tuple[int, Any]] | None = None
        threaded = not source.in_process()
        # Threads (the loader's, kept from epoch to epoch): claim, materialise ahead, commit, build (decode +
        # collate; postponing policies: the reads and claims ahead); see _claimed_ahead, commit_pending and
        # _steps_read_ahead for what each gains (measured).
        self.pools: list[ThreadPoolExecutor | None] = (
            [*loader._thread_pools()] if threaded else [None, None, None, None]
        )
        self.pool, writer, self.commit_pool, self.build_pool = self.pools
        self.materialiser = Background(writer)
        self.committer = Background(self.pool)
        self.deferred: DeferredCommit | None = None  # the due commit, for the next claim ahead to send
        self.commit_with_claim = False
        self.read: ReadAhead | None = None  # postponing policies: the next step, read ahead (_read_ahead)
        self.reads: list[Background] = []  # (the reads ahead and claims ahead queued on the build thread)
        self.read_generation = 0
        self.read_step = -1  # the step the reads ahead are for
        # linked views on threads: the next step is claimed ahead (_claim_ahead); held is the step claimed
        # ahead last and not handed out, named to every claim and move (under claim_lock) so they give it back
        self.claim_lock = threading.Lock()
        self.held: int | None = None
        self.claimed: ClaimAhead | None = None
        self.steps: Iterator[tuple[int, Any]]
        if loader.num_workers > 0:
            self.steps = self._ordered(self._from_workers())
        elif isinstance(source.policy, FixedBatch):  # nothing moves between steps: claim ahead
            self.steps = self._claimed_ahead()
            self.commit_with_claim = threaded
        else:  # rows move into the next step until the current one is done: read and claim it ahead again
            self.steps = self._steps_read_ahead()
        self.heartbeat = Heartbeat(source, threaded)

    def __iter__(self) -> LoaderIter:
        return self

    def __len__(self) -> int:
        return self.source.steps_per_epoch

    # ------------------------------------------------------------------ sources of (step, item)
    def in_epoch(self, step: int) -> bool:
        return self.epoch_end - self.source.steps_per_epoch <= step < self.epoch_end

    def _build(self, claimed: ClaimedStep) -> Any:
        item = self.source.build(claimed)
        if isinstance(item, EmptyStep):
            self.source.commit(claimed.step)
            return item
        return self.loader._pin(item)

    def _claimed_ahead(self) -> Iterator[tuple[int, Any]]:
        """FixedBatch, a pipeline ``CLAIMS_AHEAD`` (2) steps deep: while the caller works on step k, the claim
        thread claims step k + 2 (and then hands the commit that is due to the commit thread), the build
        thread decodes and collates step k + 1, and the writer materialises step k + 3. A step is handed out
        as soon as it is built, the first of an epoch too. The work ahead of a step is started by
        ``__next__`` only once the step is handed out (``self.ahead``): a thread woken earlier would take the
        GIL from the hand-out. A claim waits (in its thread) for the materialisation it needs.

        Two claims ahead: a claim holds the GIL only to send and to parse its reply's head (the payloads
        arrive in one ``recv``), so the build of one step overlaps the claim of the next (docs/architecture.md
        has the numbers). Each stage keeps its one thread, even for a caller faster than the pipeline
        (claiming on the caller instead cost 9-10% per epoch, measured)."""
        claims = self.source.claim_steps(self.epoch)
        pending: collections.deque[Background] = collections.deque()

        def ahead(step: int) -> None:
            # (a commit handed to two claims is sent by the first one)
            claim = Background(self.pool)
            claim.start(self._claim_and_build, claims, self.materialiser.future, self.deferred)
            pending.append(claim)
            later = step + CLAIMS_AHEAD + 1
            if step >= 0 and self.in_epoch(later):  # (a requeued old step has nothing ahead to write)
                self.materialiser.start(self._materialise_ahead, later)

        for _ in range(CLAIMS_AHEAD):
            ahead(-1)
        while True:
            claimed, built = pending.popleft().wait()
            if claimed is _END:
                return
            try:
                item = built.wait()  # an error of a step is raised at its turn
            except BaseException:
                ahead(claimed.step)
                raise
            step = claimed.step
            del claimed  # (its rows hold a receive buffer: free for the next claim once the batch is built)
            if isinstance(item, EmptyStep):
                ahead(step)
                continue
            self.ahead = functools.partial(ahead, step)
            # (yielded out of a box, so that this frame holds no reference to the item while suspended: the
            # caller's `del batch` then frees it at once, not inside the next next(); ~0.5 ms for 6 MB)
            box = [(step, item)]
            del item
            yield box.pop()

    def _claim_and_build(
        self,
        claims: Iterator[ClaimedStep],
        written: Future[Any] | None,
        commit: DeferredCommit | None,
    ) -> tuple[Any, Background]:
        """Claim the next step once ``written`` (the materialisation it needs) is done, then send ``commit``
        (the step handed out before) and start the build of the claimed step on the build thread (an error
        of the build is kept for the step's turn)."""
        try:
            if written is not None:
                written.result()  # (_materialise_ahead never fails: a claim that needs the step writes it)
            claimed = next(claims, _END)
        finally:
            if commit is not None:
                commit.send()
        built = Background(self.build_pool)
        if claimed is not _END:
            built.start(self._build, claimed)
        return claimed, built

    def _materialise_ahead(self, step: int) -> None:
        """Best effort: a failure is raised later, by the claim that needs the step, at its turn."""
        try:
            self.source.materialise(step)
        except Exception:
            logger.debug("materialising step %d ahead failed; the claim will retry", step, exc_info=True)

    def _steps_read_ahead(self) -> Iterator[tuple[int, Any]]:
        """Partial policies: while the caller works on a step, the build thread materialises the next one,
        reads its rows as they are then, decodes them, builds their view (linked views: :meth:`_read_ahead`)
        and claims it (:meth:`_claim_ahead`), and again after each postpone or prefetch of the current step
        (which gives the step claimed ahead back: rows moved into it must arrive there). ``next()`` hands
        out the step claimed ahead if no move came after its claim; else it claims the step itself, reading
        only the payloads of rows that came since the read ahead. A claim that holds exactly the rows read
        ahead takes their view as built, else the build takes the samples decoded."""
        payloads: dict[str, bytes | memoryview] = {}
        claims = self.source.claim_steps(self.epoch, payloads, held=lambda: self.held)
        while True:
            current = self.read_generation
            self._stop_reads()
            ahead, self.claimed = self.claimed, None
            if ahead is not None and ahead.error is not None:
                raise ahead.error
            if ahead is not None and ahead.generation == current:
                claimed, item = ahead.claimed, ahead.item
            else:  # (a step claimed ahead that a move may have given back is named: the claim gives it back)
                with self.claim_lock:
                    claimed = next(claims, None)
                item = None if claimed is None else self._adopt(claimed, self.read)
            del ahead  # (else the next turn frees the batch handed out now, if its caller dropped it)
            with self.claim_lock:
                self.held = None  # (handed out: from now on a move of it must not give it back)
            if claimed is None:
                return
            following = claimed.step + 1
            self.read_step = following if self.in_epoch(following) else -1
            if self.read_step >= 0:  # (its first read drops this one's rows, on its thread: ~0.5 ms)
                self._start_read(following, payloads, first=True, claims=claims)
                if self.claims_ahead:
                    item.session.rows_moved = functools.partial(
                        self._start_read, following, payloads, claims=claims
                    )
                    item.session.hold = functools.partial(self._holding, following)
            else:
                self.read = None
                payloads.clear()
            box = [(claimed.step, item)]
            del claimed, item  # (see _claimed_ahead; and the claimed rows' receive buffer)
            yield box.pop()

    @property
    def claims_ahead(self) -> bool:
        """Whether the next step is claimed ahead: linked views (their moves name the step held ahead) on
        threads (in-process, everything runs inline: nothing to overlap)."""
        return self.source.linked and self.build_pool is not None

    @contextlib.contextmanager
    def _holding(self, following: int) -> Iterator[int | None]:
        """For a move of the step before ``following`` (``StepSession.hold``): no claim ahead runs meanwhile,
        and a move of the step handed out last names the step held ahead, which it gives back if it goes
        through (``rows_moved`` then reads and claims it again). A view kept from an earlier step names
        nothing: its move reads nothing again."""
        with self.claim_lock:
            yield self.held if following == self.read_step else None

    def _claim_ahead(self, claims: Iterator[ClaimedStep], generation: int) -> None:
        """Claim the next step now, on the build thread after the read ahead queued with it, unless a move
        came since (a later read and claim are queued then). Moves of the step handed out give the step
        claimed here back (they name it: ``_holding``), so it is claimed with exactly the rows a claim at
        ``next()`` would get; ``next()`` hands it out if no move came after it (its ``generation``)."""
        if generation != self.read_generation:
            return
        ahead = ClaimAhead(generation)
        try:
            with self.claim_lock:
                ahead.claimed = next(claims, None)
                self.held = None if ahead.claimed is None else ahead.claimed.step
            if ahead.claimed is not None:
                ahead.item = self._adopt(ahead.claimed, self.read)
        except BaseException as exc:  # (raised by next(); a failed claim also ended the claims generator)
            ahead.error = exc
        self.claimed = ahead

    def _adopt(self, claimed: ClaimedStep, read: ReadAhead | None) -> Any:
        """The view built ahead if ``claimed`` holds exactly its rows, in order; else the build of
        ``claimed`` (taking the samples decoded ahead)."""
        if (
            read is not None
            and read.view is not None
            and read.step == claimed.step
            and read.refs == [row.ref_text for row in claimed.rows]
        ):
            read.view.adopt_claim(claimed)
            item: Any = read.view
        else:
            item = self.source.build(claimed, None if read is None else read.samples)
        return self.loader._pin(item)

    def _start_read(
        self,
        step: int,
        payloads: dict[str, bytes | memoryview],
        *,
        first: bool = False,
        claims: Iterator[ClaimedStep],
    ) -> None:
        """Queue a read ahead of ``step`` (see :meth:`_read_ahead`) and, with :attr:`claims_ahead`, its claim
        (:meth:`_claim_ahead`); a later one supersedes them. A move of a step handed out before (its view
        kept by the caller) reads nothing: its successor is claimed."""
        if step != self.read_step:
            return
        self.read_generation += 1
        task = Background(self.build_pool)
        task.start(self._read_ahead, step, payloads, self.read_generation, first)
        self.reads.append(task)
        if self.claims_ahead:
            claim = Background(self.build_pool)
            claim.start(self._claim_ahead, claims, self.read_generation)
            self.reads.append(claim)

    def _stop_reads(self) -> None:
        """Let the reads ahead know the claim came and wait for them (raising a materialisation's error:
        the claim needs that step)."""
        self.read_generation += 1
        reads, self.reads = self.reads, []
        for task in reads:
            task.wait()

    def _read_ahead(
        self, step: int, payloads: dict[str, bytes | memoryview], generation: int, first: bool
    ) -> None:
        """The ``first`` read materialises ``step`` (its error is raised at the next ``next()``). Then, best
        effort, read its rows as they are now into ``payloads`` and ``self.read`` (by ref: payloads are
        immutable, so a row still in the step when it is claimed needs no second read), and build their view.
        Once superseded (a later read, after a move, or the claim came meanwhile) it builds no view, and a
        later read stops at its next stage (the claim then reads what is still unknown)."""

        def superseded() -> bool:
            return generation != self.read_generation

        def stop_early() -> bool:  # (the first read reads and decodes in any case: the claim needs them)
            return not first and superseded()

        if first:
            self.read = None  # (the step claimed last: its rows are built)
            payloads.clear()
            self.source.materialise(step)
        if self.build_pool is None or stop_early():  # (inline: nothing to overlap with)
            return
        try:
            rows = self.source.shard().store.read_rows(step, known=payloads)
        except Exception:
            logger.debug("reading step %d ahead failed; its claim reads it", step, exc_info=True)
            return
        payloads.clear()
        payloads.update((row.ref_text, row.buffer) for row in rows)
        if stop_early():
            return
        decoded = {} if self.read is None else self.read.samples
        samples = {row.ref_text: decoded[row.ref_text] for row in rows if row.ref_text in decoded}
        samples.update(self.source.decode_ahead([row for row in rows if row.ref_text not in samples]))
        read = ReadAhead(step, [row.ref_text for row in rows], samples)
        if self.source.linked and not superseded():
            read.view = self.source.build_ahead(step, rows, samples)
        self.read = read

    def _from_workers(self) -> Iterator[tuple[int, Any]]:
        source, loader = self.source, self.loader
        shard = source.shard()
        shard.store.retrying(functools.partial(shard.client.set, source.iter_epoch_key, self.epoch))
        self.worker_iter = loader._worker_loader()
        for step, item in self.worker_iter:
            if isinstance(item, ClaimedStep):  # (built here: its view is bound to this process's session)
                item = loader._pin(source.build(item))
            if isinstance(item, EmptyStep):
                source.commit(step)
                continue
            box = [(step, item)]
            del item  # (see _claimed_ahead)
            yield box.pop()

    def _ordered(self, items: Iterator[tuple[int, Any]]) -> Iterator[tuple[int, Any]]:
        """Yield worker results in claim order: the lowest step this consumer holds comes first."""
        buffer: dict[int, Any] = {}
        last = -1
        exhausted = False
        while True:
            if buffer:
                low = min(buffer)
                if low == last + 1 or exhausted:
                    last = low
                    yield low, buffer.pop(low)
                    continue
                held = [s for s in self.source.inflight_mine() if s < low and s not in self.yielded]
                if not held:
                    last = low
                    yield low, buffer.pop(low)
                    continue
            if exhausted:
                return
            try:
                step, buffer[step] = next(items)
            except StopIteration:
                exhausted = True
                continue

    # ------------------------------------------------------------------ iteration
    def _commit(self, step: int) -> None:
        try:
            self.source.commit(step)
        except (StepStateError, LeaseLost) as exc:
            self.loader._check_not_behind()  # Redis lost writes (the claim among them)?
            if isinstance(exc, LeaseLost) or not self.source.linked:
                raise  # (a linked view may have been committed by its user already)
        self.loader._known_committed = max(self.loader._known_committed, step)

    def _send_commit(self, step: int, done: Future[None]) -> None:
        """Commit ``step`` on the commit thread; ``done`` gets the outcome."""

        def commit() -> None:
            try:
                self._commit(step)
            except BaseException as exc:  # handed to committer.wait(), like the pool does
                done.set_exception(exc)
            else:
                done.set_result(None)

        Background(self.commit_pool).start(commit)

    def _wait_commit(self) -> None:
        """Wait for the commit sent last (sending it now if its claim has not yet: ``state_dict()`` and
        ``close()`` need not wait for a claim)."""
        deferred, self.deferred = self.deferred, None
        if deferred is not None:
            deferred.send()
        self.committer.wait()

    def commit_pending(self, *, wait: bool = True) -> None:
        """Commit the step handed out last. ``wait=False`` (``next()``) sends the commit from a background
        thread so that the next batch is handed out at once; its error, if any, is raised by the next call
        (the following ``next()`` or ``state_dict()``; ``close()`` logs it). In the claim-ahead pipeline the
        claim started next sends it, once its payloads are read: Redis then deletes the payloads leaving the
        retained window while this process builds the batch, not while it waits for the claim's reply
        (measured side by side: 5% less time per epoch, p50 of 15, for 25 KiB and for 1 MiB rows)."""
        self._wait_commit()
        step, self.pending = self.pending, None
        if step is None:
            return
        if wait or self.done:  # (a closed iterator has no thread left)
            self._commit(step)
        elif self.commit_with_claim:
            done: Future[None] = Future()
            self.committer.adopt(done)
            send = functools.partial(self._send_commit, step, done)
            self.deferred = DeferredCommit(send)
        else:
            self.committer.start(self._commit, step)

    def __next__(self) -> Any:
        if self.done:
            raise StopIteration
        try:  # (the commit the previous call sent runs meanwhile; commit_pending raises its error)
            handed = [next(self.steps)]
        except StopIteration:
            self.commit_pending()
            self.close(finished=True)
            raise
        except BaseException:
            self.commit_pending()  # the caller is done with the previous step; a failed commit explains more
            raise
        step = handed[0][0]
        if step <= self.loader._known_committed:  # a requeued step of another consumer, or a lost commit?
            self.loader._check_not_behind()
        self.commit_pending(wait=False)  # the commit of the step before, then the work ahead
        self.pending = step
        self.yielded.add(step)
        ahead, self.ahead = self.ahead, None
        if ahead is not None:
            ahead()
        # (the item leaves its box as it is returned: this call's frame, if a reference cycle below it keeps
        # it alive - fakeredis holds each error reply in a cycle with its frames, whose f_back reach this
        # one - then holds no reference to the batch, and the caller's `del` still frees it at once)
        return handed.pop()[1]

    def __del__(self) -> None:  # an abandoned iterator: stop its heartbeat (its queued tasks still run)
        if hasattr(self, "heartbeat"):
            self.heartbeat.stop()

    def close(self, *, finished: bool = False) -> None:
        """Stop the heartbeat and (unless the epoch finished and they persist) the worker processes, wait for
        this iterator's background work and let the recycled batch memory go; in-flight steps stay claimed
        until the next iter() releases them."""
        if self.done:
            return
        self.done = True
        self.heartbeat.stop()
        try:
            self._wait_commit()
        except Exception:  # close() must not fail; the step stays in flight and comes again
            logger.warning("committing the step before the last one failed", exc_info=True)
        for pool in self.pools:  # wait for this iterator's tasks: each pool runs its tasks in order
            if pool is not None:
                pool.submit(no_op).result()
        if self.source.batch_memory is not None:  # (between epochs the memory goes back, not kept idle)
            self.source.batch_memory.clear()
        if self.worker_iter is not None and not (finished and self.loader.persistent_workers):
            stop_workers(self.worker_iter)
            self.loader._workers = None
