"""Opening Redis: URL and environment resolution, retry with backoff, TLS, server and durability checks.

Resolution (each setting independently, first match wins):

1. keyword argument of :func:`connect`;
2. the URL (``redis://[user[:password]@]host[:port][/db]``, ``rediss://...`` for TLS,
   ``unix://[[user]:password@]/path/to.sock``; query parameters ``db``, ``password``, ``ssl_ca_certs``,
   ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs``, ``ssl_check_hostname``);
3. environment: ``PR_LOADER_REDIS_URL`` (only when no URL is passed), ``PR_LOADER_REDIS_USER``,
   ``PR_LOADER_REDIS_PASSWORD`` and, for ``rediss://`` only, ``PR_LOADER_REDIS_CA``,
   ``PR_LOADER_REDIS_CERT``, ``PR_LOADER_REDIS_KEY``.

Errors name the address (``scheme://host:port`` or the socket path), never a password.

Durability guarantees (what an acknowledged write survives), checked by :func:`check_durability`:

* ``appendonly no`` -- mode ``"none"``: nothing beyond the last RDB snapshot survives a crash.
* ``appendonly yes`` with ``appendfsync everysec`` (or ``no``) -- mode ``"everysec"``: a Redis crash
  (kill -9) loses nothing acknowledged (the AOF is written before replies); an OS crash or power loss
  loses up to the last ~1 s (``no``: up to ~30 s).
* ``appendonly yes`` on Redis >= 7.2 plus :func:`wait_durable` (``WAITAOF``) after writes -- mode
  ``"always"``: every acknowledged-and-waited write survives power loss.
* ``appendonly yes`` with ``appendfsync always`` -- mode ``"always"``: every acknowledged write survives
  power loss (fsync before the reply); :func:`wait_durable` is then a no-op check.

The run-scoped ACL recipe (:func:`acl_rules`) is explained in ``docs/acl.md``.
"""

from __future__ import annotations

import logging
import os
import random
import ssl
import time
import weakref
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qs, unquote, urlencode, urlsplit, urlunsplit

import redis
import redis.exceptions as rexc
from redis.backoff import NoBackoff
from redis.cluster import RedisCluster
from redis.retry import Retry

from pr_loader.errors import (
    ConfigError,
    DurabilityError,
    PrLoaderError,
    StoreAuthError,
    StoreUnavailable,
    UnsupportedServer,
)

__all__ = [
    "Client",
    "DurabilityMode",
    "DurabilityReport",
    "Endpoint",
    "ServerInfo",
    "acl_rules",
    "check_durability",
    "check_server",
    "connect",
    "create_run_user",
    "redact",
    "resolve_endpoint",
    "server_info",
    "wait_durable",
]

log = logging.getLogger(__name__)

Client: TypeAlias = "redis.Redis | RedisCluster"
DurabilityMode = Literal["none", "everysec", "always"]

ENV_URL = "PR_LOADER_REDIS_URL"
ENV_USER = "PR_LOADER_REDIS_USER"
ENV_PASSWORD = "PR_LOADER_REDIS_PASSWORD"
ENV_CA = "PR_LOADER_REDIS_CA"
ENV_CERT = "PR_LOADER_REDIS_CERT"
ENV_KEY = "PR_LOADER_REDIS_KEY"

MIN_VERSION = (6, 2, 0)
WAITAOF_VERSION = (7, 2, 0)
# EVAL/EVALSHA/SCRIPT LOAD run the store's Lua; LPOP with a count needs 6.2 (checked by version).
REQUIRED_COMMANDS = ("eval", "evalsha", "script", "hmget", "hset", "lpop", "lrange", "copy")

