"""``pr_loader.DataLoader``: a drop-in ``torch.utils.data.DataLoader`` whose position lives in Redis.

Every argument of torch's loader is accepted with the same name, order and default, and checked by torch
itself. For a map-style dataset and ``linked=False`` it yields exactly what torch's loader yields (values,
dtypes, containers, order, and the random numbers it draws): each epoch's plan is drawn from torch's own
sampler objects (:mod:`pr_loader.plan`) and stored in Redis; steps are materialised lazily
(``dataset[i]`` -> codec -> Redis), claimed, decoded and collated with the user's ``collate_fn``. Background
threads work ahead: with ``FixedBatch`` steps k + 1 and k + 2 are claimed, k + 1 is decoded and collated
and k + 3 materialised while the caller works on step k (an error of a later step is raised at that step's
turn); with a postponing policy step k + 1 is materialised, its rows as they are then are read, decoded and
built into its view, and (linked views) it is claimed, again after each postpone or prefetch of step k:
such a move names the step claimed ahead, and the store gives it back first (``BatchStore.postpone``'s
``held``), so rows postponed into it still arrive there and the step gets exactly the rows a claim at
``next()`` would. ``next()`` hands out the step claimed ahead if no move came after its claim, else claims
it then. With the in-process fakeredis store everything runs inline (its Lua runtime is not thread-safe).

Commit points: a step is committed when the next one is requested (``next()``, the end of the epoch, or a
new ``iter()`` of the same loader), or when :meth:`DataLoader.state_dict` is called. ``next()`` sends that
commit from a background thread and hands the next batch out at once (a failed commit is raised by the
following call; ``state_dict()``, the end of the epoch and a new ``iter()`` wait for it). A new ``iter()``
gives back steps claimed ahead and continues after the last committed step, so one ``iter()`` is the rest of
one epoch: unlike torch, abandoning an iterator mid-epoch continues that epoch instead of starting a new one.
A new process with the same ``run_id`` and ``consumer_id`` first gives back every in-flight step of its dead
predecessor (the batch it was working on comes again). A heartbeat thread renews the leases of
claimed-not-committed steps every ``lease_seconds / 3``.

With ``num_workers > 0`` torch's own loader runs a :class:`RedisBatchDataset` in worker processes: each
claims whole steps and returns ``(step, batch)``; the main process yields them in claim order (a small
reorder buffer) and commits them.
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.utils.data as tud
from torch.utils.data._utils.pin_memory import pin_memory

from pr_loader.dataset import RedisBatchDataset
from pr_loader.dataset_meta import rank_and_world, shard_sampler
from pr_loader.errors import (
    CommittedStepsLost,
    ConfigError,
    RunNotFound,
    StateDictError,
)
from pr_loader.loader_iter import LoaderIter, Pools, stop_workers
from pr_loader.policy import FixedBatch, Policy, get_policy
from pr_loader.server import FAKE_URL
from pr_loader.state import LoaderState
from pr_loader.store.connection import DurabilityMode

__all__ = ["DataLoader"]

logger = logging.getLogger(__name__)


def _identity(item: Any) -> Any:
    return item


class DataLoader(tud.DataLoader[Any]):
    """Drop-in ``torch.utils.data.DataLoader`` backed by a persistent Redis run (see the module doc).

    Extra keyword-only arguments: ``redis_url`` (``None``: ``PR_LOADER_REDIS_URL`` or the embedded
    server), ``run_id`` (``None``: a fresh run, or the run of the first loaded state_dict), ``linked``
    (yield :class:`LinkedDataProto` views instead of collated batches), ``policy``, ``rank`` /
    ``world_size`` (default: the initialised process group), ``consumer_id`` (lease owner; default
    ``"trainer"``; competing consumers need distinct ids), ``lease_seconds``, ``retain_steps`` (how many
    committed steps a ``load_state_dict`` can roll back), ``durability`` (``"none"``, ``"everysec"``,
    ``"always"``: checked against the server), ``allow_pickle`` (codec pickle fallback for samples of
    other types; trusted data only).

    Exact resume recipe: save ``loader.state_dict()`` with every model checkpoint, including one before
    the first step (step -1), and call ``load_state_dict`` with the checkpoint's state on every start. A
    restart that skips it continues after the steps its dead predecessor committed, which its restored
    model may not have seen. ``load_state_dict`` raises :class:`CommittedStepsLost` when Redis is behind the
    checkpoint (writes lost in a server crash), :class:`RollbackOutOfRange` when the checkpoint is older
    than ``retain_steps``. Rolling back affects the whole rank shard: do not combine it with competing
    consumers on the same run.
    """

    def __init__(
        self,
        dataset: tud.Dataset[Any],
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: tud.Sampler[Any] | Iterable[Any] | None = None,
        batch_sampler: tud.Sampler[list[Any]] | Iterable[list[Any]] | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        pin_memory: bool = False,
        drop_last: bool = False,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        multiprocessing_context: Any = None,
        generator: torch.Generator | None = None,
        *,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        pin_memory_device: str = "",
        in_order: bool = True,
        redis_url: str | None = None,
        run_id: str | None = None,
        linked: bool = False,
        policy: str | Policy | type[Policy] = "FixedBatch",
        rank: int | None = None,
        world_size: int | None = None,
        consumer_id: str | None = None,
        lease_seconds: float = 60.0,
        retain_steps: int = 8,
        durability: DurabilityMode | None = None,
        allow_pickle: bool = False,
    ) -> None:
        if isinstance(dataset, tud.IterableDataset):
            raise ConfigError(
                "pr_loader.DataLoader plans steps from dataset indices: it needs a map-style dataset, not an "
                "IterableDataset (materialise it into a list or a map-style Dataset first)"
            )
        the_rank, the_world = rank_and_world(rank, world_size)
        sharded, shuffle_for_torch, built = shard_sampler(
            dataset, shuffle, sampler, batch_sampler, drop_last, generator, the_rank, the_world
        )
        try:
            super().__init__(
                dataset, batch_size, shuffle_for_torch, sharded, batch_sampler, num_workers, collate_fn,
                pin_memory, drop_last, timeout, worker_init_fn, multiprocessing_context, generator,
                prefetch_factor=prefetch_factor, persistent_workers=persistent_workers,
                pin_memory_device=pin_memory_device, in_order=in_order,
            )  # fmt: skip
        except ValueError as exc:  # torch's own checks, word for word
            raise ConfigError(str(exc)) from exc
        if num_workers == 0 and timeout != 0:
            raise ConfigError("timeout applies to worker processes only; it needs num_workers > 0")
        if num_workers > 0 and not isinstance(get_policy(policy), FixedBatch):
            raise ConfigError(
                f"policy {policy!r} postpones rows into later steps, which worker processes would already "
                "have claimed: use num_workers=0 (steps are still materialised ahead in a background thread)"
            )
        if num_workers > 0 and redis_url == FAKE_URL:
            raise ConfigError("worker processes cannot share the in-process fakeredis store; use a server")
        auto = self.batch_sampler is not None
        self.source = RedisBatchDataset(
            dataset,
            batch_size=1 if auto else None,
            sampler=None if auto else self.sampler,
            batch_sampler=self.batch_sampler if auto else None,
            generator=generator,
            collate_fn=self.collate_fn,
            linked=linked,
            redis_url=redis_url,
            run_id=run_id,
            policy=policy,
            rank=the_rank,
            world_size=the_world,
            consumer_id=consumer_id,
            lease_seconds=lease_seconds,
            retain_steps=retain_steps,
            durability=durability,
            allow_pickle=allow_pickle,
        )
        self.source.auto_set_epoch = built
        self.source.auto_commit = False
        if pin_memory and self.source.batch_memory is not None and torch.accelerator.is_available():
            self.source.batch_memory.pinned = True  # (batches collate into pinned memory: _pin copies none)
        if self.source.planner is not None:
            self.source.planner.base_seed_every_epoch = not (persistent_workers and num_workers > 0)
        self.linked = linked
        self._active: LoaderIter | None = None
        self._workers: tud.DataLoader[Any] | None = None
        self._started = False
        self._known_committed = -1  # the highest step this loader committed, checkpointed or restored
        self._pools: Pools | None = None
        self._pools_pid = 0  # the process that made them: a forked child has none of their threads

    # ------------------------------------------------------------------ iteration
    def __iter__(self) -> LoaderIter:  # type: ignore[override]
        """The rest of the current epoch (after the last committed step)."""
        if self._active is not None:  # asking for a new iterator moves past the batch handed out last
            self._active.commit_pending()
            self._active.close()
        self._started = True
        self._active = LoaderIter(self)
        return self._active

    def _thread_pools(self) -> Pools:
        """The background threads of the iterators (claim; materialise ahead; commit; build), one each,
        made on first use and kept until :meth:`close`: threads made afresh every epoch cost its first steps
        up to 10% more (measured: thread start, and a new malloc arena whose pages fault in again). A forked
        child makes its own: it inherits the pools but not their threads."""
        if self._pools is None or self._pools_pid != os.getpid():
            self._pools = (
                ThreadPoolExecutor(1, thread_name_prefix="pr_loader-ahead"),
                ThreadPoolExecutor(1, thread_name_prefix="pr_loader-write"),
                ThreadPoolExecutor(1, thread_name_prefix="pr_loader-commit"),
                ThreadPoolExecutor(1, thread_name_prefix="pr_loader-build"),
            )
            self._pools_pid = os.getpid()
        return self._pools

    def _pin(self, batch: Any) -> Any:
        if self.pin_memory and torch.accelerator.is_available():
            pin: Callable[[Any], Any] = pin_memory
            return pin(batch)
        return batch

    def _worker_loader(self) -> Iterator[tuple[int, Any]]:
        """torch's loader over a worker copy of the source (kept across epochs with persistent_workers)."""
        if self._workers is None or not self.persistent_workers:
            worker_source = self.source.worker_copy()
            seed = torch.Generator()
            seed.manual_seed(zlib.crc32(self.source.run_id.encode()) + self.source.rank)
            self._workers = tud.DataLoader(
                worker_source, batch_size=None, num_workers=self.num_workers, collate_fn=_identity,
                pin_memory=self.pin_memory, timeout=self.timeout, worker_init_fn=self.worker_init_fn,
                multiprocessing_context=self.multiprocessing_context, generator=seed,
                prefetch_factor=self.prefetch_factor, persistent_workers=self.persistent_workers,
                pin_memory_device=self.pin_memory_device, in_order=self.in_order,
            )  # fmt: skip
        return iter(self._workers)

    def _check_not_behind(self) -> None:
        """Raise :class:`CommittedStepsLost` if Redis has fewer committed steps than this loader knows of."""
        _, committed, _ = self.source.position()
        known = self._known_committed
        if committed < known:
            raise CommittedStepsLost(
                f"run {self.source.run_id!r} rank {self.source.rank}: Redis has committed steps only up to "
                f"{committed}, but step {known} was committed or checkpointed: steps {committed + 1}..{known}"
                " were lost (written but not fsynced before a server crash: appendfsync everysec/no?). Their "
                f"batches would be delivered again; restore a checkpoint at or before step {committed}."
            )

    def set_epoch(self, epoch: int) -> None:
        """Forward ``epoch`` to a user sampler that needs it (``DistributedSampler``); the built-in rank
        sharding follows the run's own epoch counter."""
        for obj in (self.sampler, getattr(self.batch_sampler, "sampler", None)):
            if obj is not None and obj is not self.source.auto_set_epoch and hasattr(obj, "set_epoch"):
                obj.set_epoch(epoch)

    def close(self) -> None:
        """Stop the current iterator's threads and worker processes; close this process's Redis connection.
        Steps it holds stay in flight until the next ``iter()`` with the same consumer id (or lease
        expiry)."""
        if self._active is not None:
            self._active.close()
            self._active = None
        if self._workers is not None:
            stop_workers(self._workers._iterator)
            self._workers = None
        if self._pools is not None:
            for pool in self._pools:
                pool.shutdown(wait=True)
            self._pools = None
        self.source.close()

    # ------------------------------------------------------------------ state
    @property
    def run_id(self) -> str:
        return self.source.run_id

    def state_dict(self) -> dict[str, Any]:
        """Commit the step handed out last and return the position (small, JSON-serialisable)."""
        if self._active is not None:
            self._active.commit_pending()
        source = self.source
        _, committed, _ = source.position()
        self._known_committed = max(self._known_committed, committed)
        return LoaderState(
            run_id=source.run_id,
            rank=source.rank,
            world_size=source.world_size,
            step=committed,
            epoch=(committed + 1) // source.steps_per_epoch,
            steps_per_epoch=source.steps_per_epoch,
            fingerprint=source.fingerprint,
            consumer_id=source.consumer_id,
        ).to_dict()

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Roll the run back to right after the state's step (within ``retain_steps``); the next ``iter()``
        continues from there, in the next epoch if the state was taken at the last step of one.

        A loader created without ``run_id`` adopts the state's run; otherwise a state of another run, rank
        or dataset raises :class:`StateDictError`; one older than the retained journal raises
        :class:`RollbackOutOfRange`.
        """
        state = LoaderState.from_dict(state_dict)
        source = self.source
        if state.run_id != source.run_id:
            if source.run_id_given or self._started:
                raise StateDictError(
                    f"the state_dict belongs to run {state.run_id!r}; this loader reads run {source.run_id!r}"
                )
            source.close()
            source.run_id = state.run_id
            source.create_run = False
        for name in ("rank", "world_size", "steps_per_epoch", "fingerprint"):
            mine, theirs = getattr(source, name), getattr(state, name)
            if mine != theirs:
                raise StateDictError(f"state_dict {name} is {theirs!r}, this loader has {mine!r}")
        if self._active is not None:
            self._active.close()
            self._active = None
        try:
            store = source.shard().store
        except RunNotFound as exc:
            raise StateDictError(f"the state_dict's run {state.run_id!r} is not in this store") from exc
        self._known_committed = state.step
        self._check_not_behind()
        store.rollback(state.step)
        logger.info("run %s rank %d rolled back to step %d", source.run_id, source.rank, state.step)
