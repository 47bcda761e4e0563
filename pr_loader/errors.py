"""Every error pr_loader raises on purpose derives from :class:`PrLoaderError`.

Errors that replace a builtin users may already catch (``ValueError``, ``TypeError``,
``ConnectionError``) also derive from it, so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class PrLoaderError(Exception):
    """Base class of every error raised on purpose by pr_loader."""


class CodecError(PrLoaderError, ValueError):
    """A sample could not be encoded, or bytes could not be decoded."""


class DataProtoError(PrLoaderError, ValueError):
    """A DataProto operation was given inconsistent or invalid input."""


class StoreError(PrLoaderError):
    """Base class of errors raised by the Redis store."""


class StoreUnavailable(StoreError, ConnectionError):
    """Redis could not be reached (after retries). The message names the address, never a secret."""


class StoreAuthError(StoreError, PermissionError):
    """Redis refused the credentials (wrong user or password, or an ACL denial)."""


class UnsupportedServer(StoreError):
    """The Redis server is too old or lacks a command pr_loader needs."""


class DurabilityError(StoreError):
    """The requested durability cannot be provided by the server's persistence settings."""


class RunNotFound(StoreError, KeyError):
    """No run with this id exists in the store."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class RunConfigMismatch(StoreError):
    """A run was re-opened with settings that differ from the stored ones."""

    def __init__(self, field: str, stored: object, given: object) -> None:
        super().__init__(f"run setting {field!r} differs: stored {stored!r}, given {given!r}")
        self.field = field
        self.stored = stored
        self.given = given


class LeaseLost(StoreError):
    """The step's lease expired or belongs to another consumer; the operation was refused."""


class StepStateError(StoreError):
    """An operation does not fit the step's current state (e.g. commit of an unclaimed step)."""


class RowsNotInStep(StoreError, ValueError):
    """Rows given to postpone are not (or no longer) part of the claimed step."""


class RollbackOutOfRange(StoreError):
    """A rollback target is older than the retained journal or newer than the run."""


class StateDictError(PrLoaderError, ValueError):
    """A state_dict has the wrong version, belongs to another run, or is malformed."""


class PolicyError(PrLoaderError, ValueError):
    """A policy returned an invalid decision or was configured wrongly."""


class DatasetError(PrLoaderError):
    """Reading an item from the user's dataset failed; the message names the index."""


class EngineError(PrLoaderError):
    """A generation engine was misused or failed."""


class ConfigError(PrLoaderError, ValueError):
    """An argument or setting is invalid."""


class NeedsMaterialisation(StoreError):
    """The step to claim has no fresh batch in Redis yet; materialise it and claim again."""

    def __init__(self, step: int) -> None:
        super().__init__(f"step {step} is not materialised yet")
        self.step = step


class NoStepReady(StoreError):
    """Nothing can be claimed now, but leased steps may still return rows; retry at ``retry_at``."""

    def __init__(self, retry_at: float) -> None:
        super().__init__(f"no step ready to claim; steps are still leased (earliest expiry {retry_at:.3f})")
        self.retry_at = retry_at


class UnsupportedSchema(StoreError):
    """The run was stored by an incompatible version of pr_loader."""


class CommittedStepsLost(StoreError):
    """Redis holds fewer committed steps than this consumer committed or checkpointed (writes lost in a
    server crash without fsync); resuming silently would deliver those batches again."""
