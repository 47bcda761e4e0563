"""SIGKILL a partial-rollout training subprocess at random points, restore from its last saved state_dict,
and compare the full trace (per step: rows, times postponed, partial fields, postponed ids) with an
uninterrupted run: PostponeToNext with prefetching, three epochs."""

from __future__ import annotations

import itertools
import json
import random
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.loader import trainer_proc
from tests.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]


def read_trace(workdir: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in (workdir / "trace.jsonl").read_text().splitlines()]


def run_life(server: RedisServer, run_id: str, workdir: Path, kill: tuple[int, str] | None) -> int:
    cmd = [sys.executable, "-m", "tests.loader.trainer_proc", "--url", server.url, "--run-id", run_id,
           "--workdir", str(workdir)]  # fmt: skip
    if kill is not None:
        cmd += ["--kill-step", str(kill[0]), "--kill-phase", kill[1]]
    done = subprocess.run(cmd, cwd=ROOT, timeout=60, capture_output=True, text=True)
    assert done.returncode in (0, -signal.SIGKILL), done.stderr[-3000:]
    return done.returncode


@pytest.mark.redis
@pytest.mark.parametrize("seed", [0])
def test_sigkill_resume_trace_equals_uninterrupted(
    redis_server: RedisServer, tmp_path: Path, seed: int
) -> None:
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    trainer_proc.train(redis_server.url, f"ref-{uuid.uuid4().hex}", reference_dir)
    reference = read_trace(reference_dir)
    total = trainer_proc.EPOCHS * trainer_proc.S
    assert [t["step"] for t in reference] == list(range(total))
    assert any(t["postponed"] for t in reference) and any(len(t["rows"]) > trainer_proc.B for t in reference)
    for step, nxt in itertools.pairwise(reference):  # reading ahead never takes postponed rows elsewhere
        arrived = [row[0] for row in nxt["rows"]] + nxt["postponed"]
        assert all(sid in arrived for sid in step["postponed"]), (step, nxt)

    rng = random.Random(seed)
    kills = sorted(rng.sample(range(total), 3))
    run_id, workdir = f"kill-{uuid.uuid4().hex}", tmp_path / "killed"
    workdir.mkdir()
    for life, step in enumerate(kills):
        phase = rng.choice(trainer_proc.PHASES)
        rc = run_life(redis_server, run_id, workdir, kill=(step, phase))
        assert rc == -signal.SIGKILL, f"life {life} should have been killed at step {step} ({phase}), rc={rc}"
    run_life(redis_server, run_id, workdir, kill=None)
    assert read_trace(workdir) == reference
