"""Redis's jemalloc with and without pr_loader's option (run by hand).

    .venv/bin/python benchmarks/bench_allocator.py [--steps 64] [--rows 256] [--payload 25000] [--quick]

Starts two redis-servers side by side (temp dirs, unix sockets, AOF off): one as installed, one in the
environment :func:`pr_loader.server.allocator_env` gives (jemalloc's ``lg_extent_max_active_fit`` raised).
Both get the churn a run's retained window makes: per step, ``--rows`` payloads written (one SET each, in a
pipeline), read back (MGET) and the payloads of the step ``--window`` steps back deleted, taking turns step
by step. Prints, per server, the server's CPU per step (``INFO cpu``), its RSS against the data it holds
(``INFO memory``) and its ``madvise`` calls when ``strace`` is installed (``--strace``).
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

from pr_loader.server import ALLOCATOR_OPTION, allocator_env


class Server:
    def __init__(self, name: str, env: dict[str, str] | None, tmp: str) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("redis-server not found")
        self.name, self.dir = name, os.path.join(tmp, name)
        os.mkdir(self.dir)
        sock = os.path.join(self.dir, "redis.sock")
        args = [binary, "--port", "0", "--unixsocket", sock, "--dir", self.dir, "--save", "",
                "--appendonly", "no"]  # fmt: skip
        self.proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(unix_socket_path=sock)
        for _ in range(500):
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.01)
        self.cpu = 0.0
        self.trace: subprocess.Popen[bytes] | None = None

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
        servers = [Server("installed", None, tmp), Server("option", allocator_env(), tmp)]
        try:
            for s in range(args.window):  # the retained window, untimed
                for server in servers:
                    server.step(s, payloads, args.window)
            for server in servers:
                server.cpu = 0.0
                if args.strace and shutil.which("strace"):
                    log = open(os.path.join(server.dir, "strace.txt"), "w")  # noqa: SIM115
                    trace = ["strace", "-f", "-e", "trace=madvise", "-p", str(server.proc.pid)]
                    server.trace = subprocess.Popen(trace, stdout=subprocess.DEVNULL, stderr=log)
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
                    text = Path(server.dir, "strace.txt").read_text()
                    calls = str(text.count("MADV_DONTNEED") + text.count("MADV_FREE"))
                label = "as installed" if server.name == "installed" else f"with {ALLOCATOR_OPTION}"
                print(f"| {label} | {server.cpu / args.steps * 1000:.2f} ms "
                      f"| {memory['used_memory_rss'] / 1e6:.0f} / {memory['used_memory'] / 1e6:.0f} MB "
                      f"| {calls} |")  # fmt: skip
        finally:
            for server in servers:
                server.close()


if __name__ == "__main__":
    main()
