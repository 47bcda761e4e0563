"""``pr-loader``: the command-line tool (``demo``, ``inspect``, ``ingest``, ``bench``, ``reset``).

Every command that touches Redis takes ``--redis-url`` (default: ``PR_LOADER_REDIS_URL``, else the embedded
server of ``$PR_LOADER_HOME``, see :mod:`pr_loader.server`) and ``--connect-timeout`` (seconds of retries
before giving up). Errors are one line on stderr with exit code 2: bad arguments, an unreachable Redis, an
unknown run, or any other :class:`~pr_loader.errors.PrLoaderError`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import subprocess
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from redis.exceptions import RedisError

from pr_loader import __version__
from pr_loader.errors import ConfigError, PrLoaderError
from pr_loader.server import default_url, open_client
from pr_loader.store.connection import Client, redact

__all__ = ["build_parser", "main"]

PROG = "pr-loader"
EXIT_ERROR = 2
# Modest demo settings per engine: the simulated one runs in seconds (virtual clock), the torch one on a CPU.
DEMO_DEFAULTS: dict[str, dict[str, Any]] = {
    "sim": {"steps": 24, "batch_size": 64, "oversample": 16, "max_postpones": 2, "seed": 0, "median": 500.0,
            "p99": 5000.0, "max_tokens": 16384, "prompt_len": 128},
    "torch": {"steps": 8, "batch_size": 16, "oversample": 4, "max_postpones": 2, "seed": 0, "median": 24.0,
              "p99": 240.0, "max_tokens": 320, "prompt_len": 16},
}  # fmt: skip
_INGEST_DOC = (
    "Create a run whose dataset is the file's records (each a dict) and materialise the steps of its first "
    "epoch; prints the run id. A consumer reads it with pr_loader.DataLoader(records, batch_size=..., "
    "run_id=...) and the same batching (shuffle with torch.Generator().manual_seed(SEED))."
)
_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_BENCH_DIR = _PACKAGE_ROOT / "benchmarks"


class UsageError(Exception):
    """Bad command-line arguments (reported in one line, exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line without the usage block."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{self.prog}: {message} (see '{self.prog} --help')")


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {value}")
    return value


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected seconds >= 0, got {value:g}")
    return value


def _redis_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--redis-url", help="Redis URL (default: $PR_LOADER_REDIS_URL, else the embedded server)"
    )
    parser.add_argument(
        "--connect-timeout",
        type=_seconds,
        default=10.0,
        metavar="S",
        help="retry an unreachable Redis for S seconds (default 10)",
    )


def _connect(args: argparse.Namespace) -> tuple[str, Client]:
    """The resolved URL and a connected client (StoreUnavailable names the address)."""
    url = args.redis_url or default_url()
    timeout = float(args.connect_timeout)
    return url, open_client(url, retry_seconds=timeout, socket_connect_timeout=max(0.5, min(5.0, timeout)))


# ---------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from pr_loader.demo import DemoOptions, run_demo

    url, client = _connect(args)
    options = DemoOptions(
        settings={name: getattr(args, name) for name in DEMO_DEFAULTS["sim"]},
        defaults=DEMO_DEFAULTS,
        engine=args.engine,
        device=args.device,
        url=url,
        run_id=args.run_id,
        resume=args.resume,
        crash_at=args.crash_at,
        state_dir=args.state_dir,
        plot=args.plot,
        progress=not args.no_progress,
    )
    try:
        return run_demo(options, client, sys.stdout)
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------- inspect
def cmd_inspect(args: argparse.Namespace) -> int:
    from pr_loader.runs import format_report, inspect_run

    _, client = _connect(args)
    try:
        report = inspect_run(client, args.run_id)
    finally:
        client.close()
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("\n".join(format_report(report, limit=args.limit)))
    return 0


