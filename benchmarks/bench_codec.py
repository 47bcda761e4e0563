"""Codec speed and size against pickle (protocol 5, in-band) and torch.save, plus a memcpy baseline; and the
loader's per-step decode + ``default_collate`` (zero-copy views + ``torch.stack`` against ``RawTensor`` rows +
``collate_raw``) against one copy of the same tensor bytes.

Run by hand: ``.venv/bin/python benchmarks/bench_codec.py [--quick]``.  Prints markdown tables of medians.
"""

from __future__ import annotations

import argparse
import io
import pickle
import resource
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pr_loader.codec import decode, decode_raw_tensors, encode
from pr_loader.collate import collate_raw

Sample = dict[str, Any]


def prompt_sample(seed: int = 0) -> Sample:
    """(a) an RL prompt: 1024-token ids / mask / positions, a ~2 KB prompt string, a small extra_info."""
    gen = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, 150_000, (1024,), generator=gen),
        "attention_mask": torch.ones(1024, dtype=torch.int64),
        "position_ids": torch.arange(1024),
        "raw_prompt": "Solve the following problem step by step. " * 48,
        "extra_info": {
            "index": 1234,
            "split": "train",
            "data_source": "gsm8k",
            "answer": "72",
            "tags": [1, 2],
        },
    }


def postponed_sample(seed: int = 0) -> Sample:
    """(b) a postponed sample: (a) plus an 8k-token partial response and its float32 log-probs."""
    gen = torch.Generator().manual_seed(seed + 1)
    sample = prompt_sample(seed)
    sample["response_ids"] = torch.randint(0, 150_000, (8192,), generator=gen)
    sample["old_log_probs"] = -torch.rand(8192, generator=gen)
    sample["prl_times_postponed"] = 1
    return sample


def big_sample() -> Sample:
    """(c) one 64 MiB float32 tensor."""
    return {"weights": torch.randn(16 * 1024 * 1024)}


def rl_row(seed: int) -> Sample:
    """One row of an RL step: the (a) tensors, its prompt string and an int index."""
    sample = prompt_sample(seed)
    keys = ("input_ids", "attention_mask", "position_ids", "raw_prompt")
    return {**{key: sample[key] for key in keys}, "index": seed}


