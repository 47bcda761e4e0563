"""BatchStore contract suite; every test runs on fakeredis and on a real redis-server."""

from __future__ import annotations

from collections.abc import Callable

import msgpack
import pytest
import redis

from pr_loader.errors import (
    ConfigError,
    LeaseLost,
    NeedsMaterialisation,
    NoStepReady,
    RowsNotInStep,
    RunConfigMismatch,
    RunNotFound,
    StepStateError,
    StoreError,
    UnsupportedSchema,
)
from pr_loader.store import BatchStore, RowRef, wire
from tests.store.conftest import fill, make_config
from tests.store.helpers import InterleavedPipeline, dump, interleave_pipelined

NewStore = Callable[..., BatchStore]


def refs(rows: list) -> list[str]:  # type: ignore[type-arg]
    return [r.ref.encode() for r in rows]


# -- open / meta ----------------------------------------------------------------------------------


def test_open_creates_and_reopens(client: redis.Redis) -> None:
    cfg = make_config()
    BatchStore.open(client, cfg)
    again = BatchStore.open(client, cfg, create=False)
    assert again.config == cfg
    meta = client.hgetall(again.keys.meta)
    assert meta[b"schema"] == b"2" and meta[b"next_step"] == b"0" and meta[b"num_epochs"] == b"2"


@pytest.mark.parametrize(
    ("field", "value"),
    [("dataset_fingerprint", "other"), ("batch_size", 5), ("steps_per_epoch", 4), ("seed", 1),
     ("policy", "PostponeToNext"), ("world_size", 2), ("num_epochs", None), ("num_epochs", 3)],
)
def test_reopen_with_other_settings_is_a_mismatch(client: redis.Redis, field: str, value: object) -> None:
    cfg = make_config()
    BatchStore.open(client, cfg)
    other = make_config(run_id=cfg.run_id, **{field: value})
    with pytest.raises(RunConfigMismatch) as info:
        BatchStore.open(client, other)
    assert info.value.field == field
    assert info.value.stored == getattr(cfg, field)
    assert info.value.given == value


def test_retain_steps_is_updatable(client: redis.Redis) -> None:
    cfg = make_config(retain_steps=2)
    BatchStore.open(client, cfg)
    store = BatchStore.open(client, make_config(run_id=cfg.run_id, retain_steps=5))
    assert client.hget(store.keys.meta, "retain_steps") == b"5"


def test_missing_run_and_unsupported_schema(client: redis.Redis) -> None:
    with pytest.raises(RunNotFound, match="not found"):
        BatchStore.open(client, make_config(), create=False)
    cfg = make_config()
    store = BatchStore.open(client, cfg)
    client.hset(store.keys.meta, "schema", "99")
    with pytest.raises(UnsupportedSchema, match="99"):
        BatchStore.open(client, cfg)
    client.hset(store.keys.meta, "schema", "1")  # (a run of an older pr_loader: its journal reads otherwise)
    with pytest.raises(UnsupportedSchema, match="'1'; this pr_loader reads schema '2'"):
        BatchStore.open(client, cfg)


def test_bad_settings_are_config_errors(client: redis.Redis) -> None:
    with pytest.raises(ConfigError):
        make_config(batch_size=0)
    with pytest.raises(ConfigError):
        make_config(rank=2, world_size=2)
    with pytest.raises(ConfigError):
        BatchStore.open(client, make_config(run_id="a{b}"))
    with pytest.raises(ConfigError):
        BatchStore.open(fakeredis_decoding(), make_config())


def fakeredis_decoding() -> redis.Redis:
    import fakeredis

    return fakeredis.FakeRedis(decode_responses=True)


def test_ranks_are_separate_shards(client: redis.Redis) -> None:
    a = BatchStore.open(client, make_config(run_id="shared", world_size=2, rank=0))
    b = BatchStore.open(client, make_config(run_id="shared", world_size=2, rank=1))
    assert a.keys.prefix == "prl:{shared:0}:" and b.keys.prefix == "prl:{shared:1}:"
    fill(a, [0])
    assert a.is_materialised(0) and not b.is_materialised(0)


# -- materialise / claim / commit -----------------------------------------------------------------


