"""Redis's jemalloc with and without pr_loader's option (run by hand).

    .venv/bin/python benchmarks/bench_allocator.py [--steps 64] [--rows 256] [--payload 25000] [--quick]

Starts two redis-servers side by side (bench_store's: temp dirs, free ports, AOF off): one as installed,
one in the environment :func:`pr_loader.server.allocator_env` gives (``lg_extent_max_active_fit`` raised,
``muzzy_decay_ms`` at -1). Both get the churn a run's retained window makes: per step, ``--rows`` payloads
written (one SET each, in a pipeline), read back (MGET) and the payloads of the step ``--window`` steps back
deleted, taking turns step by step. Prints, per server, the server's CPU per step (``INFO cpu``), its RSS
against the data it holds (``INFO memory``) and its ``madvise`` calls when ``strace`` is installed
(``--strace``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_store import start_server  # (bench_store's redis-server, with or without the option)

from pr_loader.server import ALLOCATOR_OPTIONS


class Server:
    def __init__(self, name: str, stock_allocator: bool, tmp: str) -> None:
        self.name, self.dir = name, os.path.join(tmp, name)
        os.mkdir(self.dir)
        self.proc, port = start_server(self.dir, None, stock_allocator)
        self.client = redis.Redis(port=port)
        self.cpu = 0.0
        self.trace: subprocess.Popen[bytes] | None = None
        self.trace_log: Path = Path(self.dir, "strace.txt")

    def cpu_seconds(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def step(self, step: int, payloads: list[bytes], window: int) -> None:
        start = self.cpu_seconds()
        keys = [f"payload:{step}:{i}" for i in range(len(payloads))]
        pipe = self.client.pipeline(transaction=False)
        for key, payload in zip(keys, payloads):
            pipe.set(key, payload)
        pipe.execute()
        self.client.mget(keys)
        if step >= window:
            self.client.delete(*[f"payload:{step - window}:{i}" for i in range(len(payloads))])
        self.cpu += self.cpu_seconds() - start

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--payload", type=int, default=25_000)
    parser.add_argument("--window", type=int, default=8, help="steps kept before a step's payloads go")
    parser.add_argument("--strace", action="store_true", help="count the servers' madvise calls")
    parser.add_argument("--quick", action="store_true", help="16 steps (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.steps = 16
    blob = os.urandom(args.payload)
    payloads = [blob[:-8] + i.to_bytes(8, "little") for i in range(args.rows)]
    with tempfile.TemporaryDirectory(prefix="prl-bench-") as tmp:
        servers = [Server("installed", True, tmp), Server("option", False, tmp)]
        try:
            for s in range(args.window):  # the retained window, untimed
                for server in servers:
                    server.step(s, payloads, args.window)
            for server in servers:
                server.cpu = 0.0
                if args.strace and shutil.which("strace"):
                    trace = ["strace", "-f", "-o", str(server.trace_log), "-e", "trace=madvise", "-p",
                             str(server.proc.pid)]  # fmt: skip
                    quiet = subprocess.DEVNULL
                    server.trace = subprocess.Popen(trace, stdout=quiet, stderr=quiet)
            time.sleep(0.5 if args.strace else 0)
            for s in range(args.window, args.window + args.steps):
                for server in servers[:: 1 if s % 2 else -1]:  # taking turns at going first
                    server.step(s, payloads, args.window)
            print(f"\n{args.steps} steps of {args.rows} x {args.payload} B, {args.window} steps kept\n")
            print("| redis-server | server CPU per step | RSS / data | madvise calls |\n|---|---|---|---|")
            for server in servers:
                memory = server.client.info("memory")
                calls = "-"
                if server.trace is not None:
                    server.trace.send_signal(signal.SIGINT)
                    server.trace.wait()
                    text = server.trace_log.read_text()
                    calls = str(text.count("MADV_DONTNEED") + text.count("MADV_FREE"))
                options = ",".join(ALLOCATOR_OPTIONS)
                label = "as installed" if server.name == "installed" else f"with {options}"
                print(f"| {label} | {server.cpu / args.steps * 1000:.2f} ms "
                      f"| {memory['used_memory_rss'] / 1e6:.0f} / {memory['used_memory'] / 1e6:.0f} MB "
                      f"| {calls} |")  # fmt: skip
        finally:
            for server in servers:
                server.close()


if __name__ == "__main__":
    main()
