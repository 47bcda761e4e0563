"""BatchStore: the Redis data model of one rank shard of a run (see docs/architecture.md).

Every multi-key change is one Lua script (:mod:`pr_loader.store.scripts`); this module validates arguments,
builds refs and retries connection errors with the same op id (:mod:`pr_loader.store.replies` maps
script replies to exceptions).
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import msgpack
import redis
from redis.commands.core import Script

from pr_loader.errors import (
    ConfigError,
    LeaseLost,
    NeedsMaterialisation,
    NoStepReady,
    RollbackOutOfRange,
    RunNotFound,
    StepStateError,
    StoreAuthError,
    StoreError,
    StoreUnavailable,
    UnsupportedSchema,
)
from pr_loader.store import frames, scripts, wire
from pr_loader.store.kept import close_kept
from pr_loader.store.keys import ShardKeys
from pr_loader.store.records import (
    ClaimedStep,
    DeadLetter,
    PrefetchResult,
    RowRef,
    RunConfig,
    StoredRow,
    StoreStats,
)
from pr_loader.store.replies import fail, raise_for, text

logger = logging.getLogger(__name__)

SCHEMA = "2"  # (2: a claim's refs are in claimed:<s>, not in its journal entry, where schema 1 had them)
_T = TypeVar("_T")
_CHUNK = 1000


def _held(step: int | None) -> str:
    """The ``held`` argument of CLAIM, POSTPONE and PREFETCH (-1: none)."""
    if step is None:
        return "-1"
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ConfigError(f"held must be a step number >= 0 or None, got {step!r}")
    return str(step)


class BatchStore:
    """Durable batch store of one rank shard of a run. Create it with :meth:`open`."""

    def __init__(self, client: Any, config: RunConfig, *, retry_seconds: float = 30.0) -> None:
        encoder = getattr(client, "get_encoder", None)
        if encoder is not None and encoder().decode_responses:
            raise ConfigError("BatchStore needs a redis client with decode_responses=False")
        self._client = client
        self._config = config
        self._keys = ShardKeys.for_shard(config.run_id, config.rank)
        self._retry_seconds = retry_seconds
        # Read payloads in the script's round trip (SORT ... GET), except on a cluster (MGET after the script)
        # or where the server refuses it (an ACL user without read access to every key): see _read_after.
        self._payload_pattern = None if hasattr(client, "get_node_from_key") else self._keys.payload_pattern()
        # ... on a plain socket as one transaction, received in one piece (pr_loader.store.wire)
        self._sized_reads = wire.supports(client)
        self._last_read: dict[str, int] = {}  # payload bytes the last CLAIM / PREFETCH read
        self._scripts: dict[str, Script] = {
            name: client.register_script(getattr(scripts, name))
            for name in ("OPEN", "MATERIALISE", "CLAIM", "RENEW", "COMMIT", "POSTPONE", "PREFETCH",
                         "DEAD_LETTER", "EXPIRE", "ROLLBACK", "READ_ROWS")
        }

    @classmethod
    def open(
        cls, client: Any, config: RunConfig, *, create: bool = True, retry_seconds: float = 30.0
    ) -> BatchStore:
        """Create the shard's meta or check it against ``config``.

        Raises RunConfigMismatch(field, stored, given), RunNotFound (create=False and no run) or
        UnsupportedSchema. ``retain_steps`` is not part of the identity: a different value updates the run.
        """
        store = cls(client, config, retry_seconds=retry_seconds)
        fields: list[str] = ["schema", SCHEMA, "created_at", repr(time.time()),
                             "retain_steps", str(config.retain_steps)]
        fields += config.identity_meta()
        reply = store._script("OPEN", "1" if create else "0", *fields)
        if reply[0] == b"missing":
            raise RunNotFound(f"run {config.run_id!r} rank {config.rank} not found at {store._address()}")
        if reply[0] == b"exists":
            raw = reply[1]
            stored = {text(raw[i]): text(raw[i + 1]) for i in range(0, len(raw), 2)}
            store._check_meta(stored)
        return store

    def _check_meta(self, stored: dict[str, str]) -> None:
        if stored.get("schema") != SCHEMA:
            raise UnsupportedSchema(
                f"run {self._config.run_id!r} has store schema {stored.get('schema')!r}; "
                f"this pr_loader reads schema {SCHEMA!r}"
            )
        mismatch = self._config.mismatch(stored)
        if mismatch is not None:
            raise mismatch
        if stored.get("retain_steps") != str(self._config.retain_steps):
            logger.info("run %s: retain_steps %s -> %s", self._config.run_id, stored.get("retain_steps"),
                        self._config.retain_steps)
            self.retrying(lambda: self._client.hset(self._keys.meta, "retain_steps",
                                                    str(self._config.retain_steps)))

    def _shard_node(self) -> Any:
        """The cluster node that holds this shard's slot, or None for a plain client."""
        if not hasattr(self._client, "get_node_from_key"):
            return None
        try:
            return self._client.get_node_from_key(self._keys.meta)
        except redis.exceptions.RedisClusterException:
            return None

    def _address(self) -> str:
        """host:port (or socket path) of the server holding the shard, for messages; never credentials."""
        node = self._shard_node()
        if node is not None:
            return f"{node.host}:{node.port}"
        kwargs = getattr(getattr(self._client, "connection_pool", None), "connection_kwargs", None) or {}
        if "path" in kwargs:
            return f"unix:{kwargs['path']}"
        if "host" in kwargs:
            return f"{kwargs['host']}:{kwargs.get('port', 6379)}"
        return type(self._client).__name__

    @property
    def config(self) -> RunConfig:
        return self._config

    @property
    def keys(self) -> ShardKeys:
        return self._keys

    # -- plumbing ---------------------------------------------------------------------------------

    def retrying(self, call: Callable[[], _T]) -> _T:
        """Run ``call`` (idempotent Redis commands, or a script with an op id), retrying connection errors
        with backoff for up to ``retry_seconds`` (then StoreUnavailable); other Redis errors become ours."""
        deadline = time.monotonic() + self._retry_seconds
        delay = 0.05
        while True:
            try:
                return call()
            except redis.AuthenticationError as exc:
                raise StoreAuthError(f"Redis at {self._address()} refused the credentials") from exc
            except redis.exceptions.NoPermissionError as exc:
                raise StoreAuthError(f"Redis at {self._address()} denied a command of run "
                                     f"{self._config.run_id!r}: {exc}") from exc
            except redis.ResponseError as exc:  # e.g. OOM, or a server that lacks a command
                raise StoreError(f"Redis at {self._address()} refused a command of run "
                                 f"{self._config.run_id!r}: {exc}") from exc
            except (redis.ConnectionError, redis.TimeoutError) as exc:
                if time.monotonic() + delay > deadline:
                    raise StoreUnavailable(
                        f"Redis at {self._address()} unreachable for {self._retry_seconds:g}s "
                        f"({type(exc).__name__})"
                    ) from exc
                logger.warning("Redis at %s: %s; retrying in %.2fs", self._address(), type(exc).__name__,
                               delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _script(self, name: str, *args: str | bytes | int) -> list[Any]:
        script = self._scripts[name]
        argv = [self._keys.prefix, *args]
        keys = [self._keys.meta]
        reply: list[Any] = self.retrying(lambda: wire.run_script(self._client, script, keys, argv))
        return reply

    def _read_after(
        self, name: str, op_id: str, *args: str, placer: wire.Placer | None = None
    ) -> tuple[list[Any], wire.Payloads | None]:
        """Run CLAIM, PREFETCH or READ_ROWS (last ARGV: the hand-over flag) and, where possible, read the
        payloads of the refs it returns in the same round trip: ``SORT xfer:<op_id> BY nosort ... GET
        payload:*`` and a DEL of the list go right behind the script (:mod:`pr_loader.store.wire`). Returns
        the reply and the payloads, or None for "read them with MGET" (a cluster, or a server that refused
        the SORT: then never tried again)."""
        pattern = self._payload_pattern
        if pattern is None:
            return self._script(name, op_id, *args, "0"), None
        script = self._scripts[name]
        # (a small reply gains nothing from the transaction: it and the STRLENs cost ~0.8 ms more, 256 rows)
        sized = self._sized_reads and self._last_read.get(name, wire.ONE_PIECE) >= wire.ONE_PIECE
        read = functools.partial(wire.transact, placer=placer) if sized else wire.pipelined
        script_args = [self._keys.meta, self._keys.prefix, op_id, *args, "2" if sized else "1"]
        xfer = self._keys.xfer(op_id)

        def run() -> wire.SizedReply:
            if placer is not None:
                placer.begin(0)  # (nothing an earlier, failed attempt placed counts)
            try:
                try:
                    return read(self._client, script.sha, script_args, xfer, pattern)
                except redis.exceptions.NoScriptError:  # a restarted or flushed server: load, run again
                    self._client.script_load(script.script)
                    return read(self._client, script.sha, script_args, xfer, pattern)
            except redis.exceptions.NoPermissionError as exc:
                if not sized:
                    raise
                return wire.SizedReply(None, exc)  # (refused when queued: the transaction did not run)

        reply, payloads = self.retrying(run)
        if isinstance(payloads, Exception):  # read them with MGET (which reports a failing server itself)
            self._sort_refused(payloads)
            if sized and reply is not None:
                return list(reply), None
            # no script run, or a reply without refs (the SORT has them): the refs of a replay (the op's
            # stored result), the rest of the first reply (e.g. the leases it expired)
            replayed = self._script(name, op_id, *args, "0")
            if reply is not None and reply[0] == replayed[0] == b"ok":
                replayed[:-1] = reply[:-1]
            return replayed, None
        if reply[0] != b"ok" or payloads is None:
            return list(reply), None
        self._last_read[name] = sum(map(len, filter(None, payloads)))  # (b"" and None count nothing)
        return list(reply), payloads

    def _sort_refused(self, error: Exception) -> None:
        """The server refused ``SORT ... GET``: read payloads with MGET (from now on, if it was denied)."""
        if isinstance(error, redis.exceptions.NoPermissionError) or "denied" in str(error):
            logger.info("Redis at %s refused SORT ... GET (%s); reading payloads with MGET from now on",
                        self._address(), error)
            self._payload_pattern = None
        else:
            logger.warning("SORT ... GET failed at %s (%s); reading payloads with MGET", self._address(),
                           error)

    def _rows(
        self,
        raw_refs: list[bytes],
        held: tuple[int, str] | None = None,
        payloads: wire.Payloads | None = None,
        known: Mapping[str, bytes | memoryview] | None = None,
    ) -> list[StoredRow]:
        """Rows of refs a script returned, with ``payloads`` already read or else read now by MGET
        (payloads are immutable, so reading them after the script is safe), except those in ``known``.

        A payload can only vanish meanwhile if the step stopped being ours (an expiry or rollback undid it):
        with ``held=(step, consumer)`` that is reported as LeaseLost.
        """
        refs = [r.decode() for r in raw_refs]
        if payloads is None or len(payloads) != len(refs):
            known = known or {}
            names = [self._keys.payload(r) for r in refs if r not in known]

            def read() -> list[bytes | memoryview | None]:
                out: list[bytes | memoryview | None] = []
                for i in range(0, len(names), _CHUNK):
                    out += self._client.mget(names[i:i + _CHUNK])
                return out

            fetched = iter(self.retrying(read) if names else [])
            payloads = [known[r] if r in known else next(fetched) for r in refs]
        # (by identity, not `None in`: that compares 256 memoryviews with ==, 70 us)
        ref = next((r for r, payload in zip(refs, payloads) if payload is None), None)
        if ref is not None:
            if held is not None and not self._holds(*held):
                raise LeaseLost(f"step {held[0]} was taken from {held[1]!r} while its rows were read")
            raise StoreError(f"payload of row {ref!r} of run {self._config.run_id!r} is gone "
                             "(rolled back or collected meanwhile?)")
        return list(map(StoredRow, refs, cast(list[bytes | memoryview], payloads)))

    def _holds(self, step: int, consumer_id: str) -> bool:
        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            pipe.hget(self._keys.steps, step)
            pipe.hget(self._keys.owners, step)
            return list(pipe.execute())

        state, owner = self.retrying(read)
        return bool(state == b"inflight" and owner == consumer_id.encode())

    def _staged_script(
        self, name: str, op_id: str, payloads: list[bytes | memoryview], *args: str
    ) -> list[Any]:
        """Upload payloads to stage:<op_id>:<i> and run a script that adopts (RENAME) or drops them (see
        :func:`wire.staged_in_transaction`; a cluster: :func:`wire.staged_then_run`), again while the
        script finds its stages lost (e.g. a server restart without fsync)."""
        names = [self._keys.stage(op_id, i) for i in range(len(payloads))]
        upload = wire.staged_then_run if self._shard_node() is not None else wire.staged_in_transaction
        run = functools.partial(upload, self._client, self._scripts[name], self._keys.meta,
                                [self._keys.prefix, op_id, *args], names, payloads)  # fmt: skip
        for _ in range(3):
            reply = self.retrying(run)
            if reply[0] != b"restage":
                return reply
        raise StoreError(f"staged payloads of {name.lower()} keep disappearing at {self._address()}")

    @staticmethod
    def _now(now: float | None) -> float:
        return time.time() if now is None else float(now)

    @staticmethod
    def _op(op_id: str | None) -> str:
        if op_id is None:
            return os.urandom(16).hex()  # (a uuid4's randomness, a quarter of its cost)
        if not op_id or any(ch.isspace() for ch in op_id):
            raise ConfigError(f"op_id must be non-empty without whitespace, got {op_id!r}")
        return op_id

    def _check_step(self, step: int, what: str = "step") -> None:
        if not isinstance(step, int) or isinstance(step, bool) or step < 0:
            raise ConfigError(f"{what} must be an int >= 0, got {step!r}")

    def _log_expired(self, expired: list[bytes]) -> None:
        for step in expired:
            logger.warning("run %s rank %d: lease of step %s expired; its rows were returned",
                           self._config.run_id, self._config.rank, text(step))

    # -- operations -------------------------------------------------------------------------------

    def is_materialised(self, step: int) -> bool:
        """Whether the fresh batch of ``step`` was written (and not yet garbage-collected)."""
        return bool(self.retrying(lambda: self._client.hexists(self._keys.materialised, step)))

    def materialise(self, step: int, rows: Sequence[tuple[int, bytes]]) -> bool:
        """Write the fresh batch of ``step`` as (dataset index, payload) pairs; False if it already was."""
        self._check_step(step)
        total = self._config.total_steps
        if total is not None and step >= total:
            raise ConfigError(f"step {step} is a drain step (run has {total} steps); it has no fresh batch")
        epoch = step // self._config.steps_per_epoch
        refs: list[str] = []
        payloads: list[bytes | memoryview] = []
        seen: set[int] = set()
        for index, payload in rows:
            if not isinstance(index, int) or isinstance(index, bool) or index < 0 or index in seen:
                raise ConfigError(f"step {step}: dataset index {index!r} is invalid or repeated")
            if not isinstance(payload, (bytes, bytearray, memoryview)):
                raise ConfigError(f"step {step}: payload of index {index} must be bytes")
            seen.add(index)
            refs.append(f"{epoch}:{index}:0:-")
            payloads.append(frames.payload_buffer(payload))
        reply = self._staged_script("MATERIALISE", os.urandom(16).hex(), payloads, str(step), *refs)
        return bool(reply[1])

    def claim(
        self,
        consumer_id: str,
        lease_seconds: float,
        *,
        now: float | None = None,
        op_id: str | None = None,
        known: Mapping[str, bytes | memoryview] | None = None,
        held: int | None = None,
        placer: wire.Placer | None = None,
    ) -> ClaimedStep | None:
        """Lease the next step: requeued steps first, else the cursor step. None when the run is finished.

        ``known``: payloads the caller already read, by ref (e.g. of the step it expects next, read before
        the claim: payloads are immutable, so an early read stays valid). The claim then returns its refs
        alone and reads only the payloads of the other refs.

        ``held``: a step this consumer claimed ahead of its use. If it is still leased to ``consumer_id`` and
        untouched (nothing moved into or out of it), it is given back first, as a lease expiry would (the
        claim then takes it again, with what arrived meanwhile). ``postpone`` and ``prefetch`` take it too.

        ``placer``: where the tensors of big rows are received, when the payloads come in one piece
        (:class:`pr_loader.collate.ColumnPlacer`); such rows come back ``placed``.

        Raises NeedsMaterialisation(step) if the cursor step has no batch yet, NoStepReady if only leased
        steps remain (they may still postpone rows or expire).
        """
        if lease_seconds <= 0:
            raise ConfigError(f"lease_seconds must be > 0, got {lease_seconds!r}")
        now_ = self._now(now)
        expiry = now_ + float(lease_seconds)
        args = (self._op(op_id), consumer_id, repr(now_), repr(expiry), _held(held))
        if known:
            reply, payloads = self._script("CLAIM", *args, "0"), None
        else:
            reply, payloads = self._read_after("CLAIM", *args, placer=placer)
        status = reply[0]
        if status == b"ok":
            self._log_expired(reply[3])
            step = int(reply[1])
            rows = self._rows(reply[4], (step, consumer_id), payloads, known)
            if placer is not None and payloads is not None:
                for index, placed in placer.placements.items():
                    rows[index].placed = placed
            return ClaimedStep(step, rows, float(reply[2]))
        if status == b"needs":
            self._log_expired(reply[2])
            raise NeedsMaterialisation(int(reply[1]))
        if status == b"wait":
            self._log_expired(reply[2])
            raise NoStepReady(float(reply[1]))
        if status == b"done":
            self._log_expired(reply[1])
            return None
        fail(reply)

    def renew(self, step: int, consumer_id: str, lease_seconds: float, *, now: float | None = None) -> float:
        """Extend the lease of a step held by ``consumer_id``; returns the new expiry. LeaseLost if lost."""
        now_ = self._now(now)
        expiry = now_ + float(lease_seconds)
        raise_for(self._script("RENEW", str(step), consumer_id, repr(now_), repr(expiry)), step)
        return expiry

    def commit(
        self, step: int, consumer_id: str, *, now: float | None = None, op_id: str | None = None
    ) -> None:
        """Commit a leased step (LeaseLost / StepStateError otherwise) and garbage-collect old steps."""
        reply = self._script("COMMIT", self._op(op_id), str(step), consumer_id, repr(self._now(now)))
        raise_for(reply, step)

    def postpone(
        self,
        step: int,
        consumer_id: str,
        rows: Sequence[tuple[RowRef, bytes]],
        target_step: int,
        *,
        now: float | None = None,
        op_id: str | None = None,
        held: int | None = None,
    ) -> list[RowRef]:
        """Move rows of ``step`` to the end of ``arrivals:<target_step>`` as new versions with new payloads.

        Returns the new refs in order. RowsNotInStep if a ref is not in the step (nothing changes);
        StepStateError if the target is not after ``step`` or was already claimed. ``held``: see
        :meth:`claim` (given back only when the postpone goes through; it may then be the target).
        """
        self._check_step(target_step, "target_step")
        if target_step <= step:
            raise StepStateError(f"postpone target {target_step} must be after step {step}")
        args: list[str] = [str(step), consumer_id, repr(self._now(now)), str(target_step), _held(held)]
        new_refs: list[RowRef] = []
        payloads: list[bytes | memoryview] = []
        seen: set[str] = set()
        for ref, payload in rows:
            old = ref.encode()
            if old in seen:
                raise ConfigError(f"row {old!r} is given twice to postpone")
            seen.add(old)
            new = ref.postponed(step)
            new_refs.append(new)
            payloads.append(frames.payload_buffer(payload))  # (a claimed row's view is sent, not copied)
            args += [old, new.encode()]
        if not new_refs:
            return []
        reply = self._staged_script("POSTPONE", self._op(op_id), payloads, *args)
        raise_for(reply, step)
        return new_refs

    def prefetch(
        self,
        step: int,
        consumer_id: str,
        count: int,
        last_source_step: int,
        *,
        now: float | None = None,
        op_id: str | None = None,
        held: int | None = None,
    ) -> PrefetchResult:
        """Take up to ``count`` fresh rows from the heads of steps step+1 .. last_source_step into ``step``.

        Stops at the first unmaterialised source step and names it in ``needs_materialise``. ``held``: see
        :meth:`claim` (given back first, once the lease of ``step`` is checked).
        """
        if count < 0:
            raise ConfigError(f"prefetch count must be >= 0, got {count!r}")
        reply, payloads = self._read_after("PREFETCH", self._op(op_id), str(step), consumer_id,
                                           repr(self._now(now)), str(count), str(last_source_step),
                                           _held(held))
        raise_for(reply, step)
        needs = int(reply[1])
        rows = self._rows(reply[2], (step, consumer_id), payloads)
        return PrefetchResult(rows, None if needs < 0 else needs)

    def expire_leases(self, *, now: float | None = None) -> list[int]:
        """Return the rows of steps whose lease ran out before ``now``; returns those steps."""
        reply = self._script("EXPIRE", repr(self._now(now)))
        self._log_expired(reply[1])
        return [int(s) for s in reply[1]]

    def rollback(self, to_step: int, *, op_id: str | None = None) -> None:
        """Undo everything after committed step ``to_step`` (-1 = fresh run) in one atomic script.

        RollbackOutOfRange if to_step is below the retained journal or after committed_upto.
        """
        reply = self._script("ROLLBACK", self._op(op_id), str(to_step))
        if reply[0] == b"range":
            raise RollbackOutOfRange(
                f"cannot roll back run {self._config.run_id!r} to step {to_step}: "
                f"allowed {int(reply[1])} .. {int(reply[2])}"
            )
        raise_for(reply)

    def dead_letter(self, step: int, ref: RowRef, reason: str, *, op_id: str | None = None) -> None:
        """Take ``ref`` out of in-flight ``step`` into the dead-letter list (kept with its payload)."""
        encoded = ref.encode()
        payload = self.retrying(lambda: self._client.get(self._keys.payload(encoded)))
        record = msgpack.packb(
            {"ref": encoded, "step": step, "reason": reason, "payload": payload or b"", "at": time.time()}
        )
        reply = self._script("DEAD_LETTER", self._op(op_id), str(step), encoded, record)
        raise_for(reply, step)
        logger.warning("run %s: row %s of step %d dead-lettered: %s", self._config.run_id, encoded, step,
                       reason)

    def dead_letters(self, start: int = 0, end: int = -1) -> list[DeadLetter]:
        """Dead-letter records (LRANGE semantics for start/end)."""
        raw = self.retrying(lambda: self._client.lrange(self._keys.dead, start, end))
        out = []
        for item in raw:
            rec = msgpack.unpackb(item)
            out.append(DeadLetter(RowRef.parse(rec["ref"]), rec["step"], rec["reason"], rec["payload"],
                                  rec["at"]))
        return out

    def read_rows(
        self, step: int, *, known: Mapping[str, bytes | memoryview] | None = None
    ) -> list[StoredRow]:
        """Current rows of a step (rows of a claimed step, else arrivals then fresh rows); read-only.
        ``known``: payloads the caller already has, by ref (not read again; see :meth:`claim`); without
        them the payloads come with the refs, as a claim's do (:meth:`_read_after`)."""
        op_id = self._op(None)  # (names the hand-over list alone: nothing is stored under it)
        if known:
            reply, payloads = self._script("READ_ROWS", op_id, str(step), "0"), None
        else:
            reply, payloads = self._read_after("READ_ROWS", op_id, str(step))
        return self._rows(reply[1], payloads=payloads, known=known)

    def stats(self) -> StoreStats:
        """Counts of upcoming rows, postponed rows not yet committed (waiting in a later step, or in a step
        in flight) and their staleness, leases and dead letters."""
        keys = self._keys
        meta = self.retrying(lambda: self._client.hgetall(keys.meta))
        next_step = int(meta[b"next_step"])
        last = max(next_step, int(meta.get(b"max_target", b"-1")))
        mat = self.retrying(lambda: self._client.hkeys(keys.materialised))
        requeued = [int(s) for s in self.retrying(lambda: self._client.zrange(keys.requeue, 0, -1))]
        candidates = sorted({int(s) for s in mat} | set(range(next_step, last + 1)) | set(requeued))
        # rows of every step that may be in flight when the pipeline runs (a claim moves arrivals into them)
        leased = self.retrying(lambda: self._client.zrange(keys.leases, 0, -1))
        claimable = sorted(set(candidates) | {int(s) for s in leased})

        def read() -> list[Any]:
            pipe = self._client.pipeline(transaction=False)
            for s in candidates:
                pipe.lrange(keys.arrivals(s), 0, -1)
                pipe.llen(keys.batch(s))
            for s in claimable:
                pipe.lrange(keys.rows(s), 0, -1)
            pipe.zrange(keys.leases, 0, -1, withscores=True)
            pipe.hgetall(keys.owners)
            pipe.llen(keys.dead)
            return list(pipe.execute())

        stats = StoreStats.from_reads(meta, requeued, candidates, claimable, self.retrying(read))
        node = self._shard_node()
        try:  # on a cluster: the master that holds the shard
            info = self._client.info("memory", **({} if node is None else {"target_nodes": node}))
            stats.server_memory_bytes = int(info["used_memory"])
        except (redis.ResponseError, KeyError, TypeError):
            stats.server_memory_bytes = None  # no INFO (fakeredis, ACL) or an unexpected reply
        return stats

    def close(self) -> None:
        """Close the connection the calling thread keeps for this store's payload reads and uploads (one per
        thread, outside the client's pool: :mod:`pr_loader.store.kept`); the next call opens it again. The
        client and its pool are the caller's to close."""
        close_kept(self._client)

    def delete_run(self) -> int:
        """Delete every key of this shard; returns how many were deleted."""
        pattern = self._keys.scan_pattern()

        def delete() -> int:
            found = list(self._client.scan_iter(match=pattern, count=1000))
            deleted = 0
            for i in range(0, len(found), 500):
                deleted += int(self._client.delete(*found[i:i + 500]))
            return deleted

        count = self.retrying(delete)
        logger.info("run %s rank %d: deleted %d keys", self._config.run_id, self._config.rank, count)
        return count
