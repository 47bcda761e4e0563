"""What the batch store's scripts reply, on the Python side: the status string that heads every reply
(``ok`` or an error code, see :mod:`pr_loader.store.scripts`) mapped to the store's exceptions."""

from __future__ import annotations

from typing import Any, NoReturn

from pr_loader.errors import LeaseLost, RowsNotInStep, StepStateError, StoreError


def text(value: bytes) -> str:
    """A text field of a reply (refs, steps, messages)."""
    return value.decode()


def raise_for(reply: list[Any], step: int | None = None) -> None:
    """Raise the exception of ``reply``'s status unless it is ``ok``."""
    if reply[0] != b"ok":
        fail(reply, step)


def fail(reply: list[Any], step: int | None = None) -> NoReturn:
    """Raise the exception of a reply's error status (``step``: the step the call concerned)."""
    status = reply[0]
    detail: Any = reply[1] if len(reply) > 1 else b""
    if status == b"state" or status == b"target":
        raise StepStateError(text(detail))
    if status == b"lease_lost":
        raise LeaseLost(text(detail))
    if status == b"missing":
        refs = ", ".join(text(r) for r in detail)
        raise RowsNotInStep(f"rows not in step {step}: {refs}")
    raise StoreError(f"unexpected store reply {status!r}")
