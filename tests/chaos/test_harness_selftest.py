"""The chaos harness (kill hooks, forked children, checks, snapshots) works, independent of pr_loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import redis

from tests.chaos.helpers import (
    ChaosTally,
    Killer,
    KillPlan,
    check_exactly_once,
    diff_snapshots,
    run_child,
    snapshot,
)
from tests.servers import RedisServer

pytestmark = [pytest.mark.redis]

_SCRIPT = "return redis.call('INCR', KEYS[1])"


class _Bumper:
    def __init__(self, client: redis.Redis) -> None:
        self.client = client

    def bump(self) -> int:
        return int(self.client.eval(_SCRIPT, 1, "prl:bump"))  # type: ignore[no-untyped-call]


def _bump_child(
    url: str, plan: KillPlan | None, redis_pid: int | None = None, *, times: int = 3, channel: Any = None
) -> None:
    killer = Killer(plan, redis_pid=redis_pid, channel=channel)
    with killer.client_hooks():
        client = redis.Redis.from_url(url, socket_timeout=5)
        bumper = _Bumper(client)
        killer.wrap(bumper, ["bump"])
        for _ in range(times):
            for _attempt in range(50):
                try:
                    bumper.bump()
                    break
                except redis.ConnectionError:
                    continue


@pytest.mark.parametrize(("where", "expected"), [("before", 1), ("inflight", 2), ("after", 2)])
def test_kill_points(chaos_server: RedisServer, where: str, expected: int) -> None:
    result = run_child(_bump_child, chaos_server.url, KillPlan("bump", where, 2))
    assert result.killed, result
    client = chaos_server.client()
    # an in-flight script was sent before the kill: the server runs it although nobody reads the reply
    assert int(client.get("prl:bump") or 0) == expected
    client.close()


def test_unfired_plan_lets_the_child_finish(chaos_server: RedisServer) -> None:
    result = run_child(_bump_child, chaos_server.url, KillPlan("bump", "before", 99))
    assert result.exitcode == 0 and not result.killed and result.error is None
    client = chaos_server.client()
    assert int(client.get("prl:bump") or 0) == 3
    client.close()


def test_child_errors_are_reported(chaos_server: RedisServer) -> None:
    result = run_child(_bump_child, "redis://127.0.0.1:1/0", None, times=1)
    assert result.exitcode == 0  # the child swallows connection errors by design: 50 bounded attempts
    result = run_child(_bump_child, "not-a-url", None)
    assert result.exitcode == 3 and result.error is not None and "ValueError" in result.error


def test_redis_kill_and_restart_from_aof(chaos_server: RedisServer) -> None:
    assert chaos_server.proc is not None
    result = run_child(
        _bump_child,
        chaos_server.url,
        KillPlan("bump", "after", 2, target="redis"),
        chaos_server.proc.pid,
        on_redis_killed=chaos_server.restart,
    )
    assert result.exitcode == 0, result
    assert result.redis_kills == 1
    client = chaos_server.client()
    assert int(client.get("prl:bump") or 0) == 3  # appendfsync always: nothing acknowledged was lost
    client.close()


def test_exactly_once_check_finds_lost_duplicated_and_foreign() -> None:
    tally = ChaosTally()
    report = check_exactly_once(["0:0", "0:1", "0:1", "0:9"], ["0:0", "0:1", "0:2"], tally=tally)
    assert report.lost == ["0:2"] and report.duplicated == ["0:1"] and report.foreign == ["0:9"]
    assert not report.ok
    assert (tally.rows_checked, tally.lost, tally.duplicated) == (4, 1, 1)
    assert check_exactly_once(["0:1", "0:0"], ["0:0", "0:1"], tally=None).ok


def test_snapshot_diff(chaos_server: RedisServer, tmp_path: Path) -> None:
    client = chaos_server.client()
    client.rpush("prl:l", b"a", b"b")
    client.hset("prl:h", mapping={"k": "v"})
    client.zadd("prl:z", {"m": 1.5})
    before = snapshot(client)
    assert diff_snapshots(before, snapshot(client)) == []
    client.rpush("prl:l", b"c")
    client.set("prl:new", b"x")
    client.delete("prl:z")
    problems = diff_snapshots(before, snapshot(client))
    assert len(problems) == 3 and any("prl:l" in p for p in problems)
    client.close()
