"""SIGKILL of the consumer at random points; a fresh process restores and finishes the run.

Each iteration: a seeded workload; 1-3 consumer processes die by SIGKILL at a chosen point (before, inside
-- script sent, reply not read -- or after a claim/prefetch/postpone/commit/materialise/rollback call, or
between a commit and the checkpoint write); a last process finishes. Checks: every sample committed exactly
once per epoch, and the committed trace (refs and payloads of every step) equals an uninterrupted run's.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from tests.chaos.helpers import (
    KILL_METHODS,
    KILL_WHERE,
    TALLY,
    KillPlan,
    chaos_iterations,
    chaos_seed,
    check_exactly_once,
    expected_keys,
    first_difference,
    random_kill_plan,
    run_child,
)
from tests.chaos.workload import Workload, committed_keys, committed_trace, consume
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

Trace = list[tuple[int, list[tuple[str, bytes]]]]


def reference_trace(server: RedisServer, work: Workload, tmp_path: Path) -> Trace:
    """The uninterrupted run of ``work`` (same settings, its own run id)."""
    ref = work.with_run(f"ref-{work.run_id}")
    result = run_child(
        consume,
        server.url,
        ref.as_dict(),
        str(tmp_path / f"{ref.run_id}.json"),
        consumer_id="ref",
        generation=0,
    )
    assert result.exitcode == 0 and not result.error, result.error
    return read_trace(server, ref)


def read_trace(server: RedisServer, work: Workload) -> Trace:
    client = connect(server.url)
    try:
        store = BatchStore.open(client, work.config(), create=False)
        states = {int(k): v.decode() for k, v in client.hgetall(store.keys.steps).items()}
        not_done = {s: states.get(s) for s in range(work.total_steps) if states.get(s) != "committed"}
        assert not not_done, f"steps not committed at the end: {not_done}"
        stats = store.stats()
        assert not stats.in_flight and not stats.requeued, (stats.in_flight, stats.requeued)
        assert stats.dead_letters == 0
        left = {s: n for s, n in stats.upcoming.items() if any(n)}
        assert not left, f"rows left behind in upcoming steps: {left}"
        return committed_trace(store, work.total_steps)
    finally:
        client.close()


def verify(server: RedisServer, work: Workload, reference: Trace, story: list[str]) -> None:
    trace = read_trace(server, work)
    report = check_exactly_once(
        committed_keys(trace), expected_keys(work.dataset_size, range(work.num_epochs))
    )
    assert report.ok, f"{report.describe()}; story: {story}"
    assert trace == reference, (
        f"trace differs from the uninterrupted run: {first_difference(trace, reference)}; story: {story}"
    )


def crash_and_recover(
    server: RedisServer,
    work: Workload,
    tmp_path: Path,
    recovery: str,
    plans: list[KillPlan],
) -> list[str]:
    """Run consumers dying at ``plans`` one after another, then one that finishes; returns the story."""
    ckpt = str(tmp_path / f"{work.run_id}.ckpt.json")
    story: list[str] = []
    for generation, plan in enumerate([*plans, None]):
        result = run_child(
            consume,
            server.url,
            work.as_dict(),
            ckpt,
            consumer_id=f"c{generation}",
            generation=generation,
            recovery=recovery,
            kill=plan,
        )
        story.append(f"gen{generation} {plan}: exit {result.exitcode}")
        if plan is None:
            assert result.exitcode == 0 and result.error is None, f"{result.error}; story: {story}"
        elif result.killed:
            TALLY.consumer_kills += 1
        else:
            # the plan pointed past the end of the run (or died otherwise): it must have finished cleanly
            assert result.exitcode == 0 and result.error is None, f"{result.error}; story: {story}"
    TALLY.runs += 1
    return story


@pytest.mark.parametrize("recovery", ["rollback", "lease"])
def test_random_consumer_kills(chaos_server: RedisServer, tmp_path: Path, recovery: str) -> None:
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"consumer-kill:{recovery}:{base}:{it}")
        work = Workload(run_id=f"kill-{recovery}-{it}", seed=rng.randrange(1 << 30))
        reference = reference_trace(chaos_server, work, tmp_path)
        methods = [*KILL_METHODS, "rollback"] if recovery == "rollback" else list(KILL_METHODS)
        plans = [random_kill_plan(rng, methods=methods, max_occurrence=8) for _ in range(rng.randint(1, 3))]
        story = crash_and_recover(chaos_server, work, tmp_path, recovery, plans)
        verify(chaos_server, work, reference, story)


@pytest.mark.parametrize("where", KILL_WHERE)
@pytest.mark.parametrize("method", ["claim", "prefetch", "postpone", "commit", "materialise"])
def test_kill_at_each_point(chaos_server: RedisServer, tmp_path: Path, method: str, where: str) -> None:
    """Every (method, point) pair once, deterministically, with both recovery paths."""
    for recovery in ("rollback", "lease"):
        work = Workload(run_id=f"point-{method}-{where}-{recovery}", seed=11)
        reference = reference_trace(chaos_server, work, tmp_path)
        plan = KillPlan(method, where, 3)
        story = crash_and_recover(chaos_server, work, tmp_path, recovery, [plan])
        assert "exit -9" in story[0], f"the kill point {plan} was never reached: {story}"
        verify(chaos_server, work, reference, story)


def test_kill_during_rollback_then_resume(chaos_server: RedisServer, tmp_path: Path) -> None:
    """A rollback interrupted by SIGKILL (inside its script call) is resumed by the next process."""
    work = Workload(run_id="kill-in-rollback", seed=5)
    reference = reference_trace(chaos_server, work, tmp_path)
    plans = [
        KillPlan("postpone", "after", 4),
        KillPlan("rollback", "inflight", 1),
        KillPlan("rollback", "after", 1),
    ]
    story = crash_and_recover(chaos_server, work, tmp_path, "rollback", plans)
    assert [s.endswith("exit -9") for s in story] == [True, True, True, False], story
    verify(chaos_server, work, reference, story)


@pytest.mark.parametrize("undo", ["rollback", "lease-expiry"])
def test_undone_prefetch_returns_rows_in_source_order(chaos_server: RedisServer, undo: str) -> None:
    """The smallest form of a trace difference the random kills find: rows a step prefetched go back to the
    head of their source batch in their original order, so the redo prefetches the same rows in the same
    order."""
    work = Workload(run_id=f"undo-order-{undo}", seed=1)
    client = connect(chaos_server.url)
    try:
        store = BatchStore.open(client, work.config())
        for s in range(3):
            store.materialise(s, work.fresh_rows(s))
        source_before = client.lrange(store.keys.batch(1), 0, -1)
        claimed = store.claim("a", 30.0, now=1.0)
        assert claimed is not None and claimed.step == 0
        first = [r.ref.encode() for r in store.prefetch(0, "a", 2, 5, now=1.0).rows]
        if undo == "rollback":
            store.rollback(-1)
        else:
            assert store.expire_leases(now=100.0) == [0]
        assert client.lrange(store.keys.batch(1), 0, -1) == source_before
        again = store.claim("b", 30.0, now=200.0)
        assert again is not None and again.step == 0
        second = [r.ref.encode() for r in store.prefetch(0, "b", 2, 5, now=200.0).rows]
        assert second == first
    finally:
        client.close()
