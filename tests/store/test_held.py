"""Steps claimed ahead (``held``): a move or claim that names one gives it back first when it is untouched, so
the store ends exactly as if it had never been claimed ahead. Runs on fakeredis and a real redis-server."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from pr_loader.errors import ConfigError, RowsNotInStep, StepStateError
from pr_loader.store import BatchStore, ClaimedStep
from tests.store.conftest import fill
from tests.store.helpers import dump

NewStore = Callable[..., BatchStore]


def rows_of(claimed: ClaimedStep | None) -> list[tuple[str, bytes]]:
    assert claimed is not None
    return [(row.ref_text, row.payload) for row in claimed.rows]


def claim(store: BatchStore, held: int | None = None) -> ClaimedStep:
    claimed = store.claim("c", 10, now=0, held=held)
    assert claimed is not None
    return claimed


def partial_step(store: BatchStore, ahead: bool) -> list[list[tuple[str, bytes]]]:
    """Step 0 postpones a row into step 1 and prefetches 2 rows; with ``ahead`` step 1 is claimed ahead
    before each move (and named as held), as the loader does. Returns the rows of steps 0 to 2 claimed."""
    c0 = claim(store)
    held = claim(store).step if ahead else None
    store.postpone(0, "c", [(c0.rows[1].ref, b"partial")], 1, now=0, held=held)
    if ahead:
        assert claim(store, held).step == 1  # claimed ahead again after the move
    got = store.prefetch(0, "c", 2, 2, now=0, held=held)
    assert [r.ref_text for r in got.rows] == ["0:4:0:-", "0:5:0:-"]
    store.commit(0, "c", now=0)
    c1 = claim(store, held)
    store.commit(1, "c", now=0)
    return [rows_of(c0), rows_of(c1), rows_of(claim(store))]


def test_moves_see_a_step_held_ahead_as_unclaimed(new_store: NewStore, client: redis.Redis) -> None:
    twins = []
    for ahead in (False, True):
        store = new_store(run_id=f"ahead-{ahead}")
        fill(store, range(6))
        trace = partial_step(store, ahead)
        twins.append((trace, dump(client, store, journals=False)))  # (names relative to the run)
    (plain, plain_state), (ahead_trace, ahead_state) = twins
    assert ahead_trace == plain
    assert plain[1][0] == ("0:1:1:0", b"partial")  # the postponed row arrives first
    assert ahead_state == plain_state


def test_a_claim_naming_its_held_step_takes_it_again(store: BatchStore) -> None:
    claim(store)
    ahead = claim(store)
    assert ahead.step == 1
    again = claim(store, held=1)
    assert again.step == 1 and rows_of(again) == rows_of(ahead)
    assert store.stats().next_step == 2 and store.stats().requeued == []


def test_a_touched_or_foreign_held_step_is_kept(store: BatchStore, client: redis.Redis) -> None:
    c0 = claim(store)
    c1 = claim(store)
    store.postpone(1, "c", [(c1.rows[0].ref, b"later")], 2, now=0)  # step 1 is in use: not given back
    before = dump(client, store)
    with pytest.raises(StepStateError, match="already claimed"):
        store.postpone(0, "c", [(c0.rows[0].ref, b"x")], 1, now=0, held=1)
    assert dump(client, store) == before
    store.claim("d", 10, now=0)  # step 2, another consumer's
    before = dump(client, store)
    with pytest.raises(StepStateError, match="already claimed"):
        store.postpone(0, "c", [(c0.rows[0].ref, b"x")], 2, now=0, held=2)
    assert dump(client, store) == before


def test_a_refused_postpone_keeps_the_held_step(store: BatchStore, client: redis.Redis) -> None:
    c0 = claim(store)
    claim(store)
    before = dump(client, store)
    with pytest.raises(RowsNotInStep):
        store.postpone(0, "c", [(c0.rows[0].ref, b"x"), (c0.rows[0].ref.postponed(0), b"y")], 1, now=0,
                       held=1)  # fmt: skip
    assert dump(client, store) == before


def test_the_step_moved_from_is_never_given_back(store: BatchStore) -> None:
    c0 = claim(store)
    store.postpone(0, "c", [(c0.rows[0].ref, b"x")], 1, now=0, held=0)
    store.prefetch(0, "c", 1, 1, now=0, held=0)
    assert [lease.step for lease in store.stats().in_flight] == [0]


@pytest.mark.parametrize("held", [-1, True, 1.0, "1"])
def test_held_must_be_a_step(store: BatchStore, held: Any) -> None:
    with pytest.raises(ConfigError, match="held"):
        store.claim("c", 10, now=0, held=held)
