"""The one-transaction payload read of a claim or prefetch (pr_loader.store.wire), on real redis-servers."""

from __future__ import annotations

import logging
import os
import pickle
import signal
import socket
import threading
import time
from typing import Any

import fakeredis
import numpy as np
import pytest
import redis

from pr_loader.errors import NoStepReady, StoreUnavailable
from pr_loader.store import BatchStore, wire
from pr_loader.store import kept as kept_module
from pr_loader.store.kept import thread_connection
from tests.servers import REDIS_SERVER, RedisServer
from tests.store.conftest import make_config

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")


def _store(client: redis.Redis, batch_size: int = 4) -> BatchStore:
    return BatchStore.open(client, make_config(batch_size=batch_size, steps_per_epoch=2))


def test_claim_and_prefetch_payloads_arrive_in_one_buffer(own_server: RedisServer) -> None:
    """Sizes from 0 bytes to several MiB, in list order; every payload is a read-only view of one buffer."""
    client = own_server.client()
    store = _store(client, batch_size=6)
    assert store._sized_reads
    sizes = [0, 1, 9, 10, 4 << 20, 65536 + 3]
    payloads = [os.urandom(n) for n in sizes]
    store.materialise(0, list(enumerate(payloads)))
    store.materialise(1, [(6 + i, bytes([i]) * (i + 1)) for i in range(6)])
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None
    assert [bytes(row.payload) for row in claimed.rows] == payloads
    views = [row.buffer for row in claimed.rows]
    assert all(isinstance(v, memoryview) and v.readonly for v in views)
    assert len({id(v.obj) for v in views}) == 1  # (one buffer, no per-payload copy)
    sock = thread_connection(client.connection_pool)._sock  # (TCP: the 4 MiB came under the mark)
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1  # (back at 1 for the next replies)
    sent = pickle.loads(pickle.dumps(claimed))  # (a worker process hands its claims over pickled)
    assert [r.payload for r in sent.rows] == payloads
    assert [r.ref_text for r in sent.rows] == [r.ref_text for r in claimed.rows]
    fetched = store.prefetch(0, "c", 3, 1, now=1)
    assert [bytes(row.payload) for row in fetched.rows] == [b"\0", b"\1\1", b"\2\2\2"]
    assert all(type(row.buffer) is memoryview for row in fetched.rows)  # (a store's first read: one piece)
    store._last_read.clear()  # (as for a store's first read: in one piece)
    assert store.prefetch(0, "c", 0, 1, now=1).rows == []  # (nothing handed over: "*0" behind the script)
    assert client.keys(store.keys.prefix + "xfer:*") == []
    client.close()


def test_a_flushed_script_cache_is_reloaded_within_the_call(own_server: RedisServer) -> None:
    client = own_server.client()
    store = _store(client)
    store.materialise(0, [(i, b"x%d" % i) for i in range(4)])
    client.script_flush()
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None and [bytes(r.payload) for r in claimed.rows] == [b"x0", b"x1", b"x2", b"x3"]
    assert type(claimed.rows[0].buffer) is memoryview  # (the transaction, not the pipelined fallback)
    client.close()