def test_materialise_is_idempotent(new_store: NewStore, client: redis.Redis) -> None:
    store = new_store()
    assert store.materialise(0, [(3, b"a"), (1, b"b")])
    assert not store.materialise(0, [(7, b"x")])
    assert [r.ref.encode() for r in store.read_rows(0)] == ["0:3:0:-", "0:1:0:-"]
    assert store.is_materialised(0) and not store.is_materialised(1)
    assert store.materialise(3, [(0, b"e1")])  # step 3 is epoch 1
    assert store.read_rows(3)[0].ref == RowRef(1, 0, 0, None)
    with pytest.raises(ConfigError, match="drain"):
        store.materialise(6, [(0, b"x")])
    with pytest.raises(ConfigError, match="repeated"):
        store.materialise(1, [(0, b"x"), (0, b"y")])


def test_claim_in_step_order_with_payloads(store: BatchStore) -> None:
    seen = []
    for _ in range(6):
        claimed = store.claim("c", 10, now=0)
        assert claimed is not None and claimed.lease_expiry == 10
        seen.append(claimed.step)
        assert [r.payload for r in claimed.rows] == [f"p{claimed.step // 3}:{claimed.step * 4 + i}".encode()
                                                     for i in range(4)]
    assert seen == list(range(6))
    with pytest.raises(NoStepReady) as info:
        store.claim("c", 10, now=1)
    assert info.value.retry_at == 10
    for s in range(6):
        store.commit(s, "c", now=1)
    assert store.claim("c", 10, now=1) is None


def test_claim_reads_only_the_payloads_it_is_not_given(store: BatchStore) -> None:
    """``known`` payloads (read before the claim: payloads are immutable) are taken as given, by ref; the
    claim reads the others, here the row postponed into the step after its rows were read ahead."""
    ahead = store.read_rows(1)
    first = store.claim("c", 10, now=0)
    assert first is not None and first.step == 0
    [moved] = store.postpone(0, "c", [(first.rows[0].ref, b"partial")], 1, now=0)
    known = {row.ref_text: b"given " + row.payload for row in ahead}
    known["9:99:0:-"] = b"not in the step"  # (ignored)
    second = store.claim("c", 10, now=0, known=known)
    assert second is not None and second.step == 1
    assert [r.ref_text for r in second.rows] == [moved.encode(), *(row.ref_text for row in ahead)]
    assert [r.payload for r in second.rows] == [b"partial", *(b"given " + row.payload for row in ahead)]


def test_read_rows_reads_only_the_payloads_it_is_not_given(store: BatchStore) -> None:
    """``read_rows(known=...)`` (a loader reading a step ahead again after a postpone) takes known payloads
    as given, by ref, and reads the others: here only the row postponed in since."""
    ahead = store.read_rows(1)
    first = store.claim("c", 10, now=0)
    assert first is not None and first.step == 0
    [moved] = store.postpone(0, "c", [(first.rows[0].ref, b"partial")], 1, now=0)
    known = {row.ref_text: b"given " + row.payload for row in ahead}
    again = store.read_rows(1, known=known)
    assert [r.ref_text for r in again] == [moved.encode(), *(row.ref_text for row in ahead)]
    assert [r.payload for r in again] == [b"partial", *(b"given " + row.payload for row in ahead)]


def test_a_rows_ref_is_parsed_when_used(store: BatchStore, client: redis.Redis) -> None:
    """Refs are parsed lazily (a collating loader never needs them): a damaged ref in Redis still delivers
    its payload, and raises StoreError only where the ref is used."""
    fill(store, [0])
    client.lset(store.keys.batch(0), 1, "not-a-ref")
    client.set(store.keys.payload("not-a-ref"), b"kept")
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    good, damaged = claimed.rows[:2]
    assert good.ref_text == "0:0:0:-" and good.ref == RowRef(0, 0) and good.ref is good.ref
    assert damaged.ref_text == "not-a-ref" and damaged.payload == b"kept"
    with pytest.raises(StoreError, match="malformed row ref 'not-a-ref'"):
        _ = damaged.ref


def test_a_payload_gone_while_the_step_is_held_is_an_error(store: BatchStore, client: redis.Redis) -> None:
    fill(store, [0])
    client.delete(store.keys.payload("0:2:0:-"))  # (only a bug or a hand in Redis could do this)
    with pytest.raises(StoreError, match=r"payload of row .0:2:0:-. .* is gone"):
        store.claim("c", 10, now=0)


def test_claim_needs_materialisation(new_store: NewStore) -> None:
    store = new_store()
    with pytest.raises(NeedsMaterialisation) as info:
        store.claim("c", 10, now=0)
    assert info.value.step == 0
    fill(store, [0])
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None and claimed.step == 0


