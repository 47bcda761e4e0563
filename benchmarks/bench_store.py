"""Benchmark of the BatchStore against raw redis-py moving the same bytes (run by hand).

    .venv/bin/python benchmarks/bench_store.py [--rows 256] [--payload 25000] [--moved 16] [--iters 60]
                                                 [--fsync POLICY] [--stock-allocator] [--quick]

Starts its own redis-server (temp dir, free port, never 6379, AOF off unless --fsync is given, with the
jemalloc option of pr_loader's embedded server unless --stock-allocator is given), then per
step: materialise a step ahead, claim, prefetch --moved rows from the next step, postpone --moved rows two
steps ahead, commit. In steady state every claim delivers exactly --rows rows (arrivals + fresh). The raw
baseline moves the same payload bytes with plain pipelined commands on lists that hold the payloads themselves
(claim: LRANGE + DEL of a batch list written as long before as the store's batch; prefetch: LPOP; postpone:
RPUSH) or, for materialise, one SET per payload (an RPUSH of all of them is slower here: redis-py's packer
copies one huge command slowly), interleaved with the store calls in the same run, before them on odd steps
and after them on even ones (the first read after materialise's big writes is slower, whoever does it). A
second pass with 64-byte payloads measures the bookkeeping cost alone. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pr_loader.server import allocator_env
from pr_loader.store import BatchStore, RunConfig


def free_port() -> int:
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port != 6379:
            return port


def start_server(
    data_dir: str, fsync: str | None, stock_allocator: bool
) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server not found")
    port = free_port()
    aof = ["--appendonly", "yes", "--appendfsync", fsync] if fsync else ["--appendonly", "no"]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", data_dir, "--save", "", *aof]
    env = None if stock_allocator else allocator_env()
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    client = redis.Redis(port=port)
    for _ in range(500):
        try:
            client.ping()
            return proc, port
        except redis.ConnectionError:
            time.sleep(0.01)
    proc.kill()
    sys.exit("redis-server did not start")


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@contextlib.contextmanager
def timed(samples: list[float]) -> Iterator[None]:
    start = time.perf_counter()
    yield
    samples.append(time.perf_counter() - start)


def run(
    client: redis.Redis, rows: int, size: int, moved: int, iters: int, tag: str
) -> dict[str, list[float]]:
    cfg = RunConfig(f"bench-{tag}", batch_size=rows, steps_per_epoch=10**6, dataset_fingerprint="bench",
                    retain_steps=4)
    store = BatchStore.open(client, cfg)
    store.delete_run()
    store = BatchStore.open(client, cfg)
    blob = os.urandom(size)
    payloads = [blob[:-8] + i.to_bytes(8, "little") for i in range(rows)]
    t: dict[str, list[float]] = {k: [] for k in ("claim", "commit", "claim+commit", "prefetch", "postpone",
                                                 "materialise", "raw claim", "raw prefetch", "raw postpone",
                                                 "raw materialise")}
    raw_target = f"raw:{tag}:target"

    def raw_batch(s: int) -> str:
        return f"raw:{tag}:batch:{s}"

    def materialise(s: int) -> None:  # the raw lists are written as long before they are read as batches
        store.materialise(s, [(s * rows + i, payloads[i]) for i in range(rows)])
        client.rpush(raw_batch(s), *payloads)

    for s in range(3):
        materialise(s)
    warmup = 5
    raw_keys = [f"raw:{tag}:set:{i}" for i in range(rows)]
    for s in range(iters + warmup):
        with timed(t["materialise"]):
            store.materialise(s + 3, [((s + 3) * rows + i, payloads[i]) for i in range(rows)])
        client.rpush(raw_batch(s + 3), *payloads)
        client.delete(raw_target)
        claim: list[float] = []
        commit: list[float] = []

        def raw_ops(s: int) -> None:
            pipe = client.pipeline(transaction=False)
            with timed(t["raw claim"]):  # a claim reads the batch out and its commit frees a step's payloads
                pipe.lrange(raw_batch(s), 0, -1).delete(raw_batch(s)).execute()
            with timed(t["raw prefetch"]):
                pipe.lpop(raw_batch(s + 1), moved).execute()
            with timed(t["raw postpone"]):
                pipe.rpush(raw_target, *payloads[:moved]).execute()

        if s % 2:  # whichever reads first after the big writes of materialise pays more: alternate
            raw_ops(s)
        with timed(claim):
            claimed = store.claim("bench", 60)
        if claimed is None or len(claimed.rows) != (rows if s >= 2 else rows - (moved if s else 0)):
            raise RuntimeError(f"unexpected claim at step {s}")
        moves = [(r.ref, r.payload) for r in claimed.rows[:moved]]
        with timed(t["prefetch"]):
            store.prefetch(s, "bench", moved, s + 1)
        with timed(t["postpone"]):
            store.postpone(s, "bench", moves, s + 2)
        with timed(commit):
            store.commit(s, "bench")
        if s % 2 == 0:
            raw_ops(s)
        pipe = client.pipeline(transaction=False)  # (last: its big writes would slow the reads after them)
        for key, payload in zip(raw_keys, payloads):
            pipe.set(key, payload)
        with timed(t["raw materialise"]):  # one key per payload, like the store
            pipe.execute()
        client.delete(*raw_keys)
        if s >= warmup:
            t["claim"] += claim
            t["commit"] += commit
            t["claim+commit"].append(claim[0] + commit[0])
        else:
            for key in ("prefetch", "postpone", "materialise", "raw claim", "raw prefetch", "raw postpone",
                        "raw materialise"):
                t[key].clear()
    client.delete(raw_target, *(raw_batch(i) for i in range(iters + warmup + 3)))
    store.delete_run()
    return t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--payload", type=int, default=25_000)
    parser.add_argument("--moved", type=int, default=16)
    parser.add_argument("--iters", type=int, default=60)
    parser.add_argument("--fsync", choices=["always", "everysec", "no"], default=None,
                        help="turn AOF on with this appendfsync policy (default: AOF off)")
    parser.add_argument("--stock-allocator", action="store_true",
                        help="redis-server without pr_loader's jemalloc option")
    parser.add_argument("--quick", action="store_true", help="15 steps (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.iters = 15
    with tempfile.TemporaryDirectory(prefix="prl-bench-") as tmp:
        proc, port = start_server(tmp, args.fsync, args.stock_allocator)
        try:
            client = redis.Redis(port=port)
            big = run(client, args.rows, args.payload, args.moved, args.iters, "big")
            tiny = run(client, args.rows, 64, args.moved, args.iters, "tiny")
        finally:
            proc.terminate()
            proc.wait()
    allocator = "stock jemalloc" if args.stock_allocator else "jemalloc option"
    print(f"\nredis-server on 127.0.0.1:{port} ({allocator}), AOF {args.fsync or 'off'}, {args.iters} steps, "
          f"{args.rows} rows/step, moved {args.moved} rows\n")
    print("| operation | payload | store p50 ms | store p99 ms | raw p50 ms | raw p99 ms | p50 ratio "
          "| target |")
    print("|---|---|---|---|---|---|---|---|")
    for op, raw, target in (("claim+commit", "raw claim", "<= 1.5x raw"), ("claim", "raw claim", "-"),
                            ("prefetch", "raw prefetch", "<= 1.5x raw"),
                            ("postpone", "raw postpone", "<= 1.5x raw"),
                            ("materialise", "raw materialise", "-")):
        ratio = pct(big[op], 0.5) / pct(big[raw], 0.5)
        count = args.moved if op in ("prefetch", "postpone") else args.rows
        print(f"| {op} ({count} rows) | {args.payload} B "
              f"| {pct(big[op], .5):.2f} | {pct(big[op], .99):.2f} | {pct(big[raw], .5):.2f} "
              f"| {pct(big[raw], .99):.2f} | {ratio:.2f}x | {target} |")
    for op, target in (("claim+commit", 2.0), ("claim", None), ("commit", None), ("prefetch", 2.0),
                       ("postpone", 2.0)):
        rows = args.rows if op in ("claim+commit", "claim", "commit") else args.moved
        goal = f"< {target:g} ms" if target else "-"
        print(f"| {op} ({rows} rows) | 64 B | {pct(tiny[op], .5):.2f} | {pct(tiny[op], .99):.2f} | - | - | - "
              f"| {goal} |")


if __name__ == "__main__":
    main()