def test_a_stopped_server_times_out_instead_of_hanging(own_server: RedisServer) -> None:
    """The blocking MSG_WAITALL read keeps the client's socket timeout (SO_RCVTIMEO)."""
    client = own_server.client(socket_timeout=0.3)
    store = BatchStore.open(client, make_config(steps_per_epoch=2), retry_seconds=0.5)
    store.materialise(0, [(i, b"y" * 100) for i in range(4)])
    assert own_server.proc is not None
    os.kill(own_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.claim("c", 60, now=0)
        assert time.monotonic() - started < 10
    finally:
        os.kill(own_server.proc.pid, signal.SIGCONT)
    claimed = store.claim("c", 60, now=0)  # (step 1 if the server ran the timed-out transaction after all)
    assert claimed is not None and claimed.step in (0, 1)
    client.close()


def test_the_read_leaves_the_connection_usable(own_server: RedisServer) -> None:
    """Replies after the transaction are in step: the connection serves the next read, and the client's own
    connection (from its pool) serves ordinary commands meanwhile."""
    client = own_server.client(max_connections=1)
    store = _store(client)
    for step in range(2):
        store.materialise(step, [(4 * step + i, b"z" * (50_000 + i)) for i in range(4)])
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None
    assert client.ping() and client.echo("after") == b"after"
    store.commit(0, "c", now=1)
    second = store.claim("c", 60, now=1)
    assert second is not None and [len(r.payload) for r in second.rows] == [50_000, 50_001, 50_002, 50_003]
    client.close()


def test_concurrent_claims_on_threads(own_server: RedisServer) -> None:
    """Threads claiming through one pool each get whole, distinct steps."""
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=8, steps_per_epoch=16, num_epochs=1))
    for step in range(16):
        store.materialise(step, [(8 * step + i, b"%d:%d" % (step, i) * 999) for i in range(8)])
    got: dict[int, list[bytes]] = {}
    lock = threading.Lock()

    def consume(name: str) -> None:
        try:
            while (claimed := store.claim(name, 60)) is not None:
                with lock:
                    got[claimed.step] = [bytes(r.payload) for r in claimed.rows]
                store.commit(claimed.step, name)
        except NoStepReady:  # the last steps are held by the other threads
            return

    threads = [threading.Thread(target=consume, args=(f"t{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(got) == list(range(16))
    assert all(got[s] == [b"%d:%d" % (s, i) * 999 for i in range(8)] for s in got)
    client.close()


def test_which_clients_it_serves(own_server: RedisServer) -> None:
    plain = own_server.client()
    assert wire.supports(plain)
    resp3 = redis.Redis.from_url(own_server.url, protocol=3)
    assert not wire.supports(resp3)
    assert not wire.supports(fakeredis.FakeRedis())
    ssl_pool = redis.ConnectionPool(connection_class=redis.SSLConnection, host="127.0.0.1", port=1)
    assert not wire.supports(redis.Redis(connection_pool=ssl_pool))
    assert not _store(resp3)._sized_reads  # (and the RESP3 store still works, through the pipeline)
    _store(resp3).materialise(0, [(i, b"r") for i in range(4)])
    plain.close()
    resp3.close()


def test_small_reads_go_pipelined_and_big_ones_in_one_piece(own_server: RedisServer) -> None:
    """The transaction only pays off for big replies: after a read below ``ONE_PIECE`` the next one is
    pipelined through redis-py (bytes), after a big one it is received in one piece (views)."""
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=2, steps_per_epoch=4, num_epochs=1))
    big = wire.ONE_PIECE // 2 + 1
    for step, size in enumerate([10, 10, big, big]):
        store.materialise(step, [(2 * step + i, bytes([step]) * size) for i in range(2)])
    kinds = []
    for step in range(4):
        claimed = store.claim("c", 60, now=0)
        assert claimed is not None and claimed.step == step
        assert [row.payload for row in claimed.rows] == [bytes([step]) * len(claimed.rows[0].payload)] * 2
        kinds.append(type(claimed.rows[0].buffer).__name__)
        store.commit(step, "c", now=0)
    assert kinds == ["memoryview", "bytes", "bytes", "memoryview"]  # (the first read of a store: one piece)
    client.close()


def test_the_pipelined_read_on_a_plain_socket(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Small replies: script, SORT and DEL sent and parsed by the store itself (hiredis), not redis-py's
    Pipeline; an error reply (NOSCRIPT after a flush) is raised as redis-py's exception and handled."""
    client = own_server.client(max_connections=1)
    store = BatchStore.open(client, make_config(batch_size=3, steps_per_epoch=3))
    for step in range(3):
        store.materialise(step, [(3 * step + i, b"s%d" % (3 * step + i)) for i in range(3)])
    store._last_read["CLAIM"] = store._last_read["PREFETCH"] = 0  # (as after a small read)
    reads: list[int] = []
    real = wire._read_replies

    def spy(sock: Any, count: int) -> list[Any]:
        reads.append(count)
        return real(sock, count)

    monkeypatch.setattr(wire, "_read_replies", spy)
    monkeypatch.setattr(client, "pipeline", None)  # (redis-py's Pipeline is not used)
    client.script_flush()
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None and [r.payload for r in claimed.rows] == [b"s0", b"s1", b"s2"]
    fetched = store.prefetch(0, "c", 2, 1, now=0)
    assert [r.payload for r in fetched.rows] == [b"s3", b"s4"]
    assert reads == [3, 3, 3, 3]  # (each ran twice: NOSCRIPT, then with its script loaded)
    assert client.echo("in step") == b"in step" and client.keys(store.keys.prefix + "xfer:*") == []
    client.close()


def test_a_receive_buffer_in_use_is_never_reused(own_server: RedisServer) -> None:
    """Claims reuse receive buffers nobody refers to any more, and only those: payload views kept from
    earlier claims (or tensors made from them) keep their bytes."""
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=4, steps_per_epoch=12, num_epochs=1))
    size = wire.ONE_PIECE // 4 + 1
    for step in range(12):
        store.materialise(step, [(4 * step + i, bytes([step + i]) * size) for i in range(4)])
    kept: list[tuple[int, memoryview]] = []
    arrays: list[tuple[int, np.ndarray]] = []
    owners: set[int] = set()
    for step in range(12):
        claimed = store.claim("c", 60, now=0)
        assert claimed is not None and type(claimed.rows[0].buffer) is memoryview
        owners.add(id(claimed.rows[0].buffer.obj))  # (the buffer the claim received its reply into)
        if step % 3 == 0:  # keep one payload view of every third claim
            kept.append((step, claimed.rows[1].buffer))
        if step % 3 == 1:  # ... or an array made from one (it holds the view's buffer)
            arrays.append((step, np.frombuffer(claimed.rows[2].buffer, np.uint8)))
        store.commit(step, "c", now=0)
        del claimed
    assert all(bytes(view) == bytes([step + 1]) * size for step, view in kept)
    assert all((array == step + 2).all() and len(array) == size for step, array in arrays)
    assert len(owners) < 12  # (the claims not kept shared buffers)
    client.close()


