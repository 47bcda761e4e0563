"""A competing consumer that stalls past its lease: its late calls are refused with LeaseLost, never applied.

Time is the ``now`` parameter (no sleeps): consumer A claims with a short lease, B arrives after the
expiry and takes the step over. A's late commit / postpone / prefetch / renew -- sent with a clock past
its lease, or with a clock inside it but delivered late through a stalled proxy -- must change nothing in
Redis and be refused with LeaseLost.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from pr_loader.errors import LeaseLost
from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from tests.chaos.helpers import TALLY, check_exactly_once, diff_snapshots, expected_keys, snapshot
from tests.chaos.proxy import ChaosProxy
from tests.chaos.workload import Workload, committed_keys, committed_trace, materialise_if_needed
from tests.servers import RedisServer
from tests.store.helpers import interleave_pipelined

pytestmark = [pytest.mark.redis, pytest.mark.slow]

SHORT = 10.0


def _finish(store: BatchStore, work: Workload, consumer: str, now: float) -> None:
    for _ in range(4 * work.total_steps):
        for s in range(work.total_steps):
            materialise_if_needed(store, work, s)
        claimed = store.claim(consumer, 1000.0, now=now)
        if claimed is None:
            return
        store.commit(claimed.step, consumer, now=now)
        now += 1.0
    raise AssertionError("run did not finish")


def _check_run(store: BatchStore, work: Workload) -> None:
    trace = committed_trace(store, work.total_steps)
    report = check_exactly_once(
        committed_keys(trace), expected_keys(work.dataset_size, range(work.num_epochs))
    )
    assert report.ok, report.describe()


def _late_calls(store: BatchStore, step: int, rows: list[Any], now: float) -> list[str]:
    """Every mutating call of the stale consumer "A"; returns the calls NOT refused with LeaseLost."""
    accepted = []
    calls = {
        "postpone": lambda: store.postpone(
            step, "A", [(rows[0].ref, rows[0].payload + b"|late")], step + 1, now=now
        ),
        "prefetch": lambda: store.prefetch(step, "A", 1, step + 1, now=now),
        "renew": lambda: store.renew(step, "A", SHORT, now=now),
        "commit": lambda: store.commit(step, "A", now=now),
    }
    for name, call in calls.items():
        try:
            call()
            accepted.append(f"{name}: accepted")
        except LeaseLost:
            continue
        except Exception as exc:
            accepted.append(f"{name}: {type(exc).__name__}: {exc}")
    return accepted


@pytest.mark.parametrize(
    "phase", ["expired-unclaimed", "expired-requeued", "taken-over", "taken-over-and-committed"]
)
def test_late_calls_after_lease_expiry_are_refused(chaos_server: RedisServer, phase: str) -> None:
    work = Workload(run_id=f"lease-{phase}", seed=4)
    client = connect(chaos_server.url)
    try:
        store = BatchStore.open(client, work.config())
        for s in range(3):
            materialise_if_needed(store, work, s)
        claimed = store.claim("A", SHORT, now=0.0)
        assert claimed is not None and claimed.step == 0
        rows = list(claimed.rows)
        store.postpone(0, "A", [(rows[-1].ref, rows[-1].payload + b"|a")], 1, now=1.0)
        late_now = 50.0  # past A's lease (expiry 10)
        if phase == "expired-requeued":
            assert store.expire_leases(now=40.0) == [0]  # the store took the step back; nobody claimed it
        elif phase != "expired-unclaimed":
            taken = store.claim("B", 1000.0, now=40.0)
            assert taken is not None and taken.step == 0, "B must get the expired step back first"
            TALLY.lease_steals += 1
            # the expired step comes back whole: A's postpone was undone (its target was never claimed)
            assert sorted(r.ref.key() for r in taken.rows) == sorted(r.ref.key() for r in rows)
            if phase == "taken-over-and-committed":
                store.commit(0, "B", now=41.0)
        before = snapshot(client)
        not_refused = _late_calls(store, 0, rows, late_now)
        assert diff_snapshots(before, snapshot(client)) == [], "a refused late call changed Redis"
        assert not_refused == [], (
            f"late calls of a consumer whose lease expired were not LeaseLost: {not_refused}"
        )
        if phase == "taken-over":
            store.commit(0, "B", now=60.0)
        _finish(store, work, "B", 100.0)
        _check_run(store, work)
        TALLY.runs += 1
    finally:
        client.close()


def test_late_commit_delivered_through_stalled_proxy(chaos_server: RedisServer, proxy: ChaosProxy) -> None:
    """A's commit carries a clock inside its lease but reaches Redis after B took the step over and
    committed it: the owner check must refuse it."""
    work = Workload(run_id="lease-stall", seed=6)
    slow = connect(proxy.url, socket_timeout=30.0)
    fast = connect(chaos_server.url)
    try:
        store_a = BatchStore.open(slow, work.config())
        store_b = BatchStore.open(fast, work.config())
        for s in range(2):
            materialise_if_needed(store_b, work, s)
        claimed = store_a.claim("A", SHORT, now=0.0)
        assert claimed is not None and claimed.step == 0
        outcome: list[BaseException | None] = []
        proxy.stall()

        def late_commit() -> None:
            try:
                store_a.commit(0, "A", now=5.0)  # 5 < expiry 10: only the owner check can refuse it
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        thread = threading.Thread(target=late_commit)
        thread.start()
        try:
            taken = store_b.claim("B", 1000.0, now=40.0)
            assert taken is not None and taken.step == 0
            TALLY.lease_steals += 1
            store_b.commit(0, "B", now=41.0)
            before = snapshot(fast)
        finally:
            proxy.release()
            thread.join(30)
        assert outcome, "A's commit never returned"
        assert isinstance(outcome[0], LeaseLost), (
            f"late commit was not refused with LeaseLost: {outcome[0]!r}"
        )
        assert diff_snapshots(before, snapshot(fast)) == []
        _finish(store_b, work, "B", 100.0)
        _check_run(store_b, work)
        TALLY.runs += 1
    finally:
        slow.close()
        fast.close()


def test_expired_lease_with_claimed_postpone_target(chaos_server: RedisServer, tmp_path: Path) -> None:
    """A postponed row whose target step was claimed by another consumer stays there when A's lease
    expires (undo "as far as is safe"): the row is still delivered exactly once."""
    work = Workload(run_id="lease-target", seed=8)
    client = connect(chaos_server.url)
    try:
        store = BatchStore.open(client, work.config())
        for s in range(4):
            materialise_if_needed(store, work, s)
        a = store.claim("A", SHORT, now=0.0)
        assert a is not None and a.step == 0
        store.postpone(0, "A", [(a.rows[0].ref, a.rows[0].payload + b"|a")], 1, now=1.0)
        b = store.claim("B", 1000.0, now=2.0)
        assert b is not None and b.step == 1
        assert a.rows[0].ref.key() in [r.ref.key() for r in b.rows]
        store.commit(1, "B", now=3.0)
        c = store.claim("B", 1000.0, now=40.0)  # A's lease expired: step 0 comes back without the row
        assert c is not None and c.step == 0
        TALLY.lease_steals += 1
        assert a.rows[0].ref.key() not in [r.ref.key() for r in c.rows]
        assert _late_calls(store, 0, list(a.rows[1:]), 41.0) == []
        store.commit(0, "B", now=42.0)
        _finish(store, work, "B", 100.0)
        _check_run(store, work)
        TALLY.runs += 1
    finally:
        client.close()


@pytest.mark.parametrize("read", ["sort", "mget"])
def test_claim_racing_a_lease_steal_does_not_fail_with_missing_payload(
    chaos_server: RedisServer, read: str
) -> None:
    """Found by test_competing_consumers_with_kills (about one run in 50): consumer C's claim script returns
    step 1's refs; before C reads their payloads, B's claim expires C's lease and A's, which undoes A's
    postpone into step 1 and deletes that payload version. C's claim must then report the lost lease
    (LeaseLost) or return complete rows -- not a bare StoreError("payload ... is gone"). ``read``: the
    payloads come from the SORT pipelined behind the script, or from the MGET fallback after it."""
    work = Workload(run_id=f"lease-claim-race-{read}", seed=9)
    client_a, client_b, client_c = (connect(chaos_server.url) for _ in range(3))
    try:
        store_a = BatchStore.open(client_a, work.config())
        store_b = BatchStore.open(client_b, work.config())
        store_c = BatchStore.open(client_c, work.config())
        for s in range(3):
            materialise_if_needed(store_a, work, s)
        a = store_a.claim("A", 100.0, now=10.0)  # expiry 110
        assert a is not None and a.step == 0
        store_a.postpone(0, "A", [(a.rows[0].ref, a.rows[0].payload + b"|a")], 1, now=11.0)
        stolen: list[object] = []

        def steal() -> None:  # B arrives between C's claim script and C's payload read
            if not stolen:
                stolen.append(store_b.claim("B", 100.0, now=1000.0))

        original_mget = client_c.mget

        def mget_after_a_steal(*args: Any, **kwargs: Any) -> Any:
            steal()
            return original_mget(*args, **kwargs)

        patches = pytest.MonkeyPatch()
        if read == "sort":  # (the pipelined read of small replies, TLS or RESP3: in the one-transaction read
            # of big replies the script and the SORT are one transaction, which nothing can come in between)
            store_c._sized_reads = False
            interleave_pipelined(patches, client_c, steal)
        else:
            store_c._payload_pattern = None  # the fallback of a cluster or a confined ACL user
            client_c.mget = mget_after_a_steal  # type: ignore[method-assign]
        try:
            c = store_c.claim("C", 95.0, now=10.0)  # step 1, expiry 105: expires before A's step 0
        except LeaseLost:
            c = None
        except Exception as exc:
            raise AssertionError(f"claim racing a steal failed with {type(exc).__name__}: {exc}") from exc
        finally:
            patches.undo()
            client_c.mget = original_mget  # type: ignore[method-assign]
        assert stolen, "the steal never ran between the claim script and the payload read"
        if c is not None:
            assert all(r.payload for r in c.rows)
            with pytest.raises(LeaseLost):
                store_c.commit(c.step, "C", now=11.0)
        TALLY.lease_steals += 1
    finally:
        for client in (client_a, client_b, client_c):
            client.close()
