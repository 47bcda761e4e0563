"""Collating into fresh against recycled batch memory (run by hand; no Redis).

    .venv/bin/python benchmarks/bench_batch_memory.py [--rounds 200] [--quick]

Per batch size (16 and 64 rows of 1 MiB), the loader's collate of the rows' payloads into a batch tensor
(``pr_loader.collate.stack_raw``), the consumer holding the newest batch and dropping the one before, as a
training loop does: into a fresh tensor (``pr_loader.batch_memory``'s ``torch.empty`` with its huge-page
advice, what every batch got before batches were recycled) and into one from a
:class:`~pr_loader.batch_memory.BatchMemory`. The two take turns, a round each, in this one process;
prints the medians and their ratio. The copy itself is the floor: recycled memory is already faulted in,
so only the copy remains.

Where an accelerator is, a second table: a batch for ``pin_memory=True``, collated into recycled memory
and then pinned (``Tensor.pin_memory``, a copy, as torch's DataLoader pins every batch) against collated
straight into pinned memory (a pool set ``pinned``, what pr_loader's DataLoader does).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pr_loader import batch_memory, codec
from pr_loader.collate import stack_raw

MiB = 1 << 20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="a short smoke run")
    args = parser.parse_args()
    rounds = 10 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds per size\n")
    print("| batch | fresh tensor p50 | recycled p50 | fresh / recycled |")
    print("|---|---|---|---|")
    for count in (16, 64):
        payloads = [codec.encode({"row": torch.full((MiB,), i, dtype=torch.uint8)}) for i in range(count)]
        rows = [codec.decode_raw_tensors(payload)["row"] for payload in payloads]
        memory = batch_memory.BatchMemory()
        times: dict[str, list[float]] = {"fresh": [], "recycled": []}
        held: dict[str, torch.Tensor] = {}
        for r in range(2 * rounds + 4):  # (the first round of each: the warm-up)
            kind = "fresh" if r % 2 else "recycled"
            start = time.perf_counter()
            with batch_memory.using(None if kind == "fresh" else memory):
                out = stack_raw(rows, torch.uint8, (MiB,))
            if r >= 2:
                times[kind].append(time.perf_counter() - start)
            held[kind] = out  # (the consumer holds the newest batch of its kind, dropping the one before)
            del out
        fresh, recycled = (statistics.median(times[k]) * 1000 for k in ("fresh", "recycled"))
        print(f"| {count} x 1 MiB | {fresh:.2f} ms | {recycled:.2f} ms | {fresh / recycled:.2f}x |")
    if torch.accelerator.is_available():
        pinned_table(rounds)


def pinned_table(rounds: int) -> None:
    print("\n| batch | recycled, then pin_memory() p50 | collated into pinned p50 | ratio |")
    print("|---|---|---|---|")
    for count in (16, 64):
        payloads = [codec.encode({"row": torch.full((MiB,), i, dtype=torch.uint8)}) for i in range(count)]
        rows = [codec.decode_raw_tensors(payload)["row"] for payload in payloads]
        recycled, pinned = batch_memory.BatchMemory(), batch_memory.BatchMemory()
        pinned.pinned = True
        times: dict[str, list[float]] = {"then pinned": [], "pinned": []}
        held: dict[str, torch.Tensor] = {}
        for r in range(2 * rounds + 4):
            kind = "then pinned" if r % 2 else "pinned"
            start = time.perf_counter()
            with batch_memory.using(recycled if kind == "then pinned" else pinned):
                out = stack_raw(rows, torch.uint8, (MiB,)).pin_memory()
            if r >= 2:
                times[kind].append(time.perf_counter() - start)
            held[kind] = out
            del out
        copied, straight = (statistics.median(times[k]) * 1000 for k in ("then pinned", "pinned"))
        print(f"| {count} x 1 MiB | {copied:.2f} ms | {straight:.2f} ms | {copied / straight:.2f}x |")


if __name__ == "__main__":
    main()