_SCHEMES = ("redis", "rediss", "unix")
_URL_QUERY_KEYS = frozenset(
    {"db", "password", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_cert_reqs", "ssl_check_hostname"}
)
_BACKOFF_BASE = 0.05
_BACKOFF_CAP = 2.0
_MIN_ATTEMPT_TIMEOUT = 0.2


@dataclass(frozen=True)
class Endpoint:
    """Resolved connection settings of one Redis endpoint; ``repr`` hides the password."""

    scheme: str
    host: str | None = None
    port: int | None = None
    path: str | None = None
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    ssl_check_hostname: bool = True

    @property
    def address(self) -> str:
        """``scheme://host:port`` or ``unix://<socket path>``: safe to log."""
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis`` (without timeouts)."""
        kwargs: dict[str, Any] = {"db": self.db, "username": self.username, "password": self.password}
        if self.scheme == "unix":
            kwargs["unix_socket_path"] = self.path
        else:
            kwargs.update(host=self.host, port=self.port)
        if self.scheme == "rediss":
            kwargs.update(
                ssl=True,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
                ssl_check_hostname=self.ssl_check_hostname,
            )
        return kwargs


@dataclass(frozen=True)
class ServerInfo:
    """What pr_loader needs to know about a server (from ``INFO``)."""

    version: tuple[int, int, int]
    version_text: str
    mode: str  # "standalone", "cluster" or "sentinel"
    cluster_enabled: bool
    aof_enabled: bool

    @property
    def has_waitaof(self) -> bool:
        return self.version >= WAITAOF_VERSION


@dataclass(frozen=True)
class DurabilityReport:
    """Result of :func:`check_durability`."""

    mode: DurabilityMode
    aof_enabled: bool
    appendfsync: str | None  # None when CONFIG GET is not allowed
    waitaof: bool

    @property
    def needs_wait(self) -> bool:
        """True when "always" is reached only by calling :func:`wait_durable` after writes."""
        return self.mode == "always" and self.appendfsync != "always"


def redact(url: str) -> str:
    """``url`` with any password (userinfo or ``password=`` query) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if parts.password is not None:
            userinfo, _, hostinfo = netloc.rpartition("@")
            user = userinfo.split(":", 1)[0]
            netloc = f"{user}:***@{hostinfo}"
        query = parse_qs(parts.query, keep_blank_values=True)
        if "password" in query:
            query["password"] = ["***"]
        return urlunsplit((parts.scheme, netloc, parts.path, urlencode(query, doseq=True, safe="*"), ""))
    except ValueError:
        return "<unparseable Redis URL>"


def _first(*values: str | None) -> str | None:
    return next((v for v in values if v not in (None, "")), None)


def _parse_bool(name: str, value: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"Redis URL parameter {name}={value!r} is not a boolean")


def _cert_reqs(value: str) -> str:
    if value not in ("none", "optional", "required"):
        raise ConfigError(f"Redis URL parameter ssl_cert_reqs={value!r} must be none, optional or required")
    return value


def resolve_endpoint(
    url: str | None = None,
    *,
    username: str | None = None,
    password: str | None = None,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    env: Mapping[str, str] | None = None,
) -> Endpoint:
    """Combine keyword arguments, the URL and the environment (in that order of precedence)."""
    env = os.environ if env is None else env
    url = url or env.get(ENV_URL)
    if not url:
        raise ConfigError(
            f"no Redis URL given and {ENV_URL} is not set; pass a URL, or use "
            "pr_loader.server.open_client() for the embedded server"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
    except ValueError:
        raise ConfigError(f"malformed Redis URL {redact(url)!r}") from None
    if parts.scheme not in _SCHEMES:
        raise ConfigError(f"Redis URL {redact(url)!r} must start with redis://, rediss:// or unix://")
    unknown = sorted(set(query) - _URL_QUERY_KEYS)
    if unknown:
        raise ConfigError(f"unknown parameter(s) {', '.join(unknown)} in Redis URL {redact(url)!r}")
    tls = parts.scheme == "rediss"
    tls_args = {"ssl_ca_certs": ssl_ca_certs, "ssl_certfile": ssl_certfile, "ssl_keyfile": ssl_keyfile}
    tls_given = sorted(name for name, value in tls_args.items() if value or name in query)
    if tls_given and not tls:
        raise ConfigError(f"TLS option(s) {', '.join(tls_given)} need a rediss:// URL, got {redact(url)!r}")
    url_user = unquote(parts.username) if parts.username else None
    url_password = unquote(parts.password) if parts.password else query.get("password")
    db_text = query.get("db") or (parts.path.strip("/") if parts.scheme != "unix" else "") or "0"
    try:
        db = int(db_text)
    except ValueError:
        raise ConfigError(f"Redis database {db_text!r} in {redact(url)!r} is not an integer") from None
    common: dict[str, Any] = {
        "scheme": parts.scheme,
        "db": db,
        "username": _first(username, url_user, env.get(ENV_USER)),
        "password": _first(password, url_password, env.get(ENV_PASSWORD)),
    }
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"Redis URL {redact(url)!r} names no socket path")
        return Endpoint(path=unquote(parts.path), **common)
    endpoint = Endpoint(host=parts.hostname or "localhost", port=port or 6379, **common)
    if not tls:
        return endpoint
    return Endpoint(
        **{**common, "host": endpoint.host, "port": endpoint.port},
        ssl_ca_certs=_first(ssl_ca_certs, query.get("ssl_ca_certs"), env.get(ENV_CA)),
        ssl_certfile=_first(ssl_certfile, query.get("ssl_certfile"), env.get(ENV_CERT)),
        ssl_keyfile=_first(ssl_keyfile, query.get("ssl_keyfile"), env.get(ENV_KEY)),
        ssl_cert_reqs=_cert_reqs(query.get("ssl_cert_reqs", "required")),
        ssl_check_hostname=_parse_bool("ssl_check_hostname", query.get("ssl_check_hostname", "true")),
    )


def _scrub(text: str, secret: str | None) -> str:
    return text.replace(secret, "***") if secret else text


def _is_tls_failure(exc: BaseException) -> bool:
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLError):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _nodes(client: Client) -> list[tuple[str, redis.Redis]]:
    """(address, plain client) of every primary behind ``client``."""
    if isinstance(client, RedisCluster):
        primaries = client.get_primaries()  # type: ignore[no-untyped-call]
        return [(f"{node.host}:{node.port}", node.redis_connection) for node in primaries]
    kwargs = client.get_connection_kwargs()
    where = kwargs.get("path") or f"{kwargs.get('host')}:{kwargs.get('port')}"
    return [(str(where), client)]


