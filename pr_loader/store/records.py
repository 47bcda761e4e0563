"""Value types of the batch store: run settings, row refs, claimed steps, statistics."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Protocol

from pr_loader.errors import ConfigError, RunConfigMismatch, StoreError

# meta fields that identify a run (they must match on re-open), in the order they are checked
_IDENTITY = (
    "run_id", "dataset_fingerprint", "batch_size", "steps_per_epoch", "seed", "policy", "world_size",
    "rank", "num_epochs",
)
_INT_FIELDS = frozenset({"batch_size", "steps_per_epoch", "seed", "world_size", "rank", "num_epochs"})


def _meta_value(value: object) -> str:
    return "" if value is None else str(value)


@dataclass(frozen=True)
class RunConfig:
    """Settings of one rank shard of a run; all but ``retain_steps`` must match on re-open."""

    run_id: str
    batch_size: int
    steps_per_epoch: int
    dataset_fingerprint: str
    seed: int = 0
    policy: str = "FixedBatch"
    world_size: int = 1
    rank: int = 0
    num_epochs: int | None = None
    retain_steps: int = 8

    def __post_init__(self) -> None:
        for name in ("batch_size", "steps_per_epoch", "world_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive int, got {value!r}")
        if not isinstance(self.rank, int) or not 0 <= self.rank < self.world_size:
            raise ConfigError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            raise ConfigError(f"num_epochs must be None or a positive int, got {self.num_epochs!r}")
        if not isinstance(self.retain_steps, int) or self.retain_steps < 0:
            raise ConfigError(f"retain_steps must be an int >= 0, got {self.retain_steps!r}")
        if not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an int, got {self.seed!r}")

    def identity_meta(self) -> list[str]:
        """The meta fields that identify the run, as field, value pairs (what a new run stores)."""
        return [item for name in _IDENTITY for item in (name, _meta_value(getattr(self, name)))]

    def mismatch(self, stored: Mapping[str, str]) -> RunConfigMismatch | None:
        """The error for the first identity field whose stored value differs from this config's, or None."""
        for name in _IDENTITY:
            given, raw = getattr(self, name), stored.get(name, "")
            if stored.get(name) != _meta_value(given):
                typed = (None if raw == "" else int(raw)) if name in _INT_FIELDS else raw
                return RunConfigMismatch(name, typed, given)
        return None

    @property
    def total_steps(self) -> int | None:
        """Steps of all epochs (drain steps come after), or None for an endless run."""
        return None if self.num_epochs is None else self.num_epochs * self.steps_per_epoch


@dataclass(frozen=True, slots=True)
class RowRef:
    """A parsed ref ``"<epoch>:<index>:<version>:<first_step or ->"`` naming one immutable payload."""

    epoch: int
    index: int
    version: int = 0
    first_step: int | None = None

    @classmethod
    def parse(cls, ref: str) -> RowRef:
        """Parse a ref string; StoreError if it is malformed."""
        try:
            epoch, index, version, first = ref.split(":")
            return cls(int(epoch), int(index), int(version), None if first == "-" else int(first))
        except ValueError:
            raise StoreError(f"malformed row ref {ref!r}") from None

    def key(self) -> str:
        """The sample's id across versions, ``"<epoch>:<index>"``."""
        return f"{self.epoch}:{self.index}"

    def encode(self) -> str:
        """The ref string."""
        first = "-" if self.first_step is None else self.first_step
        return f"{self.epoch}:{self.index}:{self.version}:{first}"

    def postponed(self, step: int) -> RowRef:
        """The next version, first delivered at ``first_step`` or else at ``step``."""
        first = step if self.first_step is None else self.first_step
        return RowRef(self.epoch, self.index, self.version + 1, first)


@dataclass
class Placed:
    """The last bytes of a row, received elsewhere than its buffer (a :class:`Placer`'s plan): from where
    (``start``: an offset in the payload) to where (``pieces``, back to back up to the payload's end), and
    what for (``plan``: the placer's, e.g. the batch columns of :class:`pr_loader.collate.ColumnPlacer`)."""

    start: int
    pieces: list[memoryview]
    plan: Any


class Placer(Protocol):
    """Where :func:`pr_loader.store.wire.transact` receives the last bytes of each payload (a row's tensors)
    instead of its buffer: :class:`pr_loader.collate.ColumnPlacer`, which puts them into batch columns. The
    receive reads the head of payload 0, asks for the layout (how many bytes at each payload's end), plans
    every payload long enough alike (:meth:`destinations`) and receives the whole reply in one scatter
    ``recvmsg``. Whether a row holds what was planned is for its decoder to check (its bytes are whole
    again in :attr:`StoredRow.payload` either way)."""

    head_size: int  # the first bytes of a payload that head_needed reads
    placements: dict[int, Placed]  # by payload index, the rows planned (destinations fills it, begin empties)

    def begin(self, count: int) -> None:
        """A reply of ``count`` payloads follows (0: forget the placements)."""

    def head_needed(self, head: memoryview, size: int) -> int:
        """The bytes of payload 0 (``size`` bytes; ``head``: its first ``head_size``) layout() needs, or 0."""

    def layout(self, head: memoryview, size: int) -> int:
        """From payload 0's head: how many bytes at the end of each payload to place (0: none)."""

    def destinations(self, index: int, size: int) -> list[memoryview]:
        """Where the last bytes of payload ``index`` (``size`` bytes) go, in order (their sizes add up to
        the layout's)."""


