from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from pr_loader.errors import PolicyError
from pr_loader.policy import (
    FixedBatch,
    Policy,
    PostponeToEpochEnd,
    PostponeToNext,
    RunLayout,
    get_policy,
    policy_names,
    register_policy,
)

LAYOUT = RunLayout(steps_per_epoch=4, num_epochs=2, batch_size=3)  # regular steps 0..7, drain from 8
UNBOUNDED = RunLayout(steps_per_epoch=4, num_epochs=None, batch_size=3)


class FakeView:
    """The parts of a LinkedDataProto a policy reads."""

    def __init__(
        self, rows: int, finished: int, target: int = 3, must_finish: list[str] | None = None
    ) -> None:
        self.rows, self.num_finished, self.target_size = rows, finished, target
        self._must = must_finish or []

    def __len__(self) -> int:
        return self.rows

    def must_finish_ids(self) -> list[str]:
        return self._must


def view(*args: Any, **kwargs: Any) -> Any:
    return FakeView(*args, **kwargs)


def test_layout_arithmetic() -> None:
    assert LAYOUT.total_steps == 8
    assert [LAYOUT.epoch_of(s) for s in (0, 3, 4, 7, 8, 9)] == [0, 0, 1, 1, 2, 2]
    assert LAYOUT.last_step_of_epoch(0) == 3
    assert LAYOUT.last_step_of_epoch(1) == 7
    assert not LAYOUT.is_drain(7)
    assert LAYOUT.is_drain(8)
    assert UNBOUNDED.total_steps is None
    assert not UNBOUNDED.is_drain(10**6)
    config = SimpleNamespace(batch_size=3, steps_per_epoch=4, num_epochs=2)
    assert RunLayout.from_config(config) == LAYOUT


@pytest.mark.parametrize(
    "kwargs",
    [
        {"steps_per_epoch": 0, "num_epochs": 1, "batch_size": 1},
        {"steps_per_epoch": 1, "num_epochs": 0, "batch_size": 1},
        {"steps_per_epoch": 1, "num_epochs": 1, "batch_size": -2},
        {"steps_per_epoch": 1.5, "num_epochs": 1, "batch_size": 1},
        {"steps_per_epoch": True, "num_epochs": 1, "batch_size": 1},
    ],
)
def test_layout_rejects_bad_values(kwargs: dict[str, Any]) -> None:
    with pytest.raises(PolicyError):
        RunLayout(**kwargs)


def test_fixed_batch_never_moves_rows() -> None:
    policy = FixedBatch()
    assert policy.prefetch_count(view(3, 0), 5) == 0
    assert all(policy.postpone_target(s, LAYOUT) is None for s in range(10))
    assert not policy.should_stop_gen(view(3, 2))
    assert policy.should_stop_gen(view(3, 3))
    assert policy.should_stop_gen(view(0, 0))


def test_postpone_to_next_targets_including_epoch_boundary_and_drain() -> None:
    policy = PostponeToNext()
    assert [policy.postpone_target(s, LAYOUT) for s in (0, 3, 6, 7, 8, 9)] == [1, 4, 7, 8, 9, 10]
    assert policy.prefetch_count(view(3, 0), 5) == 5


def test_postpone_to_epoch_end_targets() -> None:
    policy = PostponeToEpochEnd()
    # epoch 0 = steps 0..3: everything goes to step 3; from step 3 to the next epoch's first step
    assert [policy.postpone_target(s, LAYOUT) for s in range(4)] == [3, 3, 3, 4]
    assert [policy.postpone_target(s, LAYOUT) for s in range(4, 8)] == [7, 7, 7, 8]  # 8 = first drain step
    assert [policy.postpone_target(s, LAYOUT) for s in (8, 9)] == [9, 10]  # drain steps chain
    assert policy.postpone_target(7, UNBOUNDED) == 8  # unbounded run: epoch 2's first step


def test_prefetch_source_range() -> None:
    policy = PostponeToNext()
    assert policy.prefetch_last_source_step(0, LAYOUT) == 3
    assert policy.prefetch_last_source_step(3, LAYOUT) == 3  # last step of the epoch: nothing to take
    assert policy.prefetch_last_source_step(5, LAYOUT) == 7
    assert policy.prefetch_last_source_step(8, LAYOUT) == 8  # drain step: nothing
    assert policy.prefetch_last_source_step(9, UNBOUNDED) == 11


