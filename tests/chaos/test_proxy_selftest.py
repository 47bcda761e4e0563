"""The fault-injecting proxy itself does what the chaos tests rely on (no pr_loader code involved)."""

from __future__ import annotations

import random
import threading

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from tests.chaos.proxy import ChaosProxy

pytestmark = [pytest.mark.redis]


def _client(proxy: ChaosProxy, **kwargs: object) -> redis.Redis:
    return redis.Redis(host="127.0.0.1", port=proxy.port, retry=Retry(NoBackoff(), 0), **kwargs)  # type: ignore[arg-type]


def test_forwards(proxy: ChaosProxy) -> None:
    client = _client(proxy)
    client.set("prl:selftest", b"x")
    assert client.get("prl:selftest") == b"x"
    assert proxy.stats.connections == 1
    client.close()


def test_drop_reply_after_runs_the_command_but_loses_the_reply(proxy: ChaosProxy, chaos_server) -> None:  # type: ignore[no-untyped-def]
    direct = chaos_server.client()
    client = _client(proxy)
    proxy.drop_reply_after(b"marker-1")
    with pytest.raises(redis.ConnectionError):
        client.incr("prl:marker-1")
    assert direct.get("prl:marker-1") == b"1"  # it ran exactly once
    assert proxy.stats.drops == 1 and proxy.pending_rules() == 0
    assert client.incr("prl:marker-1") == 2  # the rule is spent; a new connection works
    client.close()
    direct.close()


def test_drop_request_never_reaches_the_server(proxy: ChaosProxy, chaos_server) -> None:  # type: ignore[no-untyped-def]
    direct = chaos_server.client()
    client = _client(proxy)
    proxy.drop_request(b"marker-2")
    with pytest.raises(redis.ConnectionError):
        client.incr("prl:marker-2")
    assert direct.get("prl:marker-2") is None
    client.close()
    direct.close()


def test_random_drops_are_seeded(proxy: ChaosProxy) -> None:
    proxy.drop_replies_randomly(b"INCR", 0.5, random.Random(7))
    client = _client(proxy)
    outcomes = []
    for _ in range(20):
        try:
            client.incr("prl:random")
            outcomes.append(True)
        except redis.ConnectionError:
            outcomes.append(False)
    proxy.clear_rules()
    assert 0 < outcomes.count(False) < 20
    assert proxy.stats.drops == outcomes.count(False)
    assert int(client.get("prl:random") or 0) == 20  # every INCR ran, dropped replies included
    client.close()


def test_stall_holds_requests_until_release(proxy: ChaosProxy, chaos_server) -> None:  # type: ignore[no-untyped-def]
    direct = chaos_server.client()
    client = _client(proxy, socket_timeout=5)
    client.ping()
    proxy.stall()
    done = threading.Event()
    result: list[object] = []

    def late_write() -> None:
        result.append(client.set("prl:stalled", b"late"))
        done.set()

    thread = threading.Thread(target=late_write)
    thread.start()
    assert not done.wait(0.3)  # held by the proxy
    assert direct.get("prl:stalled") is None
    proxy.release()
    assert done.wait(5)
    thread.join(5)
    assert result == [True]
    assert direct.get("prl:stalled") == b"late"
    client.close()
    direct.close()


def test_drop_all_resets_open_connections(proxy: ChaosProxy) -> None:
    client = _client(proxy)
    client.ping()
    assert proxy.drop_all() == 1
    # redis-py notices the closed socket when it checks the connection out and reconnects
    assert client.ping()
    assert proxy.stats.connections == 2
    client.close()
