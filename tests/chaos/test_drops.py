"""Dropped connections and stalls between the store client and Redis (through tests/chaos/proxy.py).

The worst case of a network fault is a reply lost after the script ran: the client cannot tell whether its
operation was applied. The store's retry re-sends the same op id, and the script must answer from
``op:<op_id>`` instead of applying the change again. We check this per operation against a clean twin run
(same calls, no fault: the Redis contents must be identical), then with random drops over whole runs
(exactly once, trace equal to the uninterrupted run).
"""

from __future__ import annotations

import random
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from tests.chaos.helpers import TALLY, chaos_iterations, chaos_seed, run_child, snapshot
from tests.chaos.proxy import ChaosProxy
from tests.chaos.test_consumer_kill import reference_trace, verify
from tests.chaos.workload import Workload, consume, materialise_if_needed
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis, pytest.mark.slow]

LEASE = 30.0


def _script(store: BatchStore, work: Workload) -> list[tuple[str, Callable[[], Any]]]:
    """A fixed sequence of store calls with explicit op ids (so a proxy rule can target each one)."""
    cid = "solo"
    state: dict[str, Any] = {}

    def claim0() -> None:
        claimed = store.claim(cid, LEASE, now=1.0, op_id="op-claim-0")
        assert claimed is not None and claimed.step == 0
        state["rows0"] = claimed.rows

    def prefetch0() -> None:
        store.prefetch(0, cid, 2, 1, now=2.0, op_id="op-prefetch-0")

    def postpone0() -> None:
        rows = store.read_rows(0)
        store.postpone(
            0, cid, [(r.ref, r.payload + b"|p0") for r in rows[1:3]], 1, now=3.0, op_id="op-postpone-0"
        )

    def commit0() -> None:
        store.commit(0, cid, now=4.0, op_id="op-commit-0")

    def claim1() -> None:
        claimed = store.claim(cid, LEASE, now=5.0, op_id="op-claim-1")
        assert claimed is not None and claimed.step == 1

    def commit1() -> None:
        store.commit(1, cid, now=6.0, op_id="op-commit-1")

    def claim2() -> None:
        claimed = store.claim(cid, LEASE, now=7.0, op_id="op-claim-2")
        assert claimed is not None and claimed.step == 2

    def rollback0() -> None:
        store.rollback(0, op_id="op-rollback-0")

    return [
        ("materialise", lambda: [materialise_if_needed(store, work, s) for s in range(4)]),
        ("op-claim-0", claim0),
        ("op-prefetch-0", prefetch0),
        ("op-postpone-0", postpone0),
        ("op-commit-0", commit0),
        ("op-claim-1", claim1),
        ("op-commit-1", commit1),
        ("op-claim-2", claim2),
        ("op-rollback-0", rollback0),
    ]


def _run_script(url: str, work: Workload) -> None:
    client = connect(url)
    try:
        store = BatchStore.open(client, work.config())
        for _name, call in _script(store, work):
            call()
    finally:
        client.close()


def _normalised(server: RedisServer, run_id: str) -> dict[str, Any]:
    client = server.client()
    try:
        snap = snapshot(client, f"prl:{{{run_id}:*")
    finally:
        client.close()
    token = run_id.encode()

    uuid_hex = re.compile(rb"^[0-9a-f]{32}$")

    def norm(value: Any) -> Any:
        if isinstance(value, bytes):
            return b"UUID" if uuid_hex.match(value) else value.replace(token, b"RUN")
        if isinstance(value, dict):
            return {norm(k): norm(v) for k, v in value.items() if b"created" not in norm(k)}
        if isinstance(value, (list, tuple)):
            return [norm(v) for v in value]
        return value

    # results of calls made without an explicit op id (fresh uuid4 hex ids) cannot match between the twins
    random_op = re.compile(r":op:[0-9a-f]{32}$")
    return {
        key.replace(run_id, "RUN"): norm(value) for key, value in snap.items() if not random_op.search(key)
    }


@pytest.mark.parametrize("mode", ["reply", "request"])
@pytest.mark.parametrize(
    "op", ["op-claim-0", "op-prefetch-0", "op-postpone-0", "op-commit-0", "op-claim-2", "op-rollback-0"]
)
def test_lost_reply_is_not_applied_twice(
    chaos_server: RedisServer, proxy: ChaosProxy, op: str, mode: str
) -> None:
    clean = Workload(run_id=f"clean-{op}-{mode}", seed=1)
    faulty = clean.with_run(f"drop-{op}-{mode}")
    _run_script(chaos_server.url, clean)
    if mode == "reply":
        proxy.drop_reply_after(op.encode())  # the script runs, the reply is lost, the line is cut
    else:
        proxy.drop_request(op.encode())  # the line is cut before the script reaches the server
    _run_script(proxy.url, faulty)
    assert proxy.pending_rules() == 0, f"the {op} request never went through the proxy"
    assert _normalised(chaos_server, faulty.run_id) == _normalised(chaos_server, clean.run_id)