def test_endless_run_never_finishes(new_store: NewStore) -> None:
    store = new_store(num_epochs=None)
    fill(store, range(4))
    for s in range(4):
        claimed = store.claim("c", 10, now=0)
        assert claimed is not None and claimed.step == s
        store.commit(s, "c", now=0)
    with pytest.raises(NeedsMaterialisation):
        store.claim("c", 10, now=0)


def test_commit_refusals(store: BatchStore) -> None:
    with pytest.raises(StepStateError, match="not in flight"):
        store.commit(0, "c", now=0)
    store.claim("c", 10, now=0)
    with pytest.raises(LeaseLost, match="leased to c"):
        store.commit(0, "other", now=0)
    with pytest.raises(LeaseLost, match="expired"):
        store.commit(0, "c", now=10.5)
    store.commit(0, "c", now=10, op_id="op1")
    store.commit(0, "c", now=99, op_id="op1")  # replay of the same op: the stored result
    with pytest.raises(StepStateError, match="already committed"):
        store.commit(0, "c", now=0, op_id="op2")
    with pytest.raises(LeaseLost, match="committed by c"):  # a late consumer learns it lost the step
        store.commit(0, "late", now=0)


def test_renew_extends_the_lease(store: BatchStore) -> None:
    store.claim("c", 10, now=0)
    assert store.renew(0, "c", 10, now=8) == 18
    assert store.expire_leases(now=15) == []
    store.commit(0, "c", now=17)
    store.claim("c", 10, now=20)
    with pytest.raises(LeaseLost):
        store.renew(1, "d", 10, now=21)
    with pytest.raises(LeaseLost, match="expired"):
        store.renew(1, "c", 10, now=31)


def test_lease_expiry_returns_rows_to_the_next_claim(store: BatchStore, client: redis.Redis) -> None:
    before = dump(client, store)
    first = store.claim("a", 10, now=0)
    assert first is not None
    store.prefetch(0, "a", 2, 2, now=1)
    store.postpone(0, "a", [(first.rows[0].ref, b"partial")], 1, now=2)
    assert store.expire_leases(now=10) == []  # expiry == now is still valid
    assert store.expire_leases(now=10.01) == [0]
    after = dump(client, store)
    assert after["lists"] == {k: v for k, v in before["lists"].items()}
    assert after["requeue"] == [0] and after["leases"] == {} and after["steps"] == {}
    with pytest.raises(LeaseLost, match="returned for a new claim"):
        store.renew(0, "a", 10, now=10.02)
    again = store.claim("b", 10, now=11)
    assert again is not None and again.step == 0 and refs(again.rows) == refs(first.rows)
    with pytest.raises(LeaseLost):
        store.commit(0, "a", now=11)
    store.commit(0, "b", now=12)
    nxt = store.claim("b", 10, now=12)
    assert nxt is not None and nxt.step == 1


def test_expiry_keeps_rows_that_moved_to_a_claimed_step(store: BatchStore) -> None:
    first = store.claim("a", 10, now=0)
    assert first is not None
    pf = store.prefetch(0, "a", 1, 2, now=0)
    store.postpone(0, "a", [(first.rows[0].ref, b"partial")], 1, now=0)
    second = store.claim("b", 100, now=1)  # step 1 gets the postponed row
    assert second is not None and second.step == 1
    assert second.rows[0].ref == RowRef(0, 0, 1, 0) and second.rows[0].payload == b"partial"
    third = store.claim("b", 100, now=1)
    assert third is not None and third.step == 2
    store.prefetch(2, "b", 0, 3, now=1)
    # step 0 expires: the postponed row stays in step 1, the prefetched row returns to step 1's batch? no:
    # step 1 is claimed, so the prefetched row stays with step 0.
    assert store.expire_leases(now=20) == [0]
    again = store.claim("c", 10, now=20)
    assert again is not None and again.step == 0
    assert refs(again.rows) == refs(first.rows)[1:] + refs(pf.rows)


