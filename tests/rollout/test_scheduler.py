"""Scheduler semantics against an in-memory stand-in view (stop, abort, postpone, resume, bound, sync)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from pr_loader.errors import ConfigError, EngineError, LeaseLost
from pr_loader.policy import FixedBatch, Policy, PostponeToNext, RunLayout
from pr_loader.rollout import (
    LengthDistribution,
    Scheduler,
    SimulatedEngine,
    StepResult,
    TinyConfig,
    TorchEngine,
)
from pr_loader.rollout.engine import GenRequest
from pr_loader.rollout.simulated import hashed_tokens
from pr_loader.rows import dataproto_row, rows_to_dataproto
from tests.rollout.standin import StandInRun, StandInView, make_row

MAX_TOKENS = 400


def lengths(seed: int = 3) -> LengthDistribution:
    return LengthDistribution.lognormal(40, 300, max_tokens=MAX_TOKENS, seed=seed)


def sim_engine(slots: int = 64) -> SimulatedEngine:
    return SimulatedEngine(lengths(), num_slots=slots, vocab_size=256, seed=5)


def drive(run: StandInRun, scheduler: Scheduler) -> list[StepResult]:
    results: list[StepResult] = []
    scheduler.run(run.views(), on_batch=results.append)
    return results


def responses_of(result: StepResult) -> dict[str, dict[str, Any]]:
    out = {}
    for i in range(len(result.batch)):
        row = dataproto_row(result.batch, i)
        k = int(row["response_lengths"])
        out[str(row["prl_sample_id"])] = {
            "tokens": row["responses"][:k].numpy(),
            "logprobs": row["response_logprobs"][:k].numpy(),
            "versions": row["response_versions"][:k].numpy(),
            "row": row,
        }
    return out


def test_sync_waits_for_every_row() -> None:
    run = StandInRun(48, 16, FixedBatch())
    results = drive(run, Scheduler(sim_engine(), oversample=8, max_tokens=MAX_TOKENS))
    assert [len(r.batch) for r in results] == [16, 16, 16]
    assert not run.postpone_log
    for res in results:
        assert res.metrics.rows_prefetched == 0 and res.metrics.rows_postponed == 0
        for sid, got in responses_of(res).items():
            want = hashed_tokens(5, sid, 0, lengths().length_of(sid), 256)
            np.testing.assert_array_equal(got["tokens"], want[0])
            np.testing.assert_array_equal(got["logprobs"], want[1])


def test_partial_stops_postpones_with_partial_state_and_resumes() -> None:
    run = StandInRun(64, 16, PostponeToNext())
    sched = Scheduler(sim_engine(), oversample=4, max_tokens=MAX_TOKENS)
    first = sched.run_step(run.view(0))
    assert first.metrics.rows_submitted == 20 and first.metrics.rows_prefetched == 4
    assert len(first.batch) >= 16 and first.postponed_ids
    assert len(first.batch) + len(first.postponed_ids) == 20
    arrivals = run.arrivals[1]
    assert [a["prl_sample_id"] for a in arrivals] == first.postponed_ids
    for a in arrivals:
        n = a["prl_partial_tokens"].numel()
        assert a["prl_partial_tokens"].dtype == torch.int64
        assert a["prl_partial_logprobs"].dtype == torch.float32 and a["prl_partial_logprobs"].numel() == n
        assert a["prl_partial_versions"].tolist() == [0] * n
        assert n < lengths().length_of(a["prl_sample_id"])  # really unfinished
        assert a["prl_times_postponed"] == 1
    sched.advance_version()
    second = sched.run_step(run.view(1))
    got = responses_of(second)
    resumed = [sid for sid in first.postponed_ids if sid in got]
    assert resumed, "a postponed row should finish in the next step"
    for sid in resumed:
        partial = next(a for a in arrivals if a["prl_sample_id"] == sid)
        n = partial["prl_partial_tokens"].numel()
        want_tokens, want_lp = hashed_tokens(5, sid, 0, lengths().length_of(sid), 256)
        np.testing.assert_array_equal(got[sid]["tokens"], want_tokens)  # partial + continued == uninterrupted
        np.testing.assert_array_equal(got[sid]["tokens"][:n], partial["prl_partial_tokens"].numpy())
        np.testing.assert_array_equal(got[sid]["logprobs"], want_lp)
        assert set(got[sid]["versions"][:n]) <= {0} and set(got[sid]["versions"][n:]) <= {1}
    assert second.metrics.rows_resumed == len(first.postponed_ids)
    # topped up to target_size + oversample: arrivals + the 12 fresh rows left in step 1 + prefetched rows
    assert second.metrics.rows_submitted == 20
    assert second.metrics.rows_prefetched == 20 - len(first.postponed_ids) - 12


def test_no_row_lost_or_duplicated_and_every_response_is_uninterrupted() -> None:
    run = StandInRun(200, 32, PostponeToNext(max_postpones=2))
    results = drive(run, Scheduler(sim_engine(48), oversample=8, max_tokens=MAX_TOKENS))
    seen = [sid for r in results for sid in responses_of(r)]
    assert sorted(seen) == sorted(f"0:{i}" for i in range(200))
    assert sum(r.metrics.rows_dropped for r in results) == 0
    assert any(r.metrics.rows_resumed for r in results)
    for res in results:
        for sid, got in responses_of(res).items():
            np.testing.assert_array_equal(
                got["tokens"], hashed_tokens(5, sid, 0, lengths().length_of(sid), 256)[0]
            )
            assert got["row"]["label"] == int(sid.split(":")[1])  # the row's own fields travel along


@pytest.mark.parametrize("bound", [0, 1])
def test_max_postpones_bound_is_honoured(bound: int) -> None:
    run = StandInRun(128, 16, PostponeToNext(max_postpones=bound))
    results = drive(run, Scheduler(sim_engine(32), oversample=8, max_tokens=MAX_TOKENS))
    counts: dict[str, int] = {}
    for _, ids in run.postpone_log:
        for sid in ids:
            counts[sid] = counts.get(sid, 0) + 1
    assert max(counts.values(), default=0) <= bound
    if bound == 0:
        assert not counts
    else:
        assert counts
        assert sum(r.metrics.rows_forced for r in results) == 0  # the policy keeps them running, never aborts
    for res in results:
        for got in responses_of(res).values():
            assert got["row"]["prl_times_postponed"] <= bound
    assert sorted(s for r in results for s in responses_of(r)) == sorted(f"0:{i}" for i in range(128))


class StopEarlyNoPostpone(FixedBatch):
    """Wants to stop at the first finished row but refuses postponing: the scheduler must finish all."""

    name = "StopEarlyNoPostpone"

    def should_stop_gen(self, view: Any) -> bool:
        return bool(view.num_finished >= 1)


def test_refused_postpone_resumes_and_finishes_every_row() -> None:
    run = StandInRun(16, 16, StopEarlyNoPostpone())
    res = Scheduler(sim_engine(), max_tokens=MAX_TOKENS).run_step(run.view(0))
    assert len(res.batch) == 16 and not res.postponed_ids and res.metrics.rows_forced == 15
    for sid, got in responses_of(res).items():
        np.testing.assert_array_equal(
            got["tokens"], hashed_tokens(5, sid, 0, lengths().length_of(sid), 256)[0]
        )


def test_batch_layout_and_metrics() -> None:
    run = StandInRun(16, 8, PostponeToNext())
    sched = Scheduler(sim_engine(8), oversample=2, max_tokens=MAX_TOKENS, weights_version=7)
    res = sched.run_step(run.view(0))
    b = res.batch
    assert b.batch is not None
    n, width = b.batch["responses"].shape
    assert n == len(b) and width == int(b.batch["response_lengths"].max())
    mask = b.batch["response_mask"]
    assert torch.equal(mask.sum(1), b.batch["response_lengths"])
    assert bool((b.batch["response_versions"][mask == 1] == 7).all())
    assert bool((b.batch["response_versions"][mask == 0] == -1).all())
    assert b.meta_info == {"step": 0, "weights_version": 7}
    assert b.batch.get("input_ids", None) is not None and "prl_sample_id" in b.non_tensor_batch
    assert "prl_partial_tokens" not in b.non_tensor_batch
    m = res.metrics
    assert m.rows_finished + m.rows_postponed == m.rows_submitted == 10 and m.rows_dropped == 0
    assert m.generated_tokens >= m.batch_tokens == int(b.batch["response_lengths"].sum())
    assert 0 < m.utilisation <= 1 and m.off_policy_fraction == 0 and m.max_version_span == 0
    assert res.timeline and all(0 <= s.slot < 8 and s.end >= s.start for s in res.timeline)
    assert len(res.timeline) == m.rows_submitted


def test_off_policy_and_version_span_over_steps() -> None:
    run = StandInRun(96, 16, PostponeToNext(max_postpones=3))
    results = drive(run, Scheduler(sim_engine(24), oversample=8, max_tokens=MAX_TOKENS))
    assert [r.metrics.weights_version for r in results] == list(range(len(results)))
    assert any(r.metrics.off_policy_tokens for r in results)
    for res in results:
        v = res.metrics.weights_version
        for got in responses_of(res).values():
            vers = got["versions"]
            assert vers.max() <= v and vers.max() - vers.min() <= res.metrics.max_version_span <= 3


def test_torch_engine_resume_matches_uninterrupted_greedy() -> None:
    cfg = TinyConfig(vocab_size=256, dim=32, n_layers=2, n_heads=4, max_seq_len=128)
    budget = LengthDistribution.lognormal(8, 60, max_tokens=80, seed=1)

    def engine() -> TorchEngine:
        return TorchEngine(cfg, num_slots=4, device="cpu", dtype=torch.float64, seed=11)

    ref_run = StandInRun(12, 12, FixedBatch())
    ref = responses_of(Scheduler(engine(), max_tokens=budget).run_step(ref_run.view(0)))
    run = StandInRun(12, 6, PostponeToNext())
    results = drive(run, Scheduler(engine(), oversample=2, max_tokens=budget))
    assert run.postpone_log, "the long tail should have been postponed"
    got = {sid: r for res in results for sid, r in responses_of(res).items()}
    assert sorted(got) == sorted(ref)
    for sid, r in got.items():
        assert r["tokens"].size == budget.length_of(sid)
        np.testing.assert_array_equal(r["tokens"], ref[sid]["tokens"])
        np.testing.assert_allclose(r["logprobs"], ref[sid]["logprobs"], atol=1e-6)


def test_errors() -> None:
    with pytest.raises(ConfigError):
        Scheduler(sim_engine(), oversample=-1)
    with pytest.raises(ConfigError):
        Scheduler(sim_engine(), max_tokens=0)
    engine = sim_engine()
    engine.submit([GenRequest("x", "0:999", np.arange(3), 5)])
    with pytest.raises(EngineError, match="in flight"):
        Scheduler(engine).run_step(StandInRun(4, 4, FixedBatch()).view(0))
    with pytest.raises(EngineError, match="prompt field 'missing'"):
        Scheduler(sim_engine(), prompt_key="missing").run_step(StandInRun(4, 4, FixedBatch()).view(0))


def test_policy_layout_sanity() -> None:
    # The stand-in must follow the real policy decisions it relies on.
    assert PostponeToNext().postpone_target(0, RunLayout(4, 1, 8)) == 1
    assert FixedBatch().postpone_target(0, RunLayout(4, 1, 8)) is None
    assert isinstance(StopEarlyNoPostpone(), Policy)


def test_resume_from_partial_state_stacked_in_batch() -> None:
    """Equal-length partial tensors in every row are stacked into ``batch``: resume must read them there."""
    ids = [i for i in range(40) if lengths().length_of(f"0:{i}") > 3][:8]
    rows = []
    for i in ids:
        row = make_row(i)
        tokens, logprobs = hashed_tokens(5, f"0:{i}", 0, 3, 256)
        row.update(
            prl_times_postponed=1,
            prl_partial_tokens=torch.from_numpy(tokens),
            prl_partial_logprobs=torch.from_numpy(logprobs),
            prl_partial_versions=torch.tensor([0, 0, 0]),
        )
        rows.append(row)
    view = rows_to_dataproto(StandInView, rows)
    assert view.batch is not None and "prl_partial_tokens" in set(view.batch.keys())
    run = StandInRun(8, 8, PostponeToNext())  # its own rows are not used
    view.step, view.target_size, view.policy, view.run = 0, 8, run.policy, run
    res = Scheduler(sim_engine(), max_tokens=MAX_TOKENS, weights_version=1).run_step(view)
    got = responses_of(res)
    assert sorted(got) == sorted(f"0:{i}" for i in ids) and res.metrics.rows_resumed == 8
    assert res.metrics.partial_ratio == 1.0 and res.metrics.max_version_span == 1
    for sid, r in got.items():
        np.testing.assert_array_equal(r["tokens"], hashed_tokens(5, sid, 0, lengths().length_of(sid), 256)[0])
        assert r["versions"].tolist() == [0, 0, 0] + [1] * (r["tokens"].size - 3)


def test_failed_postpone_leaves_the_engine_empty() -> None:
    run = StandInRun(32, 16, PostponeToNext())
    engine = sim_engine()
    sched = Scheduler(engine, oversample=4, max_tokens=MAX_TOKENS)
    view = run.view(0)

    def broken(samples: Any) -> bool:
        raise LeaseLost("lease of step 0 expired")

    view.postpone_samples = broken  # type: ignore[method-assign]
    with pytest.raises(LeaseLost):
        sched.run_step(view)
    assert engine.num_pending() == 0
    # usable again (step 1 lacks the 4 rows prefetched into the failed step: the stand-in has no lease expiry)
    assert len(sched.run_step(run.view(1)).batch) == 12
