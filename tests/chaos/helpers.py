"""Chaos harness pieces that know nothing of the store: knobs, tallies, Redis snapshots, trace checks,
forked child processes and SIGKILL hooks inside the Redis client.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import multiprocessing.connection
import os
import random
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
import redis.connection

from pr_loader.store import wire

# ---------------------------------------------------------------------------------------------------
# knobs


def chaos_iterations(default: int = 4) -> int:
    """``PR_LOADER_CHAOS_ITERATIONS`` (default small for CI; set thousands by hand)."""
    raw = os.environ.get("PR_LOADER_CHAOS_ITERATIONS", "")
    try:
        value = int(raw) if raw else default
    except ValueError:
        raise ValueError(f"PR_LOADER_CHAOS_ITERATIONS must be an integer, got {raw!r}") from None
    return max(1, value)


def chaos_seed() -> int:
    """``PR_LOADER_CHAOS_SEED`` (default 0): base seed of the randomised chaos choices."""
    return int(os.environ.get("PR_LOADER_CHAOS_SEED", "0") or 0)


# ---------------------------------------------------------------------------------------------------
# tally of what the suite did (printed by tests/chaos/conftest.py at the end of the session)


@dataclass
class ChaosTally:
    runs: int = 0
    consumer_kills: int = 0
    redis_kills: int = 0
    redis_restarts: int = 0
    aof_truncations: int = 0
    loss_windows_detected: int = 0
    drops: int = 0
    stalls: int = 0
    lease_steals: int = 0
    rows_checked: int = 0
    lost: int = 0
    duplicated: int = 0

    def merge(self, other: Mapping[str, int]) -> None:
        for key, value in other.items():
            if hasattr(self, key):
                setattr(self, key, getattr(self, key) + int(value))

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def line(self) -> str:
        d = self.as_dict()
        return (
            f"chaos: runs={d['runs']} consumer_kills={d['consumer_kills']} redis_kills={d['redis_kills']} "
            f"restarts={d['redis_restarts']} aof_truncations={d['aof_truncations']} "
            f"loss_windows_detected={d['loss_windows_detected']} drops={d['drops']} stalls={d['stalls']} "
            f"lease_steals={d['lease_steals']} rows_checked={d['rows_checked']} "
            f"lost={d['lost']} duplicated={d['duplicated']}"
        )


TALLY = ChaosTally()


# ---------------------------------------------------------------------------------------------------
# Redis snapshots


def snapshot(
    client: Any, pattern: str = "prl:*", *, skip: Callable[[str], bool] | None = None
) -> dict[str, tuple[str, Any]]:
    """Every key matching ``pattern`` with its type and full value (TTLs ignored), for before/after diffs."""
    out: dict[str, tuple[str, Any]] = {}
    for raw_key in client.scan_iter(match=pattern, count=1000):
        key = raw_key.decode() if isinstance(raw_key, bytes) else str(raw_key)
        if skip is not None and skip(key):
            continue
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else str(kind)
        value: Any
        if kind == "string":
            value = client.get(key)
        elif kind == "list":
            value = client.lrange(key, 0, -1)
        elif kind == "hash":
            value = dict(sorted(client.hgetall(key).items()))
        elif kind == "zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == "set":
            value = sorted(client.smembers(key))
        elif kind == "none":
            continue  # expired between SCAN and TYPE
        else:
            value = client.dump(key)
        out[key] = (kind, value)
    return out


def diff_snapshots(before: Mapping[str, tuple[str, Any]], after: Mapping[str, tuple[str, Any]]) -> list[str]:
    """Human-readable differences (empty list = identical)."""
    problems: list[str] = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            problems.append(f"deleted {key}")
        elif key not in before:
            problems.append(f"created {key} = {after[key]!r:.200}")
        elif before[key] != after[key]:
            problems.append(f"changed {key}: {before[key]!r:.200} -> {after[key]!r:.200}")
    return problems


# ---------------------------------------------------------------------------------------------------
# trace checks


@dataclass
class EpochReport:
    rows: int = 0
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.foreign)

    def describe(self) -> str:
        return (
            f"rows={self.rows} lost={len(self.lost)} {self.lost[:10]} duplicated={len(self.duplicated)} "
            f"{self.duplicated[:10]} foreign={self.foreign[:10]}"
        )


def check_exactly_once(
    committed_keys: Iterable[str], expected_keys: Iterable[str], *, tally: ChaosTally | None = TALLY
) -> EpochReport:
    """Compare committed row keys (``"<epoch>:<index>"``, any order) with the expected set."""
    counts = Counter(committed_keys)
    expected = set(expected_keys)
    report = EpochReport(rows=sum(counts.values()))
    report.lost = sorted(k for k in expected if counts[k] == 0)
    report.duplicated = sorted(k for k, n in counts.items() if n > 1)
    report.foreign = sorted(k for k in counts if k not in expected)
    if tally is not None:
        tally.rows_checked += report.rows
        tally.lost += len(report.lost)
        tally.duplicated += sum(counts[k] - 1 for k in report.duplicated)
    return report


def expected_keys(dataset_size: int, epochs: Sequence[int] | range) -> list[str]:
    return [f"{e}:{i}" for e in epochs for i in range(dataset_size)]


def first_difference(a: Sequence[Any], b: Sequence[Any]) -> str:
    """Where two traces first differ (for assertion messages)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return f"first difference at item {i}: {x!r:.300} != {y!r:.300}"
    if len(a) != len(b):
        return f"lengths differ: {len(a)} != {len(b)}"
    return "identical"


