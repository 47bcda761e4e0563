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
