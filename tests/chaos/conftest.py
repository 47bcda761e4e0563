"""Chaos fixtures and the end-of-session summary line (kills, restarts, drops, rows, lost, duplicated).

CI runs a few iterations per randomised test; by hand::

    PR_LOADER_CHAOS_ITERATIONS=1000 PR_LOADER_CHAOS_SEED=7 pytest tests/chaos -x
    PR_LOADER_SOAK_SECONDS=3600 pytest tests/test_soak.py

Every failure message carries the "story" of the run (kill plans, exit codes); the seed reproduces it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.chaos.helpers import TALLY
from tests.chaos.proxy import ChaosProxy
from tests.servers import REDIS_SERVER, RedisServer


@pytest.fixture
def chaos_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server with AOF and ``appendfsync always``, killed and reaped at teardown."""
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "redis", appendfsync="always").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def everysec_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "redis-everysec", appendfsync="everysec").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def proxy(chaos_server: RedisServer) -> Iterator[ChaosProxy]:
    """A fault-injecting TCP proxy in front of ``chaos_server``."""
    with ChaosProxy(chaos_server.port) as chaos_proxy:
        yield chaos_proxy
        TALLY.drops += chaos_proxy.stats.drops
        TALLY.stalls += chaos_proxy.stats.stalls


# ---------------------------------------------------------------------------------------------------
# summary line; works with and without xdist (workers send their tally to the controller)


def pytest_sessionfinish(session: pytest.Session) -> None:
    workeroutput: Any = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["pr_loader_chaos"] = json.dumps(TALLY.as_dict())


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    data = getattr(node, "workeroutput", {}).get("pr_loader_chaos")
    if data:
        TALLY.merge(json.loads(data))


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if any(TALLY.as_dict().values()):
        terminalreporter.write_sep("-", "pr_loader chaos summary")
        terminalreporter.write_line(TALLY.line())
