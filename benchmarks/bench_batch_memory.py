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


def alternating(
    count: int, memories: tuple[batch_memory.BatchMemory | None, ...], pin: bool, rounds: int
) -> list[float]:
    """Median ms of collating ``count`` 1 MiB rows (then pinning the batch, with ``pin``) drawing from each
    of ``memories`` in turn, a round each, the consumer holding the newest batch of each and dropping the
    one before (the first round of each: the warm-up)."""
    payloads = [codec.encode({"row": torch.full((MiB,), i, dtype=torch.uint8)}) for i in range(count)]
    rows = [codec.decode_raw_tensors(payload)["row"] for payload in payloads]
    times: list[list[float]] = [[] for _ in memories]
    held: dict[int, torch.Tensor] = {}
    for r in range(len(memories) * (rounds + 1)):
        which = r % len(memories)
        start = time.perf_counter()
        with batch_memory.using(memories[which]):
            out = stack_raw(rows, torch.uint8, (MiB,))
            if pin:
                out = out.pin_memory()
        if r >= len(memories):
            times[which].append(time.perf_counter() - start)
        held[which] = out
        del out
    return [statistics.median(t) * 1000 for t in times]


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
        fresh, recycled = alternating(count, (None, batch_memory.BatchMemory()), False, rounds)
        print(f"| {count} x 1 MiB | {fresh:.2f} ms | {recycled:.2f} ms | {fresh / recycled:.2f}x |")
    if not torch.accelerator.is_available():
        return
    print("\n| batch | recycled, then pin_memory() p50 | collated into pinned p50 | ratio |")
    print("|---|---|---|---|")
    for count in (16, 64):
        pinned = batch_memory.BatchMemory()
        pinned.pinned = True
        copied, straight = alternating(count, (batch_memory.BatchMemory(), pinned), True, rounds)
        print(f"| {count} x 1 MiB | {copied:.2f} ms | {straight:.2f} ms | {copied / straight:.2f}x |")


if __name__ == "__main__":
    main()
