"""Codec speed and size against pickle (protocol 5, in-band) and torch.save, plus a memcpy baseline.

Run by hand: ``.venv/bin/python benchmarks/bench_codec.py [--quick]``.  Prints a markdown table of medians.
"""

from __future__ import annotations

import argparse
import io
import pickle
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
from pr_loader.codec import decode, encode

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (a smoke run, ~5 s)")
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
    rows = bench_case("(a) prompt", prompt_sample(), small_reps, small_inner)
    rows += bench_case("(b) postponed 8k", postponed_sample(), small_reps, small_inner)
    rows += bench_case("(c) 64 MiB tensor", big_sample(), big_reps, 1)
    run = "quick" if args.quick else "full"
    print(f"torch {torch.__version__}, numpy {np.__version__}, CPU, medians of a {run} run")
    print()
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if i < 2 else "---:" for i in range(len(header))) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
