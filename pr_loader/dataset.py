"""RedisBatchDataset: claimed steps of a Redis-backed run, as an ``IterableDataset``.

A run shard's steps are planned from torch's own samplers (:mod:`pr_loader.plan`), materialised lazily
(``dataset[i]`` -> :func:`codec.encode` -> ``BatchStore.materialise``) just before they are needed, and
claimed whole: under ``torch.utils.data.DataLoader`` each worker claims whole steps from the shared cursor,
so no row is lost or repeated, and each rank works on its own shard.

One ``iter()`` covers the rest of one epoch: the epoch pinned with :meth:`RedisBatchDataset.set_epoch`, or
else the epoch of the run's next step. Used on its own, a step is committed when the iterator moves past it
(the next step is requested, or the epoch ends); :class:`pr_loader.DataLoader` commits in the main process
instead. Linked views built in a worker process reach the main process unbound (pickling drops the
binding); use ``pr_loader.DataLoader(linked=True)`` for bound views with workers.
"""

from __future__ import annotations

import copy
import functools
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis
import torch
import torch.utils.data as tud

from pr_loader import batch_memory, codec
from pr_loader.collate import ColumnPlacer, collate_raw
from pr_loader.dataset_meta import fingerprint, positive_int, rank_and_world, read_item, shard_sampler
from pr_loader.errors import (
    CodecError,
    ConfigError,
    LeaseLost,
    NeedsMaterialisation,
    StepStateError,
)
from pr_loader.plan import EpochPlanner, PlanStore
from pr_loader.policy import FixedBatch, Policy, get_policy
from pr_loader.server import open_client
from pr_loader.store import BatchStore, ClaimedStep, RunConfig, StoredRow
from pr_loader.store.connection import Client, DurabilityMode, check_durability, wait_durable
from pr_loader.store.keys import ShardKeys

if TYPE_CHECKING:
    from pr_loader.linked import LinkedDataProto, StepSession

__all__ = ["RedisBatchDataset"]

logger = logging.getLogger(__name__)

DEFAULT_CONSUMER = "trainer"
_PAST = 3600.0  # how far back an un-claim backdates a lease so that expiry undoes it at once


class EmptyStep:
    """Marks a collated step whose every row was dead-lettered: nothing to yield, commit it."""


@dataclass
class _Shard:
    """Per-process handles on one run shard (Redis clients are not fork-safe)."""

    pid: int
    client: Client
    store: BatchStore
    plans: PlanStore
    keys: ShardKeys