@pytest.mark.parametrize("read", ["pipeline", "mget"])
def test_claim_that_loses_its_lease_while_reading_payloads_says_so(
    store: BatchStore, client: redis.Redis, monkeypatch: pytest.MonkeyPatch, read: str
) -> None:
    a = store.claim("A", 100, now=10)
    assert a is not None
    store.postpone(0, "A", [(a.rows[0].ref, b"x")], 1, now=11)
    other = BatchStore.open(client, store.config)

    def steal() -> None:
        # between C's claim script and its payload read, B expires C (step 1) and then A, whose undone
        # postpone deletes the payload of the row C got in step 1
        monkeypatch.undo()
        other.claim("B", 100, now=1000)

    if read == "pipeline":  # the payloads are read by a SORT pipelined behind the script (small replies, TLS,
        # RESP3; big replies on a plain socket run script and SORT in one transaction: nothing comes between)
        store._sized_reads = False
        interleave_pipelined(monkeypatch, client, steal)
    else:  # the MGET fallback (a cluster, or an ACL user the server refuses SORT ... GET)
        store._payload_pattern = None
        original = client.mget

        def mget_after_steal(*args: object, **kwargs: object) -> object:
            steal()
            return original(*args, **kwargs)

        monkeypatch.setattr(client, "mget", mget_after_steal)
    with pytest.raises(LeaseLost, match="while its rows were read"):
        store.claim("C", 95, now=10)


def test_claim_and_prefetch_read_payloads_in_their_round_trip(store: BatchStore, client: redis.Redis) -> None:
    """The script hands its refs over to a SORT ... GET pipelined behind it; nothing is left behind."""
    fill(store, [0, 1])
    if not _is_fake(client):
        client.config_resetstat()
    claimed = store.claim("A", 100, now=10)
    assert claimed is not None
    fetched = store.prefetch(0, "A", 2, 1, now=11)
    assert [r.payload for r in claimed.rows] == [b"p0:0", b"p0:1", b"p0:2", b"p0:3"]
    assert [r.payload for r in fetched.rows] == [b"p0:4", b"p0:5"]
    assert client.keys(store.keys.prefix + "xfer:*") == []
    if not _is_fake(client):
        calls = client.info("commandstats")
        # (a script the server has not seen yet meets NOSCRIPT and its pipeline runs again: 2 SORTs more)
        assert calls["cmdstat_sort"]["calls"] >= 2 and "cmdstat_mget" not in calls


@pytest.mark.parametrize(
    ("error", "keeps_sort"),
    [(redis.ResponseError("BUSY Redis is busy running a script"), True),
     (redis.exceptions.NoPermissionError("this user has no permissions to run the 'sort' command"), False),
     (redis.ResponseError("GET option of SORT denied due to insufficient ACL permissions."), False)],
)
def test_a_failed_sort_falls_back_to_mget(
    store: BatchStore,
    client: redis.Redis,
    monkeypatch: pytest.MonkeyPatch,
    error: Exception,
    keeps_sort: bool,
) -> None:
    """A refusal (ACL) switches the store to MGET for good; any other SORT failure only for that call."""
    fill(store, [0])

    def fail(*_: object, **__: object) -> object:
        raise error

    store._sized_reads = False  # (the pipelined SORT; tests/test_acl.py has the transaction's refusals)
    real = wire._pipeline

    def sort_refused(commands: list[tuple[object, ...]], sock: object) -> list[object]:  # (a plain socket)
        if commands[1:2] and commands[1][0] == "SORT":  # (script calls alone, the replay among them, pass)
            script_reply, _, deleted = real(commands, sock)
            return [script_reply, error, deleted]
        return real(commands, sock)

    monkeypatch.setattr(wire, "_pipeline", sort_refused)
    monkeypatch.setattr(client, "pipeline", lambda **_: InterleavedPipeline(client, lambda: None))
    monkeypatch.setattr(client, "sort", fail)
    claimed = store.claim("A", 100, now=10)
    assert claimed is not None and [r.payload for r in claimed.rows] == [b"p0:0", b"p0:1", b"p0:2", b"p0:3"]
    assert (store._payload_pattern is not None) is keeps_sort


def _is_fake(client: redis.Redis) -> bool:
    return type(client).__module__.startswith("fakeredis")


def test_late_commit_after_reclaim_is_refused(store: BatchStore) -> None:
    store.claim("a", 5, now=0)
    store.claim("b", 5, now=6)  # expires step 0 and re-leases it to b
    with pytest.raises(LeaseLost):
        store.commit(0, "a", now=6)


# -- postpone / prefetch ---------------------------------------------------------------------------


