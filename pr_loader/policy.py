"""Partial-rollout policies: where postponed rows go, how many rows to prefetch, when to stop generating.

A policy is pure decision logic; :class:`~pr_loader.linked.LinkedDataProto` asks it and performs the store
calls. Policies are configurable by name through a registry (``get_policy("PostponeToNext",
max_postpones=2)``) and their ``name`` is stored in the run meta.

Built-in policies:

* :class:`FixedBatch` - never postpones, never prefetches: plain ``DataLoader`` behaviour, bit for bit.
* :class:`PostponeToNext` - postponed rows arrive first in the very next step, in postpone order.
* :class:`PostponeToEpochEnd` - postponed rows go to the last step of their epoch; from that last step they
  go to the next epoch's first step.

Past the final epoch (``num_epochs`` set), targets are *drain steps* ``>= num_epochs * steps_per_epoch``
that deliver the rows still postponed. Prefetch takes fresh rows from the head of the nearest later step of
the same epoch that still has rows (never from drain steps, never across an epoch boundary by default).

Staleness bound: with ``max_postpones=k`` a row that has already been postponed ``k`` times is not
postponed again. ``LinkedDataProto.postpone_samples`` refuses a call containing such a row (a
:class:`~pr_loader.errors.PolicyError` naming it, nothing changed), and :meth:`Policy.should_stop_gen`
keeps answering ``False`` until every such row is finished: the scheduler must finish them.

Writing your own policy (subclass, register, select it by name)::

    from pr_loader.errors import PolicyError
    from pr_loader.policy import PostponeToNext, get_policy, register_policy

    @register_policy
    class TailPrefetch(PostponeToNext):
        '''Prefetch one new row per unfinished row beyond ``slack``, at most ``requested``.'''

        name = "TailPrefetch"

        def __init__(self, *, max_postpones=None, slack=2):
            super().__init__(max_postpones=max_postpones)
            if not isinstance(slack, int) or isinstance(slack, bool) or slack < 0:
                raise PolicyError(f"TailPrefetch: slack must be an int >= 0, got {slack!r}")
            self.slack = slack

        def config(self):
            return {**super().config(), "slack": self.slack}

        def prefetch_count(self, view, requested):
            tail = len(view) - view.num_finished          # rows still generating
            return min(requested, max(0, tail - self.slack))

        def should_stop_gen(self, view):
            # stop once 90% of the target is finished (the bounded rows must still finish)
            need = min(len(view), (9 * view.target_size + 9) // 10)
            return view.num_finished >= need and not view.must_finish_ids()

    policy = get_policy("TailPrefetch", max_postpones=2, slack=4)  # run: RunConfig(policy=policy.name)
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TypeVar

from pr_loader.errors import PolicyError

if TYPE_CHECKING:
    from pr_loader.linked import LinkedDataProto

__all__ = [
    "FixedBatch",
    "Policy",
    "PostponeToEpochEnd",
    "PostponeToNext",
    "RunLayout",
    "get_policy",
    "policy_names",
    "register_policy",
]


def _check_int(owner: str, name: str, value: object, minimum: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise PolicyError(f"{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return value


class _LayoutSource(Protocol):
    @property
    def batch_size(self) -> int: ...
    @property
    def steps_per_epoch(self) -> int: ...
    @property
    def num_epochs(self) -> int | None: ...


@dataclass(frozen=True)
class RunLayout:
    """Step arithmetic of one run shard: ``step = epoch * steps_per_epoch + batch index``."""

    steps_per_epoch: int
    num_epochs: int | None
    batch_size: int

    def __post_init__(self) -> None:
        _check_int("RunLayout", "steps_per_epoch", self.steps_per_epoch, 1)
        _check_int("RunLayout", "batch_size", self.batch_size, 1)
        if self.num_epochs is not None:
            _check_int("RunLayout", "num_epochs", self.num_epochs, 1)

    @classmethod
    def from_config(cls, config: _LayoutSource) -> RunLayout:
        """Layout of a ``RunConfig`` (or anything with the same three attributes)."""
        return cls(config.steps_per_epoch, config.num_epochs, config.batch_size)

    @property
    def total_steps(self) -> int | None:
        """Number of regular (non-drain) steps, or ``None`` for an unbounded run."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch

    def epoch_of(self, step: int) -> int:
        """Epoch of ``step`` (drain steps report ``>= num_epochs``)."""
        return step // self.steps_per_epoch

    def last_step_of_epoch(self, epoch: int) -> int:
        return (epoch + 1) * self.steps_per_epoch - 1

    def is_drain(self, step: int) -> bool:
        """Whether ``step`` is a drain step (after the final batch of the final epoch)."""
        total = self.total_steps
        return total is not None and step >= total