def _command(client: redis.Redis, *args: Any) -> Any:
    """``execute_command`` with a typed signature."""
    return client.execute_command(*args)  # type: ignore[no-untyped-call]


def _parse_version(text: str) -> tuple[int, int, int]:
    numbers = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    numbers += [0] * (3 - len(numbers))
    return numbers[0], numbers[1], numbers[2]


def server_info(client: redis.Redis) -> ServerInfo:
    """Version, mode and AOF state of one server; :class:`StoreAuthError` if INFO is denied."""
    try:
        info: dict[str, Any] = {}
        for section in ("server", "persistence", "cluster"):
            info.update(client.info(section))
    except rexc.NoPermissionError as exc:
        raise StoreAuthError(f"the Redis user may not run INFO ({exc}); see docs/acl.md") from exc
    text = str(info.get("redis_version", "0"))
    return ServerInfo(
        version=_parse_version(text),
        version_text=text,
        mode=str(info.get("redis_mode", "standalone")),
        cluster_enabled=bool(int(info.get("cluster_enabled", 0))),
        aof_enabled=bool(int(info.get("aof_enabled", 0))),
    )


def check_server(client: redis.Redis, address: str) -> ServerInfo:
    """Raise :class:`UnsupportedServer` unless the server is Redis >= 6.2 with the needed commands."""
    info = server_info(client)
    if info.version < MIN_VERSION:
        raise UnsupportedServer(
            f"Redis at {address} is version {info.version_text}; pr_loader needs >= "
            f"{'.'.join(map(str, MIN_VERSION))} (LPOP with a count, Lua scripting)"
        )
    try:
        found = _command(client, "COMMAND INFO", *REQUIRED_COMMANDS)  # one word: raw reply, no callback
    except rexc.NoPermissionError:
        log.debug("COMMAND INFO denied at %s; skipping the command check", address)
        return info
    missing = [name for name, entry in zip(REQUIRED_COMMANDS, found) if not entry]
    if missing:
        raise UnsupportedServer(
            f"Redis at {address} (version {info.version_text}) lacks command(s) {', '.join(missing)} "
            "(renamed or disabled in its config?)"
        )
    return info


