"""SIGKILL of a training process that uses the drop-in ``pr_loader.DataLoader`` and checkpoints
``state_dict()`` with its "model" (here: the list of batches it trained on) after every step.

A fresh process loads the last checkpoint (``load_state_dict`` rolls the run back to it) and trains to the
end. The batches the final model was trained on must equal those of an uninterrupted run, and every sample
must appear exactly once per epoch. Kill points: inside/around the store calls the loader makes (claim,
commit, materialise, renew, expire_leases, rollback), including between sending a script and reading its
reply, and between ``state_dict()`` (which commits) and the checkpoint write. The same with the Redis server
SIGKILLed at those points and restarted from its AOF (``appendfsync always``).
"""

from __future__ import annotations

import multiprocessing.connection
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from pr_loader.dataloader import DataLoader
from pr_loader.store.batch_store import BatchStore
from tests.chaos.helpers import (
    KILL_WHERE,
    TALLY,
    Killer,
    KillPlan,
    chaos_iterations,
    chaos_seed,
    check_exactly_once,
    read_json,
    run_child,
    write_json_atomic,
)
from tests.chaos.proxy import ChaosProxy
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

N = 24
BATCH = 4
EPOCHS = 2
STEPS = N // BATCH
LOADER_METHODS = ("claim", "commit", "materialise", "renew", "expire_leases", "rollback")


def train(
    url: str,
    run_id: str,
    checkpoint: str,
    seed: int,
    *,
    kill: KillPlan | None = None,
    redis_pid: int | None = None,
    channel: multiprocessing.connection.Connection | None = None,
) -> None:
    killer = Killer(kill, redis_pid=redis_pid, channel=channel)
    ckpt_path = Path(checkpoint)
    with killer.client_hooks():
        killer.wrap(BatchStore, LOADER_METHODS)  # class attributes: this forked process only
        data = [{"i": i} for i in range(N)]
        loader = DataLoader(
            data,
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            redis_url=url,
            run_id=run_id,
            retain_steps=100,
        )
        ckpt: dict[str, Any] = read_json(ckpt_path, {"state": None, "trace": []})
        if ckpt["state"] is None:
            # checkpoint 0 before training: a trainer that dies before its first checkpoint must restart
            # from the beginning, not after steps a dead process committed (the loader would skip them)
            ckpt = {"state": loader.state_dict(), "trace": []}
            write_json_atomic(ckpt_path, ckpt)
        loader.load_state_dict(ckpt["state"])
        trace: list[list[int]] = ckpt["trace"]
        for _ in range(EPOCHS + 1):  # bounded: one iter() is (the rest of) one epoch
            if len(trace) >= EPOCHS * STEPS:
                break
            for batch in loader:
                trace.append([int(i) for i in batch["i"]])
                state = loader.state_dict()  # commits the step
                killer.checkpoint_point()
                write_json_atomic(ckpt_path, {"state": state, "trace": trace})
        loader.close()
        if len(trace) != EPOCHS * STEPS:
            raise AssertionError(f"trained on {len(trace)} steps, expected {EPOCHS * STEPS}")


def _reference(server: RedisServer, tmp_path: Path, seed: int) -> list[list[int]]:
    path = tmp_path / f"ref-{seed}.json"
    result = run_child(train, server.url, f"loader-ref-{seed}", str(path), seed)
    assert result.exitcode == 0 and result.error is None, result.error
    return list(read_json(path, {})["trace"])


def _restart(server: RedisServer) -> None:
    server.kill()
    server.start()
    TALLY.redis_restarts += 1


def _check(trace: list[list[int]], reference: list[list[int]], story: list[str]) -> None:
    keys = [f"{pos // STEPS}:{i}" for pos, batch in enumerate(trace) for i in batch]
    report = check_exactly_once(keys, [f"{e}:{i}" for e in range(EPOCHS) for i in range(N)])
    assert report.ok, f"{report.describe()}; story {story}"
    assert trace == reference, f"trained on other batches than the uninterrupted run; story {story}"


@pytest.mark.parametrize("target", ["self", "redis"])
def test_training_process_kills_with_state_dict_restore(
    chaos_server: RedisServer, tmp_path: Path, target: str
) -> None:
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"loader-kill:{target}:{base}:{it}")
        seed = rng.randrange(1 << 30)
        reference = _reference(chaos_server, tmp_path, seed)
        ckpt = tmp_path / f"{target}-{it}.json"
        run_id = f"loader-{target}-{it}"
        story: list[str] = []
        methods = [*LOADER_METHODS, "checkpoint"] if target == "self" else ["claim", "commit", "materialise"]
        plans: list[KillPlan | None] = [
            KillPlan(rng.choice(methods), rng.choice(KILL_WHERE), rng.randint(1, 6), target)
            for _ in range(rng.randint(1, 3))
        ]
        for gen, plan in enumerate([*plans, None]):
            assert chaos_server.proc is not None
            result = run_child(
                train,
                chaos_server.url,
                run_id,
                str(ckpt),
                seed,
                kill=plan,
                redis_pid=chaos_server.proc.pid,
                on_redis_killed=lambda: _restart(chaos_server),
            )
            story.append(f"gen{gen} {plan}: exit {result.exitcode} redis_kills={result.redis_kills}")
            if result.killed:
                TALLY.consumer_kills += 1
            else:
                assert result.exitcode == 0 and result.error is None, f"{result.error}; story {story}"
            TALLY.redis_kills += result.redis_kills
        TALLY.runs += 1
        _check(list(read_json(ckpt, {})["trace"]), reference, story)


