"""A small fault-injecting TCP proxy (127.0.0.1 only) between a Redis client and a redis-server.

One thread accepts, one thread per connection pumps both directions with ``select``. Faults:

* :meth:`ChaosProxy.drop_reply_after` — the next client request whose bytes contain a marker (for example
  an op id, or ``b"EVALSHA"``) is forwarded to the server, the server's reply is read and *discarded*, and
  both sockets are closed: the script ran, the client never hears about it. A retry with the same op id
  must not apply it twice.
* :meth:`ChaosProxy.drop_request` — the next matching request is swallowed and the connection closed
  before the server sees it (the op never ran).
* :meth:`ChaosProxy.stall` / :meth:`ChaosProxy.release` — stop forwarding in both directions (bytes stay
  queued in the kernel buffers) until released; stalled requests reach the server late, in order.
* :meth:`ChaosProxy.drop_all` — reset every open connection now.

Every fault is counted (``drops``, ``stalls``) so tests can report what they did and assert that a fault
actually hit.
"""

from __future__ import annotations

import contextlib
import random
import select
import socket
import threading
from dataclasses import dataclass, field

_CHUNK = 65536
_POLL = 0.05  # seconds between checks of the stop/stall flags; bounds every wait


@dataclass
class _Rule:
    marker: bytes
    forward: bool  # True: forward the request, discard the reply; False: swallow the request
    remaining: int


@dataclass
class ProxyStats:
    connections: int = 0
    drops: int = 0
    stalls: int = 0
    requests: int = 0
    dropped_markers: list[bytes] = field(default_factory=list)


class ChaosProxy:
    """Forward ``127.0.0.1:<port>`` to ``upstream_host:upstream_port`` with injectable faults."""

    def __init__(self, upstream_port: int, *, upstream_host: str = "127.0.0.1") -> None:
        self.upstream = (upstream_host, upstream_port)
        self._listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self._listener.settimeout(_POLL)
        self.port: int = int(self._listener.getsockname()[1])
        self.stats = ProxyStats()
        self._lock = threading.Lock()
        self._rules: list[_Rule] = []
        self._random: tuple[bytes, float, random.Random] | None = None
        self._unstalled = threading.Event()
        self._unstalled.set()
        self._stop = threading.Event()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._threads: list[threading.Thread] = []
        self._accept_thread = threading.Thread(target=self._accept_loop, name="chaos-proxy", daemon=True)

    # -- lifecycle -----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> ChaosProxy:
        self._accept_thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        self._unstalled.set()
        self.drop_all(count=False)
        self._accept_thread.join(timeout=5)
        for thread in list(self._threads):
            thread.join(timeout=5)
        self._listener.close()

    def __enter__(self) -> ChaosProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- faults --------------------------------------------------------------------------------------
    def drop_reply_after(self, marker: bytes, times: int = 1) -> None:
        """Forward the next ``times`` requests containing ``marker``, discard their replies, cut the line."""
        with self._lock:
            self._rules.append(_Rule(marker, True, times))

    def drop_request(self, marker: bytes, times: int = 1) -> None:
        """Swallow the next ``times`` requests containing ``marker`` and cut the line."""
        with self._lock:
            self._rules.append(_Rule(marker, False, times))

    def drop_replies_randomly(self, marker: bytes, probability: float, rng: random.Random) -> None:
        """From now on, drop the reply of each request containing ``marker`` with ``probability``."""
        with self._lock:
            self._random = (marker, probability, rng)

    def pending_rules(self) -> int:
        with self._lock:
            return sum(rule.remaining for rule in self._rules)

    def clear_rules(self) -> None:
        with self._lock:
            self._rules.clear()
            self._random = None

    def stall(self) -> None:
        with self._lock:
            self.stats.stalls += 1
        self._unstalled.clear()

    def release(self) -> None:
        self._unstalled.set()

    def drop_all(self, *, count: bool = True) -> int:
        """Close every open client/server connection pair now; returns how many were open."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
            if count and pairs:
                self.stats.drops += len(pairs)
        for client, upstream in pairs:
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
        return len(pairs)

    # -- internals -----------------------------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            with self._lock:
                self.stats.connections += 1
                self._pairs.append((client, upstream))
                self._threads = [t for t in self._threads if t.is_alive()]
            thread = threading.Thread(target=self._pump, args=(client, upstream), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _match(self, data: bytes) -> _Rule | None:
        with self._lock:
            self.stats.requests += 1
            for rule in self._rules:
                if rule.remaining > 0 and rule.marker in data:
                    rule.remaining -= 1
                    if rule.remaining == 0:
                        self._rules.remove(rule)
                    self.stats.drops += 1
                    self.stats.dropped_markers.append(rule.marker)
                    return rule
            if self._random is not None:
                marker, probability, rng = self._random
                if marker in data and rng.random() < probability:
                    self.stats.drops += 1
                    self.stats.dropped_markers.append(marker)
                    return _Rule(marker, True, 0)
        return None

    def _pump(self, client: socket.socket, upstream: socket.socket) -> None:
        discard_reply = False
        try:
            while not self._stop.is_set():
                if not self._unstalled.wait(_POLL):
                    continue
                readable, _, _ = select.select([client, upstream], [], [], _POLL)
                if not self._unstalled.is_set():
                    continue  # a stall began while we waited: keep the bytes queued
                for sock in readable:
                    data = sock.recv(_CHUNK)
                    if not data:
                        return
                    if sock is client:
                        rule = self._match(data)
                        if rule is not None and not rule.forward:
                            return  # swallowed: the server never sees it
                        upstream.sendall(data)
                        if rule is not None:
                            discard_reply = True
                    else:
                        if discard_reply:
                            return  # the server replied; the client never gets it
                        client.sendall(data)
        except OSError:
            return
        finally:
            with self._lock:
                if (client, upstream) in self._pairs:
                    self._pairs.remove((client, upstream))
            for sock in (client, upstream):
                with contextlib.suppress(OSError):
                    sock.close()
