"""docker-compose.yml, docker/redis.conf, docker/Dockerfile: AOF, password, volume, healthcheck, non-root."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from pr_loader.server import ALLOCATOR_OPTIONS
from tests.servers import REDIS_SERVER, RedisServer

REPO = Path(__file__).resolve().parents[1]
COMPOSE = shutil.which("docker-compose")
PASSWORD = "compose-test-pw-7f3a"


def _compose_config(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert COMPOSE is not None
    clean = {k: v for k, v in os.environ.items() if k != "REDIS_PASSWORD"}
    return subprocess.run(
        [COMPOSE, "-f", str(REPO / "docker-compose.yml"), "config"],
        cwd=REPO, env={**clean, **env}, capture_output=True, text=True, timeout=60,
    )


def _services(config: str) -> dict[str, str]:
    """The text block of each service in ``docker-compose config`` output (YAML, 2-space indent)."""
    blocks: dict[str, list[str]] = {}
    current: list[str] | None = None
    in_services = False
    for line in config.splitlines():
        if not line.startswith(" "):
            in_services, current = line == "services:", None
        elif in_services and re.fullmatch(r"  \S+:", line):
            current = blocks.setdefault(line.strip().rstrip(":"), [])
        elif current is not None:
            current.append(line)
    return {name: "\n".join(lines) + "\n" for name, lines in blocks.items()}


def _redis_conf() -> dict[str, str]:
    settings: dict[str, str] = {}
    for line in (REPO / "docker" / "redis.conf").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition(" ")
            settings[name] = value.strip().strip('"')
    return settings


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (CI installs it)")
def test_compose_config() -> None:
    result = _compose_config({"REDIS_PASSWORD": PASSWORD})
    assert result.returncode == 0, result.stderr
    text = result.stdout
    services = _services(text)
    redis_part, demo_part = services["redis"], services["demo"]
    assert re.search(r"image: redis:7(\.\d+)*\b", redis_part)
    assert re.search(rf"- --requirepass\n\s+- {PASSWORD}\n", redis_part)
    assert f"REDISCLI_AUTH: {PASSWORD}" in redis_part
    for variable in ("JE_MALLOC_CONF", "MALLOC_CONF"):  # the embedded server's jemalloc option, both builds
        options = re.escape(",".join(ALLOCATOR_OPTIONS))
        assert re.search(rf"^\s+{variable}: {options}$", redis_part, re.MULTILINE)
    assert "redis-data:/data:rw" in redis_part
    assert re.search(r"docker/redis\.conf:/usr/local/etc/redis/redis\.conf:ro", redis_part)
    assert "redis-cli ping" in redis_part and "healthcheck:" in redis_part
    assert "- /usr/local/etc/redis/redis.conf" in redis_part
    assert "condition: service_healthy" in demo_part
    assert "dockerfile: docker/Dockerfile" in demo_part
    assert f"PR_LOADER_REDIS_PASSWORD: {PASSWORD}" in demo_part
    assert re.search(r"- demo\n\s+- --redis-url\n\s+- redis://redis:6379/0", demo_part)
    assert re.search(r"^volumes:\n  redis-data:", text, re.MULTILINE)


@pytest.mark.skipif(COMPOSE is None, reason="docker-compose not installed (CI installs it)")
def test_compose_requires_password() -> None:
    result = _compose_config({})
    assert result.returncode != 0
    assert "REDIS_PASSWORD" in result.stderr


def test_redis_conf_persistence_settings() -> None:
    conf = _redis_conf()
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["aof-use-rdb-preamble"] == "yes"
    assert conf["maxmemory-policy"] == "noeviction"
    assert conf["dir"] == "/data"
    assert "requirepass" not in conf  # the secret comes from the environment, never from the repo


@pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")
def test_redis_conf_is_accepted_by_redis_server(tmp_path: Path) -> None:
    # "dir /data" is applied while the file is read, so point a copy at a temp dir
    conf = tmp_path / "redis.conf"
    data_dir = tmp_path / "data"
    text = (REPO / "docker" / "redis.conf").read_text()
    conf.write_text(re.sub(r"^dir /data$", f'dir "{data_dir}"', text, flags=re.MULTILINE))
    server = RedisServer(data_dir)
    args = server.args()
    for option in ("--appendonly", "--appendfsync"):  # keep the file's persistence settings
        at = args.index(option)
        del args[at : at + 2]
    server.args = lambda: [args[0], str(conf), *args[1:]]  # type: ignore[method-assign]
    server.start()
    try:
        client = server.client()
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        assert client.config_get("aof-use-rdb-preamble") == {"aof-use-rdb-preamble": "yes"}
        assert client.config_get("appendfsync") == {"appendfsync": _redis_conf()["appendfsync"]}
        client.close()
    finally:
        server.stop()


def test_dockerfile_runs_as_non_root_with_cpu_torch() -> None:
    lines = [line.strip() for line in (REPO / "docker" / "Dockerfile").read_text().splitlines()]
    lines = [line for line in lines if line and not line.startswith("#")]
    assert lines[0] == "FROM python:3.11-slim"
    users = [i for i, line in enumerate(lines) if line.startswith("USER ")]
    assert users and lines[users[-1]].split()[1] not in ("root", "0")
    runs = [i for i, line in enumerate(lines) if line.startswith("RUN ")]
    assert users[-1] > max(runs)  # nothing runs as root after the switch, and the image ends non-root
    torch = next(i for i, line in enumerate(lines) if "torch==2.13.0" in line)
    assert "--index-url https://download.pytorch.org/whl/cpu" in lines[torch]
    project = next(i for i, line in enumerate(lines) if re.match(r"RUN pip install \.$", line))
    assert torch < project
    assert any(line.startswith("ENTRYPOINT") and "pr-loader" in line for line in lines)
