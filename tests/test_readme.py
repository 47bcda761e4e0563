"""The README's "Resume after preemption" example runs as written: killed (SIGKILL) after a few checkpoints
and started again, it trains on exactly the batches of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.servers import RedisServer

README = Path(__file__).resolve().parents[1] / "README.md"
TRAIN_LINE = "        ...                                     # train\n"
# each step appends its batch's sample ids to trace.jsonl (flushed before the step's checkpoint)
TRACE = (
    "        with open('trace.jsonl', 'a') as trace:\n"
    "            trace.write(json.dumps(batch['input_ids'][:, 0].tolist()) + '\\n')\n"
    "        time.sleep(0.01)\n"
)


def example(url: str, run_id: str) -> str:
    """The README's example, on the test's server and run, recording what it trains on."""
    text = README.read_text()
    start = text.index("```python\n", text.index("## Resume after preemption")) + len("```python\n")
    code = text[start : text.index("```", start)]
    for old, new in (
        ('redis_url="redis://localhost:6379/0"', f"redis_url={url!r}"),
        ('run_id="my-run"', f"run_id={run_id!r}"),
        (TRAIN_LINE, TRACE),
    ):
        assert code.count(old) == 1, f"the README's example no longer has {old!r}"
        code = code.replace(old, new)
    return "import time\n" + code


def run(script: str, cwd: Path, kill_after_lines: int | None = None) -> None:
    env = {**os.environ, "PYTHONPATH": str(README.parent)}
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=cwd, env=env)
    if kill_after_lines is not None:
        deadline = time.monotonic() + 120
        trace = cwd / "trace.jsonl"
        while proc.poll() is None and time.monotonic() < deadline:
            if trace.exists() and len(trace.read_text().splitlines()) >= kill_after_lines:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        assert proc.wait(60) == -signal.SIGKILL, "the example finished before it could be killed"
        return
    assert proc.wait(120) == 0


def test_resume_example_runs_and_resumes_exactly(redis_server: RedisServer, tmp_path: Path) -> None:
    uninterrupted, preempted = tmp_path / "uninterrupted", tmp_path / "preempted"
    uninterrupted.mkdir()
    preempted.mkdir()
    run(example(redis_server.url, "readme-whole"), uninterrupted)
    full = (uninterrupted / "trace.jsonl").read_text().splitlines()
    assert len(full) == 3 * 32  # 1000 samples, batches of 32 (the last one short), 3 epochs
    ids = sorted(i for line in full for i in json.loads(line))
    assert ids == sorted(list(range(1000)) * 3)

    script = example(redis_server.url, "readme-preempted")
    run(script, preempted, kill_after_lines=45)  # (checkpoints at steps 0, 10, 20, 30, 40 of epoch 0)
    state = json.loads((preempted / "ckpt" / "loader.json").read_text())
    assert 30 <= state["step"] < 3 * 32 - 1  # (a checkpoint of the killed run, not of a finished one)
    before = (preempted / "trace.jsonl").read_text().splitlines()
    kept = before[: state["step"] + 1]  # what the checkpoint covers; later steps are trained again
    (preempted / "trace.jsonl").write_text("".join(line + "\n" for line in kept))
    run(script, preempted)
    assert (preempted / "trace.jsonl").read_text().splitlines() == full
