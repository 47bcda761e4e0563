"""The embedded default store: private redis-server on a unix socket (reuse, races, AOF), fakeredis."""

from __future__ import annotations

import multiprocessing
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pr_loader import server
from pr_loader.errors import ConfigError, StoreUnavailable
from pr_loader.server import FAKE_URL, default_url, embedded_paths, open_client, stop_embedded
from tests.servers import REDIS_SERVER

needs_redis = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
REPO = Path(__file__).resolve().parents[1]


def _kill_leftover(home: Path) -> None:
    paths = embedded_paths(home)
    try:
        pid = int(paths.pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
    except (OSError, ValueError):
        pass


@pytest.fixture
def home(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A short temporary PR_LOADER_HOME (never the user's home); its server is stopped at teardown."""
    path = Path(tempfile.mkdtemp(prefix="prl-home-"))
    monkeypatch.setenv("PR_LOADER_HOME", str(path))
    monkeypatch.delenv("PR_LOADER_REDIS_URL", raising=False)
    monkeypatch.delenv("PR_LOADER_REDIS_APPENDFSYNC", raising=False)
    yield path
    try:
        stop_embedded(path, timeout=10)
    finally:
        _kill_leftover(path)
        shutil.rmtree(path, ignore_errors=True)


def _pid(home: Path) -> int:
    return int(embedded_paths(home).pidfile.read_text())


def _url_from_subprocess(home: Path) -> subprocess.Popen[str]:
    code = "from pr_loader.server import default_url; print(default_url())"
    env = {**os.environ, "PR_LOADER_HOME": str(home)}
    args = [sys.executable, "-c", code]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)


def test_env_url_wins(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PR_LOADER_REDIS_URL", "redis://example:6379/0")
    assert default_url() == "redis://example:6379/0"
    assert not embedded_paths(home).data_dir.exists()


@needs_redis
def test_start_reuse_stop_and_resume(home: Path) -> None:
    url = default_url()
    paths = embedded_paths()
    assert url == f"unix://{home.resolve() / 'redis' / 'redis.sock'}" or url == paths.url
    assert oct(paths.data_dir.stat().st_mode & 0o777) == "0o700"
    client = open_client()
    assert isinstance(client, redis.Redis)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    assert client.config_get("port") == {"port": "0"}
    client.set("prl:{r:0}:meta", b"kept")
    client.close()
    pid = _pid(home)
    # a second process reuses the server
    proc = _url_from_subprocess(home)
    out, _ = proc.communicate(timeout=60)
    assert out.strip() == url and _pid(home) == pid
    # the server survives stop/start through its AOF
    assert stop_embedded() is True
    assert not paths.socket.exists()
    assert not server._alive(pid)
    assert stop_embedded() is False
    assert default_url() == url and _pid(home) != pid
    client = open_client(url)
    assert client.get("prl:{r:0}:meta") == b"kept"
    client.close()


@needs_redis
def test_crashed_server_is_restarted_with_its_data(home: Path) -> None:
    client = open_client(default_url())
    client.rpush("prl:{r:0}:batch:0", "a", "b")
    client.close()
    os.kill(_pid(home), signal.SIGKILL)  # leaves a stale socket file behind
    time.sleep(0.1)
    assert embedded_paths().socket.exists()
    client = open_client(default_url())
    assert client.lrange("prl:{r:0}:batch:0", 0, -1) == [b"a", b"b"]
    client.close()


def _start_after_barrier(barrier: Any, home: str, urls: Any) -> None:
    barrier.wait(timeout=30)
    urls.put(default_url(home))


@needs_redis
def test_concurrent_starts_share_one_server(home: Path) -> None:
    ctx = multiprocessing.get_context("fork")  # fork: no re-import, so the starts really overlap
    barrier, urls = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_start_after_barrier, args=(barrier, str(home), urls)) for _ in range(4)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
        assert proc.exitcode == 0
    assert {urls.get(timeout=5) for _ in procs} == {embedded_paths().url}
    data_dir = embedded_paths().data_dir
    running = []
    for proc_dir in Path("/proc").iterdir():
        try:
            if proc_dir.name.isdigit() and Path(proc_dir, "cwd").resolve() == data_dir.resolve():
                running.append(int(proc_dir.name))
        except OSError:
            continue
    assert running == [_pid(home)]


@needs_redis
def test_appendfsync_setting(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PR_LOADER_REDIS_APPENDFSYNC", "always")
    client = open_client(default_url())
    assert client.config_get("appendfsync") == {"appendfsync": "always"}
    default_url(appendfsync="everysec")  # reuse applies the requested setting
    assert client.config_get("appendfsync") == {"appendfsync": "everysec"}
    client.close()
    with pytest.raises(ConfigError, match="appendfsync"):
        default_url(appendfsync="sometimes")


def test_allocator_env_adds_the_options_and_keeps_the_users() -> None:
    options = ",".join(server.ALLOCATOR_OPTIONS)
    assert options == "lg_extent_max_active_fit:10,muzzy_decay_ms:-1"
    env = server.allocator_env({"PATH": "/bin"})
    assert env == {"PATH": "/bin", "MALLOC_CONF": options, "JE_MALLOC_CONF": options}
    env = server.allocator_env({"MALLOC_CONF": "narenas:2", "JE_MALLOC_CONF": "background_thread:true"})
    assert env["MALLOC_CONF"] == f"narenas:2,{options}"
    assert env["JE_MALLOC_CONF"] == f"background_thread:true,{options}"
    mine = {"MALLOC_CONF": "narenas:2, lg_extent_max_active_fit:6", "JE_MALLOC_CONF": "muzzy_decay_ms:100"}
    env = server.allocator_env(mine)  # (the user's own value of an option wins; the other one is added)
    assert env["MALLOC_CONF"] == "narenas:2, lg_extent_max_active_fit:6,muzzy_decay_ms:-1"
    assert env["JE_MALLOC_CONF"] == "muzzy_decay_ms:100,lg_extent_max_active_fit:10"
    both = {"MALLOC_CONF": "muzzy_decay_ms:5,lg_extent_max_active_fit:8"}
    assert server.allocator_env(both)["MALLOC_CONF"] == both["MALLOC_CONF"]


@needs_redis
def test_embedded_server_runs_with_the_allocator_option(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MALLOC_CONF", raising=False)
    monkeypatch.delenv("JE_MALLOC_CONF", raising=False)
    client = open_client(default_url())
    assert isinstance(client, redis.Redis)
    stats = client.execute_command("MEMORY", "MALLOC-STATS")
    client.close()
    text = stats.decode() if isinstance(stats, bytes) else str(stats)
    if "opt.lg_extent_max_active_fit" not in text:
        pytest.skip("this redis-server's allocator is not jemalloc")
    for option in server.ALLOCATOR_OPTIONS:
        name, _, value = option.partition(":")
        assert re.search(rf"opt\.{name}: {re.escape(value)}\b", text), name


@needs_redis
def test_long_home_path_uses_short_private_socket(home: Path) -> None:
    deep = home / ("x" * 60) / ("y" * 60)
    url = default_url(deep)
    paths = embedded_paths(deep)
    assert paths.socket.parent != paths.data_dir and len(str(paths.socket)) < 100
    assert oct(paths.socket.parent.stat().st_mode & 0o777) == "0o700"
    client = open_client(url)
    assert client.ping()
    client.close()
    assert stop_embedded(deep) is True


def test_fallback_to_fakeredis_warns(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fakeredis")
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)
    with pytest.warns(RuntimeWarning, match="NOTHING survives"):
        url = default_url()
    assert url == FAKE_URL
    first, second = open_client(url), open_client(url)
    first.set("prl:{r:0}:k", b"v")
    assert second.get("prl:{r:0}:k") == b"v"  # one in-process server per process
    assert second.eval("return redis.call('GET', KEYS[1])", 1, "prl:{r:0}:k") == b"v"
    first.delete("prl:{r:0}:k")
    with pytest.warns(RuntimeWarning):
        assert open_client().ping()
    assert not embedded_paths().data_dir.exists()
    with pytest.raises(StoreUnavailable, match="no redis-server"):
        server.ensure_embedded()


def test_fallback_without_fakeredis(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "fakeredis", None)
    with pytest.raises(StoreUnavailable, match="fakeredis"):
        open_client(FAKE_URL)


def test_foreign_socket_dir_is_refused(home: Path) -> None:
    data_dir = embedded_paths().data_dir
    data_dir.mkdir(parents=True)
    data_dir.chmod(0o755)
    with pytest.raises(ConfigError, match="mode 700"):
        server.ensure_embedded()