# ---------------------------------------------------------------------------------------------------
# checkpoints (the consumer's side of the state: written after each commit, atomically)


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def read_json(path: Path, default: dict[str, Any]) -> dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except FileNotFoundError:
        return dict(default)


# ---------------------------------------------------------------------------------------------------
# SIGKILL at chosen points, including inside the Redis client between sending a script and its reply


@dataclass(frozen=True)
class KillPlan:
    """Die at the ``occurrence``-th call (1-based) of ``method`` at ``where``.

    ``where``: ``before`` (call not started), ``inflight`` (request sent, reply not read: the server may
    or may not have applied it), ``after`` (call returned, caller did not record it yet). ``method`` is a
    store method name (``claim``, ``prefetch``, ``postpone``, ``commit``, ``materialise``, ``rollback``, ...)
    or ``checkpoint`` (between a commit and the consumer's checkpoint write; ``where`` is ignored).
    ``target``: ``self`` (SIGKILL the consumer) or ``redis`` (SIGKILL the server, wait for a restart,
    carry on).
    """

    method: str
    where: str
    occurrence: int
    target: str = "self"

    def __str__(self) -> str:
        return f"{self.target}@{self.where}:{self.method}#{self.occurrence}"


KILL_WHERE = ("before", "inflight", "after")
# RESP bulk strings of the commands that run a script or a transaction (redis-py sends names upper case)
_SCRIPT_COMMANDS = (b"$7\r\nEVALSHA\r\n", b"$4\r\nEVAL\r\n", b"$5\r\nFCALL\r\n", b"$4\r\nEXEC\r\n")
KILL_METHODS = ("claim", "prefetch", "postpone", "commit", "materialise", "checkpoint")


def random_kill_plan(
    rng: random.Random,
    *,
    target: str = "self",
    max_occurrence: int = 10,
    methods: Sequence[str] = KILL_METHODS,
) -> KillPlan:
    return KillPlan(rng.choice(list(methods)), rng.choice(KILL_WHERE), rng.randint(1, max_occurrence), target)


