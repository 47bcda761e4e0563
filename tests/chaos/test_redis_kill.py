"""SIGKILL of redis-server and restart from its AOF.

* ``appendfsync always``: the consumer kills the server at a chosen point (before, inside -- script sent,
  reply not read -- or after a store call), the test restarts it from the AOF on the same port, the consumer's
  retries carry on. Nothing acknowledged may be lost: the run finishes with every sample committed exactly
  once and the same trace as an uninterrupted run.
* ``appendfsync everysec``: a crash of the *machine* loses up to ~1 s of acknowledged writes (a redis-server
  SIGKILL alone loses nothing: the AOF is written before the reply). We simulate the machine crash by cutting
  the AOF back to what an fsync could have left (a byte offset between two checkpoints, so the last
  transaction may be torn) before the restart. The consumer's checkpoint is then newer than the store; the
  restore (``rollback(checkpoint step)``) must detect and report the lost steps, never re-deliver them
  silently, and the run must finish exactly once from the store's own state.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pr_loader.errors import PrLoaderError
from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from tests.chaos.helpers import (
    KILL_WHERE,
    TALLY,
    KillPlan,
    chaos_iterations,
    chaos_seed,
    read_json,
    run_child,
    write_json_atomic,
)
from tests.chaos.test_consumer_kill import reference_trace, verify
from tests.chaos.workload import Workload, consume
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

REDIS_KILL_METHODS = ("claim", "prefetch", "postpone", "commit", "materialise")


def _restart(server: RedisServer) -> None:
    server.kill()  # reap the process the child SIGKILLed
    server.start()
    TALLY.redis_restarts += 1


def _committed_upto(server: RedisServer, work: Workload) -> int:
    client = connect(server.url)
    try:
        store = BatchStore.open(client, work.config(), create=False)
        return int(client.hget(store.keys.meta, "committed_upto") or -1)
    finally:
        client.close()


def test_redis_sigkill_always_loses_nothing(chaos_server: RedisServer, tmp_path: Path) -> None:
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"redis-kill:{base}:{it}")
        work = Workload(run_id=f"rkill-{it}", seed=rng.randrange(1 << 30))
        reference = reference_trace(chaos_server, work, tmp_path)
        ckpt = tmp_path / f"{work.run_id}.ckpt.json"
        story: list[str] = []
        stops = [*sorted(rng.sample(range(work.total_steps - 1), 2)), None]
        for generation, stop in enumerate(stops):
            plan = KillPlan(
                rng.choice(REDIS_KILL_METHODS), rng.choice(KILL_WHERE), rng.randint(1, 4), "redis"
            )
            assert chaos_server.proc is not None
            result = run_child(
                consume,
                chaos_server.url,
                work.as_dict(),
                str(ckpt),
                consumer_id=f"c{generation}",
                generation=generation,
                kill=plan,
                redis_pid=chaos_server.proc.pid,
                stop_after_step=stop,
                on_redis_killed=lambda: _restart(chaos_server),
            )
            story.append(
                f"gen{generation} {plan} stop={stop}: exit {result.exitcode} kills={result.redis_kills}"
            )
            assert result.exitcode == 0 and result.error is None, f"{result.error}; story: {story}"
            TALLY.redis_kills += result.redis_kills
            # nothing acknowledged was lost: the store is at least as far as the consumer's checkpoint
            ckpt_step = int(read_json(ckpt, {"step": -1})["step"])
            assert _committed_upto(chaos_server, work) >= ckpt_step, story
        TALLY.runs += 1
        verify(chaos_server, work, reference, story)


@pytest.mark.parametrize("where", KILL_WHERE)
def test_redis_sigkill_inside_commit(chaos_server: RedisServer, tmp_path: Path, where: str) -> None:
    """The server dies around a commit script (the reply of an applied commit may be lost)."""
    work = Workload(run_id=f"rkill-commit-{where}", seed=3)
    reference = reference_trace(chaos_server, work, tmp_path)
    assert chaos_server.proc is not None
    result = run_child(
        consume,
        chaos_server.url,
        work.as_dict(),
        str(tmp_path / "c.json"),
        consumer_id="c0",
        generation=0,
        kill=KillPlan("commit", where, 2, "redis"),
        redis_pid=chaos_server.proc.pid,
        on_redis_killed=lambda: _restart(chaos_server),
    )
    assert result.exitcode == 0 and result.error is None, result.error
    assert result.redis_kills == 1
    TALLY.redis_kills += 1
    TALLY.runs += 1
    verify(chaos_server, work, reference, [f"redis kill {where} commit#2"])


# ---------------------------------------------------------------------------------------------------
# everysec: the loss window


def _aof_incr_file(server: RedisServer) -> Path:
    files = sorted((server.data_dir / "appendonlydir").glob("*.incr.aof"))
    assert len(files) == 1, f"expected one incremental AOF file, found {files}"
    return files[0]


def test_everysec_loss_window_is_detected(everysec_server: RedisServer, tmp_path: Path) -> None:
    base = chaos_seed()
    server = everysec_server
    for it in range(chaos_iterations(default=3)):
        rng = random.Random(f"everysec:{base}:{it}")
        work = Workload(run_id=f"everysec-{it}", seed=rng.randrange(1 << 30))
        reference = reference_trace(server, work, tmp_path)
        ckpt = tmp_path / f"{work.run_id}.ckpt.json"
        synced_step = rng.randrange(0, work.total_steps - 4)
        lost_upto = rng.randrange(synced_step + 1, work.total_steps - 1)
        # 1. run to synced_step: everything so far "reached the disk"
        result = run_child(
            consume,
            server.url,
            work.as_dict(),
            str(ckpt),
            consumer_id="c0",
            generation=0,
            stop_after_step=synced_step,
        )
        assert result.exitcode == 0, result.error
        aof = _aof_incr_file(server)
        synced_size = aof.stat().st_size
        # 2. run on to lost_upto: acknowledged and checkpointed by the consumer, but never fsynced
        result = run_child(
            consume,
            server.url,
            work.as_dict(),
            str(ckpt),
            consumer_id="c1",
            generation=1,
            stop_after_step=lost_upto,
        )
        assert result.exitcode == 0, result.error
        acked_size = aof.stat().st_size
        assert acked_size > synced_size
        # 3. the machine dies: the AOF keeps a prefix somewhere between the two (maybe a torn transaction)
        cut = synced_size if rng.random() < 0.5 else rng.randrange(synced_size, acked_size)
        server.kill()
        TALLY.redis_kills += 1
        with aof.open("r+b") as fh:
            fh.truncate(cut)
        TALLY.aof_truncations += 1
        server.start()
        TALLY.redis_restarts += 1
        store_step = _committed_upto(server, work)
        assert synced_step <= store_step < lost_upto, (synced_step, store_step, lost_upto, cut)
        # 4. restore from the consumer's checkpoint: the loss must be reported, naming the lost steps
        client = connect(server.url)
        try:
            store = BatchStore.open(client, work.config(), create=False)
            with pytest.raises(PrLoaderError) as info:
                store.rollback(lost_upto)
            message = str(info.value)
            assert str(lost_upto) in message and str(store_step) in message, message
            TALLY.loss_windows_detected += 1
        finally:
            client.close()
        # 5. the operator resumes from the store's own state (an older model checkpoint): exactly once
        write_json_atomic(ckpt, {"step": store_step})
        result = run_child(consume, server.url, work.as_dict(), str(ckpt), consumer_id="c2", generation=2)
        assert result.exitcode == 0, result.error
        TALLY.runs += 1
        verify(
            server, work, reference, [f"synced={synced_step} acked={lost_upto} store={store_step} cut={cut}"]
        )
