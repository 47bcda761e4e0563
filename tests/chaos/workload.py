"""A deterministic store-level consumer for chaos runs.

One run shard, ``dataset_size = steps_per_epoch * batch_size`` samples, ``num_epochs`` epochs, policy
``PostponeToNext``. Every decision (which rows to prefetch and postpone) is drawn from
``random.Random(f"{seed}:{step}")`` over the rows in their delivery order, so a crashed-and-restored
consumer makes exactly the same calls as an uninterrupted one and the committed trace must match.

The consumer writes a checkpoint (``{"step": last committed step}``) after each commit. Recovery of a fresh
process is either ``rollback`` (``store.rollback(checkpoint step)``, the state_dict path) or ``lease``
(another consumer id, a clock past every lease: the store hands the dead consumer's step back).
"""

from __future__ import annotations

import contextlib
import multiprocessing.connection
import random
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from pr_loader.errors import NeedsMaterialisation
from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from pr_loader.store.records import RunConfig
from tests.chaos.helpers import Killer, KillPlan, read_json, write_json_atomic

STORE_METHODS = ("claim", "prefetch", "postpone", "commit", "materialise", "rollback", "expire_leases")
LEASE_SECONDS = 30.0
CLOCK_GAP = 10_000.0  # each process generation starts this much later on the virtual clock


@dataclass(frozen=True)
class Workload:
    run_id: str
    seed: int = 0
    batch_size: int = 4
    steps_per_epoch: int = 6
    num_epochs: int = 2
    retain_steps: int = 1000
    prefetch_p: float = 0.5
    postpone_p: float = 0.6

    @property
    def dataset_size(self) -> int:
        return self.batch_size * self.steps_per_epoch

    @property
    def total_steps(self) -> int:
        return self.steps_per_epoch * self.num_epochs

    def config(self) -> RunConfig:
        return RunConfig(
            run_id=self.run_id,
            batch_size=self.batch_size,
            steps_per_epoch=self.steps_per_epoch,
            dataset_fingerprint=f"chaos-{self.dataset_size}",
            seed=self.seed,
            policy="PostponeToNext",
            num_epochs=self.num_epochs,
            retain_steps=self.retain_steps,
        )

    def with_run(self, run_id: str) -> Workload:
        return replace(self, run_id=run_id)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    # the epoch plan: deterministic from the seed -----------------------------------------------------
    def plan(self, epoch: int) -> list[int]:
        order = list(range(self.dataset_size))
        random.Random(f"plan:{self.seed}:{epoch}").shuffle(order)
        return order

    def fresh_rows(self, step: int) -> list[tuple[int, bytes]]:
        epoch, b = divmod(step, self.steps_per_epoch)
        if epoch >= self.num_epochs:
            return []  # drain steps hold only arrivals
        indices = self.plan(epoch)[b * self.batch_size : (b + 1) * self.batch_size]
        return [(i, f"sample:{epoch}:{i}".encode()) for i in indices]


def materialise_if_needed(store: BatchStore, work: Workload, step: int) -> None:
    if not store.is_materialised(step):
        store.materialise(step, work.fresh_rows(step))


