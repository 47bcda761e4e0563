"""The embedded default store: a private ``redis-server`` on a unix socket, or in-process fakeredis.

With no URL, :func:`default_url` returns ``PR_LOADER_REDIS_URL`` if set; otherwise it starts (or reuses) a
daemonized ``redis-server`` owned by the current user:

* data dir ``$PR_LOADER_HOME/redis`` (default ``~/.cache/pr_loader/redis``, mode 700) holding the AOF,
  ``redis.conf`` (regenerated at each start), ``redis.pid``, ``redis.log`` and ``server.lock``;
* unix socket ``<data dir>/redis.sock`` (``unixsocketperm 700``, no TCP port), or
  ``$TMPDIR/pr_loader-<uid>/<hash>.sock`` when that path is too long for a socket;
* ``appendonly yes`` with ``appendfsync`` from the argument, ``PR_LOADER_REDIS_APPENDFSYNC`` or
  ``everysec``: acknowledged writes survive a crash of any process, and an OS crash except the last ~1 s;
* jemalloc's ``lg_extent_max_active_fit`` raised to 10 and ``muzzy_decay_ms`` at -1 (:func:`allocator_env`):
  memory freed by a committed step is reused for the next steps instead of being handed back to the kernel
  and faulted in again (README "Redis's allocator" has the measurements).

The server outlives the process so that a restarted trainer resumes its run; :func:`stop_embedded` shuts
it down. Concurrent starts are serialised by an ``fcntl`` lock on ``server.lock``; a server that answers
PING on the socket is reused. Without a ``redis-server`` binary, :func:`default_url` warns loudly and
returns :data:`FAKE_URL`: :func:`open_client` then gives an in-process fakeredis store of which nothing
survives the process.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.retry import Retry

from pr_loader.errors import ConfigError, StoreUnavailable
from pr_loader.store.connection import ENV_URL, Client, connect

__all__ = [
    "ALLOCATOR_OPTIONS",
    "FAKE_URL",
    "EmbeddedPaths",
    "allocator_env",
    "default_url",
    "embedded_paths",
    "ensure_embedded",
    "open_client",
    "stop_embedded",
]

log = logging.getLogger(__name__)

ENV_HOME = "PR_LOADER_HOME"
ENV_APPENDFSYNC = "PR_LOADER_REDIS_APPENDFSYNC"
FAKE_URL = "fakeredis://pr_loader"
_FSYNC_MODES = ("always", "everysec", "no")
_MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes on Linux, 104 on macOS
_FAKE_SERVER: Any = None
ALLOCATOR_OPTIONS = ("lg_extent_max_active_fit:10", "muzzy_decay_ms:-1")
_ALLOCATOR_VARIABLES = ("MALLOC_CONF", "JE_MALLOC_CONF")  # a system jemalloc's, Redis's bundled one's


def allocator_env(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment to start a ``redis-server`` for pr_loader runs in: ``environ`` (default: this
    process's) with :data:`ALLOCATOR_OPTIONS` added to jemalloc's options, in ``MALLOC_CONF`` (read by a
    system jemalloc, e.g. Debian's) and ``JE_MALLOC_CONF`` (read by the jemalloc that Redis bundles, e.g. in
    the official Docker image). An option a variable already sets keeps the variable's value.

    Why (README "Redis's allocator" has the measurements):

    * ``lg_extent_max_active_fit:10``: jemalloc's default (6) only splits a free run up to 64 times the
      size asked for. The payloads of a committed step, freed together, coalesce into runs too big for the
      next steps' payloads and replies, so those take fresh pages while the freed runs are purged: with
      25 KB values churned, Redis's RSS was 2.5-2.7x its data against 1.3x with 10, and the server spent
      more CPU per step in page faults and ``madvise``.
    * ``muzzy_decay_ms:-1``: a freed run that coalesces past 8 MiB (a few big payloads of one step) is
      otherwise purged at once (``MADV_DONTNEED``) on Redis's main thread, inside the ``DEL``, and the next
      replies fault fresh pages in; ``oversize_threshold`` does not lift that in jemalloc 5.3 (measured),
      a decay time of -1 does. Freed memory still decays after ``dirty_decay_ms`` (10 s), with
      ``MADV_FREE``: the kernel takes those pages back when it needs them, not at once. With 1 MiB values
      churned the server's CPU per step fell from 10.5 to 6.3 ms, its RSS rose from 203 to 216 MB for
      170 MB of data; 25 KB values: unchanged (3.7 ms, 96 MB for 60 MB)."""
    env = dict(os.environ if environ is None else environ)
    for variable in _ALLOCATOR_VARIABLES:
        current = env.get(variable, "")
        named = {part.partition(":")[0].strip() for part in current.split(",")}
        added = [option for option in ALLOCATOR_OPTIONS if option.partition(":")[0] not in named]
        if added:
            env[variable] = ",".join(filter(None, [current, *added]))
    return env