def test_random_reply_drops_over_whole_runs(
    chaos_server: RedisServer, proxy: ChaosProxy, tmp_path: Path
) -> None:
    base = chaos_seed()
    for it in range(chaos_iterations()):
        rng = random.Random(f"drops:{base}:{it}")
        work = Workload(run_id=f"rdrop-{it}", seed=rng.randrange(1 << 30))
        reference = reference_trace(chaos_server, work, tmp_path)
        drops_before = proxy.stats.drops
        proxy.drop_reply_after(b"EVALSHA")  # at least one per run, then at random
        proxy.drop_replies_randomly(b"EVALSHA", 0.15, rng)
        result = run_child(
            consume,
            proxy.url,
            work.as_dict(),
            str(tmp_path / f"{work.run_id}.json"),
            consumer_id="c0",
            generation=0,
        )
        proxy.clear_rules()
        assert result.exitcode == 0 and result.error is None, result.error
        assert proxy.stats.drops > drops_before, "no reply was dropped: the test proved nothing"
        TALLY.runs += 1
        verify(chaos_server, work, reference, [f"drops={proxy.stats.drops - drops_before}"])


def test_stalled_reply_times_out_and_retry_is_deduplicated(
    chaos_server: RedisServer, proxy: ChaosProxy
) -> None:
    """A stall longer than the socket timeout: the client gives up and retries on a new connection while
    the first request is still queued; both reach the server, the op id makes the second a no-op."""
    work = Workload(run_id="stall", seed=2)
    client = connect(proxy.url, socket_timeout=0.5)
    direct = chaos_server.client()
    try:
        store = BatchStore.open(client, work.config())
        for s in range(2):
            materialise_if_needed(store, work, s)
        claimed = store.claim("c", LEASE, now=1.0, op_id="stall-claim")
        assert claimed is not None
        proxy.stall()
        released = threading.Timer(0.8, proxy.release)
        released.start()
        try:
            store.commit(claimed.step, "c", now=2.0, op_id="stall-commit")
        finally:
            released.cancel()
            proxy.release()
        assert proxy.stats.connections >= 2, "the client never timed out and reconnected: no retry happened"
        steps = direct.hgetall(store.keys.steps)
        assert steps.get(str(claimed.step).encode()) == b"committed"
        nxt = store.claim("c", LEASE, now=3.0, op_id="stall-claim-2")
        assert nxt is not None and nxt.step == claimed.step + 1
    finally:
        client.close()
        direct.close()


def test_rows_received_into_batch_columns_survive_cut_connections(proxy: ChaosProxy) -> None:
    """A DataLoader whose rows' tensors are received straight into the batch columns (256 KiB per row:
    pr_loader.collate.ColumnPlacer), every connection cut at random moments, mid-reply among them: each
    epoch's batches are torch's DataLoader's, bit for bit."""
    import torch
    import torch.utils.data as tud

    import pr_loader.dataloader as prl
    from tests.loader.conftest import assert_same

    rng = random.Random(chaos_seed())
    generator = torch.Generator().manual_seed(chaos_seed())
    data = [{"image": torch.randint(0, 256, (64, 4096), dtype=torch.uint8, generator=generator), "i": i}
            for i in range(24)]  # fmt: skip
    kwargs: dict[str, Any] = {"batch_size": 4, "shuffle": True}
    reference = tud.DataLoader(data, generator=torch.Generator().manual_seed(1), **kwargs)
    loader = prl.DataLoader(data, generator=torch.Generator().manual_seed(1), redis_url=proxy.url, **kwargs)
    stop = threading.Event()

    def cut_at_random() -> None:
        while not stop.wait(rng.uniform(0.002, 0.03)):
            proxy.drop_all()

    cutter = threading.Thread(target=cut_at_random, daemon=True)
    cutter.start()
    try:
        for epoch in range(chaos_iterations(2)):
            assert_same(list(reference), list(loader), f"epoch {epoch}")
    finally:
        stop.set()
        cutter.join()
        loader.close()
    assert proxy.stats.drops > 0
