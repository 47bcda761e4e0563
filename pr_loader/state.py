"""The loader's ``state_dict``: small, versioned, JSON-serialisable (torchdata ``Stateful`` protocol).

Everything else lives in Redis, so the state only names the run shard and the last committed step::

    {"version": 1, "run_id": "...", "rank": 0, "world_size": 1, "step": 41, "epoch": 2,
     "steps_per_epoch": 20, "fingerprint": "...", "consumer_id": "..."}

``step`` is the last committed step (``-1``: nothing committed yet); ``epoch`` is the epoch of the step that
comes next (``(step + 1) // steps_per_epoch``), so a checkpoint taken at the last step of an epoch resumes
with the next epoch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from pr_loader.errors import StateDictError

STATE_VERSION = 1

_FIELDS: dict[str, type] = {
    "run_id": str,
    "rank": int,
    "world_size": int,
    "step": int,
    "epoch": int,
    "steps_per_epoch": int,
    "fingerprint": str,
    "consumer_id": str,
}


@dataclass(frozen=True)
class LoaderState:
    """Position of one consumer in one run shard."""

    run_id: str
    rank: int
    world_size: int
    step: int
    epoch: int
    steps_per_epoch: int
    fingerprint: str
    consumer_id: str

    def to_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, state: Mapping[str, Any]) -> LoaderState:
        """Validate a state dict; :class:`StateDictError` names the first problem."""
        if not isinstance(state, Mapping):
            raise StateDictError(f"state_dict must be a mapping, got {type(state).__name__}")
        version = state.get("version")
        if version != STATE_VERSION:
            raise StateDictError(
                f"unsupported state_dict version {version!r} (this loader reads {STATE_VERSION})"
            )
        values: dict[str, Any] = {}
        for name, kind in _FIELDS.items():
            if name not in state:
                raise StateDictError(f"state_dict lacks {name!r}")
            value = state[name]
            if not isinstance(value, kind) or isinstance(value, bool):
                raise StateDictError(f"state_dict field {name!r} must be {kind.__name__}, got {value!r}")
            values[name] = value
        loaded = cls(**values)
        if loaded.steps_per_epoch < 1 or loaded.step < -1 or not 0 <= loaded.rank < loaded.world_size:
            raise StateDictError(f"state_dict is inconsistent: {loaded.to_dict()}")
        if loaded.epoch != (loaded.step + 1) // loaded.steps_per_epoch:
            raise StateDictError(f"state_dict epoch {loaded.epoch} does not match step {loaded.step}")
        return loaded