class RedisBatchDataset(tud.IterableDataset[Any]):
    """Steps of a Redis-backed run: ``LinkedDataProto`` views (``linked=True``) or collated batches.

    The batching arguments mean what they mean for ``torch.utils.data.DataLoader`` (the plan is drawn from
    torch's own sampler objects). ``redis_url=None`` uses ``PR_LOADER_REDIS_URL`` or the embedded server
    (``pr_loader.server.FAKE_URL``: in-process fakeredis, no worker processes);
    ``run_id=None`` starts a fresh run. ``rank``/``world_size`` default to the initialised process group;
    with ``world_size > 1`` and no sampler, rank shards follow ``DistributedSampler`` (padding and
    ``drop_last`` included). ``consumer_id`` names the lease owner; a new process with the same id takes
    over (and first releases) the in-flight steps of its predecessor. ``sampler`` / ``batch_sampler`` are
    torch's objects the plans are drawn from (e.g. to call ``set_epoch`` on a ``DistributedSampler``).
    """

    def __init__(
        self,
        dataset: tud.Dataset[Any] | Sequence[Any],
        *,
        batch_size: int | None = 1,
        shuffle: bool | None = None,
        sampler: tud.Sampler[Any] | Iterable[Any] | None = None,
        batch_sampler: tud.Sampler[list[Any]] | Iterable[list[Any]] | None = None,
        drop_last: bool = False,
        generator: torch.Generator | None = None,
        collate_fn: Callable[[Any], Any] | None = None,
        linked: bool = True,
        redis_url: str | None = None,
        run_id: str | None = None,
        policy: str | Policy | type[Policy] = "FixedBatch",
        rank: int | None = None,
        world_size: int | None = None,
        consumer_id: str | None = None,
        lease_seconds: float = 60.0,
        retain_steps: int = 8,
        durability: DurabilityMode | None = None,
        allow_pickle: bool = False,
    ) -> None:
        data: Any = dataset
        if isinstance(data, tud.IterableDataset):
            raise ConfigError(
                "pr_loader needs a map-style dataset (len + __getitem__), not an IterableDataset"
            )
        if not hasattr(data, "__getitem__") or not hasattr(data, "__len__"):
            raise ConfigError(f"dataset must support len() and indexing, got {type(dataset).__name__}")
        self.rank, self.world_size = rank_and_world(rank, world_size)
        number = isinstance(lease_seconds, int | float) and not isinstance(lease_seconds, bool)
        if not number or lease_seconds <= 0:
            raise ConfigError(f"lease_seconds must be a positive number, got {lease_seconds!r}")
        self.policy = get_policy(policy)
        if not linked and not isinstance(self.policy, FixedBatch):
            raise ConfigError(f"policy {self.policy.name!r} postpones/prefetches rows: it needs linked=True")
        if durability not in (None, "none", "everysec", "always"):
            raise ConfigError(f"durability must be None, 'none', 'everysec' or 'always', got {durability!r}")
        sampler, shuffle, self.auto_set_epoch = shard_sampler(
            data, shuffle, sampler, batch_sampler, drop_last, generator, self.rank, self.world_size
        )
        try:
            plan_loader = tud.DataLoader(
                data, batch_size=batch_size, shuffle=shuffle, sampler=sampler, batch_sampler=batch_sampler,
                collate_fn=collate_fn, drop_last=drop_last, generator=generator,
            )  # fmt: skip
        except ValueError as exc:  # torch's own argument checks, word for word
            raise ConfigError(str(exc)) from exc
        self.dataset: Any = data
        self.sampler: Iterable[Any] | None = plan_loader.sampler
        self.batch_sampler: Iterable[Any] | None = plan_loader.batch_sampler
        self.collate_fn = plan_loader.collate_fn
        self.auto_collation = plan_loader.batch_sampler is not None
        index_sampler: Any = plan_loader.batch_sampler if self.auto_collation else plan_loader.sampler
        try:
            self.steps_per_epoch = len(index_sampler)
        except TypeError:
            raise ConfigError("the sampler / batch_sampler must define __len__ (steps per epoch)") from None
        if self.steps_per_epoch < 1:
            raise ConfigError("the dataset and sampler give an empty epoch (no batch at all)")
        self.linked = linked
        self.seed = 0 if generator is None else int(generator.initial_seed())
        self.planner: EpochPlanner | None = EpochPlanner(
            index_sampler, loader_generator=generator, base_seed_every_epoch=True, dataset_len=len(data)
        )
        step_rows = getattr(index_sampler, "batch_size", None) if self.auto_collation else 1
        self.redis_url = redis_url
        self.run_id_given = run_id is not None
        self.run_id = run_id if run_id is not None else uuid.uuid4().hex
        self.consumer_id = DEFAULT_CONSUMER if consumer_id is None else str(consumer_id)
        self.lease_seconds = float(lease_seconds)
        self.retain_steps = positive_int("retain_steps", retain_steps, 0)
        self.durability = durability
        self.wait_durable = False
        self.allow_pickle = allow_pickle
        self.fingerprint = fingerprint(data, index_sampler, len(data))
        self.step_rows = step_rows if isinstance(step_rows, int) and step_rows > 0 else 1
        ShardKeys.for_shard(self.run_id, self.rank)  # validates the run id now
        self.auto_commit = True  # pr_loader.DataLoader turns this off and commits itself
        self.epoch_from_store = False  # pr_loader.DataLoader workers read the pinned epoch from Redis
        self._pinned_epoch: int | None = None
        self._shard_state: _Shard | None = None
        # big batch tensors are collated into recycled memory (see pr_loader.batch_memory)
        self.batch_memory: batch_memory.BatchMemory | None = batch_memory.BatchMemory()
        self.create_run = True  # False once a state_dict named the run: it must exist

    # ------------------------------------------------------------------ configuration
    def run_config(self) -> RunConfig:
        return RunConfig(
            run_id=self.run_id,
            batch_size=self.step_rows,
            steps_per_epoch=self.steps_per_epoch,
            dataset_fingerprint=self.fingerprint,
            seed=self.seed,
            policy=self.policy.name,
            world_size=self.world_size,
            rank=self.rank,
            retain_steps=self.retain_steps,
        )

    def set_epoch(self, epoch: int) -> None:
        """Pin the epoch the next ``iter()`` covers (needed with worker processes; see the module doc)."""
        self._pinned_epoch = positive_int("epoch", epoch, 0)

    def worker_copy(self) -> RedisBatchDataset:
        """A copy for worker processes of :class:`pr_loader.DataLoader`: it claims steps of the epoch the main
        process pinned and never draws plans, so samplers and generators stay behind (they need not, and a
        ``torch.Generator`` cannot always, be pickled to a worker)."""
        clone = copy.copy(self)
        clone.planner = clone.sampler = clone.batch_sampler = clone.auto_set_epoch = None
        clone.epoch_from_store = True
        return clone

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_shard_state"] = None
        state["batch_memory"] = None  # (a worker never recycles: see pr_loader.batch_memory)
        return state

    # ------------------------------------------------------------------ Redis handles
    def shard(self) -> _Shard:
        """This process's handles on the run shard (opened on first use, again after a fork)."""
        shard = self._shard_state
        if shard is None or shard.pid != os.getpid():
            client = open_client(self.redis_url)
            if self.durability is not None:
                self.wait_durable = check_durability(client, self.durability).needs_wait
                if self.wait_durable and not isinstance(client, redis.Redis):
                    raise ConfigError(
                        f"durability={self.durability!r} needs a WAITAOF after each commit, which pr_loader "
                        "does not issue through a Redis Cluster client (it waits on the writing connection "
                        "only): set 'appendfsync always' on every cluster node instead"
                    )
            store = BatchStore.open(client, self.run_config(), create=self.create_run)
            keys = ShardKeys.for_shard(self.run_id, self.rank)
            shard = _Shard(os.getpid(), client, store, PlanStore(client, keys.prefix, store.retrying), keys)
            self._shard_state = shard
        return shard

    def in_process(self) -> bool:
        """Whether the store is the in-process fakeredis one (no worker processes, no concurrent scripts)."""
        return type(self.shard().client).__module__.startswith("fakeredis")

    def position(self) -> tuple[int, int, list[int]]:
        """(next step at the cursor, committed_upto, requeued steps) of the shard, read cheaply."""
        shard = self.shard()
        pipe = shard.client.pipeline(transaction=False)
        pipe.hmget(shard.keys.meta, ["next_step", "committed_upto"])
        pipe.zrange(shard.keys.requeue, 0, -1)
        (next_step, committed), requeued = shard.store.retrying(pipe.execute)
        return int(next_step), int(committed), sorted(int(s) for s in requeued)

    def inflight_mine(self) -> list[int]:
        """Steps in flight under this consumer id (claimed, not committed), ascending."""
        shard = self.shard()
        pipe = shard.client.pipeline(transaction=False)
        pipe.zrange(shard.keys.leases, 0, -1)
        pipe.hgetall(shard.keys.owners)
        leased, owners = shard.store.retrying(pipe.execute)
        me = self.consumer_id.encode()
        return sorted(int(s) for s in leased if owners.get(s) == me)

    def close(self) -> None:
        """Close this process's Redis connection (reopened on next use)."""
        shard, self._shard_state = self._shard_state, None
        if self.batch_memory is not None:
            self.batch_memory.clear()
        if shard is not None and shard.pid == os.getpid():
            shard.store.close()  # (the connection this thread keeps for payloads, outside the client's pool)
            shard.client.close()

    @property
    def iter_epoch_key(self) -> str:
        return f"{self.shard().keys.prefix}iter_epoch:{self.consumer_id}"

    # ------------------------------------------------------------------ plans and materialisation
    def current_epoch(self) -> int:
        """Epoch of the lowest step that is neither committed nor in flight (requeued steps included)."""
        next_step, _, requeued = self.position()
        return min([next_step, *requeued]) // self.steps_per_epoch

    def ensure_plan(self, epoch: int) -> None:
        """Store the plan of ``epoch`` unless present, drawing it like torch's ``iter(DataLoader)`` would."""
        plans, planner = self.shard().plans, self.planner
        if plans.exists(epoch):
            state = plans.rng_state(epoch)
            if state is not None and planner is not None:
                planner.restore_rng(state)
            return
        if planner is None:
            raise StepStateError(f"the plan of epoch {epoch} is not stored and this copy cannot draw it")
        if epoch > 0:
            previous = plans.rng_state(epoch - 1)
            if previous is not None:
                planner.restore_rng(previous)
        if self.auto_set_epoch is not None:
            self.auto_set_epoch.set_epoch(epoch)
        plan = planner.draw(epoch)
        if plan.num_steps != self.steps_per_epoch:
            raise ConfigError(
                f"epoch {epoch} has {plan.num_steps} batches, the run has {self.steps_per_epoch} per epoch"
            )
        if not plans.save(epoch, plan):  # another consumer stored it first: continue from its state
            state = plans.rng_state(epoch)
            if state is not None:
                planner.restore_rng(state)
        keep = 2 + self.retain_steps // self.steps_per_epoch
        plans.delete_epoch(epoch - keep)

    def _read_items(self, indices: list[int]) -> list[Any]:
        """``dataset[i]`` for each index (``__getitems__`` when the dataset has it, like torch's fetcher);
        a failure raises :class:`DatasetError` naming the failing index."""
        getitems = getattr(self.dataset, "__getitems__", None)
        if callable(getitems):
            try:
                return list(getitems(indices))
            except Exception:
                logger.warning("__getitems__(%s...) failed; reading items one by one", indices[:4])
        return [read_item(self.dataset, i) for i in indices]

    def materialise(self, step: int) -> bool:
        """Write the fresh batch of ``step`` from its plan (idempotent); True if this call wrote it."""
        shard = self.shard()
        if shard.store.is_materialised(step):
            return False
        epoch, b = divmod(step, self.steps_per_epoch)
        if not shard.plans.exists(epoch):
            self.ensure_plan(epoch)
        indices = shard.plans.batches(epoch, b, b)[0]
        items = self._read_items(indices)
        rows = []
        for index, item in zip(indices, items):
            try:
                rows.append((index, codec.encode(item, allow_pickle=self.allow_pickle)))
            except CodecError as exc:
                raise CodecError(f"dataset index {index}: {exc}") from exc
        return shard.store.materialise(step, rows)

    def _materialise_for_claim(self, step: int, epoch_end: int) -> None:
        """Help a blocked claim: materialise ``step`` or, in a worker, a later step no other worker is on."""
        info = tud.get_worker_info()
        if info is None:
            self.materialise(step)
            return
        shard = self.shard()
        client, me = shard.client, str(info.id).encode()

        def take(lock: str) -> bool:  # (a replay whose first attempt took the lock finds it ours)
            taken = client.set(lock, me, nx=True, px=int(self.lease_seconds * 1000))
            return bool(taken) or client.get(lock) == me

        for candidate in range(step, min(step + 2 * info.num_workers, epoch_end)):
            lock = f"{shard.keys.prefix}matlock:{candidate}"
            if shard.store.retrying(functools.partial(take, lock)):
                try:
                    self.materialise(candidate)
                finally:
                    shard.store.retrying(functools.partial(client.delete, lock))
                return
        time.sleep(0.001)  # every nearby step is being materialised by another worker

    # ------------------------------------------------------------------ claiming
    def release_inflight(self) -> list[int]:
        """Undo this consumer's claimed-not-committed steps (a previous iterator's or a dead predecessor's):
        their rows go back where they came from and the steps are claimed again next."""
        mine = self.inflight_mine()
        for step in mine:
            self._unclaim(step)
        if mine:
            logger.info("consumer %s released in-flight steps %s", self.consumer_id, mine)
        return mine

    def _unclaim(self, step: int) -> None:
        """Give a held step back at once: backdate its lease, then let lease expiry undo it."""
        store = self.shard().store
        now = time.time()
        try:
            store.renew(step, self.consumer_id, 1e-3, now=now - _PAST)
        except (LeaseLost, StepStateError):  # another consumer expired or took it meanwhile
            return
        store.expire_leases(now=now)

    def claim_steps(
        self,
        epoch: int,
        known: Mapping[str, bytes | memoryview] | None = None,
        held: Callable[[], int | None] | None = None,
    ) -> Iterator[ClaimedStep]:
        """Claim the steps of ``epoch`` (and requeued older ones) until the epoch is exhausted; ``known``
        (read at each claim): payloads already read, by ref; ``held`` (called at each claim): the step
        claimed ahead that the claim names (see :meth:`BatchStore.claim`)."""
        shard = self.shard()
        epoch_end = (epoch + 1) * self.steps_per_epoch
        last = -1
        # big rows' tensors are received into the batch columns their collate would copy them into
        collated = not self.linked and self.auto_collation and self.collate_fn is tud.default_collate
        placer = ColumnPlacer(self.allow_pickle) if collated and tud.get_worker_info() is None else None
        while True:
            ahead = None if held is None else held()
            if last == epoch_end - 1 and ahead is None and self._epoch_exhausted(epoch_end):
                return  # a claim would take (and fetch the rows of) the next epoch's first step
            try:
                with batch_memory.using(self.batch_memory):
                    claimed = shard.store.claim(self.consumer_id, self.lease_seconds, known=known, held=ahead,
                                                placer=placer)  # fmt: skip
            except NeedsMaterialisation as need:
                if need.step >= epoch_end:
                    return
                self._materialise_for_claim(need.step, epoch_end)
                continue
            except LeaseLost:  # the step just claimed was taken back meanwhile (lease steal): claim again
                continue
            if claimed is None:
                return
            if claimed.step >= epoch_end:  # materialised earlier (before a rollback): give it back
                self._unclaim(claimed.step)
                return
            last = claimed.step
            yield claimed

    def _epoch_exhausted(self, epoch_end: int) -> bool:
        """Whether the cursor passed the epoch and nothing of it is requeued (one small read)."""
        next_step, _, requeued = self.position()
        return next_step >= epoch_end and not any(s < epoch_end for s in requeued)

    def commit(self, step: int) -> None:
        """Commit ``step`` for this consumer (and wait for the fsync when durability needs it)."""
        self.shard().store.commit(step, self.consumer_id)
        self._wait_durable()

    def _wait_durable(self) -> None:
        """After a commit on this thread: wait for its fsync when ``durability`` needs it."""
        client = self.shard().client
        if self.wait_durable and isinstance(client, redis.Redis):  # (clusters are refused in shard())
            wait_durable(client)

    def session(self, step: int) -> StepSession:
        """The session of a view of ``step`` (a commit through it waits for its fsync, as :meth:`commit`)."""
        from pr_loader.linked import StepSession  # tensordict is imported only when views are used

        return StepSession(
            store=self.shard().store,
            step=step,
            consumer_id=self.consumer_id,
            policy=self.policy,
            lease_seconds=self.lease_seconds,
            materialise=self.materialise,
            allow_pickle=self.allow_pickle,
            committed=self._wait_durable,
            batch_memory=self.batch_memory,
        )

    def _row_decoder(self) -> Callable[[bytes | memoryview], Any]:
        """How the rows of one step decode: tensors as :class:`codec.RawTensor` records for torch's
        ``default_collate`` (which :meth:`collate` copies once per column) and for linked views, else
        private tensors."""
        raw = self.linked or (self.auto_collation and self.collate_fn is tud.default_collate)
        return codec.row_decoder(allow_pickle=self.allow_pickle, raw_tensors=raw)

    def build_ahead(
        self, step: int, rows: list[StoredRow], samples: Mapping[str, Any]
    ) -> LinkedDataProto | None:
        """The view the claim of ``step`` would build if it returned exactly ``rows``, read before the claim
        (``samples``: theirs from :meth:`decode_ahead`), in the batch memory a build uses; None where the
        claim must build it (see :meth:`LinkedDataProto.ahead_of_claim`)."""
        from pr_loader.linked import LinkedDataProto  # (tensordict is imported only when views are used)

        with batch_memory.using(self.batch_memory):
            return LinkedDataProto.ahead_of_claim(rows, self.session(step), samples)

    def decode_ahead(self, rows: list[StoredRow]) -> dict[str, Any]:
        """The samples of rows read before their step was claimed, by ref (undecodable rows are left out:
        their step's build decodes them again, and dead-letters them)."""
        out: dict[str, Any] = {}
        decode_row = self._row_decoder()
        for row in rows:
            try:
                out[row.ref_text] = decode_row(row.buffer)
            except CodecError:
                continue
        return out

    def decode(self, claimed: ClaimedStep, ahead: Mapping[str, Any] | None = None) -> list[Any]:
        """The samples of a claimed step (those of ``ahead``, from :meth:`decode_ahead`, are taken from
        there); an undecodable row is dead-lettered (kept in Redis with the reason) and left out, like
        :class:`LinkedDataProto` does."""
        samples = []
        decode_row = self._row_decoder()
        for row in claimed.rows:
            if ahead and row.ref_text in ahead:
                samples.append(ahead[row.ref_text])
                continue
            try:
                if row.placed is not None:  # (its tensors were received into batch columns)
                    samples.append(ColumnPlacer.decode(row, self.allow_pickle))
                    continue
                samples.append(decode_row(row.buffer))
            except CodecError as exc:
                logger.warning("step %d: dead-lettering row %s: %s", claimed.step, row.ref.encode(), exc)
                self.shard().store.dead_letter(claimed.step, row.ref, f"undecodable payload: {exc}")
        return samples

    def collate(self, samples: list[Any]) -> Any:
        """The user's collate function over the samples of one step (one sample without auto-collation);
        torch's ``default_collate`` runs as :func:`pr_loader.collate.collate_raw` (see :meth:`decode`)."""
        if self.auto_collation:
            if self.collate_fn is tud.default_collate:
                return collate_raw(samples)
            return self.collate_fn(samples)
        if len(samples) != 1:
            raise StepStateError(f"a step without auto-collation must hold one sample, got {len(samples)}")
        return self.collate_fn(samples[0])

    def build(self, claimed: ClaimedStep, ahead: Mapping[str, Any] | None = None) -> Any:
        """What a claimed step yields: a bound view (``linked``), the collated batch, or :class:`EmptyStep`
        when every row of a collated step was dead-lettered (the caller commits and skips it). ``ahead``:
        samples decoded before the claim (:meth:`decode_ahead`)."""
        with batch_memory.using(self.batch_memory):
            if self.linked:
                from pr_loader.linked import LinkedDataProto

                return LinkedDataProto.from_claim(claimed, self.session(claimed.step), ahead)
            samples = self.decode(claimed, ahead)
            return self.collate(samples) if samples else EmptyStep()

    def epoch_for_iteration(self) -> int:
        """The epoch the next ``iter()`` covers."""
        if self._pinned_epoch is not None:
            return self._pinned_epoch
        if self.epoch_from_store:
            shard = self.shard()
            raw = shard.store.retrying(functools.partial(shard.client.get, self.iter_epoch_key))
            if raw is None:
                raise StepStateError("no epoch was pinned for this iteration by the main process")
            return int(raw)
        return self.current_epoch()

    def __iter__(self) -> Iterator[Any]:
        epoch = self.epoch_for_iteration()
        if tud.get_worker_info() is None:  # workers share the consumer id: only a lone process releases
            self.release_inflight()
        self.ensure_plan(epoch)
        for claimed in self.claim_steps(epoch):
            if not self.auto_commit:
                yield claimed.step, (claimed if self.linked else self.build(claimed))
                continue
            item = self.build(claimed)
            if not isinstance(item, EmptyStep):
                yield item
            self.commit(claimed.step)
        self._pinned_epoch = None