@pytest.mark.parametrize(
    "plan",
    [
        KillPlan("checkpoint", "after", 3),
        KillPlan("commit", "inflight", 2),
        KillPlan("claim", "inflight", 4),
        KillPlan("materialise", "inflight", 3),
    ],
    ids=str,
)
def test_training_process_kill_points(chaos_server: RedisServer, tmp_path: Path, plan: KillPlan) -> None:
    reference = _reference(chaos_server, tmp_path, 17)
    ckpt = tmp_path / "point.json"
    first = run_child(train, chaos_server.url, "loader-point", str(ckpt), 17, kill=plan)
    assert first.killed, f"kill point {plan} never reached ({first.exitcode}, {first.error})"
    TALLY.consumer_kills += 1
    second = run_child(train, chaos_server.url, "loader-point", str(ckpt), 17)
    assert second.exitcode == 0 and second.error is None, second.error
    TALLY.runs += 1
    _check(list(read_json(ckpt, {})["trace"]), reference, [str(plan)])


def test_state_dict_after_everysec_loss_is_reported(everysec_server: RedisServer, tmp_path: Path) -> None:
    """The machine dies with ``appendfsync everysec``: the AOF loses the last steps the trainer already
    checkpointed. ``load_state_dict`` must report the lost steps (not resume silently, which would
    re-deliver them as if new)."""
    server = everysec_server
    seed = 23
    ckpt = tmp_path / "everysec.json"
    aof = next((server.data_dir / "appendonlydir").glob("*.incr.aof"))
    # 1. train until step 2, "fsynced"
    data = [{"i": i} for i in range(N)]

    def make() -> DataLoader:
        return DataLoader(
            data,
            batch_size=BATCH,
            shuffle=True,
            generator=torch.Generator().manual_seed(seed),
            redis_url=server.url,
            run_id="loader-everysec",
            retain_steps=100,
        )

    loader = make()
    it = iter(loader)
    for _ in range(3):
        next(it)
    loader.state_dict()
    loader.close()
    synced = aof.stat().st_size
    # 2. train on to step 4, checkpoint, never fsynced
    loader = make()
    it = iter(loader)
    for _ in range(2):
        next(it)
    state = loader.state_dict()
    loader.close()
    write_json_atomic(ckpt, {"state": state})
    assert state["step"] == 4
    # 3. power loss: the AOF keeps what was fsynced
    server.kill()
    TALLY.redis_kills += 1
    with aof.open("r+b") as fh:
        fh.truncate(synced)
    TALLY.aof_truncations += 1
    server.start()
    TALLY.redis_restarts += 1
    loader = make()
    try:
        with pytest.raises(Exception) as info:
            loader.load_state_dict(state)
        message = str(info.value)
        assert "lost" in message.lower() and "3" in message and "4" in message, (
            f"the error must say steps 3..4 were lost: {type(info.value).__name__}: {message}"
        )
        TALLY.loss_windows_detected += 1
    finally:
        loader.close()


def test_running_loader_detects_everysec_loss(everysec_server: RedisServer, tmp_path: Path) -> None:
    """Same loss, but the training process survives (only the Redis machine died): its next batch must not
    silently be a step it already trained on and committed."""
    server = everysec_server
    aof = next((server.data_dir / "appendonlydir").glob("*.incr.aof"))
    data = [{"i": i} for i in range(N)]
    loader = DataLoader(
        data, batch_size=BATCH, shuffle=False, redis_url=server.url, run_id="loader-alive", retain_steps=100
    )
    try:
        it = iter(loader)
        seen = [[int(i) for i in next(it)["i"]] for _ in range(3)]
        loader.state_dict()
        synced = aof.stat().st_size
        seen += [[int(i) for i in next(it)["i"]] for _ in range(2)]
        assert loader.state_dict()["step"] == 4
        server.kill()
        TALLY.redis_kills += 1
        with aof.open("r+b") as fh:
            fh.truncate(synced)
        TALLY.aof_truncations += 1
        server.start()
        TALLY.redis_restarts += 1
        # go on training: either the loss is reported (naming the lost steps) before a committed batch
        # comes again, or no batch comes twice at all
        for _ in range(2 * STEPS):  # bounded: at most the rest of the epoch and the next one
            try:
                batch = [int(i) for i in next(it)["i"]]
            except StopIteration:
                break
            except Exception as exc:
                message = str(exc)
                assert "lost" in message.lower() and "3" in message and "4" in message, message
                TALLY.loss_windows_detected += 1
                return
            assert batch not in seen, (
                f"after the store lost steps 3..4 the loader silently re-delivered a batch "
                f"it had already committed: {batch} (seen {seen})"
            )
            seen.append(batch)
    finally:
        loader.close()


def test_training_through_a_proxy_that_drops_replies(
    chaos_server: RedisServer, proxy: ChaosProxy, tmp_path: Path
) -> None:
    """The whole loader (claims, commits, materialisation, rollback) talks to Redis through a proxy that
    loses the reply of some scripts after they ran: the retries must not apply anything twice."""
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"loader-drops:{base}:{it}")
        seed = rng.randrange(1 << 30)
        reference = _reference(chaos_server, tmp_path, seed)
        drops_before = proxy.stats.drops
        proxy.drop_reply_after(b"EVALSHA")  # at least one per run, then at random
        proxy.drop_replies_randomly(b"EVALSHA", 0.1, rng)
        ckpt = tmp_path / f"drops-{it}.json"
        result = run_child(train, proxy.url, f"loader-drops-{it}", str(ckpt), seed)
        proxy.clear_rules()
        assert result.exitcode == 0 and result.error is None, result.error
        assert proxy.stats.drops > drops_before, "no reply was dropped: the test proved nothing"
        TALLY.runs += 1
        _check(list(read_json(ckpt, {})["trace"]), reference, [f"drops={proxy.stats.drops - drops_before}"])