def _open_once(
    endpoint: Endpoint, cluster: bool | None, timeouts: dict[str, Any], attempt_timeout: float
) -> Client:
    probe = redis.Redis(
        **{**endpoint.client_kwargs(), "db": 0},  # SELECT is refused in cluster mode
        socket_connect_timeout=attempt_timeout,
        socket_timeout=timeouts["socket_timeout"],
        retry=Retry(NoBackoff(), 0),
    )
    try:
        probe.ping()
        info = check_server(probe, endpoint.address)
        use_cluster = info.cluster_enabled if cluster is None else cluster
        if not use_cluster and endpoint.db:
            try:
                probe.select(endpoint.db)
            except rexc.ResponseError as exc:
                raise ConfigError(
                    f"Redis at {endpoint.address} refused database {endpoint.db}: {exc}"
                ) from None
    finally:
        probe.close()
    if not use_cluster:
        return redis.Redis(**endpoint.client_kwargs(), **timeouts)
    if not info.cluster_enabled:
        raise ConfigError(f"cluster=True but Redis at {endpoint.address} is not in cluster mode")
    if endpoint.scheme == "unix" or endpoint.db != 0:
        raise ConfigError(f"Redis Cluster at {endpoint.address} needs a TCP URL with database 0")
    kwargs = endpoint.client_kwargs()
    kwargs.pop("db")
    client = RedisCluster(**kwargs, **timeouts)
    for where, node in _nodes(client):
        check_server(node, where)
    return client


def connect(
    url: str | None = None,
    *,
    retry_seconds: float = 10.0,
    socket_timeout: float | None = 30.0,
    socket_connect_timeout: float = 5.0,
    username: str | None = None,
    password: str | None = None,
    ssl_ca_certs: str | None = None,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
    cluster: bool | None = None,
) -> Client:
    """Open and check a connection; a ``RedisCluster`` when ``cluster`` or the server says so.

    Connection failures are retried with exponential backoff and jitter for ``retry_seconds``, then
    :class:`StoreUnavailable` is raised. Refused credentials or ACL denials raise :class:`StoreAuthError`,
    TLS handshake failures :class:`StoreUnavailable`, old servers :class:`UnsupportedServer`, all at once.
    """
    if retry_seconds < 0:
        raise ConfigError(f"retry_seconds must be >= 0, got {retry_seconds}")
    endpoint = resolve_endpoint(
        url,
        username=username,
        password=password,
        ssl_ca_certs=ssl_ca_certs,
        ssl_certfile=ssl_certfile,
        ssl_keyfile=ssl_keyfile,
    )
    timeouts: dict[str, Any] = {
        "socket_timeout": socket_timeout,
        "socket_connect_timeout": socket_connect_timeout,
    }
    start = time.monotonic()
    deadline = start + retry_seconds
    attempt = 0
    while True:
        attempt += 1
        remaining = deadline - time.monotonic()
        attempt_timeout = min(socket_connect_timeout, max(remaining, _MIN_ATTEMPT_TIMEOUT))
        try:
            return _open_once(endpoint, cluster, timeouts, attempt_timeout)
        except (rexc.AuthenticationError, rexc.NoPermissionError) as exc:
            user = endpoint.username or "default"
            raise StoreAuthError(
                f"Redis at {endpoint.address} refused user {user!r}: {_scrub(str(exc), endpoint.password)}"
            ) from exc
        except PrLoaderError:
            raise  # StoreAuthError / StoreUnavailable are OSErrors too: never retried
        except (rexc.ConnectionError, rexc.TimeoutError, rexc.RedisClusterException, OSError) as exc:
            reason = _scrub(f"{type(exc).__name__}: {exc}", endpoint.password)
            if _is_tls_failure(exc):
                raise StoreUnavailable(
                    f"TLS handshake with Redis at {endpoint.address} failed: {reason}"
                ) from exc
            delay = min(_BACKOFF_CAP, _BACKOFF_BASE * 2 ** (attempt - 1))
            delay = random.uniform(delay / 2, delay)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StoreUnavailable(
                    f"Redis at {endpoint.address} is unreachable after {attempt} attempt(s) in "
                    f"{time.monotonic() - start:.1f}s: {reason}"
                ) from exc
            delay = min(delay, remaining)
            log.warning(
                "Redis at %s not reachable (%s); retry %d in %.2fs", endpoint.address, reason, attempt, delay
            )
            time.sleep(delay)


def _config_get(client: redis.Redis, name: str) -> str | None:
    try:
        value = client.config_get(name).get(name)
    except rexc.NoPermissionError:
        return None
    return None if value is None else str(value)


