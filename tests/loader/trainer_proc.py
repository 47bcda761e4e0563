"""A tiny partial-rollout training loop for the SIGKILL resume test (run as a subprocess or in-process).

Per step it prefetches and postpones rows with a deterministic 'scheduler' driven by sample ids, appends
the step's trace (rows kept, their times postponed and partial fields, rows postponed) to a JSONL file and
saves the loader's state_dict (JSON, atomically) after odd steps. ``--kill-step/--kill-phase`` SIGKILL the
process itself at that point. On start it restores the saved state and drops trace lines after it, like a
trainer restoring its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pr_loader.dataloader import DataLoader
from pr_loader.linked import LinkedDataProto
from pr_loader.protocol_ops import object_array

N, B, EPOCHS = 20, 4, 3
S = N // B
PHASES = ("claimed", "scheduled", "traced", "saved")
DATA = [{"input_ids": torch.arange(i, i + 3), "prompt": f"p{i}"} for i in range(N)]


def schedule(view: LinkedDataProto) -> list[str]:
    """Prefetch on every third step; postpone rows picked by (index, step), at most twice each."""
    step = view.step
    if step % 3 == 0:
        view.prefetch_samples(2)
    ids = view.sample_ids()
    times = [int(t) for t in view.non_tensor_batch["prl_times_postponed"]]
    index = [int(i) for i in view.non_tensor_batch["prl_index"]]
    partial = view.non_tensor_batch.get("partial")
    chosen = [k for k in range(len(ids)) if (index[k] * 7 + step) % 5 < 2 and times[k] < 2]
    if not chosen:
        return []
    samples = view.select_idxs(chosen)
    samples.non_tensor_batch["partial"] = object_array(
        [([] if partial is None or partial[k] is None else list(partial[k])) + [step] for k in chosen]
    )
    view.postpone_samples(samples)
    return [ids[k] for k in chosen]


def trace_of(view: LinkedDataProto, postponed: list[str]) -> dict[str, Any]:
    partial = view.non_tensor_batch.get("partial")
    rows = [
        [sid, int(t), None if partial is None or partial[k] is None else list(partial[k])]
        for k, (sid, t) in enumerate(zip(view.sample_ids(), view.non_tensor_batch["prl_times_postponed"]))
    ]
    ids = view.batch["input_ids"][:, 0].tolist() if view.batch is not None and len(view) else []
    return {"step": view.step, "rows": rows, "first_token": ids, "postponed": postponed}


def save_state(path: Path, state: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, path)


def train(url: str, run_id: str, workdir: Path, *, kill: tuple[int, str] | None = None) -> None:
    trace_path, state_path = workdir / "trace.jsonl", workdir / "state.json"
    loader = DataLoader(
        DATA, batch_size=B, shuffle=True, generator=torch.Generator().manual_seed(99),
        redis_url=url, run_id=run_id, linked=True, policy="PostponeToNext", retain_steps=8,
    )  # fmt: skip
    if state_path.exists():
        state = json.loads(state_path.read_text())
        loader.load_state_dict(state)
        lines = trace_path.read_text().splitlines() if trace_path.exists() else []
        kept = [line for line in lines if json.loads(line)["step"] <= state["step"]]
        trace_path.write_text("".join(line + "\n" for line in kept))
    else:
        save_state(state_path, loader.state_dict())
    with trace_path.open("a") as trace:
        while True:
            last = -1
            for view in loader:
                last = view.step
                if kill == (view.step, "claimed"):
                    os.kill(os.getpid(), signal.SIGKILL)
                postponed = schedule(view)
                if kill == (view.step, "scheduled"):
                    os.kill(os.getpid(), signal.SIGKILL)
                trace.write(json.dumps(trace_of(view, postponed)) + "\n")
                trace.flush()
                if kill == (view.step, "traced"):
                    os.kill(os.getpid(), signal.SIGKILL)
                if view.step % 2 == 1:
                    save_state(state_path, loader.state_dict())
                if kill == (view.step, "saved"):
                    os.kill(os.getpid(), signal.SIGKILL)
            if last >= EPOCHS * S - 1 or (last == -1 and loader.state_dict()["step"] >= EPOCHS * S - 1):
                break
    loader.state_dict()  # commits the final step
    loader.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--run-id", required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--kill-step", type=int)
    parser.add_argument("--kill-phase", choices=PHASES)
    args = parser.parse_args()
    kill = None if args.kill_step is None else (args.kill_step, args.kill_phase)
    np.seterr(all="raise")
    train(args.url, args.run_id, args.workdir, kill=kill)


if __name__ == "__main__":
    main()
