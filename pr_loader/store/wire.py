"""A claim's (or prefetch's) payloads read off the socket in one ``recv``, which releases the GIL once.

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
known, and the rest is received with ``MSG_WAITALL`` into one uninitialised buffer; payloads are read-only
``memoryview`` slices of it (no per-payload copy). Inside ``EXEC`` nothing can change a payload between the
script and the read, so the size is exact.

Only for a plain TCP or unix socket speaking RESP2 (:func:`supports`). Elsewhere (TLS, RESP3, in-process
fakeredis) :func:`pipelined` sends the commands without the transaction through redis-py (another client
may then run commands between the script and the SORT: ``BatchStore`` checks the payloads it gets); a
cluster reads payloads with MGET after the script instead.
"""

from __future__ import annotations

import socket
import struct
from typing import Any, NamedTuple

import numpy as np
import redis

__all__ = ["Payloads", "SizedReply", "pipelined", "supports", "transact"]

Payloads = list[bytes | memoryview | None]  # (this module only makes memoryviews)

_CHUNK = 1 << 16


class SizedReply(NamedTuple):
    """What :func:`transact` read: the script's reply (its sizes taken off) and the payloads (None when the
    script handed nothing over, the SORT's ``ResponseError`` when it was refused at run time)."""

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
    return plain and kwargs.get("protocol") in (None, 2, "2")


class _Reader:
    """RESP2 values off a blocking socket: small ones through a buffer, the big one straight into numpy."""

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

    def exactly(self, size: int) -> np.ndarray[Any, Any]:
        """The next ``size`` bytes, received with MSG_WAITALL into an uninitialised numpy buffer."""
        out = np.empty(size, dtype=np.uint8)
        have = min(len(self.buf) - self.pos, size)
        out[:have] = np.frombuffer(self.buf, np.uint8, have, self.pos)
        self.pos += have
        view = out.data
        while have < size:
            got = self.sock.recv_into(view[have:], size - have, socket.MSG_WAITALL)
            if not got:
                raise redis.ConnectionError("Redis closed the connection mid-reply")
            have += got
        return out


def _error(message: str) -> redis.exceptions.ResponseError:
    if message.startswith("NOSCRIPT"):
        return redis.exceptions.NoScriptError(message)
    if message.startswith("NOPERM"):
        return redis.exceptions.NoPermissionError(message)
    if message.startswith("EXECABORT"):
        return redis.exceptions.ExecAbortError(message)
    return redis.exceptions.ResponseError(message)


def _bulk_array_size(sizes: list[int]) -> int:
    """Bytes of the RESP2 array of bulk strings of these sizes."""
    return len(b"*%d\r\n" % len(sizes)) + sum(len(b"$%d\r\n" % n) + n + 2 for n in sizes)


def _slice_payloads(data: np.ndarray[Any, Any], sizes: list[int]) -> Payloads:
    """The bulk strings of an array reply of known sizes, as read-only views of ``data``; the framing (a
    ``$`` before and CRLF after every payload) is checked, vectorised."""
    if not sizes:
        if data.tobytes() != b"*0\r\n":
            raise redis.ConnectionError("payload reply out of step with the sizes its script gave")
        return []
    n = np.array(sizes, dtype=np.int64)
    head = np.array([len(str(size)) for size in sizes], dtype=np.int64) + 3  # "$<n>\r\n"
    at = len(b"*%d\r\n" % len(sizes)) + np.concatenate(([0], np.cumsum(head + n + 2)[:-1]))
    start = at + head
    end = start + n
    framed = bool(
        data[0] == ord("*")
        and (data[at] == ord("$")).all()
        and (data[end] == ord("\r")).all()
        and (data[end + 1] == ord("\n")).all()
    )
    if not framed:
        raise redis.ConnectionError("payload reply out of step with the sizes its script gave")
    view = data.data.toreadonly()
    return [view[a:b] for a, b in zip(start.tolist(), end.tolist())]


