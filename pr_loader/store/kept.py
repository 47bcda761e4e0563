"""Each thread's own connection to a client's server, for :mod:`pr_loader.store.wire`'s reads and uploads.

Made with the client pool's connection class and settings but kept outside the pool, from call to call,
its socket always blocking (what ``MSG_WAITALL`` and a whole ``sendmsg`` need), the connection's timeout
kept as ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``. Why: taking a connection from redis-py's pool and switching its
socket to blocking and back cost 35-55 us per call with cold caches, right after a big claim (measured), a
fixed cost the raw commands compared with do not pay.

Lifetime: a connection lives in a ``threading.local`` the pool holds. It is closed when its thread ends or
the pool is collected (:meth:`KeptConnection.__del__`), or by :func:`close_kept` on its own thread; one
found closed or out of step (:meth:`KeptConnection.usable`) is opened again, and a forked child opens its
own.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import struct
import threading
from typing import Any

import redis

__all__ = ["KeptConnection", "close_kept", "thread_connection"]

_ATTRIBUTE = "_pr_loader_wire"  # (on a client's pool: a threading.local of each thread's KeptConnection)


class KeptConnection:
    """A thread's connection, the process it belongs to, and a poller of its socket."""

    __slots__ = ("conn", "pid", "poller")

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.pid = os.getpid()
        self.poller = select.poll()

    def __del__(self) -> None:
        # (its thread ended, or its pool was collected: close the socket now, not when the cyclic collector
        # frees redis-py's connection, which its parser refers back to)
        with contextlib.suppress(Exception):  # (interpreter shutdown: the socket goes either way)
            self.conn.disconnect()

    def usable(self) -> bool:
        """Whether the connection is open and in step: nothing to read on it (an end of file, the server
        having closed it, e.g. its ``timeout`` or ``CLIENT KILL``, or bytes nobody asked for, would be).
        One ``poll`` with no wait, as redis-py's pool checks a connection it hands out."""
        return self.conn._sock is not None and not self.poller.poll(0)

    def open(self) -> None:
        """Connect (redis-py's handshake: AUTH, SELECT, ...; its errors are redis-py's), then make the socket
        blocking with the connection's timeout as ``SO_RCVTIMEO`` / ``SO_SNDTIMEO``."""
        conn = self.conn
        conn.disconnect()
        conn.connect()
        sock: socket.socket = conn._sock
        timeout = sock.gettimeout()
        seconds = 0.0 if timeout is None else timeout
        limit = struct.pack("ll", int(seconds), int(seconds % 1 * 1e6))
        try:
            sock.settimeout(None)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, limit)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, limit)
            self.poller = select.poll()
            self.poller.register(sock, select.POLLIN)
        except OSError as exc:
            conn.disconnect()
            raise redis.ConnectionError(f"Error on the socket: {exc}") from exc


def thread_connection(pool: Any) -> Any:
    """This thread's own connection to the server of ``pool`` (a redis-py ``Connection``), open and in step;
    see the module's docstring."""
    local = pool.__dict__.get(_ATTRIBUTE)
    if local is None:
        local = pool.__dict__.setdefault(_ATTRIBUTE, threading.local())  # (atomic: one per pool)
    kept: KeptConnection | None = getattr(local, "kept", None)
    if kept is None or kept.pid != os.getpid():  # (a child must not touch its parent's socket)
        kept = local.kept = KeptConnection(pool.connection_class(**pool.connection_kwargs))
    if not kept.usable():
        kept.open()
    return kept.conn


def close_kept(client: Any) -> None:
    """Close the connection the calling thread keeps to ``client``'s server, if it has one (its next exchange
    opens it again); other threads' close when those threads end (:meth:`KeptConnection.__del__`)."""
    pool = getattr(client, "connection_pool", None)
    held = getattr(pool, "__dict__", {}).get(_ATTRIBUTE)
    kept: KeptConnection | None = getattr(held, "kept", None)
    if kept is not None and kept.pid == os.getpid():
        kept.conn.disconnect()
