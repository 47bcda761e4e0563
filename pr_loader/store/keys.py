"""Every Redis key name of one run shard (``prl:{<run_id>:<rank>}:...``).

All keys of a shard share the hash tag ``{<run_id>:<rank>}``, so they live in one Redis Cluster slot and every
Lua script of the shard is atomic and cluster-safe. Scripts receive :attr:`ShardKeys.prefix` and build the
per-step names below themselves; keep the two in sync (``scripts.py`` uses the same suffixes). One name
exists only inside a script: POSTPONE keeps a copy of ``rows:<s>`` in ``rows:<s>:kept`` until it knows every
row it removes was there (and puts it back otherwise).
"""

from __future__ import annotations

from dataclasses import dataclass

from pr_loader.errors import ConfigError

_FORBIDDEN = "{}\n\r\t "


@dataclass(frozen=True)
class ShardKeys:
    """Key names of one rank shard of a run."""

    prefix: str

    @classmethod
    def for_shard(cls, run_id: str, rank: int) -> ShardKeys:
        """Keys of shard ``rank`` of ``run_id``; rejects ids that would break the hash tag."""
        if not run_id or any(ch in run_id for ch in _FORBIDDEN):
            raise ConfigError(f"run_id {run_id!r} must be non-empty without braces or whitespace")
        return cls(f"prl:{{{run_id}:{rank}}}:")

    @property
    def meta(self) -> str:
        return self.prefix + "meta"

    @property
    def steps(self) -> str:
        return self.prefix + "steps"

    @property
    def leases(self) -> str:
        return self.prefix + "leases"

    @property
    def owners(self) -> str:
        return self.prefix + "owners"

    @property
    def requeue(self) -> str:
        return self.prefix + "requeue"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    @property
    def materialised(self) -> str:
        return self.prefix + "materialised"

    def batch(self, step: int) -> str:
        return f"{self.prefix}batch:{step}"

    def arrivals(self, step: int) -> str:
        return f"{self.prefix}arrivals:{step}"

    def rows(self, step: int) -> str:
        return f"{self.prefix}rows:{step}"

    def journal(self, step: int) -> str:
        return f"{self.prefix}journal:{step}"

    def claimed(self, step: int) -> str:
        """The refs a claim of ``step`` took, in order (its journal entry holds their count alone)."""
        return f"{self.prefix}claimed:{step}"

    def payload(self, ref: str) -> str:
        """The string key holding the (immutable) payload of one ref."""
        return f"{self.prefix}payload:{ref}"

    def stage(self, op_id: str, i: int) -> str:
        """Where a call uploads payload i before its script adopts it (RENAME) as a payload key."""
        return f"{self.prefix}stage:{op_id}:{i}"

    def opids(self, step: int) -> str:
        """The op ids whose results belong to ``step`` (deleted with them when the step is collected)."""
        return f"{self.prefix}opids:{step}"

    def xfer(self, op_id: str) -> str:
        """Where a claim or prefetch leaves the refs it returns, for a ``SORT ... GET`` of their payloads
        pipelined right behind it (deleted by the same pipeline; a short TTL is the backstop)."""
        return f"{self.prefix}xfer:{op_id}"

    def payload_pattern(self) -> str | None:
        """``payload:*`` as a SORT GET pattern, or None when the prefix itself holds ``*`` or ``->``."""
        if "*" in self.prefix or "->" in self.prefix:
            return None
        return self.prefix + "payload:*"

    def op(self, op_id: str) -> str:
        return f"{self.prefix}op:{op_id}"

    def scan_pattern(self) -> str:
        """A SCAN MATCH pattern for every key of the shard (glob characters escaped)."""
        escaped = "".join("\\" + ch if ch in "*?[]\\" else ch for ch in self.prefix)
        return escaped + "*"
