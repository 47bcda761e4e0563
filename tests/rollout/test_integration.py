"""The scheduler on real LinkedDataProto views over BatchStore on fakeredis (store + codec round trips)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from pr_loader import codec
from pr_loader.dataset import RedisBatchDataset
from pr_loader.errors import LeaseLost, NeedsMaterialisation
from pr_loader.linked import LinkedDataProto, StepSession
from pr_loader.policy import FixedBatch, Policy, PostponeToNext
from pr_loader.rollout import (
    LengthDistribution,
    Scheduler,
    SimulatedEngine,
    StepResult,
    TinyConfig,
    TorchEngine,
)
from pr_loader.rollout.simulated import hashed_tokens
from pr_loader.rows import dataproto_row
from pr_loader.server import FAKE_URL
from pr_loader.store import BatchStore, RunConfig

fakeredis = pytest.importorskip("fakeredis")

B, S, E = 16, 4, 2  # batch size, steps per epoch, epochs (drain steps after 8)
LENGTHS = LengthDistribution.lognormal(40, 300, max_tokens=400, seed=3)


def sample(i: int) -> dict[str, Any]:
    return {"input_ids": torch.arange(1, 4 + i % 5, dtype=torch.int64), "label": i}


class Run:
    """A store shard and the claim loop the loader would run; yields bound views and commits them."""

    def __init__(self, policy: Policy, *, batch: int = B, steps: int = S, epochs: int = E) -> None:
        self.policy, self.batch, self.steps = policy, batch, steps
        config = RunConfig(
            run_id="r", batch_size=batch, steps_per_epoch=steps, dataset_fingerprint="fp",
            policy=policy.name, num_epochs=epochs,
        )  # fmt: skip
        self.store = BatchStore.open(fakeredis.FakeRedis(server=fakeredis.FakeServer()), config)

    def materialise(self, step: int) -> None:
        b = step % self.steps
        idx = range(b * self.batch, (b + 1) * self.batch)
        self.store.materialise(step, [(i, codec.encode(sample(i))) for i in idx])

    def views(self) -> Iterator[LinkedDataProto]:
        while True:
            try:
                claimed = self.store.claim("c", 600.0)
            except NeedsMaterialisation as need:
                self.materialise(need.step)
                continue
            if claimed is None:
                return
            session = StepSession(self.store, claimed.step, "c", self.policy, materialise=self.materialise)
            view = LinkedDataProto.from_claim(claimed, session)
            yield view
            view.commit()


def sim() -> SimulatedEngine:
    return SimulatedEngine(LENGTHS, num_slots=24, vocab_size=256, seed=5)


def by_id(results: list[StepResult]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for res in results:
        for i in range(len(res.batch)):
            row = dataproto_row(res.batch, i)
            sid = str(row["prl_sample_id"])
            assert sid not in out, f"{sid} delivered twice"
            k = int(row["response_lengths"])
            out[sid] = {
                "row": row,
                "tokens": row["responses"][:k].numpy(),
                "versions": row["response_versions"][:k],
            }
    return out


def all_ids(epochs: int = E) -> list[str]:
    return sorted(f"{e}:{i}" for e in range(epochs) for i in range(B * S))


def test_partial_rollout_on_real_views_loses_nothing_and_resumes_exactly() -> None:
    run = Run(PostponeToNext(max_postpones=2))
    results: list[StepResult] = []
    metrics = Scheduler(sim(), oversample=4, max_tokens=400).run(run.views(), on_batch=results.append)
    got = by_id(results)
    assert sorted(got) == all_ids()  # every row of both epochs exactly once (drain steps included)
    s = metrics.summary()
    assert s["rows_dropped"] == 0 and s["rows_postponed"] > 0 and s["rows_resumed"] > 0
    assert s["max_version_span"] >= 1 and s["off_policy_fraction"] > 0
    resumed = 0
    for sid, r in got.items():
        assert r["row"]["prl_times_postponed"] <= 2
        assert r["row"]["label"] == int(sid.split(":")[1])
        want = hashed_tokens(5, sid, 0, LENGTHS.length_of(sid), 256)[0]
        np.testing.assert_array_equal(
            r["tokens"], want
        )  # partial (through Redis) + continued == uninterrupted
        assert "prl_partial_tokens" not in r["row"]
        resumed += int(r["row"]["prl_times_postponed"] > 0)
        assert bool((r["versions"][1:] >= r["versions"][:-1]).all())
    assert resumed > 0
    assert run.store.stats() is not None


def test_sync_on_real_views_is_plain_batches() -> None:
    run = Run(FixedBatch())
    results: list[StepResult] = []
    Scheduler(sim(), oversample=8, max_tokens=400).run(run.views(), on_batch=results.append)
    assert [len(r.batch) for r in results] == [B] * (S * E)
    for step, res in enumerate(results):
        ids = [str(x) for x in res.batch.non_tensor_batch["prl_sample_id"]]
        b = step % S
        assert ids == [f"{step // S}:{i}" for i in range(b * B, (b + 1) * B)]
        assert res.metrics.rows_prefetched == 0 and res.metrics.rows_postponed == 0
    assert sorted(by_id(results)) == all_ids()


def test_torch_engine_on_real_views_resume_equals_uninterrupted() -> None:
    cfg = TinyConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, max_seq_len=96)
    budget = LengthDistribution.lognormal(6, 60, max_tokens=64, seed=2)

    def engine() -> TorchEngine:
        return TorchEngine(cfg, num_slots=6, device="cpu", dtype=torch.float64, seed=4)

    ref: list[StepResult] = []
    Scheduler(engine(), max_tokens=budget).run(
        Run(FixedBatch(), batch=8, steps=2, epochs=1).views(), on_batch=ref.append
    )
    part: list[StepResult] = []
    sched = Scheduler(engine(), oversample=2, max_tokens=budget)
    metrics = sched.run(Run(PostponeToNext(), batch=8, steps=2, epochs=1).views(), on_batch=part.append)
    assert metrics.summary()["rows_postponed"] > 0
    want, got = by_id(ref), by_id(part)
    assert sorted(got) == sorted(want)
    for sid in want:
        np.testing.assert_array_equal(got[sid]["tokens"], want[sid]["tokens"])


def test_scheduler_over_redis_batch_dataset() -> None:
    data = [sample(i) for i in range(48)]
    ds = RedisBatchDataset(data, batch_size=16, linked=True, redis_url=FAKE_URL, policy=PostponeToNext())
    results: list[StepResult] = []
    sched = Scheduler(sim(), oversample=4, max_tokens=400)
    sched.run(ds, on_batch=results.append)
    delivered = [sid for r in results for sid in map(str, r.batch.non_tensor_batch["prl_sample_id"])]
    pending = [row.ref.key() for row in ds.shard().store.read_rows(3)]  # postponed into the next epoch
    assert sorted(delivered + pending) == sorted(f"0:{i}" for i in range(48))
    assert len(set(delivered + pending)) == 48
    ds.close()


def test_lease_lost_mid_step_loses_nothing() -> None:
    """The store refuses the postpone (lease expired): the engine is left empty, the step's rows (prefetched
    ones included) come back on lease expiry, and the run still delivers every row exactly once."""
    run = Run(PostponeToNext(max_postpones=2))
    sched = Scheduler(sim(), oversample=4, max_tokens=400)
    view = next(run.views())
    assert view.session is not None
    later = time.time() + 10_000  # past the 600 s lease
    view.session.clock = lambda: later
    with pytest.raises(LeaseLost):
        sched.run_step(view)
    assert sched.engine.num_pending() == 0
    assert run.store.expire_leases(now=later) == [0]
    results: list[StepResult] = []
    sched.run(run.views(), on_batch=results.append)
    assert results[0].metrics.step == 0
    assert sorted(by_id(results)) == all_ids()
