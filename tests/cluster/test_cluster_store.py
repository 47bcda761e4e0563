"""BatchStore on a local 3-master Redis Cluster: every script of a shard runs in the shard's slot, and the
rank shards of a run spread over the masters."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest
from redis.cluster import RedisCluster

from pr_loader.errors import (
    LeaseLost,
    NoStepReady,
    RollbackOutOfRange,
    RowsNotInStep,
    RunConfigMismatch,
    RunNotFound,
    StepStateError,
)
from pr_loader.store import BatchStore, RunConfig
from pr_loader.store.keys import ShardKeys
from tests.cluster import LocalCluster

pytestmark = [pytest.mark.redis, pytest.mark.cluster]

B, S, E = 4, 3, 2  # rows per step, steps per epoch, epochs
LISTS = ("batch", "arrivals", "rows", "journal", "claimed")


# ---------------------------------------------------------------------------------------------- helpers
def make_config(run_id: str, **overrides: Any) -> RunConfig:
    settings: dict[str, Any] = {
        "run_id": run_id, "batch_size": B, "steps_per_epoch": S, "dataset_fingerprint": "fp",
        "num_epochs": E, "retain_steps": 2,
    }  # fmt: skip
    settings.update(overrides)
    return RunConfig(**settings)


def payload(epoch: int, index: int) -> bytes:
    return f"p{epoch}:{index}".encode()


def fill(store: BatchStore, steps: range | list[int]) -> None:
    """Materialise regular steps: step s holds dataset indices s*B .. s*B+B-1."""
    cfg = store.config
    for s in steps:
        epoch = s // cfg.steps_per_epoch
        first = s * cfg.batch_size
        rows = [(first + i, payload(epoch, first + i)) for i in range(cfg.batch_size)]
        assert store.materialise(s, rows) is True


def refs(rows: list[Any]) -> list[str]:
    return [r.ref.encode() for r in rows]


def slot_owners(client: RedisCluster) -> dict[int, str]:
    """slot -> "host:port" of its master, from CLUSTER SLOTS."""
    owners: dict[int, str] = {}
    for (first, last), info in client.cluster_slots().items():
        host, port = info["primary"][:2]
        owners.update(dict.fromkeys(range(int(first), int(last) + 1), f"{host}:{port}"))
    return owners


def server_slot(client: RedisCluster, key: str) -> int:
    """The slot of ``key`` as the server computes it (``CLUSTER KEYSLOT``)."""
    return int(client.cluster_keyslot(key))


def shard_key_names(keys: ShardKeys) -> list[str]:
    """Every kind of key a shard uses (store keys and the names other modules add under the prefix)."""
    return [
        keys.meta, keys.steps, keys.leases, keys.owners, keys.requeue, keys.dead, keys.materialised,
        keys.batch(0), keys.arrivals(17), keys.rows(123), keys.journal(5), keys.payload("1:22:3:4"),
        keys.payload("0:7:0:-"), keys.stage("a" * 32, 9), keys.op("b" * 32),
        f"{keys.prefix}plan:0:idx", f"{keys.prefix}matlock:3", f"{keys.prefix}iter_epoch:trainer",
    ]  # fmt: skip


def keys_by_node(cluster: LocalCluster, keys: ShardKeys) -> dict[str, list[str]]:
    """The shard's keys actually stored on each master (SCAN on each node's own connection)."""
    found: dict[str, list[str]] = {}
    for i, address in enumerate(cluster.addresses()):
        node = cluster.plain_client(i)
        try:
            names = sorted(k.decode() for k in node.scan_iter(match=keys.scan_pattern(), count=1000))
        finally:
            node.close()
        if names:
            found[address] = names
    return found


def dump(client: RedisCluster, store: BatchStore, from_step: int = 0, *, seqs: bool = True) -> dict[str, Any]:
    """The shard's state from ``from_step`` on, with key names relative to the shard prefix (so shards of
    two runs compare); payloads of every listed ref; dead letters by ref. ``seqs=False`` drops the journal
    sequence numbers (a shard-wide counter that a rollback does not wind back)."""
    keys = store.keys
    meta = client.hgetall(keys.meta)
    lists: dict[str, list[str]] = {}
    for raw in client.scan_iter(match=keys.scan_pattern(), count=1000):
        name = raw.decode()[len(keys.prefix) :]
        kind, _, step = name.partition(":")
        if kind in LISTS and int(step) >= from_step:
            items = [v.decode() for v in client.lrange(raw, 0, -1)]
            if kind == "journal" and not seqs:
                items = [entry.partition(" ")[2] for entry in items]
            lists[name] = items
    listed = sorted({r for name, items in lists.items() if not name.startswith("journal:") for r in items})
    payloads = client.mget([keys.payload(r) for r in listed]) if listed else []

    def step_hash(name: str) -> dict[int, str]:
        return {int(k): v.decode() for k, v in client.hgetall(name).items() if int(k) >= from_step}

    return {
        "next_step": int(meta[b"next_step"]),
        "committed_upto": int(meta[b"committed_upto"]),
        "lists": lists,
        "steps": step_hash(keys.steps),
        "materialised": step_hash(keys.materialised),
        "owners": step_hash(keys.owners),
        "leases": {int(k): v for k, v in client.zrange(keys.leases, 0, -1, withscores=True)},
        "requeue": [int(v) for v in client.zrange(keys.requeue, 0, -1)],
        "payloads": dict(zip(listed, payloads)),
        "dead": [d.ref.encode() for d in store.dead_letters()],
    }


def drive_step(store: BatchStore, consumer: str = "c") -> tuple[int, list[str]] | None:
    """Claim the next step, prefetch / postpone / dead-letter by a fixed rule, commit it.

    Returns (step, refs committed in it), or None when the run is finished.
    """
    claimed = store.claim(consumer, 100, now=0)
    if claimed is None:
        return None
    s = claimed.step
    total = store.config.total_steps
    assert total is not None
    if s % 2 == 0 and s + 1 < total:
        store.prefetch(s, consumer, 2, min(s + 2, total - 1), now=0)
    rows = store.read_rows(s)
    moves = [(r.ref, r.payload + b"+") for r in rows[1::3] if r.ref.version < 2]
    if moves:
        store.postpone(s, consumer, moves, s + 1 + s % 2, now=0)
    if s == 2:
        store.dead_letter(s, rows[0].ref, "undecodable")
    committed = refs(store.read_rows(s))
    store.commit(s, consumer, now=0)
    return s, committed


def run_ids_on_distinct_masters(client: RedisCluster, count: int) -> list[str]:
    """``count`` fresh run ids whose rank-0 shards are owned by ``count`` different masters."""
    owners = slot_owners(client)
    chosen: dict[str, str] = {}
    for _ in range(200):  # each try lands on a new master with probability >= 1/3
        run_id = f"pair-{uuid.uuid4().hex[:10]}"
        master = owners[server_slot(client, ShardKeys.for_shard(run_id, 0).meta)]
        if master not in chosen.values():
            chosen[run_id] = master
        if len(chosen) == count:
            return list(chosen)
    raise AssertionError(f"could not place {count} shards on distinct masters: {chosen}")


def per_master(cluster: LocalCluster, section: str, field: str, counter: str) -> dict[str, int]:
    """``counter`` of ``field`` in INFO ``section`` on each master (0 where the field is absent)."""
    values = {}
    for i, address in enumerate(cluster.addresses()):
        node = cluster.plain_client(i)
        try:
            stats = node.info(section)
        finally:
            node.close()
        values[address] = int(stats.get(field, {}).get(counter, 0))
    return values


def command_calls(cluster: LocalCluster, command: str) -> dict[str, int]:
    """Calls of ``command`` per master (INFO commandstats)."""
    return per_master(cluster, "commandstats", f"cmdstat_{command}", "calls")


def crossslot_errors(cluster: LocalCluster) -> dict[str, int]:
    """CROSSSLOT error replies per master since it started (INFO errorstats)."""
    return per_master(cluster, "errorstats", "errorstat_CROSSSLOT", "count")


# ------------------------------------------------------------------------------------------------ tests
def test_client_from_connect_is_a_cluster_client(cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    assert len(cluster_client.get_primaries()) == 3
    assert sorted(f"{n.host}:{n.port}" for n in cluster_client.get_primaries()) == sorted(cluster.addresses())


def test_open_reopen_and_identity(cluster_client: RedisCluster, run_id: str) -> None:
    with pytest.raises(RunNotFound):
        BatchStore.open(cluster_client, make_config(run_id), create=False)
    store = BatchStore.open(cluster_client, make_config(run_id))
    fill(store, [0])
    again = BatchStore.open(cluster_client, make_config(run_id, retain_steps=5), create=False)
    assert again.is_materialised(0) and cluster_client.hget(store.keys.meta, "retain_steps") == b"5"
    with pytest.raises(RunConfigMismatch) as info:
        BatchStore.open(cluster_client, make_config(run_id, batch_size=B + 1))
    assert (info.value.field, info.value.stored, info.value.given) == ("batch_size", B, B + 1)
    other_rank = BatchStore.open(cluster_client, make_config(run_id, world_size=2, rank=1))
    with pytest.raises(RunConfigMismatch):  # rank 0 was created with world_size 1
        BatchStore.open(cluster_client, make_config(run_id, world_size=2, rank=0))
    assert not other_rank.is_materialised(0)


def test_full_cycle_runs_every_script_on_the_shards_master(
    cluster: LocalCluster, cluster_client: RedisCluster, run_id: str
) -> None:
    keys = ShardKeys.for_shard(run_id, 0)
    owner = slot_owners(cluster_client)[server_slot(cluster_client, keys.meta)]
    evals_before = command_calls(cluster, "evalsha")
    errors_before = crossslot_errors(cluster)

    store = BatchStore.open(cluster_client, make_config(run_id, retain_steps=1))  # OPEN
    fill(store, range(S * E))  # MATERIALISE
    assert store.materialise(0, [(0, b"other")]) is False
    claimed = store.claim("a", 10, now=100)  # CLAIM
    assert claimed is not None and claimed.step == 0 and claimed.lease_expiry == 110
    assert refs(claimed.rows) == [f"0:{i}:0:-" for i in range(B)]
    assert [r.payload for r in claimed.rows] == [payload(0, i) for i in range(B)]
    assert store.renew(0, "a", 20, now=101) == 121  # RENEW

    got = store.prefetch(0, "a", 3, 2, now=101)  # PREFETCH: all of step 1's head, nearest first
    assert got.needs_materialise is None and refs(got.rows) == [f"0:{i}:0:-" for i in range(4, 7)]
    moved = store.postpone(
        0, "a", [(claimed.rows[3].ref, b"x3"), (claimed.rows[1].ref, b"x1")], 1, now=101
    )  # POSTPONE
    assert [r.encode() for r in moved] == ["0:3:1:0", "0:1:1:0"]
    with pytest.raises(RowsNotInStep):
        store.postpone(0, "a", [(claimed.rows[3].ref, b"again")], 1, now=101)
    store.dead_letter(0, claimed.rows[0].ref, "bad")  # DEAD_LETTER
    assert refs(store.read_rows(0)) == ["0:2:0:-", "0:4:0:-", "0:5:0:-", "0:6:0:-"]  # READ_ROWS
    assert refs(store.read_rows(1)) == ["0:3:1:0", "0:1:1:0", "0:7:0:-"]

    stats = store.stats()
    assert (stats.next_step, stats.committed_upto, stats.gc_floor) == (1, -1, 0)
    assert stats.upcoming[1] == (2, 1) and stats.upcoming[2] == (0, B)
    assert [(p.ref.encode(), p.target_step, p.staleness) for p in stats.postponed] == [
        ("0:3:1:0", 1, 1), ("0:1:1:0", 1, 1)]  # fmt: skip
    assert [(x.step, x.owner, x.expiry) for x in stats.in_flight] == [(0, "a", 121.0)]
    # every materialised row + 2 postponed versions - the dead letter (its payload moved into the record)
    assert stats.dead_letters == 1 and stats.payloads == S * E * B + 2 - 1
    assert [(d.ref.encode(), d.step, d.reason, d.payload) for d in store.dead_letters()] == [
        ("0:0:0:-", 0, "bad", payload(0, 0))]  # fmt: skip

    store.commit(0, "a", now=121)  # COMMIT
    with pytest.raises(StepStateError):
        store.commit(0, "a", now=121)
    step1 = store.claim("a", 10, now=200)
    assert step1 is not None and refs(step1.rows) == ["0:3:1:0", "0:1:1:0", "0:7:0:-"]
    assert [r.payload for r in step1.rows] == [b"x3", b"x1", payload(0, 7)]
    assert store.expire_leases(now=211) == [1]  # EXPIRE
    assert store.stats().requeued == [1]
    store.rollback(-1)  # ROLLBACK
    again = store.claim("a", 10, now=300)
    assert again is not None and again.step == 0
    assert refs(again.rows) == ["0:1:0:-", "0:2:0:-", "0:3:0:-"]  # the dead letter stays out

    evals_after = command_calls(cluster, "evalsha")
    for address in cluster.addresses():  # every script call went to the shard's master only
        grew = evals_after[address] > evals_before[address]
        assert grew == (address == owner), (address, owner, evals_before, evals_after)
    assert crossslot_errors(cluster) == errors_before
    nodes = keys_by_node(cluster, keys)
    assert list(nodes) == [owner]
    assert len({server_slot(cluster_client, k) for k in nodes[owner]}) == 1
    assert store.delete_run() == len(nodes[owner])  # DELETE (SCAN over every master)
    assert keys_by_node(cluster, keys) == {}
    with pytest.raises(RunNotFound):
        BatchStore.open(cluster_client, make_config(run_id), create=False)


def test_lease_expiry_by_now_parameter(cluster_client: RedisCluster, run_id: str) -> None:
    store = BatchStore.open(cluster_client, make_config(run_id, num_epochs=1))
    fill(store, range(S))
    first = store.claim("a", 10, now=1000)
    second = store.claim("b", 10, now=1005)
    assert first is not None and second is not None and (first.step, second.step) == (0, 1)
    store.prefetch(1, "b", 2, 2, now=1005)  # b takes the head of step 2
    assert store.expire_leases(now=1010) == []  # valid while now <= expiry
    assert store.expire_leases(now=1010.5) == [0]
    with pytest.raises((LeaseLost, StepStateError)):  # the step was given back
        store.commit(0, "a", now=1010.5)
    with pytest.raises((LeaseLost, StepStateError)):  # (the code says StepStateError: not in flight)
        store.renew(0, "a", 10, now=1010.5)
    retaken = store.claim("c", 10, now=1011)  # the requeued step comes first, with the same rows
    assert retaken is not None and retaken.step == 0 and refs(retaken.rows) == refs(first.rows)
    store.commit(0, "c", now=1011)
    # b's lease lapses while it holds prefetched rows of step 2: they go back to the head of step 2
    third = store.claim("d", 10, now=1012)
    assert third is not None and third.step == 2 and refs(third.rows) == ["0:10:0:-", "0:11:0:-"]
    with pytest.raises(NoStepReady):
        store.claim("e", 10, now=1013)
    assert store.expire_leases(now=1016) == [1]
    store.commit(2, "d", now=1016)
    assert store.stats().requeued == [1]
    final = store.claim("e", 10, now=1017)
    # step 2 was claimed meanwhile, so the rows b prefetched from it stay with step 1
    assert final is not None and final.step == 1
    assert refs(final.rows) == [*refs(second.rows), "0:8:0:-", "0:9:0:-"]
    store.commit(1, "e", now=1017)
    assert store.claim("e", 10, now=1018) is None
    assert store.stats().committed_upto == 2


def test_op_id_replay_changes_nothing(cluster_client: RedisCluster, run_id: str) -> None:
    store = BatchStore.open(cluster_client, make_config(run_id))
    fill(store, range(S))
    a = store.claim("a", 10, now=0, op_id="claim-a")
    replay = store.claim("a", 10, now=0, op_id="claim-a")
    assert a is not None and replay is not None and replay.step == a.step == 0
    assert refs(replay.rows) == refs(a.rows) and store.stats().next_step == 1

    got = store.prefetch(0, "a", 1, 2, now=0, op_id="pf")
    got_again = store.prefetch(0, "a", 1, 2, now=0, op_id="pf")
    assert refs(got.rows) == refs(got_again.rows) == ["0:4:0:-"]
    assert cluster_client.llen(store.keys.batch(1)) == B - 1

    move = [(a.rows[2].ref, b"moved")]
    first_reply = store.postpone(0, "a", move, 2, now=0, op_id="pp")
    assert store.postpone(0, "a", move, 2, now=0, op_id="pp") == first_reply
    assert cluster_client.lrange(store.keys.arrivals(2), 0, -1) == [b"0:2:1:0"]

    store.dead_letter(0, a.rows[1].ref, "bad", op_id="dl")
    store.dead_letter(0, a.rows[1].ref, "bad", op_id="dl")
    assert len(store.dead_letters()) == 1

    store.commit(0, "a", now=0, op_id="cm")
    store.commit(0, "a", now=0, op_id="cm")  # the stored result, not StepStateError
    with pytest.raises(StepStateError):
        store.commit(0, "a", now=0, op_id="cm-other")

    store.rollback(-1, op_id="rb")
    b = store.claim("b", 10, now=0)
    assert b is not None and b.step == 0
    store.rollback(-1, op_id="rb")  # a replayed rollback must not undo b's later claim
    assert [x.step for x in store.stats().in_flight] == [0]
    with pytest.raises(LeaseLost):  # a's claim is no longer held: its replay says so
        store.claim("a", 10, now=0, op_id="claim-a")


def test_rollback_equals_an_uninterrupted_run_on_another_master(
    cluster_client: RedisCluster,
) -> None:
    """Run A goes straight through; run B (another master) runs to the end, rolls back to every retained
    step and must then hold exactly A's state at that step, and replay A's steps from there."""
    run_a, run_b = run_ids_on_distinct_masters(cluster_client, 2)
    settings: dict[str, Any] = {"steps_per_epoch": 4, "num_epochs": 2, "retain_steps": 3}
    a = BatchStore.open(cluster_client, make_config(run_a, **settings))
    b = BatchStore.open(cluster_client, make_config(run_b, **settings))
    fill(a, range(8))
    fill(b, range(8))
    snapshots = {-1: dump(cluster_client, a)}
    trace_a = []
    for _ in range(40):
        done = drive_step(a)
        if done is None:
            break
        trace_a.append(done)
        snapshots[done[0]] = dump(cluster_client, a)
    assert trace_a[-1][0] >= 8, "drain steps took part"
    trace_b = [t for t in (drive_step(b) for _ in range(len(trace_a) + 1)) if t is not None]
    assert trace_b == trace_a
    floor = b.stats().gc_floor
    assert floor - 1 > 2, "the dead letter of step 2 is outside the rollback window"
    with pytest.raises(RollbackOutOfRange, match="allowed"):
        b.rollback(floor - 2)
    targets = sorted((k for k in snapshots if k >= floor - 1), reverse=True)
    assert len(targets) >= 3
    for k in targets:
        b.rollback(k)
        assert dump(cluster_client, b, floor) == dump_restricted(snapshots[k], floor), k
    replay = [t for t in (drive_step(b) for _ in range(len(trace_a) + 1)) if t is not None]
    assert replay == [t for t in trace_a if t[0] > targets[-1]]
    final_a = dump(cluster_client, a, floor, seqs=False)
    assert dump(cluster_client, b, floor, seqs=False) == final_a
    a.delete_run()
    b.delete_run()


def dump_restricted(state: dict[str, Any], from_step: int) -> dict[str, Any]:
    """A :func:`dump` (taken from step 0) as if taken from ``from_step``."""
    lists = {k: v for k, v in state["lists"].items() if int(k.partition(":")[2]) >= from_step}
    listed = {r for k, v in lists.items() if not k.startswith("journal:") for r in v}
    out = dict(state)
    out["lists"] = lists
    for name in ("steps", "materialised", "owners"):
        out[name] = {s: v for s, v in state[name].items() if s >= from_step}
    out["payloads"] = {r: p for r, p in state["payloads"].items() if r in listed}
    return out


def test_rank_shards_spread_over_the_masters(cluster: LocalCluster, cluster_client: RedisCluster) -> None:
    world_size = 8
    owners = slot_owners(cluster_client)
    assert set(owners.values()) == set(cluster.addresses()) and len(owners) == 16384
    run_id = "spread-w8"  # fixed: slot layout and hashing are deterministic, so is the placement
    for rank in range(world_size):
        BatchStore.open(cluster_client, make_config(run_id, world_size=world_size, rank=rank)).delete_run()
    placement: dict[int, str] = {}
    for rank in range(world_size):
        keys = ShardKeys.for_shard(run_id, rank)
        slots = {server_slot(cluster_client, name) for name in shard_key_names(keys)}
        assert len(slots) == 1, f"rank {rank}: keys of one shard in slots {slots}"
        (slot,) = slots
        assert slot == cluster_client.keyslot(keys.meta)  # the client routes where the server hashes
        placement[rank] = owners[slot]
        store = BatchStore.open(cluster_client, make_config(run_id, world_size=world_size, rank=rank))
        fill(store, range(2))
        claimed = store.claim("c", 10, now=0)
        assert claimed is not None and claimed.step == 0
        store.postpone(0, "c", [(claimed.rows[0].ref, b"later")], 1, now=0)
        store.commit(0, "c", now=0)
        assert list(keys_by_node(cluster, keys)) == [owners[slot]]  # the data really lives there
    slots_of_ranks = [
        server_slot(cluster_client, ShardKeys.for_shard(run_id, r).meta) for r in range(world_size)
    ]
    assert len(set(slots_of_ranks)) == world_size, "two ranks of a run share a slot"
    spread = Counter(placement.values())
    print(f"\nrun {run_id}: shards per master {dict(spread)}; rank -> slot {slots_of_ranks}")
    assert len(spread) >= 2, f"every rank shard of {run_id} is on one master: {placement}"
    for rank in range(world_size):
        BatchStore.open(cluster_client, make_config(run_id, world_size=world_size, rank=rank)).delete_run()


def test_rank_shards_spread_over_the_masters_across_many_runs(cluster_client: RedisCluster) -> None:
    """Over many run ids every master owns a fair share of rank shards, and every run of 4 or 8 ranks uses
    all three masters.

    The hash tag ``{<run_id>:<rank>}`` includes the rank, so ranks of a run never share a slot (a run-wide
    tag would put a whole run on one master). CRC16 is linear, so for one run the slots of ranks 1..3 are
    the slot of rank 0 XOR 4129, 8258, 12387 (a quarter of the slot space apart: spread over the masters),
    and rank r + 4 is always rank r's slot XOR 132 (next to it: the same master, barring a boundary).
    """
    owners = slot_owners(cluster_client)
    runs = 60
    for world_size in (4, 8):
        per_master: Counter[str] = Counter()
        masters_per_run: Counter[int] = Counter()
        for n in range(runs):
            run_id = f"job-{n}"
            slots = [
                server_slot(cluster_client, ShardKeys.for_shard(run_id, r).meta) for r in range(world_size)
            ]
            assert len(set(slots)) == world_size
            assert [slots[0] ^ s for s in slots[:4]] == [0, 4129, 8258, 12387]
            placed = [owners[s] for s in slots]
            per_master.update(placed)
            masters_per_run[len(set(placed))] += 1
        print(
            f"\n{runs} runs x {world_size} ranks: shards per master {dict(per_master)}; "
            f"runs by number of masters used {dict(sorted(masters_per_run.items()))}"
        )
        total = runs * world_size
        assert len(per_master) == 3 and all(0.25 * total < c < 0.42 * total for c in per_master.values())
        assert masters_per_run == {3: runs}


def test_delete_run_removes_one_shard_only(
    cluster: LocalCluster, cluster_client: RedisCluster, run_id: str
) -> None:
    stores = [BatchStore.open(cluster_client, make_config(run_id, world_size=3, rank=r)) for r in range(3)]
    for store in stores:
        fill(store, range(2))
    before = {r: keys_by_node(cluster, s.keys) for r, s in enumerate(stores)}
    assert all(len(nodes) == 1 for nodes in before.values())
    removed = stores[1].delete_run()
    assert removed == len(next(iter(before[1].values()))) and removed >= 2 * B + 3
    assert keys_by_node(cluster, stores[1].keys) == {}
    assert keys_by_node(cluster, stores[0].keys) == before[0]
    assert keys_by_node(cluster, stores[2].keys) == before[2]
    assert stores[1].delete_run() == 0
    for store in (stores[0], stores[2]):
        assert store.delete_run() > 0


def test_stage_keys_and_op_keys_share_the_slot(cluster_client: RedisCluster) -> None:
    """Names a caller chooses (op ids, refs) cannot move a key out of its shard's slot."""
    keys = ShardKeys.for_shard("r", 3)
    slot = server_slot(cluster_client, keys.meta)
    odd = ["}", "{x}", "{", "a}b{c", "{}"]
    names = [keys.op(o) for o in odd] + [keys.stage(o, 0) for o in odd] + [keys.payload(o) for o in odd]
    assert {server_slot(cluster_client, n) for n in names} == {slot}