def test_postpone_moves_new_versions_to_arrivals_in_order(store: BatchStore, client: redis.Redis) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    r1, r3 = claimed.rows[1].ref, claimed.rows[3].ref
    new = store.postpone(0, "c", [(r3, b"n3"), (r1, b"n1")], 2, now=1)
    assert [n.encode() for n in new] == ["0:3:1:0", "0:1:1:0"]
    assert refs(store.read_rows(0)) == ["0:0:0:-", "0:2:0:-"]
    step2 = store.read_rows(2)
    assert refs(step2)[:2] == ["0:3:1:0", "0:1:1:0"] and [r.payload for r in step2[:2]] == [b"n3", b"n1"]
    store.commit(0, "c", now=1)
    store.claim("c", 10, now=1)
    c2 = store.claim("c", 10, now=1)
    assert c2 is not None and c2.step == 2 and refs(c2.rows) == refs(step2)
    again = store.postpone(2, "c", [(c2.rows[0].ref, b"n3b")], 4, now=2)
    assert again[0] == RowRef(0, 3, 2, 0)  # first_step is kept


def test_postpone_refusals_change_nothing(store: BatchStore, client: redis.Redis) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    store.claim("c", 10, now=0)  # step 1 claimed
    before = dump(client, store)
    good = (claimed.rows[0].ref, b"x")
    with pytest.raises(RowsNotInStep, match="0:9:0:-"):
        store.postpone(0, "c", [good, (RowRef(0, 9), b"y")], 2, now=0)
    with pytest.raises(StepStateError):
        store.postpone(0, "c", [good], 0, now=0)
    with pytest.raises(StepStateError, match="already claimed"):
        store.postpone(0, "c", [good], 1, now=0)
    with pytest.raises(LeaseLost):
        store.postpone(0, "d", [good], 2, now=0)
    with pytest.raises(ConfigError):
        store.postpone(0, "c", [good, good], 2, now=0)
    assert dump(client, store) == before
    assert store.postpone(0, "c", [], 2, now=0) == []


def test_postpone_from_an_emptied_step_names_the_missing_row(store: BatchStore, client: redis.Redis) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    gone = claimed.rows[0].ref
    store.postpone(0, "c", [(r.ref, b"later") for r in claimed.rows], 2, now=0)
    assert store.read_rows(0) == []  # (Redis deleted the emptied rows list)
    before = dump(client, store)
    with pytest.raises(RowsNotInStep, match=gone.encode()):
        store.postpone(0, "c", [(gone, b"again")], 2, now=0)
    assert dump(client, store) == before


def test_prefetch_takes_nearest_heads_first(store: BatchStore) -> None:
    store.claim("c", 10, now=0)
    got = store.prefetch(0, "c", 6, 2, now=0)
    assert refs(got.rows) == ["0:4:0:-", "0:5:0:-", "0:6:0:-", "0:7:0:-", "0:8:0:-", "0:9:0:-"]
    assert got.needs_materialise is None
    assert refs(store.read_rows(0))[4:] == refs(got.rows)
    assert refs(store.read_rows(2)) == ["0:10:0:-", "0:11:0:-"]
    store.commit(0, "c", now=0)
    c1 = store.claim("c", 10, now=0)  # step 1 was emptied by the prefetch but is still a step
    assert c1 is not None and c1.step == 1 and c1.rows == []
    c2 = store.claim("c", 10, now=0)
    assert c2 is not None and c2.step == 2 and refs(c2.rows) == ["0:10:0:-", "0:11:0:-"]


def test_prefetch_skips_claimed_steps_and_stops_at_unmaterialised(new_store: NewStore) -> None:
    store = new_store()
    fill(store, [0, 1, 2])
    store.claim("c", 10, now=0)
    store.claim("c", 10, now=0)
    got = store.prefetch(0, "c", 10, 5, now=0)
    assert refs(got.rows) == ["0:8:0:-", "0:9:0:-", "0:10:0:-", "0:11:0:-"]
    assert got.needs_materialise == 3
    fill(store, [3])
    got = store.prefetch(0, "c", 2, 5, now=0)
    assert refs(got.rows) == ["1:12:0:-", "1:13:0:-"] and got.needs_materialise is None
    assert store.prefetch(0, "c", 0, 5, now=0).rows == []


# -- op replay --------------------------------------------------------------------------------------


