"""connect(): URL/env resolution, retry with backoff, auth, TLS, server and durability checks, cluster."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.cluster import RedisCluster

from pr_loader.errors import (
    ConfigError,
    DurabilityError,
    StoreAuthError,
    StoreUnavailable,
    UnsupportedServer,
)
from pr_loader.store import connection
from pr_loader.store.connection import (
    check_durability,
    connect,
    redact,
    resolve_endpoint,
    server_info,
    wait_durable,
)
from tests.cluster import LocalCluster
from tests.servers import REDIS_SERVER, RedisServer, free_port
from tests.tls import TlsFiles, TlsRedisServer

SECRET = "s3cr3t-Pa55word"
needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("URL", "USER", "PASSWORD", "CA", "CERT", "KEY"):
        monkeypatch.delenv(f"PR_LOADER_REDIS_{name}", raising=False)


class _PasswordServer(RedisServer):
    def client(self, **kwargs: object) -> redis.Redis:
        return super().client(password=SECRET, **kwargs)


@pytest.fixture
def auth_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = _PasswordServer(tmp_path / "auth", extra_args=["--requirepass", SECRET]).start()
    yield server
    server.stop()


def _messages(exc: BaseException) -> str:
    """str() and repr() of an exception and of everything chained to it."""
    parts: list[str] = []
    seen: BaseException | None = exc
    while seen is not None:
        parts += [str(seen), repr(seen)]
        seen = seen.__cause__ or seen.__context__
    return "\n".join(parts)


def _assert_secret_hidden(exc: BaseException, caplog: pytest.LogCaptureFixture) -> None:
    assert SECRET not in _messages(exc)
    for record in caplog.records:
        assert SECRET not in record.getMessage()


# --- resolution, no server ------------------------------------------------------------------------


def test_keyword_beats_url_beats_env() -> None:
    env = {"PR_LOADER_REDIS_PASSWORD": "from-env", "PR_LOADER_REDIS_USER": "env-user"}
    ep = resolve_endpoint("redis://url-user:from-url@h:1234/3", password="from-kw", env=env)
    assert (ep.host, ep.port, ep.db, ep.username, ep.password) == ("h", 1234, 3, "url-user", "from-kw")
    ep = resolve_endpoint("redis://:from-url@h/0", env=env)
    assert (ep.username, ep.password, ep.port) == ("env-user", "from-url", 6379)
    ep = resolve_endpoint("redis://h?password=from%20query", env=env)
    assert ep.password == "from query"
    ep = resolve_endpoint(None, env={"PR_LOADER_REDIS_URL": "unix:///tmp/x.sock?db=2", **env})
    assert (ep.path, ep.db, ep.password, ep.address) == ("/tmp/x.sock", 2, "from-env", "unix:///tmp/x.sock")
    assert "from-env" not in repr(ep)


def test_tls_options_from_kwargs_url_and_env() -> None:
    env = {
        "PR_LOADER_REDIS_CA": "/env/ca",
        "PR_LOADER_REDIS_CERT": "/env/cert",
        "PR_LOADER_REDIS_KEY": "/env/key",
    }
    ep = resolve_endpoint("rediss://h:1/0?ssl_certfile=/url/cert", ssl_keyfile="/kw/key", env=env)
    assert (ep.ssl_ca_certs, ep.ssl_certfile, ep.ssl_keyfile) == ("/env/ca", "/url/cert", "/kw/key")
    assert ep.address == "rediss://h:1"
    # TLS env vars are ignored for non-TLS URLs, explicit TLS options are an error
    assert resolve_endpoint("redis://h", env=env).ssl_ca_certs is None
    with pytest.raises(ConfigError, match="rediss://"):
        resolve_endpoint("redis://h", ssl_ca_certs="/ca", env={})


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("http://h", "must start with"),
        ("redis://h?colour=blue", "colour"),
        ("redis://h/notanumber", "not an integer"),
        ("redis://h?ssl_ca_certs=/x", "need a rediss"),
        ("rediss://h?ssl_check_hostname=maybe", "not a boolean"),
        ("rediss://h?ssl_cert_reqs=always", "ssl_cert_reqs"),
        ("unix://", "no socket path"),
        ("redis://h:99999999", "malformed"),
    ],
)
def test_bad_urls(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_endpoint(url, env={})


def test_no_url_anywhere() -> None:
    with pytest.raises(ConfigError, match="PR_LOADER_REDIS_URL"):
        connect(None)


def test_redact() -> None:
    assert redact(f"redis://user:{SECRET}@h:1/0") == "redis://user:***@h:1/0"
    assert redact(f"redis://:{SECRET}@h:1/0") == "redis://:***@h:1/0"
    assert SECRET not in redact(f"unix:///tmp/s.sock?db=1&password={SECRET}")
    assert redact("redis://h:1/0") == "redis://h:1/0"


# --- real servers ---------------------------------------------------------------------------------


@needs_redis
def test_password_in_url_and_env(auth_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    client = connect(f"redis://:{SECRET}@127.0.0.1:{auth_server.port}/0", retry_seconds=0)
    assert isinstance(client, redis.Redis) and client.ping()
    client.close()
    monkeypatch.setenv("PR_LOADER_REDIS_PASSWORD", SECRET)
    monkeypatch.setenv("PR_LOADER_REDIS_URL", f"redis://127.0.0.1:{auth_server.port}/1")
    client = connect(retry_seconds=0)
    assert client.ping() and client.connection_pool.connection_kwargs["db"] == 1
    client.close()


@needs_redis
@pytest.mark.parametrize("password", ["wrong-password", None])
def test_wrong_or_missing_password_is_auth_error_without_retry(
    auth_server: RedisServer, password: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    userinfo = f":{password}@" if password else ""
    started = time.monotonic()
    with pytest.raises(StoreAuthError, match=f"127.0.0.1:{auth_server.port}") as info:
        connect(f"redis://{userinfo}127.0.0.1:{auth_server.port}/0", retry_seconds=10)
    assert time.monotonic() - started < 2.0  # no retry
    assert password is None or password not in _messages(info.value)
    _assert_secret_hidden(info.value, caplog)


@needs_redis
def test_acl_user(auth_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    admin = auth_server.client()
    admin.execute_command("ACL", "SETUSER", "alice", "on", f">{SECRET}", "~*", "+@all")
    client = connect(f"redis://alice:{SECRET}@127.0.0.1:{auth_server.port}/0", retry_seconds=0)
    assert client.acl_whoami() in ("alice", b"alice")
    client.close()
    admin.execute_command("ACL", "SETUSER", "alice", "resetpass", ">other")
    with pytest.raises(StoreAuthError, match="'alice'") as info:
        connect(f"redis://alice:{SECRET}@127.0.0.1:{auth_server.port}/0", retry_seconds=5)
    _assert_secret_hidden(info.value, caplog)
    admin.close()


def test_unreachable_port_backs_off_within_bound(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    port = free_port()
    started = time.monotonic()
    with pytest.raises(StoreUnavailable) as info:
        connect(f"redis://:{SECRET}@127.0.0.1:{port}/0", retry_seconds=0.8)
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 2.0
    message = str(info.value)
    assert f"redis://127.0.0.1:{port}" in message and "attempt" in message
    retries = [r for r in caplog.records if r.name == connection.__name__ and "retry" in r.getMessage()]
    assert 3 <= len(retries) < 20  # exponential backoff: several tries, not a busy loop
    assert isinstance(info.value, ConnectionError)  # builtin users may catch
    _assert_secret_hidden(info.value, caplog)


def test_zero_retry_seconds_tries_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(StoreUnavailable, match=r"after 1 attempt"):
        connect(f"redis://127.0.0.1:{free_port()}/0", retry_seconds=0)


@needs_redis
def test_retry_until_server_comes_up(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "late")
    starter = threading.Timer(0.5, server.start)
    starter.start()
    try:
        client = connect(server.url, retry_seconds=15)
        assert client.ping()
        client.close()
    finally:
        starter.join()
        server.stop()


@needs_redis
def test_unix_socket(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "sock", unix_socket=True).start()
    try:
        client = connect(server.url, retry_seconds=0)
        assert client.set("k", b"v") and client.get("k") == b"v"
        client.close()
    finally:
        server.stop()
    with pytest.raises(StoreUnavailable, match=f"unix://{server.socket_path}"):
        connect(server.url, retry_seconds=0.2)


@needs_redis
def test_old_server_version_is_refused(redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    original = redis.Redis.info

    def old_info(self: redis.Redis, section: str | None = None, *args: Any, **kwargs: Any) -> Any:
        info = original(self, section, *args, **kwargs)
        if section == "server":
            info["redis_version"] = "6.0.9"
        return info

    monkeypatch.setattr(redis.Redis, "info", old_info)
    with pytest.raises(UnsupportedServer, match=r"version 6\.0\.9.*>= 6\.2"):
        connect(redis_server.url, retry_seconds=5)


@needs_redis
def test_disabled_command_is_refused(tmp_path: Path) -> None:
    server = RedisServer(tmp_path / "renamed", extra_args=["--rename-command", "EVALSHA", ""]).start()
    try:
        with pytest.raises(UnsupportedServer, match="evalsha"):
            connect(server.url, retry_seconds=0)
    finally:
        server.stop()


@needs_redis
def test_server_info(redis_server: RedisServer) -> None:
    client = redis_server.client()
    info = server_info(client)
    assert info.version >= (6, 2, 0) and info.aof_enabled and not info.cluster_enabled
    assert info.version_text == client.info("server")["redis_version"]
    client.close()


@needs_redis
def test_durability_checks(tmp_path: Path) -> None:
    no_aof = RedisServer(tmp_path / "noaof", appendonly=False).start()
    everysec = RedisServer(tmp_path / "everysec", appendfsync="everysec").start()
    always = RedisServer(tmp_path / "always", appendfsync="always").start()
    try:
        client = no_aof.client()
        assert check_durability(client, "none").aof_enabled is False
        with pytest.raises(DurabilityError, match="appendonly yes"):
            check_durability(client, "everysec")
        with pytest.raises(DurabilityError, match="appendonly yes"):
            check_durability(client, "always")
        client = everysec.client()
        assert check_durability(client, "everysec").appendfsync == "everysec"
        if server_info(client).has_waitaof:
            assert check_durability(client, "always").needs_wait
        else:
            with pytest.raises(DurabilityError, match="appendfsync always"):
                check_durability(client, "always")
        client = always.client()
        report = check_durability(client, "always")
        assert report.appendfsync == "always" and not report.needs_wait
        assert wait_durable(client) is server_info(client).has_waitaof
        with pytest.raises(ConfigError):
            check_durability(client, "sometimes")  # type: ignore[arg-type]
    finally:
        for server in (no_aof, everysec, always):
            server.stop()


class _WaitaofStub:
    """Stands in for a Redis >= 7.2 client: WAITAOF answers [numlocal, numreplicas]."""

    def __init__(self, local: int) -> None:
        self.local = local
        self.sent: list[tuple[Any, ...]] = []

    def execute_command(self, *args: Any) -> list[int]:
        self.sent.append(args)
        return [self.local, 0]


def test_wait_durable_uses_waitaof(monkeypatch: pytest.MonkeyPatch) -> None:
    info = connection.ServerInfo((7, 2, 4), "7.2.4", "standalone", False, True)
    monkeypatch.setattr(connection, "server_info", lambda client: info)
    ok = _WaitaofStub(local=1)
    assert wait_durable(ok, timeout_ms=250) is True  # type: ignore[arg-type]
    assert ok.sent == [("WAITAOF", 1, 0, 250)]
    with pytest.raises(DurabilityError, match="250 ms"):
        wait_durable(_WaitaofStub(local=0), timeout_ms=250)  # type: ignore[arg-type]


# --- TLS ------------------------------------------------------------------------------------------


def test_tls_with_ca_from_kwargs_url_and_env(
    tls_redis: TlsRedisServer, tls_files: TlsFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = connect(tls_redis.url, ssl_ca_certs=str(tls_files.ca), retry_seconds=0)
    assert client.ping()
    client.close()
    client = connect(f"{tls_redis.url}?ssl_ca_certs={tls_files.ca}", retry_seconds=0)
    assert client.ping()
    client.close()
    monkeypatch.setenv("PR_LOADER_REDIS_CA", str(tls_files.ca))
    client = connect(f"rediss://localhost:{tls_redis.tls_port}/0", retry_seconds=0)
    assert client.ping()
    client.close()


def test_tls_untrusted_server_fails_fast(tls_redis: TlsRedisServer, tls_files: TlsFiles) -> None:
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match=f"TLS handshake with Redis at rediss://127.0.0.1:{tls_redis.tls_port}"):
        connect(tls_redis.url, ssl_ca_certs=str(tls_files.other_ca), retry_seconds=10)
    assert time.monotonic() - started < 3.0


def test_tls_plain_client_cannot_talk_to_tls_port(tls_redis: TlsRedisServer) -> None:
    with pytest.raises(StoreUnavailable, match=f"redis://127.0.0.1:{tls_redis.tls_port}"):
        connect(f"redis://127.0.0.1:{tls_redis.tls_port}/0", retry_seconds=0.3, socket_timeout=0.5)


@needs_redis
def test_tls_client_certificate_required(tmp_path: Path, tls_files: TlsFiles) -> None:
    server = TlsRedisServer(tmp_path / "mtls", tls_files, auth_clients="yes").start()
    try:
        with pytest.raises(StoreUnavailable, match=f"rediss://127.0.0.1:{server.tls_port}"):
            connect(server.url, ssl_ca_certs=str(tls_files.ca), retry_seconds=0.5)
        client = connect(
            server.url,
            ssl_ca_certs=str(tls_files.ca),
            ssl_certfile=str(tls_files.client_cert),
            ssl_keyfile=str(tls_files.client_key),
            retry_seconds=0,
        )
        assert client.ping()
        client.close()
    finally:
        server.stop()


# --- cluster --------------------------------------------------------------------------------------


@pytest.mark.cluster
def test_cluster_is_detected_and_hash_tags_keep_scripts_in_one_slot(redis_cluster: LocalCluster) -> None:
    client = connect(redis_cluster.url, retry_seconds=5)
    assert isinstance(client, RedisCluster)
    assert len(client.get_primaries()) == 3
    script = (
        "redis.call('RPUSH', KEYS[1], ARGV[1]); redis.call('HSET', KEYS[2], 'n', ARGV[1]);"
        "return {redis.call('LPOP', KEYS[1], 1)[1], redis.call('HMGET', KEYS[2], 'n')[1]}"
    )
    keys = [f"prl:{{run{i}:0}}:batch:0" for i in range(8)]
    # shards land on different nodes, yet each script stays inside one slot
    assert len({client.keyslot(k) for k in keys}) > 1
    for i, key in enumerate(keys):
        meta = key.replace("batch:0", "meta")
        assert client.eval(script, 2, key, meta, str(i)) == [str(i).encode()] * 2
    with pytest.raises(redis.RedisClusterException):
        client.eval(script, 2, "untagged:a", "untagged:b", "x")
    client.close()


@pytest.mark.cluster
def test_cluster_flag(redis_cluster: LocalCluster, redis_server: RedisServer) -> None:
    plain = connect(redis_cluster.url, cluster=False, retry_seconds=0)
    assert type(plain) is redis.Redis
    plain.close()
    with pytest.raises(ConfigError, match="not in cluster mode"):
        connect(redis_server.url, cluster=True, retry_seconds=0)
    with pytest.raises(ConfigError, match="database 0"):
        connect(redis_cluster.url.replace("/0", "/2"), retry_seconds=0)


@pytest.mark.cluster
def test_batch_store_on_cluster(redis_cluster: LocalCluster) -> None:
    from pr_loader.store import BatchStore, RunConfig

    client = connect(redis_cluster.url, retry_seconds=5)
    slots = set()
    for run in ("alpha", "beta", "gamma", "delta"):
        config = RunConfig(run, batch_size=2, steps_per_epoch=1, dataset_fingerprint="fp", num_epochs=1)
        store = BatchStore.open(client, config)
        slots.add(client.keyslot(store.keys.meta))
        store.materialise(0, [(0, run.encode()), (1, b"x")])
        claimed = store.claim("c", 30.0, now=10.0)
        assert claimed is not None and claimed.rows[0].payload == run.encode()
        store.commit(0, "c", now=11.0)
        assert store.claim("c", 30.0, now=12.0) is None  # run finished
        store.delete_run()
    assert len(slots) > 1
    client.close()


@needs_redis
def test_database_out_of_range(redis_server: RedisServer) -> None:
    with pytest.raises(ConfigError, match="database 99"):
        connect(redis_server.url.replace("/0", "/99"), retry_seconds=0)
