"""``pr-loader demo``: partial rollout vs the synchronous baseline, end to end through the Redis loader.

Both modes iterate one epoch of linked views from :class:`pr_loader.DataLoader` and drive them with
:class:`pr_loader.rollout.Scheduler` on the same engine settings:

* *partial* (run ``<run_id>``): ``PostponeToNext(max_postpones)`` plus over-sampling; a step stops once
  ``batch_size`` rows finished and the rest is postponed with its partial output;
* *sync* (run ``<run_id>-sync``, recreated each time): ``FixedBatch``, every row generated to the end.

The partial run saves a checkpoint after every committed step (``<state dir>/<run_id>.json``: the loader's
``state_dict``, the settings, the trace and the metrics so far). ``crash_at`` SIGKILLs the process in the
middle of the step after that many steps (its rows generated and postponed, not committed); ``resume``
rolls the run back to the checkpoint and continues. The *trace* (per step: finished sample ids with their
response lengths, and the postponed ids) is deterministic, so its sha256 digest after a crash and resume
equals the digest of an uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from tqdm import tqdm

from pr_loader.dataloader import DataLoader
from pr_loader.errors import ConfigError, StateDictError
from pr_loader.policy import FixedBatch, Policy, PostponeToNext
from pr_loader.rollout import (
    Engine,
    LengthDistribution,
    RunMetrics,
    Scheduler,
    SimulatedEngine,
    SlotSpan,
    StepMetrics,
    StepResult,
    TinyConfig,
    TorchEngine,
)
from pr_loader.runs import delete_run, open_shards, run_exists
from pr_loader.server import FAKE_URL, embedded_paths
from pr_loader.store.connection import Client, redact
from pr_loader.store.keys import ShardKeys

__all__ = ["DemoOptions", "DemoSettings", "DemoState", "run_demo"]

CHECKPOINT_VERSION = 1
ENGINES = ("sim", "torch")
_LEASE_SECONDS = 120.0


@dataclass(frozen=True)
class DemoSettings:
    """Everything that decides the demo's trace (stored in the checkpoint, checked on resume)."""

    engine: str
    steps: int
    batch_size: int
    oversample: int
    max_postpones: int
    seed: int
    median: float
    p99: float
    max_tokens: int
    prompt_len: int

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ConfigError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        for name in ("steps", "batch_size", "max_tokens", "prompt_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        for name in ("oversample", "max_postpones"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.median <= self.p99:
            raise ConfigError(f"need 1 <= --median <= --p99, got {self.median:g} and {self.p99:g}")

    def lengths(self) -> LengthDistribution:
        return LengthDistribution.lognormal(self.median, self.p99, max_tokens=self.max_tokens, seed=self.seed)

    def dataset(self) -> list[dict[str, torch.Tensor]]:
        """``steps * batch_size`` rows; every 8 consecutive rows share one prompt (8 samples per prompt)."""
        vocab = 512 if self.engine == "torch" else 32000
        gen = torch.Generator().manual_seed(self.seed)
        n = self.steps * self.batch_size
        prompts = [torch.randint(1, vocab, (self.prompt_len,), generator=gen) for _ in range((n + 7) // 8)]
        return [{"input_ids": prompts[i // 8]} for i in range(n)]


@dataclass
class DemoState:
    """Progress of the partial run: what the checkpoint file holds."""

    run_id: str
    settings: DemoSettings
    loader: dict[str, Any] | None = None
    clock: float = 0.0  # engine time at the end of the last recorded step (timelines continue from it)
    trace: list[list[Any]] = field(default_factory=list)
    metrics: RunMetrics = field(default_factory=RunMetrics)

    @property
    def steps_done(self) -> int:
        return len(self.trace)

    def to_json(self) -> dict[str, Any]:
        return {
            "version": CHECKPOINT_VERSION,
            "run_id": self.run_id,
            "settings": dataclasses.asdict(self.settings),
            "loader": self.loader,
            "clock": self.clock,
            "trace": self.trace,
            "metrics": [dataclasses.asdict(m) for m in self.metrics.steps],
            "timeline": [dataclasses.astuple(s) for s in self.metrics.timeline],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> DemoState:
        if not isinstance(data, dict) or data.get("version") != CHECKPOINT_VERSION:
            raise StateDictError(f"{where} is not a version-{CHECKPOINT_VERSION} demo checkpoint")
        try:
            state = cls(
                str(data["run_id"]),
                DemoSettings(**data["settings"]),
                data["loader"],
                float(data["clock"]),
                list(data["trace"]),
            )
            state.metrics.steps = [StepMetrics(**m) for m in data["metrics"]]
            state.metrics.timeline = [SlotSpan(*s) for s in data["timeline"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise StateDictError(f"demo checkpoint {where} is malformed: {exc!r}") from None
        return state

    def digest(self) -> str:
        """sha256 of the trace (canonical JSON)."""
        text = json.dumps(self.trace, separators=(",", ":"), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()


def state_dir(explicit: str | None) -> Path:
    """``explicit``, else ``demo/`` next to the embedded server's data dir (``$PR_LOADER_HOME``)."""
    return Path(explicit) if explicit else embedded_paths().data_dir.parent / "demo"


def checkpoint_path(directory: Path, run_id: str) -> Path:
    ShardKeys.for_shard(run_id, 0)  # validates the id before it becomes a file name
    return directory / f"{run_id}.json"


def save_checkpoint(path: Path, state: DemoState) -> None:
    """Write atomically (temp file + rename): a kill leaves the old or the new checkpoint, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state.to_json()))
    os.replace(tmp, path)


def load_checkpoint(directory: Path, run_id: str | None) -> tuple[Path, DemoState]:
    """The checkpoint of ``run_id``, or the newest one in ``directory``."""
    if run_id is None:
        found = sorted(directory.glob("*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise ConfigError(f"--resume: no demo checkpoint in {directory}; pass --run-id or --state-dir")
        path = found[-1]
    else:
        path = checkpoint_path(directory, run_id)
        if not path.is_file():
            raise ConfigError(f"--resume: no checkpoint for run {run_id!r} in {directory}")
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StateDictError(f"cannot read demo checkpoint {path}: {exc}") from None
    return path, DemoState.from_json(data, path)


def _make_engine(settings: DemoSettings, device: str | None) -> tuple[Engine, int | Callable[[str], int]]:
    """The engine and the scheduler's ``max_tokens`` (the torch model never stops: lengths are imposed)."""
    lengths = settings.lengths()
    if settings.engine == "torch":
        cfg = TinyConfig(
            vocab_size=512,
            dim=64,
            n_layers=2,
            n_heads=4,
            max_seq_len=settings.prompt_len + settings.max_tokens,
        )
        slots = settings.batch_size + settings.oversample
        return TorchEngine(cfg, num_slots=slots, device=device, seed=settings.seed), lengths
    slots = settings.batch_size + 2 * settings.oversample
    engine = SimulatedEngine(
        lengths,
        num_slots=slots,
        decode_base_s=0.02,
        decode_per_seq_s=5e-5,
        prefill_per_token_s=2e-5,
        seed=settings.seed,
    )
    return engine, settings.max_tokens


def _shift(metrics: StepMetrics, spans: Sequence[SlotSpan], offset: float) -> list[SlotSpan]:
    metrics.start += offset
    metrics.end += offset
    return [dataclasses.replace(s, start=s.start + offset, end=s.end + offset) for s in spans]


def _trace_entry(result: StepResult) -> list[Any]:
    batch = result.batch
    ids = [str(s) for s in batch.non_tensor_batch.get("prl_sample_id", [])]
    lengths = batch.batch["response_lengths"].tolist() if ids and batch.batch is not None else []
    return [result.metrics.step, [[s, int(n)] for s, n in zip(ids, lengths)], sorted(result.postponed_ids)]


@dataclass
class Phase:
    """One mode's run: which run, policy and oversampling, and where progress goes."""

    label: str
    state: DemoState
    policy: Policy
    oversample: int
    checkpoint: Path | None = None
    crash_at: int | None = None


def run_phase(phase: Phase, url: str, device: str | None, progress: bool) -> None:
    """Drive the rest of one epoch of ``phase.state``'s run; checkpoint after every commit if asked."""
    state, settings = phase.state, phase.state.settings
    if state.steps_done >= settings.steps:
        return
    gen = torch.Generator().manual_seed(settings.seed)
    dataset: Any = settings.dataset()  # a list: a map-style dataset
    loader = DataLoader(
        dataset,
        batch_size=settings.batch_size,
        shuffle=True,
        generator=gen,
        linked=True,
        policy=phase.policy,
        redis_url=url,
        run_id=state.run_id,
        lease_seconds=_LEASE_SECONDS,
    )
    engine, max_tokens = _make_engine(settings, device)
    sched = Scheduler(
        engine, oversample=phase.oversample, weights_version=state.steps_done, max_tokens=max_tokens
    )
    bar = tqdm(
        total=settings.steps,
        initial=state.steps_done,
        desc=phase.label,
        unit="step",
        disable=not progress,
        leave=True,
        dynamic_ncols=True,
    )
    try:
        if state.loader is not None:
            loader.load_state_dict(state.loader)
        views = iter(loader)
        base = state.clock - engine.clock  # timelines continue where the last recorded step ended
        while state.steps_done < settings.steps:
            t0 = time.perf_counter()
            view = next(views, None)
            fetch_s = time.perf_counter() - t0
            if view is None:
                raise StateDictError(f"run {state.run_id!r} ended after {state.steps_done} steps")
            result = sched.run_step(view)
            if phase.crash_at is not None and state.steps_done == phase.crash_at:
                sys.stdout.flush()
                sys.stderr.flush()
                os.kill(os.getpid(), signal.SIGKILL)  # mid-step: rows postponed, step not committed
            t1 = time.perf_counter()
            state.loader = loader.state_dict()  # commits the step
            result.metrics.data_path_s += fetch_s + time.perf_counter() - t1
            state.metrics.add(result.metrics, _shift(result.metrics, result.timeline, base))
            state.trace.append(_trace_entry(result))
            state.clock = base + engine.clock
            sched.advance_version()
            if phase.checkpoint is not None:
                save_checkpoint(phase.checkpoint, state)
            bar.update(1)
    finally:
        bar.close()
        loader.close()


def pending_ids(client: Client, run_id: str) -> list[str]:
    """Sample ids still postponed (waiting in a later step) when the partial run's epoch ended."""
    return [p.ref.key() for store in open_shards(client, run_id) for p in store.stats().postponed]


def loss_check(state: DemoState, pending: Sequence[str]) -> tuple[int, int]:
    """(lost, duplicated) rows of the epoch: each must be finished once or still postponed."""
    seen = [sid for _, rows, _ in state.trace for sid, _ in rows] + list(pending)
    expected = {f"0:{i}" for i in range(state.settings.steps * state.settings.batch_size)}
    return len(expected - set(seen)), len(seen) - len(set(seen))


def table(sync: DemoState, partial: DemoState, checks: dict[str, tuple[int, int]]) -> list[str]:
    """The comparison table (markdown), then the speed-up line."""
    s, p = sync.metrics.summary(), partial.metrics.summary()

    def per_step(summary: dict[str, float], name: str) -> float:
        return summary[name] / summary["steps"] if summary["steps"] else 0.0

    def rows(summary: dict[str, float]) -> str:
        return " / ".join(f"{summary[k]:,.0f}" for k in ("rows_finished", "rows_postponed", "rows_resumed"))

    lines: list[tuple[str, str, str]] = [
        (
            "steps x rows",
            f"{s['steps']:.0f} x {sync.settings.batch_size}",
            f"{p['steps']:.0f} x {partial.settings.batch_size} (+{partial.settings.oversample} over-sampled)",
        ),
        ("generated tokens/s", f"{s['tokens_per_s']:,.0f}", f"{p['tokens_per_s']:,.0f}"),
        ("engine utilisation", f"{s['utilisation']:.1%}", f"{p['utilisation']:.1%}"),
        (
            "idle bubbles (slot-s / step)",
            f"{per_step(s, 'idle_slot_seconds'):,.1f}",
            f"{per_step(p, 'idle_slot_seconds'):,.1f}",
        ),
        ("rows finished / postponed / resumed", rows(s), rows(p)),
        ("partial ratio", f"{s['partial_ratio']:.1%}", f"{p['partial_ratio']:.1%}"),
        ("max version span", f"{s['max_version_span']:.0f}", f"{p['max_version_span']:.0f}"),
        ("off-policy token fraction", f"{s['off_policy_fraction']:.1%}", f"{p['off_policy_fraction']:.1%}"),
        ("rows dropped", f"{s['rows_dropped']:.0f}", f"{p['rows_dropped']:.0f}"),
        ("rows lost / duplicated", "{} / {}".format(*checks["sync"]), "{} / {}".format(*checks["partial"])),
        ("data-path share of step time", f"{s['data_path_share']:.2%}", f"{p['data_path_share']:.2%}"),
        ("engine time (s)", f"{s['duration']:,.1f}", f"{p['duration']:,.1f}"),
    ]
    header = ("metric", f"sync ({sync.run_id})", f"partial ({partial.run_id})")
    widths = [max(len(r[i]) for r in [header, *lines]) for i in range(3)]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in lines]
    speedup = p["tokens_per_s"] / s["tokens_per_s"] if s["tokens_per_s"] else 0.0
    out.append(f"speed-up (generated tokens/s, partial vs sync): {speedup:.2f}x")
    return out


def plot(path: str, sync: DemoState, partial: DemoState) -> None:
    """PNG: slot timelines of sync and partial side by side (shared time axis), response-length histogram."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig = plt.figure(figsize=(15, 9), layout="constrained")
    grid = fig.add_gridspec(2, 2, height_ratios=[3, 2])
    first = fig.add_subplot(grid[0, 0])
    axes = [first, fig.add_subplot(grid[0, 1], sharex=first, sharey=first)]
    colours = {"stop": "tab:blue", "length": "tab:green", "abort": "tab:orange"}
    for ax, state in zip(axes, (sync, partial)):
        by_slot: dict[tuple[int, str], list[tuple[float, float]]] = {}
        for span in state.metrics.timeline:
            by_slot.setdefault((span.slot, span.finish_reason), []).append(
                (span.start, span.end - span.start)
            )
        for (slot, reason), bars in by_slot.items():
            ax.broken_barh(bars, (slot - 0.4, 0.8), facecolors=colours[reason], linewidth=0)
        for step in state.metrics.steps:
            ax.axvline(step.end, color="grey", linewidth=0.4, alpha=0.6)
        summary = state.metrics.summary()
        ax.set_title(
            f"{state.run_id}: {summary['tokens_per_s']:,.0f} tok/s, utilisation {summary['utilisation']:.0%}"
        )
        ax.set_xlabel("engine time (s)")
        ax.set_ylabel("engine slot")
    handles = [matplotlib.patches.Patch(color=c, label=r) for r, c in colours.items()]
    axes[1].legend(handles=handles, loc="upper right", title="slot ended by")
    hist = fig.add_subplot(grid[1, :])
    lengths = np.array([n for _, rows, _ in partial.trace for _, n in rows] or [1])
    bins = np.geomspace(1, max(2, int(lengths.max())), 60).tolist()
    hist.hist(lengths, bins=bins, color="tab:blue")
    hist.set_xscale("log")
    hist.set_xlabel("response length (tokens)")
    hist.set_ylabel("rows")
    hist.set_title(
        f"response lengths: median {np.median(lengths):,.0f}, p99 {np.percentile(lengths, 99):,.0f}, "
        f"max {lengths.max():,}"
    )
    fig.savefig(path, dpi=100)
    plt.close(fig)


@dataclass
class DemoOptions:
    """Resolved command-line options of ``pr-loader demo``."""

    settings: dict[str, Any]  # given options only (None = engine default / checkpoint value)
    defaults: dict[str, dict[str, Any]]  # engine -> default settings
    engine: str | None
    device: str | None
    url: str
    run_id: str | None
    resume: bool
    crash_at: int | None
    state_dir: str | None
    plot: str | None
    progress: bool


def _resolve(options: DemoOptions) -> DemoSettings:
    engine = options.engine or "sim"
    values = {**options.defaults[engine], **{k: v for k, v in options.settings.items() if v is not None}}
    return DemoSettings(engine=engine, **values)


def _check_resume(options: DemoOptions, stored: DemoSettings) -> None:
    given = {k: v for k, v in options.settings.items() if v is not None}
    if options.engine is not None:
        given["engine"] = options.engine
    for name, value in given.items():
        if getattr(stored, name) != value:
            raise ConfigError(
                f"--resume: --{name.replace('_', '-')} {value} differs from the checkpoint's "
                f"{getattr(stored, name)}"
            )


def _check_outputs(options: DemoOptions, settings: DemoSettings) -> None:
    """Fail before any work when the plot or the device cannot be had."""
    if options.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise ConfigError("--plot needs matplotlib ('pip install pr-loader[plot]')")
        if not Path(options.plot).parent.is_dir():
            raise ConfigError(f"--plot: directory {Path(options.plot).parent} does not exist")
    if settings.engine == "torch" and options.device is not None:
        try:
            device = torch.device(options.device)
        except RuntimeError as exc:
            raise ConfigError(f"--device {options.device!r}: {exc}") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {options.device!r}: CUDA is not available here")


def run_demo(options: DemoOptions, client: Client, out: TextIO) -> int:
    """The demo: partial run (checkpointed, crashable, resumable), sync baseline, table, digest, plot."""
    directory = state_dir(options.state_dir)
    if options.resume:
        path, partial = load_checkpoint(directory, options.run_id)
        _check_resume(options, partial.settings)
        print(f"resuming run {partial.run_id} after step {partial.steps_done} (checkpoint {path})", file=out)
    else:
        settings = _resolve(options)
        run_id = options.run_id or f"demo-{uuid.uuid4().hex[:8]}"
        path = checkpoint_path(directory, run_id)
        if run_exists(client, run_id):
            raise ConfigError(
                f"run {run_id!r} already exists; continue it with 'pr-loader demo --resume --run-id "
                f"{run_id}' or delete it with 'pr-loader reset {run_id}'"
            )
        partial = DemoState(run_id, settings)
    if options.crash_at is not None:
        if options.url == FAKE_URL:
            raise ConfigError("--crash-at needs a redis-server: the in-process fakeredis store dies with it")
        if not partial.steps_done <= options.crash_at < partial.settings.steps:
            raise ConfigError(
                f"--crash-at must be in [{partial.steps_done}, {partial.settings.steps - 1}], "
                f"got {options.crash_at}"
            )
    settings = partial.settings
    _check_outputs(options, settings)
    print(
        f"demo: {settings.steps} steps x {settings.batch_size} rows, engine {settings.engine}, "
        f"lengths median {settings.median:g} / p99 {settings.p99:g} / max {settings.max_tokens}, "
        f"store {redact(options.url)}",
        file=out,
        flush=True,
    )
    if not options.resume:
        save_checkpoint(path, partial)  # resumable even if it dies in its first step
    t0 = time.perf_counter()
    run_phase(
        Phase(
            "partial",
            partial,
            PostponeToNext(max_postpones=settings.max_postpones),
            settings.oversample,
            path,
            options.crash_at,
        ),
        options.url,
        options.device,
        options.progress,
    )
    sync = DemoState(f"{partial.run_id}-sync", settings)
    if run_exists(client, sync.run_id):  # the baseline is recomputed every time
        delete_run(client, sync.run_id)
    run_phase(Phase("sync", sync, FixedBatch(), 0), options.url, options.device, options.progress)
    checks = {
        "sync": loss_check(sync, []),
        "partial": loss_check(partial, pending_ids(client, partial.run_id)),
    }
    print("", file=out)
    for line in table(sync, partial, checks):
        print(line, file=out)
    print(f"trace digest (partial run): {partial.digest()}", file=out)
    wall = time.perf_counter() - t0
    print(f"wall time: {wall:.1f}s; inspect the run with 'pr-loader inspect {partial.run_id}'", file=out)
    if options.plot:
        plot(options.plot, sync, partial)
        print(f"plot written to {options.plot}", file=out)
    return 0