def check_durability(client: Client, mode: DurabilityMode) -> DurabilityReport:
    """Check that every primary can provide ``mode`` (see the table in the module docstring).

    Raises :class:`DurabilityError` explaining how to enable it. With ``"always"`` and
    ``report.needs_wait`` the caller must call :func:`wait_durable` after each write.
    """
    if mode not in ("none", "everysec", "always"):
        raise ConfigError(f"durability mode must be 'none', 'everysec' or 'always', got {mode!r}")
    reports = []
    for where, node in _nodes(client):
        info = server_info(node)
        fsync = _config_get(node, "appendfsync")
        report = DurabilityReport(mode, info.aof_enabled, fsync, info.has_waitaof)
        if mode != "none" and not info.aof_enabled:
            raise DurabilityError(
                f"durability {mode!r} needs the append-only file, but Redis at {where} runs with "
                "'appendonly no'; enable it with 'CONFIG SET appendonly yes' (and 'CONFIG REWRITE') or "
                "'appendonly yes' in redis.conf"
            )
        if mode == "always" and fsync != "always" and not info.has_waitaof:
            setting = "unknown (CONFIG GET not allowed)" if fsync is None else repr(fsync)
            raise DurabilityError(
                f"durability 'always' needs 'appendfsync always' or Redis >= 7.2 (WAITAOF); Redis at "
                f"{where} is {info.version_text} with appendfsync {setting}; set 'appendfsync always' "
                "in redis.conf or upgrade Redis"
            )
        reports.append(report)
    return (
        reports[0]
        if len(reports) == 1
        else DurabilityReport(
            mode,
            all(r.aof_enabled for r in reports),
            reports[0].appendfsync if len({r.appendfsync for r in reports}) == 1 else None,
            all(r.waitaof for r in reports),
        )
    )


_WAITAOF_SUPPORT: weakref.WeakKeyDictionary[redis.Redis, bool] = weakref.WeakKeyDictionary()


def wait_durable(client: redis.Redis, *, timeout_ms: int = 1000) -> bool:
    """Block until this connection's writes are fsynced to the local AOF (``WAITAOF 1 0``).

    Returns False without waiting on servers before 7.2, which must run ``appendfsync always``
    (:func:`check_durability` verifies that). ``WAITAOF`` covers the writes of the connection it is
    sent on: call it from the thread that wrote, right after the write (redis-py hands a thread its
    last connection back), or on a ``single_connection_client=True`` client. Raises
    :class:`DurabilityError` if the fsync did not happen within ``timeout_ms``.
    """
    supported = _WAITAOF_SUPPORT.get(client)
    if supported is None:
        supported = server_info(client).has_waitaof
        _WAITAOF_SUPPORT[client] = supported
    if not supported:
        return False
    local, _replicas = _command(client, "WAITAOF", 1, 0, timeout_ms)
    if int(local) < 1:
        raise DurabilityError(f"writes were not fsynced to the append-only file within {timeout_ms} ms")
    return True


def _glob_escape(text: str) -> str:
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


def acl_rules(run_id: str, ranks: Iterable[int] = (0,)) -> list[str]:
    """ACL SETUSER rules that confine a user to the keys of the given rank shards of one run.

    One exact key pattern per shard (``~prl:{<run>:<rank>}:*``): a run-wide ``prl:{<run>:*`` would also
    match runs whose id starts with ``<run>:``. See docs/acl.md for the reasoning behind each rule.
    """
    shards = sorted(set(ranks))
    if not run_id or not shards or any(r < 0 for r in shards):
        raise ConfigError(f"acl_rules needs a run id and ranks >= 0, got {run_id!r}, {shards}")
    patterns = [f"~prl:{{{_glob_escape(run_id)}:{rank}}}:*" for rank in shards]
    return [
        "resetkeys", *patterns, "resetchannels",
        "-@all", "+@read", "+@write", "+@scripting", "+@connection", "+@transaction",
        "-@dangerous", "+info",  # INFO is flagged dangerous but connect() needs it for the version check
        "-randomkey", "-function", "-fcall", "-fcall_ro", "-script|flush", "-script|kill", "-script|debug",
    ]  # fmt: skip


def create_run_user(
    client: redis.Redis, user: str, password: str, run_id: str, ranks: Iterable[int] = (0,)
) -> None:
    """Create or reset ``user`` with ``password``, allowed only the given shards of ``run_id``."""
    _command(client, "ACL", "SETUSER", user, "reset", "on", f">{password}", *acl_rules(run_id, ranks))
