"""How payloads travel with a store script: a claim's (or prefetch's) read off the socket in one ``recv``,
which releases the GIL once, and the staged upload of a postpone's (or materialise's) new payloads.

Why: redis-py reads a reply in ``socket_read_size`` (64 KiB) chunks, and each ``recv`` releases the GIL. On
the loader's background thread that is harmless while the caller sleeps or waits on a GPU, but a caller
busy in Python holds the GIL, and each release then costs up to a switch interval (5 ms) to get it back:
a 6 MB LRANGE on one thread took 1.2 s instead of 3 ms while another thread ran Python (measured). In the
loader that delays the batch a Python-heavy consumer asks for next (``benchmarks/bench_loader.py`` (a)).

How: the script, the payload read and the cleanup go out as ONE transaction::

    MULTI
    EVALSHA <CLAIM or PREFETCH> ... '2'
    SORT xfer:<op_id> BY nosort GET payload:*
    DEL xfer:<op_id>
    EXEC

With hand-over flag ``'2'`` the script's reply carries the refs it hands over joined into one string (quick
to parse here) and the byte size of each of their payloads (``-1`` for a missing one). The script's reply
comes first in the ``EXEC`` array, so once it is parsed the exact size of the ``SORT`` reply behind it is
known, and the rest is received with ``MSG_WAITALL`` into one buffer (reused once nothing views it);
payloads are read-only ``memoryview`` slices of it (no per-payload copy). Inside ``EXEC`` nothing can
change a payload between the script and the read, so the size is exact. A claim for a collated batch
passes a :class:`~pr_loader.store.records.Placer`: the tensors of its big rows are then received straight
into the batch columns (:class:`pr_loader.collate.ColumnPlacer`), in one scatter ``recvmsg`` with the rest
of the reply.

Only for a plain TCP or unix socket speaking RESP2 (:func:`supports`), and only while the payloads are
big (``ONE_PIECE``: the transaction and the sizes cost ~0.8 ms for 256 rows, measured). Otherwise
:func:`pipelined` sends the commands without the transaction (another client may then run commands between
the script and the SORT: ``BatchStore`` checks the payloads it gets): for small payloads on a plain socket
sent and parsed here with hiredis (13-17% faster than through redis-py's ``Pipeline``, measured), for TLS,
RESP3 and in-process fakeredis through redis-py. A cluster reads payloads with MGET after the script.

The write side, on the same sockets: a staged upload (``MULTI`` / ``MSET`` stages / ``EVALSHA`` / ``EXEC``)
goes out by scatter-gather ``sendmsg`` from the payloads' own buffers (:mod:`pr_loader.store.frames`:
redis-py's packing of the payloads cost as much as the raw write it was compared with).

The store's other script calls go over the same sockets (:func:`run_script`). All of them go over a
connection each thread keeps for them (:mod:`pr_loader.store.kept`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import threading
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar

import numpy as np
import redis
from redis._parsers.base import BaseParser
from redis.commands.core import Script

from pr_loader.store import frames
from pr_loader.store.kept import thread_connection
from pr_loader.store.records import Placer

try:
    import hiredis
except ImportError:  # (installed with pr_loader; without it the pipelined read goes through redis-py)
    hiredis = None  # type: ignore[assignment]

__all__ = [
    "ONE_PIECE", "Payloads", "Placer", "SizedReply", "pipelined", "run_script",
    "staged_in_transaction", "staged_then_run", "supports", "transact",
]  # fmt: skip

# A reply this big is received in one piece when it can be: redis-py would need 16 reads (GIL releases)
ONE_PIECE = 1 << 20
Payloads = list[bytes | memoryview | None]  # (views from transact, bytes from pipelined)
_T = TypeVar("_T")

_CHUNK = 1 << 16
# SO_RCVLOWAT while a big reply streams in over TCP, up to its last this-many bytes: the kernel then wakes
# the receiving thread once this much is queued, not at every packet. A receive that copies at memory speed
# empties the socket and sleeps again at once, and each wakeup costs redis-server CPU (its send path wakes
# us): 16 MiB replies cost the server 1.4 ms per reply in wakeups, against 0.3 ms for redis-py's slower
# reads of the same bytes (perf, measured).
_WAKE_BYTES = 1 << 19
_TCP = (socket.AF_INET, socket.AF_INET6)  # (the mark gates wakeups on TCP only: a unix socket wakes anyway)
_MSET_KEYS = 8  # keys per MSET of staged payloads: hiredis.pack_command slows down superlinearly with size
_MSET_BYTES = 64 << 20  # payload bytes per MSET sent from the payloads' own buffers (Redis must hold one
# whole command in its query buffer, 1 GiB at most by default)
_STAGE_TTL = 3600  # seconds an uploaded payload waits for its script (dropped by it in any case)


class SizedReply(NamedTuple):
    """What :func:`transact` or :func:`pipelined` read: the script's reply (sizes taken off) and the payloads
    (None when the script handed nothing over, the SORT's ``ResponseError`` when refused at run time)."""

    script_reply: Any
    payloads: Payloads | Exception | None


_CRLF = b"\r\n"


def supports(client: Any) -> bool:
    """Whether ``client`` talks RESP2 over a plain socket (what :func:`transact` reads)."""
    pool = getattr(client, "connection_pool", None)
    kwargs = getattr(pool, "connection_kwargs", None)
    if pool is None or kwargs is None:
        return False
    conn_class = getattr(pool, "connection_class", None)
    plain = conn_class in (redis.Connection, redis.UnixDomainSocketConnection)
    posix = sys.platform.startswith(("linux", "darwin"))  # (SO_RCVTIMEO as a struct timeval, MSG_WAITALL)
    return plain and posix and kwargs.get("protocol") in (None, 2, "2")


class _Buffers:
    """Receive buffers kept for reuse: a fresh one costs page faults (kernel zeroing), ~0.4 ms for a 6 MB
    claim (measured). A buffer is reused only once nothing refers to its memory: every payload view (and
    any tensor or array made from one) holds an export of the ``bytearray``, which then refuses to resize.
    At most ``_KEEP`` buffers of up to ``_KEEP_BYTES`` each are kept (bigger replies get a buffer of their
    own), so this holds at most 96 MiB."""

    _KEEP = 3  # (the loader holds two or three claims at once: being built, being read, handed out)
    _KEEP_BYTES = 32 << 20

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._kept: list[bytearray] = []

    @staticmethod
    def _unused(buffer: bytearray) -> bool:
        try:
            buffer.append(0)  # (BufferError while any view of it is alive)
        except BufferError:
            return False
        buffer.pop()
        return True

    def take(self, size: int) -> bytearray:
        """A buffer of at least ``size`` bytes that nothing else uses (contents undefined)."""
        if size > self._KEEP_BYTES:
            return bytearray(size)
        with self._lock:
            for buffer in self._kept:
                if self._unused(buffer):
                    if len(buffer) < size:
                        buffer.extend(bytes(size - len(buffer)))
                    return buffer
            fresh = bytearray(max(size, 1 << 20))
            self._kept.append(fresh)
            if len(self._kept) > self._KEEP:  # the oldest is still in use: it is its users' now
                del self._kept[0]
            return fresh


_BUFFERS = _Buffers()


def _new_buffers_in_child() -> None:  # (a fork may have happened while a parent thread held the lock)
    global _BUFFERS
    _BUFFERS = _Buffers()


os.register_at_fork(after_in_child=_new_buffers_in_child)


class _Reader:
    """RESP2 values off a blocking socket: small ones through a growing buffer, the payload reply straight
    into a buffer of its exact size (:meth:`exactly`)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.pos = 0

    def _more(self) -> None:
        chunk = self.sock.recv(_CHUNK)
        if not chunk:
            raise redis.ConnectionError("Redis closed the connection mid-reply")
        if self.pos:
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += chunk

    def peek(self) -> bytes:
        """The first byte of the next reply."""
        while len(self.buf) <= self.pos:
            self._more()
        return bytes(self.buf[self.pos : self.pos + 1])

    def _line(self) -> bytes:
        while True:
            end = self.buf.find(_CRLF, self.pos)
            if end >= 0:
                line = bytes(self.buf[self.pos : end])
                self.pos = end + 2
                return line
            self._more()

    def array_header(self) -> int | Exception:
        """The length of the next reply, an array (-1: nil), or its error."""
        line = self._line()
        if line[:1] == b"*":
            return int(line[1:])
        if line[:1] == b"-":
            return _error(line[1:].decode(errors="replace"))
        raise redis.ConnectionError(f"expected an array reply, got {line[:16]!r}")

    def value(self) -> Any:
        """One reply: bytes, int, None, a list, or an exception object for an error reply."""
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self.buf) - self.pos < n + 2:
                self._more()
            data = bytes(self.buf[self.pos : self.pos + n])
            self.pos += n + 2
            return data
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [self.value() for _ in range(n)]
        if kind == b":":
            return int(rest)
        if kind == b"+":
            return rest
        if kind == b"-":
            return _error(rest.decode(errors="replace"))
        if kind == b"_":  # (RESP3 null: SORT ... GET of a missing key on Redis 7.0 sends it to RESP2 too)
            return None
        raise redis.ConnectionError(f"unexpected RESP reply type {line[:16]!r}")

    def exactly(
        self, size: int, offsets: tuple[np.ndarray[Any, Any], ...] = (), placer: Placer | None = None
    ) -> tuple[bytearray, int]:
        """The next ``size`` bytes, received with MSG_WAITALL into (the start of) a reusable buffer; with a
        ``placer`` (and the payloads' ``offsets``) the last bytes of each payload (the tensors of a row: see
        :class:`Placer`) go where it says, in one scatter ``recvmsg`` planned from the head of payload 0."""
        out = _BUFFERS.take(size)
        have = min(len(self.buf) - self.pos, size)
        view = memoryview(out)
        try:
            view[:have] = self.buf[self.pos : self.pos + have]
            self.pos += have
            tail = 0
            if placer is not None and offsets and len(offsets[1]):
                starts, ends = offsets[1].tolist(), offsets[2].tolist()
                placer.begin(len(starts))
                head_end = min(starts[0] + placer.head_size, ends[0])
                have = self._fill(view, have, head_end)
                needed = placer.head_needed(view[starts[0] : head_end], ends[0] - starts[0])
                if needed:
                    have = self._fill(view, have, starts[0] + needed)
                    tail = placer.layout(view[starts[0] : starts[0] + needed], ends[0] - starts[0])
            if not tail or placer is None:
                self._fill(view, have, size)
                return out, size
            segments, cursor = [], 0
            for index, (start, end) in enumerate(zip(starts, ends)):
                if end - start >= tail + placer.head_size:
                    segments.append(view[cursor : end - tail])
                    segments += placer.destinations(index, end - start)
                    cursor = end
            segments.append(view[cursor:size])
            self._scatter(segments, view, have)
        finally:
            view.release()
        return out, size

    def _scatter(self, segments: list[memoryview], view: memoryview, have: int) -> None:
        """Receive the reply into ``segments`` (its bytes in order, each a slice of ``view`` or a destination
        of the placer); its first ``have`` bytes are in ``view`` already (copied to destinations from
        there)."""
        position, first = 0, 0
        while first < len(segments) and position < have:  # (what _more read ahead: 64 KiB at most)
            segment = segments[first]
            early = min(have - position, segment.nbytes)
            segment[:early] = view[position : position + early]
            position += segment.nbytes
            segments[first] = segment[early:]
            first += 1 if early == segment.nbytes else 0
        self._receive_all(segments[first:])

    def _fill(self, view: memoryview, have: int, upto: int) -> int:
        """Receive ``view[have:upto]``; returns ``max(have, upto)``."""
        if have < upto:
            self._receive_all([view[have:upto]])
        return max(have, upto)

    def _receive_all(self, segments: list[memoryview]) -> None:
        """Receive exactly the bytes of ``segments``, in order. On TCP, while more than :data:`_WAKE_BYTES`
        are still to come after a receive, that receive is woken only once that many are queued
        (``SO_RCVLOWAT``); the last ones are received with it back at 1 byte. Why that split: a blocking
        receive waits until the bytes *queued* reach the mark, not the bytes it still needs, so a mark above
        what is left to arrive would never be reached."""
        coming = sum(segment.nbytes for segment in segments)
        if coming < 2 * _WAKE_BYTES or self.sock.family not in _TCP:
            self._receive_segments(segments)
            return
        head, tail = _split(segments, coming - _WAKE_BYTES)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, _WAKE_BYTES)
        try:
            self._receive_segments(head)
        finally:
            with contextlib.suppress(OSError):  # (a broken socket: the error on its way says more)
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._receive_segments(tail)

    def _receive_segments(self, segments: list[memoryview]) -> None:
        """Receive exactly the bytes of ``segments`` with ``MSG_WAITALL``, ``frames.IOV_MAX`` per call."""
        first = 0
        while first < len(segments):
            chunk = segments[first : first + frames.IOV_MAX]
            got = self.sock.recvmsg_into(chunk, 0, socket.MSG_WAITALL)[0]
            if not got:
                raise redis.ConnectionError("Redis closed the connection mid-reply")
            if got == sum(map(len, chunk)):
                first += len(chunk)
                continue
            while got >= segments[first].nbytes:  # (a signal cut the receive short)
                got -= segments[first].nbytes
                first += 1
            segments[first] = segments[first][got:]


def _split(segments: list[memoryview], at: int) -> tuple[list[memoryview], list[memoryview]]:
    """``segments`` cut after their first ``at`` bytes (all of them, and none after, if they hold no more)."""
    for index, segment in enumerate(segments):
        if at < segment.nbytes:
            return [*segments[:index], segment[:at]], [segment[at:], *segments[index + 1 :]]
        at -= segment.nbytes
    return segments, []


_PARSE_ERROR: Callable[[str], redis.exceptions.RedisError] = BaseParser.parse_error  # (redis-py's own)


def _error(message: str) -> redis.exceptions.RedisError:
    """An error reply as the exception redis-py raises for it, with the whole message: ``LOADING`` (a
    restarted server reading its AOF) is a ``BusyLoadingError``, a ``ConnectionError`` the store retries;
    ``NOSCRIPT``, ``NOPERM``, ``OOM``, ... their own ``ResponseError`` classes."""
    return type(_PARSE_ERROR(message))(message)


def _raised(error: BaseException) -> BaseException:
    """A copy of an error reply read as a value, to raise: the value raised would be a cycle (its traceback
    holds the frames whose locals hold it) that kept the callers' locals alive until the cyclic GC ran."""
    return type(error)(*error.args)


def _bulk_array(sizes_text: bytes) -> tuple[int, tuple[np.ndarray[Any, Any], ...]]:
    """For the space-separated payload sizes of a RESP2 array of bulk strings (none missing): its byte size
    and, per payload, the offsets of its ``$`` header, first byte and end."""
    digits = sizes_text.split()
    sizes = np.array(list(map(int, digits)), dtype=np.int64)
    head = np.array(list(map(len, digits)), dtype=np.int64) + 3  # "$<n>\r\n"
    first = len(b"*%d\r\n" % len(digits))
    after = first + np.cumsum(head + sizes + 2)  # (each payload is followed by CRLF)
    end = after - 2
    heads = np.concatenate((np.array([first], dtype=np.int64), after[:-1]))[: len(digits)]
    return int(after[-1]) if len(digits) else first, (heads, end - sizes, end)


def _slice_payloads(received: tuple[bytearray, int], offsets: tuple[np.ndarray[Any, Any], ...]) -> Payloads:
    """The payloads of an array reply (the first ``size`` bytes of ``buffer``), as read-only views of it,
    after checking its framing (``*`` first, a ``$`` before and CRLF after every payload)."""
    buffer, size = received
    heads, start, end = offsets
    data = np.frombuffer(buffer, np.uint8, size)
    framed = bool(
        data[0] == ord("*")
        and (data[heads] == ord("$")).all()
        and (data[end] == ord("\r")).all()
        and (data[end + 1] == ord("\n")).all()
    )
    del data
    if not framed:
        raise redis.ConnectionError("payload reply out of step with the sizes its script gave")
    view = memoryview(buffer).toreadonly()
    return [view[a:b] for a, b in zip(start.tolist(), end.tolist())]


def _receive(reader: _Reader, placer: Placer | None) -> tuple[Any, Payloads | Exception | None]:
    """The replies of MULTI, the three queued commands and EXEC: the script's reply (refs split again) and
    the payloads (or the SORT's error), big ones where ``placer`` says."""
    queued = [reader.value() for _ in range(4)]
    first_error = next((r for r in queued if isinstance(r, Exception)), None)
    head = reader.array_header()  # (EXEC's reply, an array of the three replies: read one by one below)
    if first_error is not None:  # a command was refused at queueing: EXEC aborted
        raise _raised(first_error)
    if isinstance(head, Exception):
        raise _raised(head)
    if head != 3:
        raise redis.ConnectionError(f"EXEC replied with {head} replies, expected 3")
    script_reply = reader.value()
    sized = (
        isinstance(script_reply, list)
        and script_reply[:1] == [b"ok"]
        and all(isinstance(item, bytes) for item in script_reply[-2:])
    )
    if not sized:  # nothing handed over (or an error, NOSCRIPT among them)
        sort_reply = reader.value()
        reader.value()  # (DEL)
        if isinstance(script_reply, Exception):
            raise _raised(script_reply)
        return script_reply, sort_reply if isinstance(sort_reply, list) else None
    sizes_text = script_reply.pop()
    script_reply[-1] = script_reply[-1].split(b" ") if script_reply[-1] else []
    if reader.peek() == b"-" or b"-" in sizes_text:
        # the SORT was refused at run time (e.g. GET denied to this ACL user), or a payload is missing
        # (only a bug or a hand in Redis does that: the server's nil is "$-1" or, from SORT on Redis 7.0,
        # RESP3's "_"): read the reply value by value
        payloads = reader.value()
    else:
        total, offsets = _bulk_array(sizes_text)
        payloads = _slice_payloads(reader.exactly(total, offsets, placer), offsets)
    reader.value()  # (DEL)
    return script_reply, payloads


def _exchange(client: Any, exchange: Callable[[socket.socket], _T]) -> _T:
    """Run ``exchange`` (send commands, read their replies) on this thread's connection to ``client``'s server
    (:func:`pr_loader.store.kept.thread_connection`). A refused command raises its ``ResponseError``
    (``NoScriptError`` for an unknown script); socket trouble raises ``ConnectionError`` / ``TimeoutError``
    and closes the connection (it may be out of step)."""
    conn = thread_connection(client.connection_pool)
    try:
        return exchange(conn._sock)
    except redis.exceptions.ResponseError:
        raise  # (every reply was read: the connection is in step)
    except BlockingIOError as exc:  # SO_RCVTIMEO / SO_SNDTIMEO ran out
        conn.disconnect()
        raise redis.TimeoutError(f"Timeout on the socket: {exc}") from exc
    except BaseException as exc:
        conn.disconnect()
        if isinstance(exc, OSError):
            raise redis.ConnectionError(f"Error on the socket: {exc}") from exc
        raise


def transact(
    client: Any, sha: str, script_args: list[Any], xfer: str, pattern: str, placer: Placer | None = None
) -> SizedReply:
    """Send ``MULTI / EVALSHA sha 1 <script_args> / SORT xfer BY nosort GET pattern / DEL xfer / EXEC`` on a
    connection of ``client``'s pool (see :func:`supports`) and read the replies (errors: see
    :func:`_exchange`). ``script_args`` is the key then ARGV, with the hand-over flag ``'2'`` last;
    ``placer``: where big payloads' bytes go (:class:`Placer`)."""
    commands = [("MULTI",), ("EVALSHA", sha, 1, *script_args), ("SORT", xfer, "BY", "nosort", "GET", pattern),
                ("DEL", xfer), ("EXEC",)]  # fmt: skip

    def exchange(sock: socket.socket) -> SizedReply:
        frames.send(sock, frames.small(commands))
        return SizedReply(*_receive(_Reader(sock), placer))

    return _exchange(client, exchange)


def pipelined(client: Any, sha: str, script_args: list[Any], xfer: str, pattern: str) -> SizedReply:
    """The commands of :func:`transact` pipelined, no MULTI/EXEC, hand-over flag ``'1'``: the SORT returns
    the refs, each before its payload (``GET # GET pattern``), put back last in the script's reply. On a plain
    socket (:func:`supports`) parsed here with hiredis (redis-py's ``Pipeline`` costs 35-50 us more per call),
    else through redis-py. The SORT's error is returned (the refs are then unknown), the others' raised."""
    if hiredis is not None and supports(client):
        sort = ("SORT", xfer, "BY", "nosort", "GET", "#", "GET", pattern)
        commands = [("EVALSHA", sha, 1, *script_args), sort, ("DEL", xfer)]
        script_reply, both, deleted = _exchange(client, functools.partial(_pipeline, commands))
    else:
        pipe = client.pipeline(transaction=False)
        pipe.evalsha(sha, 1, *script_args)
        pipe.sort(xfer, by="nosort", get=["#", pattern])
        pipe.delete(xfer)
        script_reply, both, deleted = pipe.execute(raise_on_error=False)
    for reply in (script_reply, deleted):
        if isinstance(reply, Exception):
            raise _raised(reply)
    if isinstance(both, Exception):
        return SizedReply(script_reply, both)
    if script_reply[0] == b"ok":
        script_reply[-1] = both[0::2]
    return SizedReply(script_reply, both[1::2])


def run_script(client: Any, script: Script, keys: list[str], args: list[Any]) -> Any:
    """``script(keys=keys, args=args)``, on a plain socket (:func:`supports`) on this thread's kept connection
    (through redis-py's ``Script`` and pool a no-op script took 80-160 us more, measured), loading the script
    where the server lacks it; error replies raise redis-py's exceptions, as through redis-py."""
    if hiredis is None or not supports(client):
        return script(keys=keys, args=args)
    call = functools.partial(_pipeline, [("EVALSHA", script.sha, len(keys), *keys, *args)])
    (reply,) = _exchange(client, call)
    if isinstance(reply, redis.exceptions.NoScriptError):  # a restarted or flushed server: load, run again
        client.script_load(script.script)
        (reply,) = _exchange(client, call)
    if isinstance(reply, Exception):
        raise _raised(reply)
    return reply


def _pipeline(commands: list[tuple[Any, ...]], sock: socket.socket) -> list[Any]:
    """Send ``commands`` (without payloads) and read their replies."""
    frames.send(sock, frames.small(commands))
    return _read_replies(sock, len(commands))


def _read_replies(sock: socket.socket, count: int) -> list[Any]:
    """``count`` replies read with hiredis (error replies as exception objects)."""
    reader = hiredis.Reader()
    replies: list[Any] = []
    while len(replies) < count:
        try:
            reply = reader.gets()
        except hiredis.ProtocolError as exc:  # (out of step: the connection is dropped)
            raise redis.ConnectionError(f"unreadable reply from Redis: {exc}") from exc
        if reply is False:
            chunk = sock.recv(_CHUNK)
            if not chunk:
                raise redis.ConnectionError("Redis closed the connection mid-reply")
            reader.feed(chunk)
        else:
            replies.append(_error(str(reply)) if isinstance(reply, hiredis.ReplyError) else reply)
    return replies


def _receive_exec(reader: _Reader, queued: int) -> list[Any]:
    """The replies of MULTI, ``queued`` commands and EXEC: EXEC's results (an error reply of a command
    inside is an exception object in its place). A command refused when queued raises its error."""
    replies = [reader.value() for _ in range(queued + 1)]  # MULTI's OK, then QUEUED or a refusal each
    results = reader.value()  # (EXECABORT after a refusal)
    refused = next((r for r in replies if isinstance(r, Exception)), None)
    if refused is not None:
        raise _raised(refused)
    if isinstance(results, Exception):
        raise _raised(results)
    return list(results)


def _upload(uploads: list[tuple[Any, ...]], call: tuple[Any, ...], sock: socket.socket) -> list[Any]:
    """MULTI, the payload-carrying ``uploads``, the script ``call`` and EXEC in one send (the call's many
    small arguments packed by :func:`frames.small`: 23 against 8 us for a postpone of 16 rows, measured)."""
    frames.send(sock, [*frames.framed([("MULTI",), *uploads]), *frames.small([call, ("EXEC",)])])
    return _receive_exec(_Reader(sock), len(uploads) + 1)


def staged_in_transaction(
    client: Any, script: Script, meta_key: str, argv: list[str], names: list[str],
    payloads: list[bytes | memoryview],
) -> list[Any]:
    """Upload ``payloads`` (see :func:`frames.payload_buffer`) to the stage keys ``names`` and run ``script``
    (which adopts them by RENAME or drops them: payload bytes never enter Lua) in one round trip: a MULTI
    transaction of MSETs and the EVALSHA (measured faster than SETs with a TTL: fewer commands to pack and
    parse). On a plain socket (:func:`supports`) the payloads go out from their own buffers
    (:func:`frames.send`); otherwise through redis-py, whose packing copies them. Should the server have
    lost its script cache, the stages get a TTL and the script is loaded and run at once. The script gets
    one more ARGV, last: ``'1'`` when the stages carry a TTL (it drops it on adoption), else ``'0'``."""
    if supports(client):
        uploads: list[tuple[Any, ...]] = []
        args: list[Any] = []
        size = 0
        for name, payload in zip(names, payloads):
            if args and size + len(payload) > _MSET_BYTES:
                uploads.append(("MSET", *args))
                args, size = [], 0
            args += (name, payload)
            size += len(payload)
        if args:
            uploads.append(("MSET", *args))
        script_call = ("EVALSHA", script.sha, 1, meta_key, *argv, "0")
        *results, reply = _exchange(client, functools.partial(_upload, uploads, script_call))
    else:
        pipe = client.pipeline(transaction=True)
        for i in range(0, len(names), _MSET_KEYS):  # hiredis packs one huge command slowly
            pipe.mset(dict(zip(names[i : i + _MSET_KEYS], payloads[i : i + _MSET_KEYS])))
        pipe.evalsha(script.sha, 1, meta_key, *argv, "0")
        *results, reply = pipe.execute(raise_on_error=False)
    for item in results:
        if isinstance(item, Exception):  # e.g. OOM: the script then found its stages missing
            raise _raised(item)
    if isinstance(reply, redis.exceptions.NoScriptError):  # a restarted or flushed server
        expire = client.pipeline(transaction=False)
        for stage in names:  # (so that a crash right now cannot leave them forever)
            expire.expire(stage, _STAGE_TTL)
        expire.execute()
        return list(script(keys=[meta_key], args=[*argv, "1"]))  # (loads it, then runs it)
    if isinstance(reply, Exception):
        raise _raised(reply)
    return list(reply)


def staged_then_run(
    client: Any, script: Script, meta_key: str, argv: list[str], names: list[str],
    payloads: list[bytes | memoryview],
) -> list[Any]:
    """:func:`staged_in_transaction` for a cluster, where redis-py refuses scripts in pipelines: SETs with a
    TTL, then the script."""
    pipe = client.pipeline(transaction=False)
    for stage, payload in zip(names, payloads):
        pipe.set(stage, payload, ex=_STAGE_TTL)
    pipe.execute()
    return list(script(keys=[meta_key], args=[*argv, "1"]))