@dataclass(frozen=True)
class EmbeddedPaths:
    """Files of the embedded server of one data dir."""

    data_dir: Path
    socket: Path

    @property
    def url(self) -> str:
        return f"unix://{self.socket}"

    @property
    def conf(self) -> Path:
        return self.data_dir / "redis.conf"

    @property
    def pidfile(self) -> Path:
        return self.data_dir / "redis.pid"

    @property
    def logfile(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def lock(self) -> Path:
        return self.data_dir / "server.lock"


def embedded_paths(home: str | os.PathLike[str] | None = None) -> EmbeddedPaths:
    """Paths for ``home`` (default ``$PR_LOADER_HOME``, then ``~/.cache/pr_loader``); creates nothing."""
    base = Path(home or os.environ.get(ENV_HOME) or Path.home() / ".cache" / "pr_loader")
    data_dir = base.expanduser().absolute() / "redis"
    sock = data_dir / "redis.sock"
    if len(os.fsencode(sock)) > _MAX_SOCKET_PATH:
        digest = hashlib.sha256(os.fsencode(data_dir)).hexdigest()[:16]
        sock = Path(tempfile.gettempdir()) / f"pr_loader-{os.getuid()}" / f"{digest}.sock"
    return EmbeddedPaths(data_dir, sock)


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    stat = path.stat()
    if stat.st_uid != os.getuid() or stat.st_mode & 0o077:
        raise ConfigError(
            f"{path} must be a directory owned by you with mode 700 (it holds the Redis socket)"
        )


@contextlib.contextmanager
def _locked(path: Path, timeout: float) -> Iterator[None]:
    with open(path, "a+b") as handle:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise StoreUnavailable(
                        f"another process holds {path} for more than {timeout:.0f}s"
                    ) from None
                time.sleep(0.05)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_client(paths: EmbeddedPaths) -> redis.Redis:
    return redis.Redis(
        unix_socket_path=str(paths.socket),
        socket_timeout=5.0,
        socket_connect_timeout=1.0,
        retry=Retry(NoBackoff(), 0),  # SHUTDOWN drops the connection: do not reconnect
    )


def _answers(paths: EmbeddedPaths) -> bool:
    if not paths.socket.exists():
        return False
    client = _local_client(paths)
    try:
        return bool(client.ping())
    except rexc.BusyLoadingError:
        return True  # ours, still loading its AOF; connect() waits for it
    except (rexc.ConnectionError, rexc.TimeoutError, OSError):
        return False
    finally:
        client.close()


def _quote(value: object) -> str:
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def _write_conf(paths: EmbeddedPaths, appendfsync: str) -> None:
    settings = {
        "port": 0,
        "unixsocket": paths.socket,
        "unixsocketperm": 700,
        "dir": paths.data_dir,
        "daemonize": "yes",
        "pidfile": paths.pidfile,
        "logfile": paths.logfile,
        "appendonly": "yes",
        "appendfsync": appendfsync,
        "aof-use-rdb-preamble": "yes",
        "save": "",
        "maxmemory-policy": "noeviction",
    }
    lines = ["# written by pr_loader.server at every start; edits are overwritten"]
    lines += [f"{name} {_quote(value)}" for name, value in settings.items()]
    paths.conf.write_text("\n".join(lines) + "\n")


def _read_pid(paths: EmbeddedPaths) -> int | None:
    try:
        return int(paths.pidfile.read_text().strip())
    except (OSError, ValueError):
        return None


def _log_tail(paths: EmbeddedPaths) -> str:
    try:
        return paths.logfile.read_text(errors="replace")[-1500:]
    except OSError:
        return "(no log)"


def _start(binary: str, paths: EmbeddedPaths, appendfsync: str, timeout: float) -> None:
    with contextlib.suppress(FileNotFoundError):
        paths.socket.unlink()  # stale: nothing answered on it
    _write_conf(paths, appendfsync)
    result = subprocess.run(
        [binary, str(paths.conf)], capture_output=True, text=True, timeout=timeout, env=allocator_env()
    )
    if result.returncode != 0:
        raise StoreUnavailable(
            f"redis-server for {paths.data_dir} failed to start: "
            f"{result.stdout}{result.stderr}{_log_tail(paths)}"
        )
    deadline = time.monotonic() + timeout
    while not _answers(paths):
        if time.monotonic() > deadline:
            raise StoreUnavailable(
                f"redis-server for {paths.data_dir} did not answer on {paths.socket} within {timeout:.0f}s: "
                f"{_log_tail(paths)}"
            )
        time.sleep(0.02)
    log.info("started embedded redis-server (pid %s) on %s", _read_pid(paths), paths.socket)


def _fsync_mode(appendfsync: str | None) -> str:
    mode = appendfsync or os.environ.get(ENV_APPENDFSYNC) or "everysec"
    if mode not in _FSYNC_MODES:
        raise ConfigError(f"appendfsync must be one of {', '.join(_FSYNC_MODES)}, got {mode!r}")
    return mode


def ensure_embedded(
    home: str | os.PathLike[str] | None = None, *, appendfsync: str | None = None, timeout: float = 30.0
) -> str:
    """Start the embedded server of ``home`` unless it already answers; returns its ``unix://`` URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise StoreUnavailable(
            "no redis-server binary on PATH (install it, e.g. 'apt-get install redis-server')"
        )
    mode = _fsync_mode(appendfsync)
    paths = embedded_paths(home)
    _private_dir(paths.data_dir)
    _private_dir(paths.socket.parent)
    with _locked(paths.lock, timeout):
        if _answers(paths):
            client = _local_client(paths)
            try:
                if client.config_get("appendfsync").get("appendfsync") != mode:
                    client.config_set("appendfsync", mode)
            finally:
                client.close()
        else:
            _start(binary, paths, mode, timeout)
    return paths.url


def default_url(home: str | os.PathLike[str] | None = None, *, appendfsync: str | None = None) -> str:
    """``PR_LOADER_REDIS_URL``, else the embedded server's URL, else :data:`FAKE_URL` with a warning."""
    url = os.environ.get(ENV_URL)
    if url:
        return url
    if shutil.which("redis-server") is None:
        message = (
            "no redis-server binary found: pr_loader falls back to an in-process fakeredis store and "
            "NOTHING survives this process (no resume after a crash). Install redis-server or set "
            f"{ENV_URL}."
        )
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        log.warning("%s", message)
        return FAKE_URL
    return ensure_embedded(home, appendfsync=appendfsync)


def _fake_client() -> redis.Redis:
    global _FAKE_SERVER
    try:
        import fakeredis
    except ImportError:
        raise StoreUnavailable(
            "no redis-server binary and fakeredis is not installed; install redis-server "
            f"(e.g. 'apt-get install redis-server') or 'pip install fakeredis[lua]', or set {ENV_URL}"
        ) from None
    if _FAKE_SERVER is None:
        _FAKE_SERVER = fakeredis.FakeServer(version=(7, 0))
    client: redis.Redis = fakeredis.FakeRedis(server=_FAKE_SERVER)
    return client


def open_client(url: str | None = None, **connect_kwargs: Any) -> Client:
    """A connected client for ``url`` or :func:`default_url`; :data:`FAKE_URL` gives the shared fakeredis.

    Fake clients of one process share one in-process server; they skip the server checks of
    :func:`~pr_loader.store.connection.connect` (fakeredis has no ``INFO``).
    """
    url = url or default_url()
    if url == FAKE_URL:
        return _fake_client()
    return connect(url, **connect_kwargs)


def stop_embedded(home: str | os.PathLike[str] | None = None, *, timeout: float = 30.0) -> bool:
    """Shut the embedded server of ``home`` down (the AOF is fsynced first); False if none was running."""
    paths = embedded_paths(home)
    if not paths.data_dir.is_dir():
        return False
    with _locked(paths.lock, timeout):
        pid = _read_pid(paths)
        if not _answers(paths):
            return False
        client = _local_client(paths)
        try:
            client.shutdown()
        except rexc.ConnectionError:
            pass  # the server closed the connection while shutting down
        finally:
            client.close()
        deadline = time.monotonic() + timeout
        while pid is not None and _alive(pid):
            if time.monotonic() > deadline:
                log.warning("embedded redis-server pid %d ignored SHUTDOWN; sending SIGTERM", pid)
                os.kill(pid, signal.SIGTERM)
                break
            time.sleep(0.02)
        with contextlib.suppress(FileNotFoundError):
            paths.socket.unlink()
    return True


def _alive(pid: int) -> bool:
    """True while ``pid`` runs; a zombie (exited, not yet reaped by its new parent) counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # running, as another user
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True  # no procfs: trust kill(0)
    return state != "Z"
