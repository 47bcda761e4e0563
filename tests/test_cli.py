"""``pr-loader`` end to end with a temporary ``PR_LOADER_HOME`` (its embedded server is stopped at teardown)
or the ``redis_server`` fixture; never the machine's Redis.

What depends on the process (the console entry, SIGKILL, exit codes and stderr of a real interpreter, resume
in a fresh process) runs as subprocesses; the other commands call :func:`pr_loader.cli.main` in-process, which
runs the same code without paying the interpreter and torch start-up each time (the suite must stay short).
"""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from pr_loader import codec
from pr_loader.cli import main
from pr_loader.dataloader import DataLoader
from pr_loader.runs import run_exists
from pr_loader.server import stop_embedded
from pr_loader.store import BatchStore, RunConfig
from pr_loader.store.connection import connect
from tests.servers import REDIS_SERVER, RedisServer, free_port

pytestmark = pytest.mark.skipif(REDIS_SERVER is None, reason="redis-server binary not installed")

REPO = Path(__file__).resolve().parents[1]
DIGEST = re.compile(r"trace digest \(partial run\): ([0-9a-f]{64})")
SPEEDUP = re.compile(r"speed-up \(generated tokens/s, partial vs sync\): ([0-9.]+)x")
SMALL = ["--steps", "8", "--batch-size", "32", "--no-progress"]
METRICS = (
    "generated tokens/s", "engine utilisation", "idle bubbles", "rows finished / postponed / resumed",
    "partial ratio", "max version span", "off-policy token fraction", "rows dropped", "data-path share",
)  # fmt: skip


@dataclass
class Result:
    code: int
    out: str
    err: str
    seconds: float = 0.0

    def error_line(self) -> str:
        """The single non-empty stderr line of a failed command (asserts exit code 2, no traceback)."""
        lines = [line for line in self.err.splitlines() if line.strip()]
        assert self.code == 2, (self.code, self.out, self.err)
        assert len(lines) == 1 and "Traceback" not in self.err, self.err
        assert lines[0].startswith("pr-loader: error: ")
        return lines[0]

    def digest(self) -> str:
        match = DIGEST.search(self.out)
        assert match, self.out + self.err
        return match.group(1)


Cli = Callable[..., Result]