def test_a_forked_child_gets_its_own_buffers_and_connections(own_server: RedisServer) -> None:
    """A fork while a parent thread holds the buffer pool's lock leaves the child a pool of its own; the child
    reads through the parent's store on a connection of its own: the parent's stays in step."""
    client = own_server.client()
    store = _store(client)
    for step in range(3):
        store.materialise(step, [(4 * step + i, b"f%d" % (4 * step + i)) for i in range(4)])
    parent_sock = thread_connection(client.connection_pool)._sock
    with wire._BUFFERS._lock:  # (as if a parent thread were inside take() at the fork)
        pid = os.fork()
        if pid == 0:  # pragma: no cover (the child)
            signal.alarm(20)  # (a deadlock would otherwise hang the test run)
            try:
                claimed = store.claim("child", 60, now=0)
                got = [] if claimed is None else [r.buffer for r in claimed.rows]
                ok = [bytes(b) for b in got] == [b"f0", b"f1", b"f2", b"f3"] and type(got[0]) is memoryview
                ok = ok and thread_connection(client.connection_pool)._sock is not parent_sock
                os._exit(0 if ok else 1)
            except BaseException:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    claimed = store.claim("parent", 60, now=0)
    assert claimed is not None and [bytes(r.payload) for r in claimed.rows] == [b"f4", b"f5", b"f6", b"f7"]
    assert thread_connection(client.connection_pool)._sock is parent_sock
    client.close()


def _server_clients(client: redis.Redis) -> int:
    return int(client.info("clients")["connected_clients"])


