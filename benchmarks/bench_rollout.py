"""Synchronous vs partial rollout, end to end through the Redis-backed loader (run by hand).

Every mode iterates one epoch of linked views (``pr_loader.dataloader.DataLoader(linked=True)`` on the
in-process fakeredis store, or ``--redis-url``) and drives them with :class:`pr_loader.rollout.Scheduler`:

* ``sync``: ``FixedBatch`` - every row of a step is generated to the end (the baseline);
* ``partial``: ``PostponeToNext(max_postpones=2)`` + over-sampling - the step stops once ``batch_size`` rows
  finished, the rest is postponed with its partial output and resumed in the next step.

Settings: APRIL-like (256 rows/step = 32 prompts x 8 samples, over-sampling 64, max 16k tokens,
log-normal lengths median 500 / p99 5000) and verl-like long context (max 28k) on :class:`SimulatedEngine`
with a GPU-like cost model (20 ms + 50 us per active sequence per decode iteration: ~33 ms at 256
sequences), and a scaled-down setting on the real :class:`TorchEngine` (CPU by default; wall-clock tokens/s,
forced long-tailed lengths).

Columns: generated tok/s (all decoded tokens / step time: the engine's throughput), trained tok/s (tokens
of the returned batches / step time), utilisation (busy slot share), idle (idle slot-seconds per step), rows
per step finished / postponed / resumed, partial ratio (batch rows resumed from a partial output), max
version span, off-policy token share, lost / duplicated rows (checked against the store), data path (wall
time in store and codec calls, claim and commit included) as a share of step time.

    .venv/bin/python benchmarks/bench_rollout.py            # all settings, < 3 min on 2 CPUs
    .venv/bin/python benchmarks/bench_rollout.py --only torch --device cuda --torch-scale 4

The torch setting runs ``--repeats`` alternating sync/partial pairs and reports the median run of each mode
(wall-clock timings on a shared machine are noisy). ``--timeline spans.jsonl`` writes every slot occupancy
(setting, mode, slot, start, end, sample id, finish reason) for plotting.
"""

from __future__ import annotations

import argparse
import json
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TextIO

import torch

from pr_loader.dataloader import DataLoader
from pr_loader.policy import FixedBatch, Policy, PostponeToNext
from pr_loader.rollout import (
    Engine,
    LengthDistribution,
    Scheduler,
    SimulatedEngine,
    StepResult,
    TinyConfig,
    TorchEngine,
)


@dataclass
class Setting:
    name: str
    engine: Callable[[], Engine]
    lengths: LengthDistribution
    batch_size: int
    oversample: int
    steps: int
    prompt_len: int
    vocab: int
    force_lengths: bool  # the scheduler imposes each row's length (untrained torch model, EOS off)


def simulated(
    name: str, *, batch: int, over: int, max_tokens: int, median: float, p99: float, steps: int
) -> Setting:
    dist = LengthDistribution.lognormal(median, p99, max_tokens=max_tokens, seed=1)

    def engine() -> Engine:
        return SimulatedEngine(
            dist,
            num_slots=batch + over,
            decode_base_s=0.02,
            decode_per_seq_s=5e-5,
            prefill_per_token_s=2e-5,
        )

    return Setting(name, engine, dist, batch, over, steps, prompt_len=256, vocab=32000, force_lengths=False)


def torch_setting(scale: int, device: str) -> Setting:
    batch, over = 16 * scale, 4 * scale
    dist = LengthDistribution.lognormal(24, 240, max_tokens=320, seed=1)
    cfg = TinyConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, max_seq_len=352)

    def engine() -> Engine:
        return TorchEngine(cfg, num_slots=batch + over, device=device, seed=0)

    name = f"TorchEngine {device} (tiny)"
    return Setting(name, engine, dist, batch, over, 8, prompt_len=16, vocab=512, force_lengths=True)