@dataclass
class StoredRow:
    """One row of a step: its ref string and payload.

    ``buffer`` holds the payload as read: a read-only ``memoryview`` of the one buffer a claim or prefetch
    received all of its payloads into (:mod:`pr_loader.store.wire`), or ``bytes``. Decoding from it costs no
    copy; :attr:`payload` is the same as ``bytes`` (a copy the first time, for a view). A row whose last
    bytes were received elsewhere (``placed``: its tensors, into batch columns) lacks them in ``buffer``: its
    placer's decoder reads them there, and :attr:`payload` joins the bytes again.

    ``ref`` is parsed on first use: a loader that collates a step never needs it, and parsing the refs of a
    256-row step cost ~0.35 ms of a ~6 ms claim."""

    ref_text: str
    buffer: bytes | memoryview
    placed: Placed | None = None

    @cached_property
    def ref(self) -> RowRef:
        """The parsed ref; StoreError if it is malformed."""
        return RowRef.parse(self.ref_text)

    @cached_property
    def payload(self) -> bytes:
        """The payload bytes."""
        buffer = self.buffer
        if self.placed is None:
            return buffer if type(buffer) is bytes else bytes(buffer)
        return b"".join([buffer[: self.placed.start], *self.placed.pieces])

    def __reduce__(self) -> tuple[type[StoredRow], tuple[str, bytes]]:
        return StoredRow, (self.ref_text, self.payload)  # (a memoryview does not pickle)


@dataclass
class ClaimedStep:
    """A leased step: arrivals first, then fresh rows."""

    step: int
    rows: list[StoredRow]
    lease_expiry: float


@dataclass
class PrefetchResult:
    """Rows taken from later steps, and the first later step that must be materialised first (if any)."""

    rows: list[StoredRow]
    needs_materialise: int | None


@dataclass
class DeadLetter:
    """A row taken out of the run, with the reason and its last payload."""

    ref: RowRef
    step: int
    reason: str
    payload: bytes
    at: float


@dataclass
class StepLease:
    """An in-flight step."""

    step: int
    owner: str
    expiry: float


@dataclass
class PostponedRow:
    """A postponed row not yet committed: waiting in ``arrivals`` of ``target_step``, or among the rows of
    ``target_step`` once that is in flight (claimed, maybe ahead of its use); staleness = target -
    first_step."""

    ref: RowRef
    target_step: int
    staleness: int


@dataclass
class StoreStats:
    """A snapshot of one shard (see :meth:`BatchStore.stats`)."""

    next_step: int
    committed_upto: int
    gc_floor: int
    upcoming: dict[int, tuple[int, int]] = field(default_factory=dict)  # step -> (arrivals, fresh)
    postponed: list[PostponedRow] = field(default_factory=list)
    in_flight: list[StepLease] = field(default_factory=list)
    requeued: list[int] = field(default_factory=list)
    dead_letters: int = 0
    payloads: int = 0  # payload keys held (retained, in-flight and upcoming rows)
    server_memory_bytes: int | None = None  # INFO memory used_memory of the whole server

    @classmethod
    def from_reads(
        cls,
        meta: Mapping[bytes, bytes],
        requeued: list[int],
        steps: list[int],
        claimable: list[int],
        replies: list[Any],
    ) -> StoreStats:
        """The snapshot from the shard's meta hash and the replies read for it: per step of ``steps`` its
        arrivals and its batch length, per step of ``claimable`` its rows, then the leases, the owners and
        the dead-letter count."""
        stats = cls(int(meta[b"next_step"]), int(meta[b"committed_upto"]), int(meta[b"gc_floor"]),
                    requeued=requeued, payloads=int(meta[b"payloads"]))  # fmt: skip
        waiting: list[tuple[int, list[bytes]]] = []
        for i, s in enumerate(steps):
            arrivals, fresh = replies[2 * i], int(replies[2 * i + 1])
            if arrivals or fresh:
                stats.upcoming[s] = (len(arrivals), fresh)
            waiting.append((s, arrivals))
        rows = dict(zip(claimable, replies[2 * len(steps) : 2 * len(steps) + len(claimable)]))
        leases, owners, stats.dead_letters = replies[2 * len(steps) + len(claimable):]
        waiting += [(int(s), rows.get(int(s), [])) for s, _ in leases]  # (rows of the steps in flight)
        for s, raws in sorted(waiting, key=lambda item: item[0]):
            for raw in raws:
                ref = RowRef.parse(raw.decode())
                if ref.version > 0:
                    first = s if ref.first_step is None else ref.first_step
                    stats.postponed.append(PostponedRow(ref, s, s - first))
        stats.in_flight = [StepLease(int(s), owners.get(s, b"").decode(), float(exp)) for s, exp in leases]
        return stats