def _until(condition: Any) -> None:
    deadline = time.monotonic() + 5
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_each_thread_keeps_a_connection_of_its_own(own_server: RedisServer) -> None:
    """A thread's reads and uploads go over one connection, kept from call to call outside the client's
    pool; another thread gets another one, closed as that thread ends."""
    client = own_server.client()
    store = _store(client)
    for step in range(3):
        store.materialise(step, [(4 * step + i, b"k" * 100) for i in range(4)])
    conn = thread_connection(client.connection_pool)
    sock = conn._sock
    clients = _server_clients(client)  # (the pool's connection and this thread's own)
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None
    store.prefetch(0, "c", 1, 1, now=0)
    store.postpone(0, "c", [(claimed.rows[0].ref, b"partial")], 2, now=0)
    assert thread_connection(client.connection_pool) is conn and conn._sock is sock
    assert _server_clients(client) == clients
    seen: list[Any] = []

    def other() -> None:
        seen.append(store.claim("d", 60, now=0))
        kept = thread_connection(client.connection_pool)
        seen.extend((kept, kept._sock is not None, _server_clients(client)))

    thread = threading.Thread(target=other)
    thread.start()
    thread.join()
    claimed_there, theirs, was_open, clients_then = seen
    assert claimed_there is not None and theirs is not conn and was_open and clients_then == clients + 1
    assert theirs._sock is None  # (closed when its thread ended, not when the cyclic collector runs)
    _until(lambda: _server_clients(client) == clients)
    client.close()