class Killer:
    """Counts store calls and fires a :class:`KillPlan`; installed in a (forked) consumer process only."""

    def __init__(
        self,
        plan: KillPlan | None,
        *,
        redis_pid: int | None = None,
        channel: multiprocessing.connection.Connection | None = None,
    ) -> None:
        self.plan = plan
        self.redis_pid = redis_pid
        self.channel = channel
        self.calls: Counter[str] = Counter()
        self.fired = False
        # per thread: the loader's background threads (read-ahead, heartbeat) talk to Redis concurrently
        self._local = threading.local()

    # the action -------------------------------------------------------------------------------------
    def fire(self) -> None:
        assert self.plan is not None
        self.fired = True
        if self.plan.target == "self":
            os.kill(os.getpid(), signal.SIGKILL)
            raise AssertionError("unreachable: SIGKILL did not kill")  # pragma: no cover
        assert self.redis_pid is not None and self.channel is not None
        os.kill(self.redis_pid, signal.SIGKILL)
        self.channel.send(("redis_killed", str(self.plan)))
        if not self.channel.poll(60):
            raise RuntimeError("redis was not restarted within 60 s")
        self.channel.recv()

    def _hit(self, method: str, where: str) -> bool:
        plan = self.plan
        return (
            plan is not None
            and not self.fired
            and plan.method == method
            and plan.where == where
            and self.calls[method] == plan.occurrence
        )

    # hooks ------------------------------------------------------------------------------------------
    def wrap(self, obj: Any, methods: Iterable[str]) -> None:
        """Wrap bound methods of ``obj`` (instance attributes shadow the class's)."""
        for name in methods:
            original = getattr(obj, name, None)
            if original is None:
                continue
            setattr(obj, name, self._wrapper(name, original))

    def _wrapper(self, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self.calls[name] += 1
            if self._hit(name, "before"):
                self.fire()
            inflight = self._hit(name, "inflight")
            self._local.armed = inflight
            try:
                result = original(*args, **kwargs)
            finally:
                self._local.armed = False
            if self._hit(name, "after"):
                self.fire()
            return result

        return wrapped

    def checkpoint_point(self) -> None:
        """Call between a commit and the checkpoint write."""
        self.calls["checkpoint"] += 1
        plan = self.plan
        if (
            plan is not None
            and not self.fired
            and plan.method == "checkpoint"
            and self.calls["checkpoint"] == plan.occurrence
        ):
            self.fire()

    @contextlib.contextmanager
    def client_hooks(self) -> Iterator[None]:
        """Patch redis-py so an armed ``inflight`` plan fires after a script was sent, before its reply."""
        cls = redis.connection.AbstractConnection
        orig_send = cls.send_packed_command
        orig_read = cls.read_response
        killer = self

        def send_packed_command(conn: Any, command: Any, check_health: bool = True) -> Any:
            result = orig_send(conn, command, check_health)
            parts = [command] if isinstance(command, (bytes, str)) else list(command)
            packed = b"".join(p if isinstance(p, bytes) else str(p).encode() for p in parts)
            # a script may ride at the end of a pipeline (payloads staged first): look at every command name
            killer._local.sent_script = any(name in packed for name in _SCRIPT_COMMANDS)
            return result

        def fire_if_armed() -> None:
            local = killer._local
            if getattr(local, "armed", False) and getattr(local, "sent_script", False):
                local.armed = False
                killer.fire()

        def read_response(conn: Any, *args: Any, **kwargs: Any) -> Any:
            fire_if_armed()
            return orig_read(conn, *args, **kwargs)

        def receive(*args: Any, **kwargs: Any) -> Any:  # (a claim's or prefetch's one-transaction read)
            fire_if_armed()
            return orig_receive(*args, **kwargs)

        def receive_exec(*args: Any, **kwargs: Any) -> Any:  # (a staged write sent from its own buffers)
            killer._local.sent_script = True  # (its transaction always carries the script)
            fire_if_armed()
            return orig_receive_exec(*args, **kwargs)

        def read_replies(*args: Any, **kwargs: Any) -> Any:  # (a small claim's or prefetch's pipelined read)
            killer._local.sent_script = True  # (its pipeline always starts with the script)
            fire_if_armed()
            return orig_read_replies(*args, **kwargs)

        orig_receive, orig_receive_exec = wire._receive, wire._receive_exec
        orig_read_replies = wire._read_replies
        cls.send_packed_command = send_packed_command  # type: ignore[method-assign]
        cls.read_response = read_response  # type: ignore[method-assign]
        wire._receive, wire._receive_exec, wire._read_replies = receive, receive_exec, read_replies
        try:
            yield
        finally:
            cls.send_packed_command = orig_send  # type: ignore[method-assign]
            cls.read_response = orig_read  # type: ignore[method-assign]
            wire._receive, wire._receive_exec = orig_receive, orig_receive_exec
            wire._read_replies = orig_read_replies


# ---------------------------------------------------------------------------------------------------
# forked child processes


@dataclass
class ChildResult:
    exitcode: int
    killed: bool
    error: str | None
    redis_kills: int = 0


def _child_main(
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    result_w: multiprocessing.connection.Connection,
) -> None:
    try:
        fn(*args, **kwargs)
    except BaseException as exc:
        import traceback

        result_w.send(f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        result_w.close()
        os._exit(3)
    result_w.send(None)
    result_w.close()
    os._exit(0)


def run_child(
    fn: Callable[..., Any],
    *args: Any,
    timeout: float = 60.0,
    on_redis_killed: Callable[[], object] | None = None,
    **kwargs: Any,
) -> ChildResult:
    """Run ``fn(*args, channel=..., **kwargs)`` in a forked process; SIGKILL is an expected outcome.

    The child gets ``channel`` (a pipe end): when it kills redis it sends ``("redis_killed", plan)`` and
    waits; we call ``on_redis_killed`` (restart the server) and answer ``"go"``.
    """
    ctx = multiprocessing.get_context("fork")
    result_r, result_w = ctx.Pipe(duplex=False)
    parent_end, child_end = ctx.Pipe(duplex=True)
    proc = ctx.Process(
        target=_child_main, args=(fn, args, {**kwargs, "channel": child_end}, result_w), daemon=True
    )
    proc.start()
    result_w.close()
    child_end.close()
    redis_kills = 0
    error: str | None = None
    channel_open = True
    deadline = time.monotonic() + timeout
    try:
        while proc.is_alive():
            if time.monotonic() > deadline:
                raise TimeoutError(f"chaos child {fn.__name__} still running after {timeout} s")
            if not channel_open:
                proc.join(0.05)
                continue
            if not parent_end.poll(0.05):
                continue
            try:
                message = parent_end.recv()
            except EOFError:
                channel_open = False  # the child is exiting; wait for it above
                continue
            if message[0] == "redis_killed":
                redis_kills += 1
                if on_redis_killed is None:
                    raise RuntimeError("child killed redis but no restart callback was given")
                on_redis_killed()
                parent_end.send("go")
        proc.join(10)
        if result_r.poll(0):
            with contextlib.suppress(EOFError):
                error = result_r.recv()
    finally:
        if proc.is_alive():
            proc.kill()
            proc.join(10)
        parent_end.close()
        result_r.close()
    exitcode = proc.exitcode if proc.exitcode is not None else -999
    return ChildResult(
        exitcode=exitcode, killed=exitcode == -signal.SIGKILL, error=error, redis_kills=redis_kills
    )