def start(args: Sequence[str], home: Path) -> tuple[subprocess.Popen[str], float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PR_LOADER_")}
    env["PR_LOADER_HOME"] = str(home)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pr_loader", *args], cwd=REPO, env=env, text=True,
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    return proc, time.monotonic()


def finish(started: tuple[subprocess.Popen[str], float]) -> Result:
    proc, t0 = started
    out, err = proc.communicate(timeout=120)
    return Result(proc.returncode, out, err, time.monotonic() - t0)


def run_many(commands: Sequence[Sequence[str]], home: Path) -> list[Result]:
    """``python -m pr_loader ...`` for each command, concurrently."""
    started = [start(args, home) for args in commands]
    return [finish(s) for s in started]


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A temporary PR_LOADER_HOME shared by the module; its embedded redis-server is stopped at teardown."""
    path = tmp_path_factory.mktemp("home")
    yield path
    stop_embedded(path)


@pytest.fixture
def cli(home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Iterator[Cli]:
    """In-process ``pr-loader``: ``cli(*args, stdin=None) -> Result``."""
    for name in [k for k in os.environ if k.startswith("PR_LOADER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("PR_LOADER_HOME", str(home))

    def run(*args: str, stdin: str | None = None) -> Result:
        monkeypatch.setattr(sys, "stdin", io.StringIO(stdin or ""))
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    yield run


@pytest.fixture
def url(redis_server: RedisServer) -> str:
    return redis_server.url


# ------------------------------------------------------------------------------------------------ demo
def test_demo_defaults_print_table_speedup_and_plot(home: Path, tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    [res] = run_many([["demo", "--plot", str(png)]], home)
    assert res.code == 0, res.err
    for metric in METRICS:
        assert f"| {metric}" in res.out, metric
    assert re.search(r"\| rows dropped\s+\| 0\s+\| 0\s+\|", res.out), res.out
    assert re.search(r"\| rows lost / duplicated\s+\| 0 / 0\s+\| 0 / 0\s+\|", res.out), res.out
    match = SPEEDUP.search(res.out)
    assert match and float(match.group(1)) > 1.0, res.out
    assert "24 steps x 64 rows" in res.out and res.digest()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "partial" in res.err and "Traceback" not in res.err  # tqdm progress bars go to stderr
    assert res.seconds < 60


def test_demo_crash_and_resume_reproduce_the_uninterrupted_trace(
    cli: Cli, home: Path, tmp_path: Path
) -> None:
    state = ["--state-dir", str(tmp_path / "state")]
    [crashed] = run_many([["demo", "--run-id", "crashy", "--crash-at", "5", *SMALL, *state]], home)
    assert crashed.code == -9, crashed.err
    assert "trace digest" not in crashed.out
    again = cli("demo", "--run-id", "crashy", *SMALL, *state)
    assert "already exists" in again.error_line() and "--resume" in again.error_line()
    mismatch = cli("demo", "--resume", "--run-id", "crashy", "--steps", "9", *state)
    assert "--steps 9 differs" in mismatch.error_line()
    resumed = run_many([["demo", "--resume", "--run-id", "crashy", *SMALL, *state]], home)[0]
    assert resumed.code == 0, resumed.err
    assert "resuming run crashy after step 5" in resumed.out
    clean = cli("demo", "--run-id", "clean", *SMALL, *state)
    assert clean.code == 0, clean.err
    assert resumed.digest() == clean.digest()


# ------------------------------------------------------------------------------------------------ inspect
def _run_with_postponed_rows_and_a_dead_letter(url: str) -> None:
    client = connect(url)
    config = RunConfig(
        "insp", batch_size=4, steps_per_epoch=3, dataset_fingerprint="fp", policy="PostponeToNext"
    )
    store = BatchStore.open(client, config)
    for step in (0, 1):
        store.materialise(step, [(i, codec.encode({"x": i})) for i in range(4 * step, 4 * step + 4)])
    claimed = store.claim("worker-a", 600.0)
    assert claimed is not None and claimed.step == 0
    rows = claimed.rows
    store.postpone(0, "worker-a", [(r.ref, r.payload) for r in rows[:2]], target_step=2)
    store.dead_letter(0, rows[2].ref, "reward model rejected the prompt")
    store.commit(0, "worker-a")
    assert store.claim("worker-b", 600.0) is not None  # step 1 stays in flight
    client.close()


def test_inspect_text_and_json(cli: Cli, url: str) -> None:
    _run_with_postponed_rows_and_a_dead_letter(url)
    text = cli("inspect", "insp", "--redis-url", url)
    assert text.code == 0, text.err
    for expected in (
        "policy PostponeToNext", "committed up to 0", "postponed rows: 2", "staleness 2",
        "in-flight leases: 1", "step 1 held by 'worker-b'", "dead letters: 1",
        "reward model rejected the prompt", "step 2: 2 postponed + 0 fresh rows",
    ):  # fmt: skip
        assert expected in text.out, (expected, text.out)
    as_json = cli("inspect", "insp", "--json", "--redis-url", url)
    assert as_json.code == 0, as_json.err
    shard = json.loads(as_json.out)["shards"][0]
    assert shard["batches"]["committed_upto"] == 0 and shard["batches"]["next_step"] == 2
    postponed = [
        (p["sample_id"], p["target_step"], p["staleness"], p["times_postponed"]) for p in shard["postponed"]
    ]
    assert postponed == [("0:0", 2, 2, 1), ("0:1", 2, 2, 1)]
    assert [(f["step"], f["owner"]) for f in shard["in_flight"]] == [(1, "worker-b")]
    assert 0 < shard["in_flight"][0]["expires_in_s"] <= 600
    [dead] = shard["dead_letters"]
    assert (dead["ref"], dead["step"], dead["reason"]) == ("0:2:0:-", 0, "reward model rejected the prompt")


# ------------------------------------------------------------------------------------------------ ingest
def test_ingest_jsonl_and_parquet_then_inspect(cli: Cli, url: str, tmp_path: Path) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    records = [{"id": i, "prompt": f"question {i}", "tags": ["a", str(i % 3)]} for i in range(10)]
    jsonl = tmp_path / "prompts.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n\n")
    parquet = tmp_path / "prompts.parquet"
    pq.write_table(pa.Table.from_pylist(records), parquet)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1}\n[1, 2]\n')

    from_jsonl = cli("ingest", str(jsonl), "--run-id", "from-jsonl", "--batch-size", "4", "--redis-url", url)
    assert from_jsonl.code == 0, from_jsonl.err
    assert from_jsonl.out.splitlines() == ["from-jsonl"]
    from_parquet = cli(
        "ingest", str(parquet), "--batch-size", "3", "--shuffle", "--seed", "7", "--redis-url", url
    )
    assert from_parquet.code == 0, from_parquet.err
    parquet_run = from_parquet.out.strip()
    assert (
        "bad.jsonl:2: expected a JSON object, got list"
        in cli("ingest", str(bad), "--redis-url", url).error_line()
    )
    twice = cli("ingest", str(jsonl), "--run-id", "from-jsonl", "--redis-url", url)
    assert "already exists" in twice.error_line()

    shown = cli("inspect", parquet_run, "--json", "--redis-url", url)
    assert shown.code == 0, shown.err
    batches = json.loads(shown.out)["shards"][0]["batches"]
    assert [(u["step"], u["fresh"]) for u in batches["upcoming"]] == [(0, 3), (1, 3), (2, 3), (3, 1)]
    assert "step 2: 0 postponed + 2 fresh rows" in cli("inspect", "from-jsonl", "--redis-url", url).out
    # a consumer with the same batching reads the ingested runs, as torch's loader would read the records
    data: Any = records  # a list is a map-style dataset
    loader = DataLoader(data, batch_size=4, redis_url=url, run_id="from-jsonl")
    assert [batch["id"].tolist() for batch in loader] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    loader.close()
    gen = torch.Generator().manual_seed(7)
    shuffled = DataLoader(data, batch_size=3, shuffle=True, generator=gen, redis_url=url, run_id=parquet_run)
    assert sorted(i for batch in shuffled for i in batch["id"].tolist()) == list(range(10))
    shuffled.close()


# ------------------------------------------------------------------------------------------------ reset
def test_reset_asks_for_confirmation(cli: Cli, url: str) -> None:
    client = connect(url)
    config = RunConfig("doomed", batch_size=2, steps_per_epoch=1, dataset_fingerprint="fp")
    BatchStore.open(client, config).materialise(0, [(0, codec.encode({"x": 0})), (1, codec.encode({"x": 1}))])
    kept = cli("reset", "doomed", "--redis-url", url, stdin="n\n")
    assert kept.code == 1 and "Delete run doomed" in kept.out and "kept run doomed" in kept.out
    assert run_exists(client, "doomed")
    gone = cli("reset", "doomed", "--yes", "--redis-url", url)
    assert gone.code == 0 and "deleted run doomed" in gone.out, gone.err
    assert not run_exists(client, "doomed") and not client.keys("prl:{doomed:*")
    again = cli("reset", "doomed", "--yes", "--redis-url", url)
    assert "RunNotFound" in again.error_line() and "doomed" in again.error_line()
    client.close()


# ------------------------------------------------------------------------------------------------ errors
def test_errors_of_the_real_command_are_one_line_with_exit_code_2(home: Path) -> None:
    dead = f"redis://127.0.0.1:{free_port()}"
    unknown_cmd, unreachable = run_many(
        [["frobnicate"], ["inspect", "some-run", "--redis-url", dead, "--connect-timeout", "0.5"]], home
    )
    assert "invalid choice: 'frobnicate'" in unknown_cmd.error_line()
    line = unreachable.error_line()
    assert "StoreUnavailable" in line and dead.removeprefix("redis://") in line
    assert unreachable.seconds < 30


def test_bad_arguments_and_unknown_runs(cli: Cli, url: str, home: Path) -> None:
    assert "--steps: expected an integer, got 'many'" in cli("demo", "--steps", "many").error_line()
    assert "--batch-size: expected an integer >= 0, got -1" in cli("demo", "--batch-size=-1").error_line()
    assert "--batch-size must be >= 1" in cli("demo", "--batch-size", "0", "--redis-url", url).error_line()
    assert "the following arguments are required: run_id" in cli("inspect").error_line()
    unknown = cli("inspect", "no-such-run", "--redis-url", url).error_line()
    assert "RunNotFound" in unknown and "no-such-run" in unknown
    resume = cli(
        "demo", "--resume", "--run-id", "never-ran", "--redis-url", url, "--state-dir", str(home / "no")
    )
    assert "no checkpoint for run 'never-ran'" in resume.error_line()
    crash = cli("demo", "--crash-at", "8", *SMALL, "--redis-url", url)
    assert "--crash-at must be in [0, 7], got 8" in crash.error_line()
    assert "must be non-empty without braces" in cli("inspect", "a{b}", "--redis-url", url).error_line()
    plot = cli("demo", *SMALL, "--plot", str(home / "missing" / "x.png"), "--redis-url", url)
    assert "--plot: directory" in plot.error_line() and "does not exist" in plot.error_line()


def test_bench_runs_scripts_by_name_with_options_passed_through(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "bench_echo.py").write_text(  # benchmarks import pr_loader, installed or not
        "import pathlib, sys\nimport pr_loader.errors\n"
        "pathlib.Path(__file__).with_suffix('.args').write_text(repr(sys.argv[1:]))\n"
    )
    (tmp_path / "bench_fail.py").write_text("raise SystemExit(3)\n")
    listed = cli("bench", "--list")
    assert listed.code == 0 and {"codec", "rollout"} <= set(listed.out.split())
    ran = cli("bench", "echo", "--quick", "--dir", str(tmp_path))
    assert ran.code == 0 and (tmp_path / "bench_echo.args").read_text() == "['--quick']", ran.err
    ran = cli("bench", "echo", "--args=--no-aof-rewrite --label 'a b'", "--dir", str(tmp_path))
    assert ran.code == 0, ran.err
    assert (tmp_path / "bench_echo.args").read_text() == "['--no-aof-rewrite', '--label', 'a b']"
    unclosed = cli("bench", "echo", "--args='x", "--dir", str(tmp_path))
    assert "--args: No closing quotation" in unclosed.error_line()
    failed = cli("bench", "fail", "--dir", str(tmp_path))
    assert failed.code == 1 and "benchmark fail failed with exit code 3" in failed.err
    assert (
        "unknown benchmark(s) nope; known: echo, fail"
        in cli("bench", "nope", "--dir", str(tmp_path)).error_line()
    )