def test_every_mutating_call_replays_by_op_id(store: BatchStore, client: redis.Redis) -> None:
    c1 = store.claim("c", 10, now=0, op_id="claim")
    c1b = store.claim("c", 10, now=0, op_id="claim")
    assert c1 is not None and c1b is not None and c1b.step == c1.step == 0 and c1b.rows == c1.rows
    p1 = store.prefetch(0, "c", 2, 2, now=0, op_id="pf")
    state = dump(client, store)
    p2 = store.prefetch(0, "c", 2, 2, now=0, op_id="pf")
    assert p1 == p2 and dump(client, store) == state
    store.postpone(0, "c", [(c1.rows[0].ref, b"x")], 2, now=0, op_id="pp")
    state = dump(client, store)
    store.postpone(0, "c", [(c1.rows[0].ref, b"x")], 2, now=0, op_id="pp")
    assert dump(client, store) == state
    store.dead_letter(0, c1.rows[1].ref, "bad", op_id="dl")
    store.dead_letter(0, c1.rows[1].ref, "bad", op_id="dl")
    assert client.llen(store.keys.dead) == 1
    store.commit(0, "c", now=0, op_id="cm")
    store.commit(0, "c", now=0, op_id="cm")
    c2 = store.claim("c", 10, now=0, op_id="claim2")
    assert c2 is not None and c2.step == 1
    store.commit(1, "c", now=0)
    store.rollback(0, op_id="rb")
    c3 = store.claim("c", 10, now=0)
    assert c3 is not None and c3.step == 1
    state = dump(client, store)
    store.rollback(0, op_id="rb")  # replay: must not undo the new claim
    assert dump(client, store) == state
    # a replayed claim whose lease was lost is refused
    store.expire_leases(now=100)
    with pytest.raises(LeaseLost):
        store.claim("c", 10, now=0, op_id="claim")


# -- dead letters / stats / delete ------------------------------------------------------------------


def test_dead_letters_keep_payload_and_never_come_back(store: BatchStore, client: redis.Redis) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    bad = claimed.rows[2].ref
    store.dead_letter(0, bad, "undecodable")
    with pytest.raises(RowsNotInStep):
        store.dead_letter(0, bad, "again")
    (letter,) = store.dead_letters()
    assert (letter.ref, letter.step, letter.reason, letter.payload) == (bad, 0, "undecodable", b"p0:2")
    raw = msgpack.unpackb(client.lindex(store.keys.dead, 0))
    assert raw["ref"] == "0:2:0:-"
    store.expire_leases(now=11)  # lease expiry does not resurrect it
    again = store.claim("c", 10, now=11)
    assert again is not None and bad not in [r.ref for r in again.rows]
    store.commit(0, "c", now=11)
    store.rollback(-1)  # neither does rollback
    assert bad not in [r.ref for r in store.read_rows(0)]
    assert len(store.read_rows(0)) == 3 and store.stats().dead_letters == 1
    with pytest.raises(StepStateError):
        store.dead_letter(1, RowRef(0, 4), "step 1 is not claimed")


def test_stats(store: BatchStore) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    store.postpone(0, "c", [(claimed.rows[0].ref, b"x")], 2, now=0)
    stats = store.stats()
    assert stats.next_step == 1 and stats.committed_upto == -1 and stats.gc_floor == 0
    assert stats.upcoming[1] == (0, 4) and stats.upcoming[2] == (1, 4)
    assert [(p.ref.encode(), p.target_step, p.staleness) for p in stats.postponed] == [("0:0:1:0", 2, 2)]
    assert [(lease.step, lease.owner, lease.expiry) for lease in stats.in_flight] == [(0, "c", 10.0)]
    assert stats.payloads == 25 and stats.dead_letters == 0
    store.claim("c", 10, now=0)
    store.claim("c", 10, now=0)  # step 2, with the postponed row: still listed until it is committed
    postponed = [(p.ref.encode(), p.target_step, p.staleness) for p in store.stats().postponed]
    assert postponed == [("0:0:1:0", 2, 2)] and 2 not in store.stats().upcoming
    for step in range(3):
        store.commit(step, "c", now=0)
    assert store.stats().postponed == []


def test_delete_run_removes_every_key(store: BatchStore, client: redis.Redis) -> None:
    other = BatchStore.open(client, make_config())
    fill(other, [0])
    store.claim("c", 10, now=0, op_id="x")
    assert store.delete_run() > 5
    assert not list(client.scan_iter(match=store.keys.scan_pattern()))
    assert other.is_materialised(0)


def test_scripts_flushed_from_the_server_are_loaded_again(store: BatchStore, client: redis.Redis) -> None:
    claimed = store.claim("c", 10, now=0)
    assert claimed is not None
    client.script_flush()  # like a restarted server: every EVALSHA meets NOSCRIPT once
    store.postpone(0, "c", [(claimed.rows[0].ref, b"x")], 1, now=0)  # the one-round-trip pipeline path
    client.script_flush()
    store.commit(0, "c", now=0)
    assert store.read_rows(1)[0].payload == b"x"
    assert not list(client.scan_iter(match=store.keys.prefix + "stage:*"))