class Policy(abc.ABC):
    """Base class of partial-rollout policies; subclass it and override the decisions you need.

    Every decision is validated by the caller: a bad answer raises :class:`PolicyError`.
    """

    name: ClassVar[str] = "Policy"

    def __init__(self, *, max_postpones: int | None = None) -> None:
        if max_postpones is not None:
            _check_int(type(self).__name__, "max_postpones", max_postpones, 0)
        self.max_postpones = max_postpones

    def config(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this policy: ``get_policy(p.name, **p.config())``."""
        return {"max_postpones": self.max_postpones}

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __eq__(self, other: object) -> bool:
        return type(other) is type(self) and isinstance(other, Policy) and other.config() == self.config()

    def __hash__(self) -> int:
        return hash((type(self), repr(sorted(self.config().items()))))

    def prefetch_count(self, view: LinkedDataProto, requested: int) -> int:
        """How many rows to move into ``view`` when the scheduler asks for ``requested`` (default: all)."""
        return requested

    def prefetch_last_source_step(self, step: int, layout: RunLayout) -> int:
        """Last step prefetch may take rows from (``step`` = none). Default: the end of ``step``'s epoch."""
        if layout.is_drain(step):
            return step
        return layout.last_step_of_epoch(layout.epoch_of(step))

    @abc.abstractmethod
    def postpone_target(self, step: int, layout: RunLayout) -> int | None:
        """The later step that receives rows postponed from ``step``; ``None`` refuses postponing."""

    def may_postpone(self, times_postponed: int) -> bool:
        """Whether a row already postponed ``times_postponed`` times may be postponed again."""
        return self.max_postpones is None or times_postponed < self.max_postpones

    def should_stop_gen(self, view: LinkedDataProto) -> bool:
        """Stop once ``target_size`` rows (or every row, if fewer) are finished and no unfinished row
        has reached ``max_postpones``."""
        need = min(len(view), view.target_size)
        return view.num_finished >= need and not view.must_finish_ids()


_REGISTRY: dict[str, type[Policy]] = {}

P = TypeVar("P", bound=type[Policy])


def register_policy(cls: P) -> P:
    """Class decorator: make ``cls`` available to :func:`get_policy` under ``cls.name``."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise PolicyError(f"{cls.__qualname__} must define its own class attribute 'name' (a non-empty str)")
    known = _REGISTRY.get(name)
    if known is not None and known is not cls:
        raise PolicyError(f"policy name {name!r} is already registered by {known.__qualname__}")
    _REGISTRY[name] = cls
    return cls


def policy_names() -> list[str]:
    """Names of the registered policies."""
    return sorted(_REGISTRY)


def get_policy(policy: str | Policy | type[Policy], **kwargs: Any) -> Policy:
    """A policy instance from a registered name, a class, or an instance (returned unchanged)."""
    if isinstance(policy, Policy):
        if kwargs:
            raise PolicyError(f"arguments {sorted(kwargs)} given together with a policy instance {policy!r}")
        return policy
    factory: Callable[..., Policy]
    if isinstance(policy, str):
        if policy not in _REGISTRY:
            raise PolicyError(f"unknown policy {policy!r}; known: {', '.join(policy_names())}")
        factory = _REGISTRY[policy]
    elif isinstance(policy, type) and issubclass(policy, Policy):
        factory = policy
    else:
        raise PolicyError(f"policy must be a name, a Policy subclass or instance, got {policy!r}")
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise PolicyError(f"invalid arguments for policy {policy!r}: {exc}") from None


@register_policy
class FixedBatch(Policy):
    """Never postpones, never prefetches; generation stops when every row is finished."""

    name = "FixedBatch"

    def prefetch_count(self, view: LinkedDataProto, requested: int) -> int:
        return 0

    def postpone_target(self, step: int, layout: RunLayout) -> int | None:
        return None

    def should_stop_gen(self, view: LinkedDataProto) -> bool:
        return view.num_finished >= len(view)


@register_policy
class PostponeToNext(Policy):
    """Postponed rows arrive first in step ``step + 1`` (a drain step after the final epoch)."""

    name = "PostponeToNext"

    def postpone_target(self, step: int, layout: RunLayout) -> int | None:
        return step + 1


@register_policy
class PostponeToEpochEnd(Policy):
    """Postponed rows go to the last step of their epoch; from that step, to the next epoch's first step
    (the first drain step after the final epoch). From a drain step they go to the next drain step."""

    name = "PostponeToEpochEnd"

    def postpone_target(self, step: int, layout: RunLayout) -> int | None:
        if layout.is_drain(step):
            return step + 1
        last = layout.last_step_of_epoch(layout.epoch_of(step))
        return last if step < last else last + 1
