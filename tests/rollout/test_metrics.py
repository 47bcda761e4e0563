"""Metrics arithmetic."""

from __future__ import annotations

import math

import numpy as np

from pr_loader.rollout.engine import SlotSpan
from pr_loader.rollout.metrics import RunMetrics, StepMetrics, busy_slot_seconds, version_stats


def span(slot: int, start: float, end: float) -> SlotSpan:
    return SlotSpan(slot, start, end, f"0:{slot}", f"r{slot}", "stop")


def test_busy_slot_seconds_clips_to_window() -> None:
    spans = [span(0, 0.0, 4.0), span(1, 1.0, 2.0), span(2, 5.0, 9.0), span(3, -3.0, -1.0)]
    assert busy_slot_seconds(spans, 0.0, 6.0) == 4.0 + 1.0 + 1.0
    assert busy_slot_seconds([], 0.0, 1.0) == 0.0


def test_version_stats() -> None:
    v = [np.array([3, 3, 4, 5]), np.array([5, 5]), np.array([], dtype=np.int64)]
    st = version_stats(v, 5)
    assert (st.tokens, st.off_policy_tokens, st.max_version_span) == (6, 3, 2)
    assert st.off_policy_fraction == 0.5
    assert version_stats([], 0).off_policy_fraction == 0.0


def step(**kw: float) -> StepMetrics:
    base = dict(
        step=0,
        weights_version=0,
        start=10.0,
        end=20.0,
        num_slots=4,
        generated_tokens=1000,
        busy_slot_seconds=30.0,
        rows_submitted=10,
        rows_prefetched=2,
        rows_resumed=3,
        rows_finished=8,
        rows_postponed=2,
        rows_forced=0,
        rows_dropped=0,
        batch_partial_rows=2,
        batch_tokens=800,
        off_policy_tokens=200,
        max_version_span=1,
        data_path_s=0.05,
    )
    base.update(kw)
    return StepMetrics(**base)  # type: ignore[arg-type]


def test_step_metrics_derived_values() -> None:
    m = step()
    assert m.duration == 10.0 and m.tokens_per_s == 100.0
    assert m.slot_seconds == 40.0 and m.utilisation == 0.75 and m.idle_slot_seconds == 10.0
    assert m.partial_ratio == 0.25 and m.off_policy_fraction == 0.25
    assert math.isclose(m.data_path_share, 0.005)
    d = m.as_dict()
    assert d["tokens_per_s"] == 100.0 and d["rows_dropped"] == 0.0
    empty = step(end=10.0, rows_finished=0, batch_tokens=0)
    assert empty.tokens_per_s == empty.utilisation == empty.partial_ratio == empty.data_path_share == 0.0


def test_run_metrics_summary() -> None:
    run = RunMetrics()
    run.add(step(), [span(0, 10.0, 20.0)])
    run.add(step(start=20.0, end=40.0, generated_tokens=3000, busy_slot_seconds=50.0, max_version_span=2))
    s = run.summary()
    assert s["steps"] == 2 and s["duration"] == 30.0
    assert s["tokens_per_s"] == 4000 / 30
    assert s["utilisation"] == 80.0 / 120.0
    assert s["idle_slot_seconds"] == 40.0
    assert s["rows_finished"] == 16 and s["partial_ratio"] == 4 / 16
    assert s["max_version_span"] == 2 and s["off_policy_fraction"] == 400 / 1600
    assert math.isclose(s["data_path_share"], 0.1 / 30)
    assert len(run.timeline) == 1
    assert RunMetrics().summary()["tokens_per_s"] == 0.0