def _prefetch(store: BatchStore, work: Workload, step: int, cid: str, count: int, now: float) -> int:
    """Prefetch up to ``count`` rows from the rest of the epoch, materialising sources on demand."""
    last = (step // work.steps_per_epoch + 1) * work.steps_per_epoch - 1
    got = 0
    # bounded: every round gets the rows or materialises one more source step
    for _ in range(work.steps_per_epoch + 1):
        if got >= count or step + 1 > last:
            break
        result = store.prefetch(step, cid, count - got, last, now=now)
        got += len(result.rows)
        if result.needs_materialise is None:
            break
        materialise_if_needed(store, work, result.needs_materialise)
    return got


def consume(
    url: str,
    work_dict: Mapping[str, Any],
    checkpoint: str,
    *,
    consumer_id: str,
    generation: int,
    recovery: str = "rollback",
    kill: KillPlan | None = None,
    redis_pid: int | None = None,
    stop_after_step: int | None = None,
    channel: multiprocessing.connection.Connection | None = None,
) -> None:
    """Consume the run to its end (or ``stop_after_step``), dying where ``kill`` says."""
    work = Workload(**work_dict)
    killer = Killer(kill, redis_pid=redis_pid, channel=channel)
    ckpt_path = Path(checkpoint)
    clock = CLOCK_GAP * generation
    with killer.client_hooks():
        client = connect(url, retry_seconds=30.0, socket_timeout=10.0)
        store = BatchStore.open(client, work.config())
        killer.wrap(store, STORE_METHODS)
        if recovery == "rollback":
            state = read_json(ckpt_path, {"step": -1})
            store.rollback(int(state["step"]))
        for _ in range(4 * work.total_steps + 16):  # bounded: each round claims or materialises
            clock += 1.0
            try:
                claimed = store.claim(consumer_id, LEASE_SECONDS, now=clock)
            except NeedsMaterialisation as exc:
                store.materialise(exc.step, work.fresh_rows(exc.step))
                continue
            if claimed is None:
                return
            step = claimed.step
            rng = random.Random(f"{work.seed}:{step}")
            if rng.random() < work.prefetch_p:
                _prefetch(store, work, step, consumer_id, rng.randint(1, 3), clock)
            rows = store.read_rows(step)
            target = step + 1
            if rows and target < work.total_steps and rng.random() < work.postpone_p:
                chosen = rng.sample(range(len(rows)), rng.randint(1, min(2, len(rows))))
                picked = [rows[i] for i in sorted(chosen)]
                store.postpone(
                    step,
                    consumer_id,
                    [(r.ref, r.payload + f"|p{step}".encode()) for r in picked],
                    target,
                    now=clock,
                )
            store.commit(step, consumer_id, now=clock)
            killer.checkpoint_point()
            write_json_atomic(ckpt_path, {"step": step})
            if stop_after_step is not None and step >= stop_after_step:
                return
        raise RuntimeError("consumer loop bound reached without finishing the run")


def committed_trace(store: BatchStore, total_steps: int) -> list[tuple[int, list[tuple[str, bytes]]]]:
    """(step, [(ref, payload), ...]) of every step 0..total_steps-1 as stored now."""
    return [(s, [(r.ref.encode(), r.payload) for r in store.read_rows(s)]) for s in range(total_steps)]


def committed_keys(trace: Sequence[tuple[int, list[tuple[str, bytes]]]]) -> list[str]:
    keys = []
    for _step, rows in trace:
        for ref, _payload in rows:
            epoch, index = ref.split(":")[:2]
            keys.append(f"{epoch}:{index}")
    return keys


def consume_competing(
    url: str,
    work_dict: Mapping[str, Any],
    *,
    consumer_id: str,
    generation: int,
    kill: KillPlan | None = None,
    channel: multiprocessing.connection.Connection | None = None,
) -> None:
    """One of several consumers racing on the run: a lost lease drops the step, a claimed postpone target
    keeps the rows; returns when the run is finished. Clocks: ``generation * CLOCK_GAP`` plus one per round,
    so a replacement consumer's first claim expires the leases of every older generation (a steal)."""
    import time

    from pr_loader.errors import LeaseLost, NoStepReady, StepStateError

    work = Workload(**work_dict)
    killer = Killer(kill, channel=channel)
    clock = CLOCK_GAP * generation
    with killer.client_hooks():
        client = connect(url, retry_seconds=30.0, socket_timeout=10.0)
        store = BatchStore.open(client, work.config())
        killer.wrap(store, STORE_METHODS)
        for _ in range(2000):  # bounded: a round claims, materialises or waits 5 ms for a leased step
            clock += 1.0
            try:
                claimed = store.claim(consumer_id, 1000.0, now=clock)
            except NeedsMaterialisation as exc:
                store.materialise(exc.step, work.fresh_rows(exc.step))
                continue
            except NoStepReady:
                time.sleep(0.005)  # other consumers hold the last steps; they commit or get stolen
                continue
            except LeaseLost:
                # the step was stolen between the claim script and the payload read (docs/BUGS-chaos.md
                # #10, pinned by test_lease.py::test_claim_racing_a_lease_steal_...)
                continue
            if claimed is None:
                return
            step = claimed.step
            rng = random.Random(f"{work.seed}:{step}:{consumer_id}")
            try:
                if rng.random() < work.prefetch_p:
                    _prefetch(store, work, step, consumer_id, rng.randint(1, 3), clock)
                rows = store.read_rows(step)
                if rows and step + 1 < work.total_steps and rng.random() < work.postpone_p:
                    picked = rng.sample(rows, 1)
                    # step + 1 may have been claimed by another consumer meanwhile: then keep the row
                    with contextlib.suppress(StepStateError):
                        store.postpone(
                            step, consumer_id, [(r.ref, r.payload) for r in picked], step + 1, now=clock
                        )
                store.commit(step, consumer_id, now=clock)
            except (LeaseLost, StepStateError):
                continue  # a younger consumer stole the step (StepStateError: see docs/BUGS-chaos.md #2)
        raise RuntimeError("competing consumer loop bound reached")
