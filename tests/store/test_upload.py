"""The staged upload of new payloads (materialise, postpone) sent from the payloads' own buffers
(pr_loader.store.frames.send), on real redis-servers, and the partial-send loop on its own."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from pr_loader.errors import StoreError, StoreUnavailable
from pr_loader.store import BatchStore, frames, wire
from tests.servers import RedisServer
from tests.store.conftest import make_config


def _spy_sends(monkeypatch: pytest.MonkeyPatch) -> list[list[bytes]]:
    sent: list[list[bytes]] = []
    real = frames.send

    def spy(sock: Any, buffers: list[bytes]) -> None:
        sent.append(buffers)
        real(sock, buffers)

    monkeypatch.setattr(frames, "send", spy)
    return sent


def test_payloads_are_stored_byte_exact_and_sent_uncopied(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = own_server.client()
    sizes = [0, 1, frames.INLINE - 1, frames.INLINE, frames.INLINE + 1, (1 << 20) + 5]
    store = BatchStore.open(client, make_config(batch_size=len(sizes), steps_per_epoch=3))
    payloads = [os.urandom(n) for n in sizes]
    sent = _spy_sends(monkeypatch)
    assert store.materialise(0, list(enumerate(payloads)))
    assert store.materialise(1, [(10 + i, b"q") for i in range(len(sizes))])
    assert [client.get(store.keys.payload(f"0:{i}:0:-")) for i in range(len(sizes))] == payloads
    big = [p for p in payloads if len(p) >= frames.INLINE]
    assert len(big) == 3 and all(any(b is p for b in sent[0]) for p in big)  # (their own buffers)
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None
    partial = [(row.ref, bytearray(b"partial %d " % i) * 1000) for i, row in enumerate(claimed.rows[:3])]
    new = store.postpone(0, "c", partial, 2, now=0)  # (bytearray payloads are taken as bytes)
    assert [client.get(store.keys.payload(ref.encode())) for ref in new] == [bytes(p) for _, p in partial]
    # views (a claimed row's payload is one) go out from the memory they view, uncopied; a non-contiguous
    # view is copied
    memory = bytearray(os.urandom(3 * frames.INLINE))
    views = [memoryview(memory)[: 2 * frames.INLINE], memoryview(memory)[::3]]
    sent.clear()
    new = store.postpone(0, "c", [(row.ref, v) for row, v in zip(claimed.rows[3:], views)], 2, now=0)
    assert [client.get(store.keys.payload(ref.encode())) for ref in new] == [v.tobytes() for v in views]
    assert any(isinstance(b, memoryview) and b.obj is memory for b in sent[0])
    assert client.keys(store.keys.prefix + "stage:*") == []
    assert client.ping()
    client.close()


def test_more_buffers_than_one_sendmsg_takes(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(frames, "IOV_MAX", 5)
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=40, steps_per_epoch=2))
    payloads = [bytes([i]) * (frames.INLINE + i) for i in range(40)]
    store.materialise(0, list(enumerate(payloads)))
    claimed = store.claim("c", 60, now=0)
    assert claimed is not None and [bytes(r.payload) for r in claimed.rows] == payloads
    client.close()


def test_big_uploads_are_split_into_several_msets(
    own_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(wire, "_MSET_BYTES", 3 * 10_000)  # (three payloads per MSET)
    client = own_server.client()
    store = BatchStore.open(client, make_config(batch_size=8, steps_per_epoch=2))
    sent = _spy_sends(monkeypatch)  # (after the open, whose script goes out on the same socket)
    payloads = [bytes([i]) * 10_000 for i in range(8)]
    store.materialise(0, list(enumerate(payloads)))
    assert b"".join(sent[0]).count(b"MSET") == 3
    assert [client.get(store.keys.payload(f"0:{i}:0:-")) for i in range(8)] == payloads
    client.close()


def test_a_refused_upload_raises_and_leaves_the_connection_in_step(own_server: RedisServer) -> None:
    client = own_server.client(max_connections=1)
    store = BatchStore.open(client, make_config(batch_size=2, steps_per_epoch=2))
    client.config_set("maxmemory", 1)  # (noeviction: MSET is refused when queued, EXEC aborts)
    with pytest.raises(StoreError, match="OOM"):
        store.materialise(0, [(0, b"a" * 10_000), (1, b"b" * 10_000)])
    client.config_set("maxmemory", 0)
    assert client.echo("in step") == b"in step"
    assert store.materialise(0, [(0, b"a" * 10_000), (1, b"b" * 10_000)])
    assert client.keys(store.keys.prefix + "stage:*") == []
    client.close()


def test_a_stopped_server_times_out_instead_of_hanging_on_the_send(own_server: RedisServer) -> None:
    """The blocking sendmsg keeps the socket timeout (SO_SNDTIMEO): 32 MiB fill the socket buffers."""
    client = own_server.client(socket_timeout=0.3)
    store = BatchStore.open(client, make_config(batch_size=4, steps_per_epoch=2), retry_seconds=0.5)
    assert own_server.proc is not None
    os.kill(own_server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.materialise(0, [(i, os.urandom(8 << 20)) for i in range(4)])
        assert time.monotonic() - started < 10
    finally:
        os.kill(own_server.proc.pid, signal.SIGCONT)
    assert store.materialise(0, [(i, b"after") for i in range(4)]) in (True, False)  # (it may have landed)
    assert client.keys(store.keys.prefix + "stage:*") == []
    client.close()


class _TrickleSocket:
    """A socket that takes at most ``most`` bytes per sendmsg (what a blocking send may do on a signal)."""

    def __init__(self, most: int) -> None:
        self.most = most
        self.received = bytearray()
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview]) -> int:
        self.calls += 1
        taken = b"".join(bytes(b) for b in buffers)[: self.most]
        self.received += taken
        return len(taken)


@pytest.mark.parametrize("most", [1, 3, 7, 1 << 20])
def test_partial_sends_resume_where_they_stopped(most: int) -> None:
    buffers = [b"*1\r\n$3\r\n", b"abc", b"", b"\r\n", b"x" * 50, b"", b"tail"]
    sock = _TrickleSocket(most)
    frames.send(sock, buffers)  # type: ignore[arg-type]
    assert bytes(sock.received) == b"".join(buffers)
    assert sock.calls == (1 if most >= 70 else -(-len(b"".join(buffers)) // most))


def test_frames_are_resp2_with_big_arguments_as_their_own_buffers() -> None:
    payload = b"p" * frames.INLINE
    request = frames.framed([("MSET", "k", payload), ("EVALSHA", "abc", 1, b"\x00", 2.5)])
    assert b"".join(request) == (
        b"*3\r\n$4\r\nMSET\r\n$1\r\nk\r\n$%d\r\n" % len(payload) + payload + b"\r\n"
        b"*5\r\n$7\r\nEVALSHA\r\n$3\r\nabc\r\n$1\r\n1\r\n$1\r\n\x00\r\n$3\r\n2.5\r\n"
    )
    assert any(f is payload for f in request)
    memory = bytearray(b"v" * frames.INLINE)
    request = frames.framed([("SET", "k", memoryview(memory)), ("SET", "j", memoryview(memory)[:3])])
    assert b"".join(request) == (
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$%d\r\n" % len(memory) + memory + b"\r\n"
        b"*3\r\n$3\r\nSET\r\n$1\r\nj\r\n$3\r\nvvv\r\n"
    )
    assert any(isinstance(f, memoryview) and f.obj is memory for f in request)  # (a view of it, no copy)