# ---------------------------------------------------------------------------------------------- ingest
def read_records(path: Path, fmt: str | None) -> list[dict[str, Any]]:
    """The records of a ``.jsonl`` or ``.parquet`` file; each must be a dict (ConfigError otherwise)."""
    kind = fmt or ("parquet" if path.suffix.lower() in (".parquet", ".pq") else "jsonl")
    if not path.is_file():
        raise ConfigError(f"no such file: {path}")
    if kind == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading parquet needs pyarrow ('pip install pr-loader[parquet]')") from None
        try:
            records: list[Any] = pq.read_table(path).to_pylist()
        except Exception as exc:  # pyarrow raises its own types for corrupt or foreign files
            raise ConfigError(f"{path} is not a readable parquet file: {exc}") from None
    else:
        records = []
        with path.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except ValueError as exc:
                    raise ConfigError(f"{path}:{lineno}: invalid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise ConfigError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
                records.append(record)
    if not records:
        raise ConfigError(f"{path} holds no records")
    return records


def cmd_ingest(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from pr_loader.dataset import RedisBatchDataset
    from pr_loader.policy import get_policy
    from pr_loader.runs import run_exists

    records = read_records(Path(args.file), args.format)
    url, client = _connect(args)
    try:
        if args.run_id is not None and run_exists(client, args.run_id):
            raise ConfigError(
                f"run {args.run_id!r} already exists; delete it with 'pr-loader reset {args.run_id}'"
            )
    finally:
        client.close()
    kwargs = {} if args.max_postpones is None else {"max_postpones": args.max_postpones}
    dataset = RedisBatchDataset(
        records,
        batch_size=args.batch_size,
        shuffle=args.shuffle,
        drop_last=args.drop_last,
        generator=torch.Generator().manual_seed(args.seed) if args.shuffle else None,
        linked=True,
        policy=get_policy(args.policy, **kwargs),
        redis_url=url,
        run_id=args.run_id,
    )
    try:
        dataset.ensure_plan(0)
        steps = dataset.steps_per_epoch
        for step in tqdm(range(steps), desc="ingest", unit="step", disable=args.no_progress):
            dataset.materialise(step)
    finally:
        dataset.close()
    print(
        f"ingested {len(records)} records from {args.file} into run {dataset.run_id}: {steps} steps of "
        f"{dataset.step_rows} rows, policy {dataset.policy.name}",
        file=sys.stderr,
    )
    print(dataset.run_id)
    return 0


# ---------------------------------------------------------------------------------------------- bench
def benchmarks(directory: Path) -> dict[str, Path]:
    """Benchmark name (``bench_<name>.py``) -> script."""
    return {p.stem.removeprefix("bench_"): p for p in sorted(directory.glob("bench_*.py"))}


def cmd_bench(args: argparse.Namespace) -> int:
    directory = Path(args.dir) if args.dir else _BENCH_DIR
    found = benchmarks(directory) if directory.is_dir() else {}
    if not found:
        raise ConfigError(
            f"no benchmarks (bench_*.py) in {directory}; run from a source checkout or pass --dir"
        )
    if args.list:
        print("\n".join(found))
        return 0
    unknown = [name for name in args.names if name not in found]
    if unknown:
        raise ConfigError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(found)}")
    try:
        passed = shlex.split(args.args or "")
    except ValueError as exc:
        raise ConfigError(f"--args: {exc}") from None
    env = dict(os.environ)  # the scripts import pr_loader even when it is not installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), env.get("PYTHONPATH")]))
    for name in args.names or list(found):
        command = [sys.executable, str(found[name]), *(["--quick"] if args.quick else []), *passed]
        print(f"== {name}: {' '.join(command)}", flush=True)
        code = subprocess.run(command, cwd=directory.parent, env=env, check=False).returncode
        if code:
            print(f"{PROG}: error: benchmark {name} failed with exit code {code}", file=sys.stderr)
            return 1
    return 0


# ---------------------------------------------------------------------------------------------- reset
def cmd_reset(args: argparse.Namespace) -> int:
    from pr_loader.runs import count_keys, delete_run

    url, client = _connect(args)
    try:
        keys = count_keys(client, args.run_id)
        if not args.yes:
            print(f"Delete run {args.run_id} ({keys} keys) from {redact(url)}? [y/N] ", end="", flush=True)
            answer = sys.stdin.readline().strip().lower()
            if answer not in ("y", "yes"):
                print(f"kept run {args.run_id}")
                return 1
        deleted = delete_run(client, args.run_id)
    finally:
        client.close()
    print(f"deleted run {args.run_id} ({deleted} keys)")
    return 0


# ---------------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Persistent, Redis-backed data loader with partial rollout.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: warnings, -vv: info logs")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    demo = sub.add_parser(
        "demo",
        help="partial rollout vs the synchronous baseline",
        description="Run a partial-rollout epoch and its synchronous baseline through the "
        "Redis loader; print the metrics, the speed-up and a trace digest.",
    )
    demo.add_argument(
        "--engine", choices=["sim", "torch"], help="simulated engine (default) or the real TorchEngine"
    )
    demo.add_argument("--device", help="TorchEngine device (default: cuda if available, else cpu)")
    for flag, kind, what in (
        ("--steps", _count, "steps of the epoch"),
        ("--batch-size", _count, "rows per step"),
        ("--oversample", _count, "rows prefetched from later steps (partial run)"),
        ("--max-postpones", _count, "staleness bound: times a row may be postponed"),
        ("--seed", int, "seed of prompts, shuffling and response lengths"),
        ("--median", float, "median response length (tokens)"),
        ("--p99", float, "99th-percentile response length (tokens)"),
        ("--max-tokens", _count, "response length cap (tokens)"),
        ("--prompt-len", _count, "prompt length (tokens)"),
    ):
        name = flag[2:].replace("-", "_")
        sim, torch = DEMO_DEFAULTS["sim"][name], DEMO_DEFAULTS["torch"][name]
        demo.add_argument(flag, type=kind, help=f"{what} (default: {sim:g} sim, {torch:g} torch)")
    demo.add_argument(
        "--run-id", help="id of the partial run (default: demo-<random>; the baseline is <id>-sync)"
    )
    demo.add_argument(
        "--resume",
        action="store_true",
        help="continue the run (--run-id, else the newest checkpoint) from its last checkpoint",
    )
    demo.add_argument(
        "--crash-at",
        type=_count,
        metavar="STEP",
        help="SIGKILL this process in the middle of the step after STEP committed steps",
    )
    demo.add_argument("--state-dir", help="checkpoint directory (default: $PR_LOADER_HOME/demo)")
    demo.add_argument("--plot", metavar="FILE.png", help="write slot timelines and the length distribution")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    _redis_options(demo)
    demo.set_defaults(func=cmd_demo)

    inspect = sub.add_parser(
        "inspect",
        help="show a run's state in Redis",
        description="Epochs, batches, postponed rows and their staleness, in-flight "
        "leases and dead letters of a run.",
    )
    inspect.add_argument("run_id")
    inspect.add_argument("--json", action="store_true", help="machine-readable output")
    inspect.add_argument("--limit", type=_count, default=20, help="entries shown per list (text output)")
    _redis_options(inspect)
    inspect.set_defaults(func=cmd_inspect)

    ingest = sub.add_parser(
        "ingest", help="load a jsonl or parquet file of prompts into a new run", description=_INGEST_DOC
    )
    ingest.add_argument("file")
    ingest.add_argument("--format", choices=["jsonl", "parquet"], help="default: from the file suffix")
    ingest.add_argument("--run-id", help="default: a random id")
    ingest.add_argument("--batch-size", type=_count, default=8, help="rows per step (default 8)")
    ingest.add_argument("--shuffle", action="store_true", help="shuffle with --seed")
    ingest.add_argument("--seed", type=int, default=0)
    ingest.add_argument("--drop-last", action="store_true", help="drop the last incomplete batch")
    ingest.add_argument(
        "--policy", default="FixedBatch", help="partial-rollout policy name (default FixedBatch)"
    )
    ingest.add_argument("--max-postpones", type=_count)
    ingest.add_argument("--no-progress", action="store_true", help="no progress bar")
    _redis_options(ingest)
    ingest.set_defaults(func=cmd_ingest)

    bench = sub.add_parser(
        "bench",
        help="run benchmarks from benchmarks/",
        description="Run benchmarks/bench_<NAME>.py by name (all when none is given).",
    )
    bench.add_argument("names", nargs="*", metavar="NAME")
    bench.add_argument("--quick", action="store_true", help="passed through: a short smoke run")
    bench.add_argument(
        "--args", metavar="'ARGS'",
        help="more options for the scripts, in one quoted string (--args='--no-aof-rewrite')",
    )  # fmt: skip
    bench.add_argument("--list", action="store_true", help="list the benchmark names")
    bench.add_argument("--dir", help=f"benchmark directory (default {_BENCH_DIR})")
    bench.set_defaults(func=cmd_bench)

    reset = sub.add_parser(
        "reset", help="delete a run", description="Delete every key of a run (all shards)."
    )
    reset.add_argument("run_id")
    reset.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    _redis_options(reset)
    reset.set_defaults(func=cmd_reset)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 400 else text[:397] + "..."


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: Any = None,
    line: str | None = None,
) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (2 for bad arguments and pr_loader errors)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    level = {0: logging.ERROR, 1: logging.WARNING}.get(args.verbose, logging.INFO)
    logging.basicConfig(level=level, format=f"{PROG}: %(levelname)s: %(name)s: %(message)s")
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        try:
            code: int = args.func(args)
        except (PrLoaderError, RedisError, OSError) as exc:  # Redis lost mid-command, unwritable paths
            print(f"{PROG}: error: {type(exc).__name__}: {_one_line(exc)}", file=sys.stderr)
            return EXIT_ERROR
        except KeyboardInterrupt:
            print(f"{PROG}: interrupted", file=sys.stderr)
            return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