def run_mode(
    setting: Setting, policy: Policy, oversample: int, redis_url: str | None, timeline: TextIO | None = None
) -> dict[str, float]:
    """One epoch in one mode; returns the run summary. ``timeline``: a text file for the slot spans."""
    n = setting.batch_size * setting.steps
    prompts = [  # 8 samples per prompt
        torch.randint(1, setting.vocab, (setting.prompt_len,), generator=torch.Generator().manual_seed(p))
        for p in range((n + 7) // 8)
    ]
    data = [{"input_ids": prompts[i // 8]} for i in range(n)]
    loader = DataLoader(
        data, batch_size=setting.batch_size, linked=True, policy=policy, redis_url=redis_url,
        run_id=f"bench-{uuid.uuid4().hex[:8]}", lease_seconds=3600.0,
    )  # fmt: skip
    sched = Scheduler(
        setting.engine(),
        oversample=oversample,
        max_tokens=setting.lengths if setting.force_lengths else setting.lengths.max_tokens,
    )
    finished: list[str] = []

    def on_batch(result: StepResult) -> None:
        finished.extend(str(s) for s in result.batch.non_tensor_batch["prl_sample_id"])

    t0 = time.perf_counter()
    metrics = sched.run(loader, on_batch=on_batch)
    wall = time.perf_counter() - t0
    store = loader.source.shard().store
    pending = [row.ref.key() for row in store.read_rows(setting.steps)]  # postponed past the epoch
    expected = {f"0:{i}" for i in range(n)}
    seen = finished + pending
    summary = metrics.summary()
    summary.update(
        lost=float(len(expected - set(seen))),
        duplicated=float(len(seen) - len(set(seen))),
        trained_tokens_per_s=sum(s.batch_tokens for s in metrics.steps) / summary["duration"],
        pending=float(len(pending)),
        bench_wall_s=wall,
    )
    loader.close()
    if timeline is not None:
        mode = "sync" if isinstance(policy, FixedBatch) else "partial"
        for span in metrics.timeline:
            timeline.write(json.dumps({"setting": setting.name, "mode": mode, **asdict(span)}) + "\n")
    return summary


def row(setting: Setting, mode: str, s: dict[str, float], base: float | None) -> str:
    idle, fin, post, res = (
        s[k] / s["steps"] for k in ("idle_slot_seconds", "rows_finished", "rows_postponed", "rows_resumed")
    )
    cells = [
        setting.name,
        mode,
        f"{s['tokens_per_s']:,.0f}",
        f"{s['tokens_per_s'] / base:.2f}x" if base else "1.00x",
        f"{s['trained_tokens_per_s']:,.0f}",
        f"{s['utilisation']:.1%}",
        f"{idle:,.0f}",
        f"{fin:.0f} / {post:.0f} / {res:.0f}",
        f"{s['partial_ratio']:.1%}",
        f"{s['max_version_span']:.0f}",
        f"{s['off_policy_fraction']:.1%}",
        f"{s['lost']:.0f} / {s['duplicated']:.0f}",
        f"{s['data_path_share']:.3%}",
        f"{s['bench_wall_s']:.1f}",
    ]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["april", "verl", "torch"], action="append")
    parser.add_argument("--device", default="cpu", help="TorchEngine device (cpu, cuda)")
    parser.add_argument("--torch-scale", type=int, default=1, help="multiply the torch setting's batch")
    parser.add_argument(
        "--redis-url", default=None, help="default: the embedded (real) redis-server; fakeredis:// in-process"
    )
    parser.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=3, help="torch setting: alternating runs per mode")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on shared boxes)"
    )
    parser.add_argument("--timeline", help="write every slot span (JSON lines) to this file, for plotting")
    args = parser.parse_args()
    settings = {
        "april": simulated(
            "APRIL-like (sim, 16k)", batch=256, over=64, max_tokens=16384, median=500, p99=5000,
            steps=8 if args.quick else 30,
        ),
        "verl": simulated(
            "verl-like long ctx (sim, 28k)",
            batch=128,
            over=32,
            max_tokens=28672,
            median=1500,
            p99=15000,
            steps=6 if args.quick else 20,
        ),
        "torch": torch_setting(args.torch_scale, args.device),
    }
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    print(
        "| setting | mode | generated tok/s | vs sync | trained tok/s | utilisation | idle slot-s/step | "
        "finished / postponed / resumed per step | partial ratio | max version span | off-policy tokens | "
        "lost / dup rows | data path share | bench wall s |"
    )
    print("|" + "---|" * 14)
    timeline = open(args.timeline, "w", encoding="utf-8") if args.timeline else None  # noqa: SIM115
    for key in args.only or list(settings):
        setting = settings[key]
        # wall-clock timings (torch): alternate the modes and take the median
        repeats = (1 if args.quick else args.repeats) if key == "torch" else 1
        runs: dict[str, list[dict[str, float]]] = {"sync": [], "partial": []}
        for rep in range(repeats):
            spans = timeline if rep == 0 else None
            runs["sync"].append(run_mode(setting, FixedBatch(), 0, args.redis_url, spans))
            partial = PostponeToNext(max_postpones=2)
            runs["partial"].append(run_mode(setting, partial, setting.oversample, args.redis_url, spans))
        sync, part = (
            sorted(runs[m], key=lambda r: r["tokens_per_s"])[repeats // 2] for m in ("sync", "partial")
        )
        print(row(setting, "sync", sync, None), flush=True)
        print(row(setting, "partial", part, sync["tokens_per_s"]), flush=True)
    if timeline is not None:
        timeline.close()


if __name__ == "__main__":
    main()
