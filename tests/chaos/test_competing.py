"""Three competing consumer processes on one run, SIGKILLed at random points and replaced by younger ones
(whose later clock expires -- steals -- every older lease, dead or alive). The run must finish with every
sample committed exactly once per epoch; the trace is not compared (the interleaving is not deterministic).
"""

from __future__ import annotations

import multiprocessing
import random
import signal
import time
from typing import Any

import pytest

from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from tests.chaos.helpers import (
    TALLY,
    KillPlan,
    chaos_iterations,
    chaos_seed,
    check_exactly_once,
    expected_keys,
    random_kill_plan,
)
from tests.chaos.test_consumer_kill import read_trace
from tests.chaos.workload import Workload, committed_keys, consume_competing
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

CONSUMERS = 3
TIMEOUT = 90.0


def _start(ctx: Any, url: str, work: Workload, gen: int, slot: int, plan: KillPlan | None) -> Any:
    proc = ctx.Process(
        target=consume_competing,
        args=(url, work.as_dict()),
        kwargs={"consumer_id": f"g{gen}s{slot}", "generation": gen, "kill": plan},
        daemon=True,
    )
    proc.start()
    return proc


def test_competing_consumers_with_kills(chaos_server: RedisServer) -> None:
    ctx = multiprocessing.get_context("fork")
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"competing:{base}:{it}")
        work = Workload(run_id=f"compete-{it}", seed=rng.randrange(1 << 30), steps_per_epoch=8)
        kills_left = rng.randint(2, 4)
        gen = 0
        story: list[str] = []
        procs = {
            slot: _start(ctx, chaos_server.url, work, gen, slot, random_kill_plan(rng, max_occurrence=6))
            for slot in range(CONSUMERS)
        }
        deadline = time.monotonic() + TIMEOUT
        try:
            while procs:
                assert time.monotonic() < deadline, f"competing run did not finish; story {story}"
                for slot, proc in list(procs.items()):
                    proc.join(0.02)
                    if proc.exitcode is None:
                        continue
                    story.append(f"{proc.name} slot{slot} gen{gen}: exit {proc.exitcode}")
                    del procs[slot]
                    if proc.exitcode == -signal.SIGKILL:
                        TALLY.consumer_kills += 1
                        gen += 1
                        plan = random_kill_plan(rng, max_occurrence=6) if kills_left > 0 else None
                        kills_left -= 1
                        procs[slot] = _start(ctx, chaos_server.url, work, gen, slot, plan)
                    else:
                        assert proc.exitcode == 0, f"a consumer failed; story {story}"
        finally:
            for proc in procs.values():
                proc.kill()
                proc.join(10)
        TALLY.runs += 1
        trace = read_trace(chaos_server, work)
        report = check_exactly_once(
            committed_keys(trace), expected_keys(work.dataset_size, range(work.num_epochs))
        )
        assert report.ok, f"{report.describe()}; story {story}"


PER_STEP_KINDS = ("batch", "arrivals", "rows", "journal", "claimed", "opids")


def keys_of_collected_steps(client: Any, prefix: str, floor: int) -> list[str]:
    """Per-step keys (``<prefix><kind>:<step>``) of steps below the garbage-collection floor."""
    left = []
    for raw in client.scan_iter(match=f"{prefix}*", count=1000):
        kind, _, step = raw.decode()[len(prefix) :].partition(":")
        if kind in PER_STEP_KINDS and step.isdigit() and int(step) < floor:
            left.append(raw.decode())
    return sorted(left)


def test_late_commit_leaves_nothing_of_collected_steps(chaos_server: RedisServer) -> None:
    """Found by tests/test_soak.py: a step committed after later steps moved ``committed_upto`` past the
    retained window is collected by its own commit; nothing of it may stay behind (per-step keys have no
    TTL, so a leftover is a permanent leak)."""
    work = Workload(run_id="late-commit-gc", seed=2, retain_steps=2)
    client = connect(chaos_server.url)
    try:
        store = BatchStore.open(client, work.config())
        for s in range(work.steps_per_epoch):
            store.materialise(s, work.fresh_rows(s))
        slow = store.claim("slow", 1000.0, now=0.0)
        assert slow is not None and slow.step == 0
        for _ in range(5):
            fast = store.claim("fast", 1000.0, now=1.0)
            assert fast is not None
            store.commit(fast.step, "fast", now=1.0)
        store.commit(0, "slow", now=2.0)  # commits step 0 and collects steps 0..2 in the same call
        floor = store.stats().gc_floor
        assert floor >= 1
        left = keys_of_collected_steps(client, store.keys.prefix, floor)
        assert left == [], f"keys of collected steps (< {floor}) left behind: {left}"
    finally:
        client.close()