def raw_bytes(obj: Any) -> int:
    """Bytes of tensor data and str/bytes content: the floor for any encoding."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, str | bytes):
        return len(obj.encode() if isinstance(obj, str) else obj)
    if isinstance(obj, dict):
        return sum(raw_bytes(k) + raw_bytes(v) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return sum(raw_bytes(v) for v in obj)
    return 0


def torch_dumps(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def torch_loads(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True)


METHODS: dict[str, tuple[Callable[[Any], bytes], Callable[[bytes], Any]]] = {
    "pr_loader.codec": (encode, decode),
    "pickle (protocol 5)": (lambda s: pickle.dumps(s, protocol=5), pickle.loads),
    "torch.save / torch.load": (torch_dumps, torch_loads),
}


def median_seconds(fn: Callable[[], object], reps: int, inner: int) -> float:
    """Median over ``reps`` of the mean time of ``inner`` back-to-back calls."""
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return bool(a == b)


def bench_case(name: str, sample: Sample, reps: int, inner: int) -> list[list[str]]:
    raw = raw_bytes(sample)
    results: dict[str, tuple[float, float, int | None]] = {}
    for method, (dumps, loads) in METHODS.items():
        payload = dumps(sample)
        if not same(sample, loads(payload)):
            raise SystemExit(f"{method} did not round-trip case {name}")
        enc = median_seconds(lambda d=dumps: d(sample), reps, inner)  # type: ignore[misc]
        dec = median_seconds(lambda lo=loads, p=payload: lo(p), reps, inner)  # type: ignore[misc]
        results[method] = (enc, dec, len(payload))
    if name.startswith("(c)"):
        array = sample["weights"].numpy()
        copy = median_seconds(lambda: bytes(array), reps, inner)
        payload = encode(sample)
        view = memoryview(payload)
        copy_back = median_seconds(lambda: bytearray(view[-array.nbytes :]), reps, inner)
        results["memcpy baseline: bytes(t.numpy()), bytearray(payload)"] = (copy, copy_back, None)
        with warnings.catch_warnings():  # a read-only view: what a zero-copy decode would cost
            warnings.simplefilter("ignore")
            zero = median_seconds(lambda: torch.frombuffer(payload, dtype=torch.float32), reps, inner)
        results["zero-copy read-only view (not offered)"] = (
            results["pr_loader.codec"][0],
            zero,
            len(payload),
        )
    codec_rt = results["pr_loader.codec"][0] + results["pr_loader.codec"][1]
    rows = []
    for method, (enc, dec, size) in results.items():
        rt = enc + dec
        rows.append(
            [
                name,
                method,
                f"{enc * 1e3:.3f}",
                f"{dec * 1e3:.3f}",
                f"{rt * 1e3:.3f}",
                "-" if size is None else f"{size:,}",
                "-" if size is None else f"{size - raw:+,}",
                f"{rt / codec_rt:.2f}x",
            ]
        )
    return rows


def step_timings(
    fns: dict[str, Callable[[], object]], reps: int, inner: int
) -> dict[str, tuple[float, float]]:
    """Median seconds and mean minor page faults per call of each function, timed in interleaved rounds so
    that all see the same malloc state; each result lives until the function's next call, as a training loop
    holds its batch (dropped at once, malloc would hand the same pages back every call)."""
    held = {name: fn() for name, fn in fns.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    faults = dict.fromkeys(fns, 0)
    for _ in range(reps):
        for name, fn in fns.items():
            faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            for _ in range(inner):
                held[name] = fn()
            times[name].append((time.perf_counter() - start) / inner)
            faults[name] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before
    del held
    return {name: (statistics.median(times[name]), faults[name] / (reps * inner)) for name in fns}


def bench_batch(name: str, rows: list[Sample], reps: int, inner: int) -> list[list[str]]:
    """One step's decode + default_collate: the old path, the new one, and one join of the tensor bytes."""
    payloads = [encode(row) for row in rows]
    tensor_bytes = raw_bytes({k: v for k, v in rows[0].items() if isinstance(v, torch.Tensor)})
    raws = [memoryview(p)[len(p) - tensor_bytes :] for p in payloads]  # a payload ends with its tensors

    def old() -> Any:
        return torch.utils.data.default_collate([decode(p, copy=False) for p in payloads])

    def new() -> Any:
        return collate_raw([decode_raw_tensors(p) for p in payloads])

    got, want = new(), old()
    strides = [(got[k].stride(), want[k].stride()) for k in got if isinstance(want[k], torch.Tensor)]
    if not same(got, want) or any(a != b for a, b in strides):
        raise SystemExit(f"collate_raw differs from default_collate in case {name}")
    fns: dict[str, Callable[[], object]] = {
        "old: default_collate(decode(p, copy=False) per row)": old,
        "new: collate_raw(decode_raw_tensors(p) per row)": new,
        "floor: b''.join(the rows' tensor bytes)": lambda: b"".join(raws),
    }
    timings = step_timings(fns, reps, inner)
    (old_s, _), *_, (floor_s, _) = timings.values()
    mib = len(rows) * tensor_bytes / 2**20
    return [
        [
            name,
            method,
            f"{seconds * 1e3:.3f}",
            f"{seconds / floor_s:.2f}x",
            f"{old_s / seconds:.2f}x",
            f"{faults:.0f}",
            f"{mib:.1f}",
        ]
        for method, (seconds, faults) in timings.items()
    ]


def print_table(header: list[str], rows: list[list[str]]) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, ~5 s)")
    parser.add_argument("--batch-only", action="store_true", help="only the batch decode + collate table")
    args = parser.parse_args()
    small_reps, small_inner, big_reps = (5, 20, 3) if args.quick else (15, 100, 9)
    torch.manual_seed(0)
    np.random.seed(0)
    header = [
        "case",
        "method",
        "encode ms",
        "decode ms",
        "round trip ms",
        "size B",
        "size - raw B",
        "round trip time / codec's",
    ]
    rows = []
    if not args.batch_only:
        rows += bench_case("(a) prompt", prompt_sample(), small_reps, small_inner)
        rows += bench_case("(b) postponed 8k", postponed_sample(), small_reps, small_inner)
        rows += bench_case("(c) 64 MiB tensor", big_sample(), big_reps, 1)
    batch_rows = bench_batch("(d) 256 RL rows", [rl_row(i) for i in range(256)], small_reps, small_inner // 4)
    big_rows = [{"blob": torch.randint(0, 256, (1 << 20,), dtype=torch.uint8)} for _ in range(16)]
    batch_rows += bench_batch("(e) 16 rows of 1 MiB", big_rows, small_reps, small_inner // 4)
    run = "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, numpy {np.__version__}, CPU, medians of a {run} run")
    print()
    if rows:
        print_table(header, rows)
        print()
    print("batch decode + collate (one step of a RedisBatchDataset with torch's default_collate)")
    print()
    batch_header = [
        "case",
        "method",
        "ms per step",
        "time / floor",
        "speed-up over old",
        "page faults",
        "MiB",
    ]
    print_table(batch_header, batch_rows)


if __name__ == "__main__":
    main()