def test_max_postpones_bound() -> None:
    policy = PostponeToNext(max_postpones=2)
    assert [policy.may_postpone(n) for n in range(4)] == [True, True, False, False]
    assert PostponeToNext(max_postpones=0).may_postpone(0) is False
    assert all(PostponeToNext().may_postpone(n) for n in (0, 10, 10**6))


def test_partial_should_stop_gen() -> None:
    policy = PostponeToNext()
    assert not policy.should_stop_gen(view(5, 2, target=3))
    assert policy.should_stop_gen(view(5, 3, target=3))
    assert policy.should_stop_gen(view(2, 2, target=3))  # drain step with fewer rows: all finished
    assert not policy.should_stop_gen(view(2, 1, target=3))
    assert not policy.should_stop_gen(view(5, 4, target=3, must_finish=["0:1"]))  # bound reached, unfinished


@pytest.mark.parametrize("bad", [-1, 1.0, "2", True])
def test_bad_max_postpones(bad: object) -> None:
    with pytest.raises(PolicyError, match="max_postpones"):
        PostponeToNext(max_postpones=bad)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="max_postpones"):
        get_policy("PostponeToEpochEnd", max_postpones=bad)


def test_registry() -> None:
    assert {"FixedBatch", "PostponeToNext", "PostponeToEpochEnd"} <= set(policy_names())
    policy = get_policy("PostponeToNext", max_postpones=2)
    assert type(policy) is PostponeToNext and policy.max_postpones == 2
    assert policy.name == "PostponeToNext"
    assert get_policy(policy.name, **policy.config()) == policy
    assert get_policy(PostponeToEpochEnd) == PostponeToEpochEnd()
    assert get_policy(policy) is policy
    assert repr(policy) == "PostponeToNext(max_postpones=2)"
    assert hash(policy) == hash(PostponeToNext(max_postpones=2))
    assert policy != PostponeToNext(max_postpones=3)
    assert policy != PostponeToEpochEnd(max_postpones=2)


def test_registry_errors() -> None:
    with pytest.raises(PolicyError, match=r"unknown policy 'Nope'.*FixedBatch"):
        get_policy("Nope")
    with pytest.raises(PolicyError, match="invalid arguments"):
        get_policy("FixedBatch", bogus=1)
    with pytest.raises(PolicyError, match="together with a policy instance"):
        get_policy(FixedBatch(), max_postpones=1)
    with pytest.raises(PolicyError, match="must be a name"):
        get_policy(42)  # type: ignore[arg-type]
    with pytest.raises(PolicyError, match="already registered"):

        @register_policy
        class Clash(PostponeToNext):
            name = "PostponeToNext"

    with pytest.raises(PolicyError, match="own class attribute 'name'"):

        @register_policy
        class Nameless(PostponeToNext):
            pass


def test_policy_is_abstract() -> None:
    with pytest.raises(TypeError):
        Policy()  # type: ignore[abstract]


@register_policy
class TailPrefetchForTest(PostponeToNext):
    """The worked example of the policy module docstring."""

    name = "TailPrefetchForTest"

    def __init__(self, *, max_postpones: int | None = None, slack: int = 2) -> None:
        super().__init__(max_postpones=max_postpones)
        if not isinstance(slack, int) or isinstance(slack, bool) or slack < 0:
            raise PolicyError(f"slack must be an int >= 0, got {slack!r}")
        self.slack = slack

    def config(self) -> dict[str, Any]:
        return {**super().config(), "slack": self.slack}

    def prefetch_count(self, view: Any, requested: int) -> int:
        return min(requested, max(0, len(view) - int(view.num_finished) - self.slack))

    def should_stop_gen(self, view: Any) -> bool:
        need = min(len(view), (9 * view.target_size + 9) // 10)
        return bool(view.num_finished >= need and not view.must_finish_ids())


def test_custom_policy_from_docstring() -> None:
    policy = get_policy("TailPrefetchForTest", slack=1)
    assert policy.prefetch_count(view(6, 2), 10) == 3
    assert policy.prefetch_count(view(6, 2), 2) == 2
    assert policy.prefetch_count(view(6, 6), 10) == 0
    assert policy.should_stop_gen(view(20, 18, target=20))
    assert not policy.should_stop_gen(view(20, 17, target=20))
    assert get_policy(policy.name, **policy.config()) == policy
    assert register_policy(TailPrefetchForTest) is TailPrefetchForTest  # re-registering is a no-op
    with pytest.raises(PolicyError, match="slack"):
        get_policy("TailPrefetchForTest", slack=-1)