def test_a_connection_the_server_closed_is_opened_again_at_once(
    own_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A kept connection the server closed meanwhile (its ``timeout``, ``CLIENT KILL``) is found closed
    before use and opened again: no failed attempt, no retry."""
    client = own_server.client()
    store = _store(client)
    store.materialise(0, [(i, b"a" * 100) for i in range(4)])
    conn = thread_connection(client.connection_pool)
    old = conn._sock
    kept = client.connection_pool.__dict__[kept_module._ATTRIBUTE].kept
    client.client_kill_filter(_type="normal", skipme=True)
    _until(lambda: not kept.usable())
    with caplog.at_level(logging.WARNING, logger="pr_loader"):
        store.materialise(1, [(4 + i, b"b" * 100) for i in range(4)])
        claimed = store.claim("c", 60, now=0)
    assert claimed is not None and [r.payload for r in claimed.rows] == [b"a" * 100] * 4
    assert conn._sock is not None and conn._sock is not old
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]
    client.close()


def test_without_hiredis_the_pipelined_read_goes_through_redis_py(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=2, steps_per_epoch=2))
    store.materialise(0, [(0, b"a"), (1, b"b")])
    store._last_read["CLAIM"] = 0  # (as after a small read)
    monkeypatch.setattr(wire, "hiredis", None)
    monkeypatch.setattr(wire, "_read_replies", None)  # (never reached)
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None and [r.payload for r in claimed.rows] == [b"a", b"b"]
    client.close()


def test_an_unreadable_reply_is_a_connection_error() -> None:
    class Garbage:
        def recv(self, _: int) -> bytes:
            return b"?not resp\r\n"

    with pytest.raises(redis.ConnectionError, match="unreadable reply"):
        wire._read_replies(Garbage(), 1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("reply", "kind"),
    [(b"-LOADING Redis is loading the dataset in memory\r\n", redis.exceptions.BusyLoadingError),
     (b"-NOSCRIPT No matching script. Please use EVAL.\r\n", redis.exceptions.NoScriptError),
     (b"-NOPERM this user has no permissions\r\n", redis.exceptions.NoPermissionError),
     (b"-OOM command not allowed when used memory > 'maxmemory'.\r\n", redis.exceptions.OutOfMemoryError),
     (b"-ERR unknown command\r\n", redis.exceptions.ResponseError)],
)
def test_error_replies_are_redis_pys_exceptions(reply: bytes, kind: type[Exception]) -> None:
    """Read here, an error reply becomes the exception redis-py raises for it, so the store treats it alike:
    a server still loading its AOF after a restart is retried (BusyLoadingError is a ConnectionError), not
    reported as a refused command."""

    class Replies:
        def recv(self, _: int) -> bytes:
            return reply

    for got in (wire._read_replies(Replies(), 1)[0], wire._Reader(Replies()).value()):  # type: ignore[arg-type]
        assert type(got) is kind
    assert issubclass(redis.exceptions.BusyLoadingError, redis.ConnectionError)


def test_a_script_run_on_the_kept_socket_replies_as_through_redis_py(own_server: RedisServer) -> None:
    """wire.run_script: the same reply as redis-py's Script call, its error replies as redis-py's exceptions,
    a flushed script loaded again, and the connection in step after each."""
    client = own_server.client()
    echo = client.register_script("return {ARGV[1], tonumber(ARGV[2]), {KEYS[1]}, redis.status_reply('OK')}")
    args = ["x y", 7]
    expected = [b"x y", 7, [b"k"], b"OK"]
    assert wire.run_script(client, echo, ["k"], args) == echo(keys=["k"], args=args) == expected
    client.script_flush()  # (NOSCRIPT: loaded, then run again, within the call)
    assert wire.run_script(client, echo, ["k"], args)[0] == b"x y"
    failing = client.register_script("return redis.call('INCR', KEYS[1])")
    client.set("text", "not a number")
    with pytest.raises(redis.ResponseError, match="not an integer"):
        wire.run_script(client, failing, ["text"], [])
    assert wire.run_script(client, failing, ["n"], []) == 1  # (in step: the reply is this call's)
    fake = fakeredis.FakeRedis()  # (not a plain socket: through redis-py)
    assert wire.run_script(fake, fake.register_script("return ARGV[1]"), [], ["f"]) == b"f"
    client.close()


def test_an_error_reply_keeps_no_caller_frame_alive(own_server: RedisServer) -> None:
    """A claim that meets NOSCRIPT (a restarted server) leaves its callers' locals to refcounting: the error
    reply raised inside is a copy, not the value held in a local (that was a cycle through its traceback)."""
    import gc
    import weakref

    class Marker:
        pass

    client = own_server.client()
    store = _store(client)
    store.materialise(0, [(i, b"x%d" % i) for i in range(4)])
    store.materialise(1, [(4 + i, b"y%d" % i) for i in range(4)])

    def caller(sized: bool) -> weakref.ref[Marker]:
        marker = Marker()
        store._last_read["CLAIM"] = wire.ONE_PIECE if sized else 0  # (the transaction, or the pipeline)
        client.script_flush()
        assert store.claim("c", 60, now=0) is not None
        return weakref.ref(marker)

    gc.disable()
    try:
        assert caller(sized=True)() is None
        assert caller(sized=False)() is None
    finally:
        gc.enable()
    client.close()


def test_read_rows_reads_payloads_with_their_refs_in_one_piece(own_server: RedisServer) -> None:
    """A step read ahead without known payloads: refs and payloads in one round trip, the payloads views of
    one buffer; with known ones, only the others are read (MGET); no hand-over list is left behind."""
    client = own_server.client()
    store = _store(client, batch_size=4)
    payloads = [os.urandom(n) for n in (0, 5, 70_000, 3)]
    store.materialise(0, list(enumerate(payloads)))
    rows = store.read_rows(0)
    assert [r.ref_text for r in rows] == [f"0:{i}:0:-" for i in range(4)]
    assert [bytes(r.payload) for r in rows] == payloads
    assert len({id(r.buffer.obj) for r in rows if isinstance(r.buffer, memoryview)}) == 1
    known = {rows[0].ref_text: b"known"}
    again = store.read_rows(0, known=known)
    assert [bytes(r.payload) for r in again] == [b"known", *payloads[1:]]
    store._last_read["READ_ROWS"] = 0  # (a small reply: the pipelined read, refs from the SORT)
    assert [bytes(r.payload) for r in store.read_rows(0)] == payloads
    assert client.keys(store.keys.prefix + "xfer:*") == []
    client.close()