def _receive(reader: _Reader) -> tuple[Any, Payloads | Exception | None]:
    """The replies of MULTI, the three queued commands and EXEC: the script's reply (refs split again) and
    the payloads (or the SORT's error)."""
    queued = [reader.value() for _ in range(4)]
    first_error = next((r for r in queued if isinstance(r, Exception)), None)
    head = reader.array_header()  # (EXEC's reply, an array of the three replies: read one by one below)
    if first_error is not None:  # a command was refused at queueing: EXEC aborted
        raise first_error
    if isinstance(head, Exception):
        raise head
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
            raise script_reply
        return script_reply, sort_reply if isinstance(sort_reply, list) else None
    sizes = [int(n) for n in script_reply.pop().split()]
    script_reply[-1] = script_reply[-1].split(b" ") if script_reply[-1] else []
    if reader.peek() == b"-" or min(sizes, default=0) < 0:
        # the SORT was refused at run time (e.g. GET denied to this ACL user), or a payload is missing
        # (only a bug or a hand in Redis does that: the server's nil is "$-1" or, from SORT on Redis 7.0,
        # RESP3's "_"): read the reply value by value
        payloads = reader.value()
    else:
        payloads = _slice_payloads(reader.exactly(_bulk_array_size(sizes)), sizes)
    reader.value()  # (DEL)
    return script_reply, payloads


def transact(client: Any, sha: str, script_args: list[Any], xfer: str, pattern: str) -> SizedReply:
    """Send ``MULTI / EVALSHA sha 1 <script_args> / SORT xfer BY nosort GET pattern / DEL xfer / EXEC`` on a
    connection of ``client``'s pool (see :func:`supports`) and read the replies. ``script_args`` is the key
    then ARGV, with the hand-over flag ``'2'`` last. A refused command raises its ``ResponseError``
    (``NoScriptError`` for an unknown script); socket trouble raises ``ConnectionError`` /
    ``TimeoutError`` (the connection is dropped: it may be out of step)."""
    pool = client.connection_pool
    conn = pool.get_connection()
    try:
        conn.send_packed_command(conn.pack_commands([
            ("MULTI",), ("EVALSHA", sha, 1, *script_args), ("SORT", xfer, "BY", "nosort", "GET", pattern),
            ("DEL", xfer), ("EXEC",),
        ]))  # fmt: skip
        sock: socket.socket = conn._sock
        timeout = sock.gettimeout()
        sock.settimeout(None)  # MSG_WAITALL needs a blocking socket; SO_RCVTIMEO keeps the time limit
        seconds = 0.0 if timeout is None else timeout
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", int(seconds), int(seconds % 1 * 1e6)))  # fmt: skip
        try:
            script_reply, payloads = _receive(_Reader(sock))
        finally:
            sock.settimeout(timeout)
    except redis.exceptions.ResponseError:
        pool.release(conn)
        raise
    except BlockingIOError as exc:  # SO_RCVTIMEO ran out
        conn.disconnect()
        pool.release(conn)
        raise redis.TimeoutError(f"Timeout reading from socket: {exc}") from exc
    except BaseException as exc:
        conn.disconnect()
        pool.release(conn)
        if isinstance(exc, OSError):
            raise redis.ConnectionError(f"Error reading from socket: {exc}") from exc
        raise
    pool.release(conn)
    return SizedReply(script_reply, payloads)


def pipelined(client: Any, sha: str, script_args: list[Any], xfer: str, pattern: str) -> SizedReply:
    """The commands of :func:`transact` pipelined through redis-py, without MULTI/EXEC, with hand-over flag
    ``'1'`` (refs as a list, no sizes). The SORT's error is returned, the others' are raised."""
    pipe = client.pipeline(transaction=False)
    pipe.evalsha(sha, 1, *script_args)
    pipe.sort(xfer, by="nosort", get=pattern)
    pipe.delete(xfer)
    script_reply, payloads, deleted = pipe.execute(raise_on_error=False)
    for reply in (script_reply, deleted):
        if isinstance(reply, Exception):
            raise reply
    return SizedReply(script_reply, payloads)
