"""An in-memory stand-in for LinkedDataProto: just the documented view methods, no store.

``StandInRun`` plays the role of the store across steps: step s holds the rows postponed into it (first, in
postpone order) followed by its fresh rows; prefetch pops fresh rows of later steps; postponed payloads keep
the fields given to ``postpone_samples`` (minus reserved ones) and count ``prl_times_postponed`` up.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

from pr_loader.errors import PolicyError, RowsNotInStep
from pr_loader.policy import FixedBatch, Policy, RunLayout
from pr_loader.protocol import DataProto
from pr_loader.rows import RESERVED_FIELDS, dataproto_row, rows_to_dataproto


class StandInView(DataProto):
    step: int
    target_size: int
    policy: Policy
    run: StandInRun | None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.step, self.target_size, self.policy, self.run = 0, 0, FixedBatch(), None
        self._finished: set[str] = set()

    def _rows(self) -> list[dict[str, Any]]:
        return [dataproto_row(self, i) for i in range(len(self))]

    def _set_rows(self, rows: list[dict[str, Any]]) -> None:
        dp = rows_to_dataproto(DataProto, rows)
        self.batch, self.non_tensor_batch = dp.batch, dp.non_tensor_batch

    def sample_ids(self) -> list[str]:
        return [str(s) for s in self.non_tensor_batch.get("prl_sample_id", [])]

    def _check(self, ids: Iterable[str]) -> list[str]:
        ids = list(ids)
        unknown = set(ids) - set(self.sample_ids())
        if unknown:
            raise RowsNotInStep(f"rows not in step: {sorted(unknown)}")
        return ids

    def mark_finished(self, sample_ids: Iterable[str]) -> None:
        self._finished.update(self._check(sample_ids))

    @property
    def num_finished(self) -> int:
        return len(self._finished)

    def times_postponed(self, sid: str) -> int:
        return int(self.non_tensor_batch["prl_times_postponed"][self.sample_ids().index(sid)])

    def must_finish_ids(self) -> list[str]:
        return [
            s
            for s in self.sample_ids()
            if s not in self._finished and not self.policy.may_postpone(self.times_postponed(s))
        ]

    def should_stop_gen(self) -> bool:
        return self.policy.should_stop_gen(self)  # type: ignore[arg-type]

    def prefetch_samples(self, count: int) -> DataProto:
        assert self.run is not None
        n = self.policy.prefetch_count(self, count)  # type: ignore[arg-type]
        new = self.run.take_fresh(self.step, n)
        self._set_rows(self._rows() + new)
        return rows_to_dataproto(DataProto, new)

    def postpone_samples(self, samples: DataProto) -> bool:
        assert self.run is not None
        target = self.policy.postpone_target(self.step, self.run.layout)
        if target is None:
            return False
        ids = self._check(str(s) for s in samples.non_tensor_batch["prl_sample_id"])
        bounded = [s for s in ids if not self.policy.may_postpone(self.times_postponed(s))]
        if bounded:
            raise PolicyError(f"bounded rows {bounded}")
        for i in range(len(samples)):
            row = dataproto_row(samples, i)
            payload = {k: v for k, v in row.items() if k not in RESERVED_FIELDS}
            payload["prl_sample_id"] = row["prl_sample_id"]
            payload["prl_times_postponed"] = int(row["prl_times_postponed"]) + 1
            self.run.arrivals.setdefault(target, []).append(payload)
        self.run.postpone_log.append((self.step, ids))
        self._set_rows([r for r in self._rows() if r["prl_sample_id"] not in set(ids)])
        self._finished -= set(ids)
        return True


def make_row(index: int, prompt_len: int = 4, vocab: int = 256) -> dict[str, Any]:
    prompt = torch.tensor([(index * 7 + j) % (vocab - 1) + 1 for j in range(prompt_len)], dtype=torch.int64)
    return {"prl_sample_id": f"0:{index}", "prl_times_postponed": 0, "input_ids": prompt, "label": index}


class StandInRun:
    """Rows per step in memory; yields StandInView objects and records what was postponed."""

    def __init__(self, num_rows: int, batch_size: int, policy: Policy, *, prompt_len: int = 4) -> None:
        steps = (num_rows + batch_size - 1) // batch_size
        self.layout = RunLayout(steps_per_epoch=steps, num_epochs=1, batch_size=batch_size)
        self.policy = policy
        self.fresh = [
            [make_row(i, prompt_len) for i in range(s * batch_size, min(num_rows, (s + 1) * batch_size))]
            for s in range(steps)
        ]
        self.arrivals: dict[int, list[dict[str, Any]]] = {}
        self.postpone_log: list[tuple[int, list[str]]] = []

    def take_fresh(self, step: int, count: int) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for later in self.fresh[step + 1 :]:
            while later and len(out) < count:
                out.append(later.pop(0))
        return out

    def view(self, step: int) -> StandInView:
        rows = self.arrivals.pop(step, []) + (self.fresh[step] if step < len(self.fresh) else [])
        if step < len(self.fresh):
            self.fresh[step] = []
        view = rows_to_dataproto(StandInView, rows)
        view.step, view.target_size, view.policy, view.run = step, self.layout.batch_size, self.policy, self
        return view

    def views(self) -> Iterator[StandInView]:
        step = 0
        while step < len(self.fresh) or self.arrivals:
            view = self.view(step)
            if len(view):
                yield view
            step += 1
