"""A small pure-Python model of one BatchStore shard, for differential testing against the Lua scripts.

It implements the semantics of docs/architecture.md ("Journal and rollback") directly on dicts and lists.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from pr_loader.errors import (
    ConfigError,
    LeaseLost,
    NeedsMaterialisation,
    NoStepReady,
    RollbackOutOfRange,
    RowsNotInStep,
    StepStateError,
)

Entry = tuple[int, str, Any]  # (seq, kind, data)


@dataclass
class _Undo:
    excluded: set[str] = field(default_factory=set)
    extras: dict[int, list[list[str]]] = field(default_factory=dict)


class Model:
    def __init__(self, batch_size: int, steps_per_epoch: int, num_epochs: int, retain: int) -> None:
        self.B, self.S, self.retain = batch_size, steps_per_epoch, retain
        self.total = num_epochs * steps_per_epoch
        self.batch: dict[int, list[str]] = defaultdict(list)
        self.arrivals: dict[int, list[str]] = defaultdict(list)
        self.rows: dict[int, list[str]] = defaultdict(list)
        self.journal: dict[int, list[Entry]] = defaultdict(list)
        self.steps: dict[int, str] = {}
        self.owners: dict[int, str] = {}
        self.leases: dict[int, float] = {}
        self.requeue: set[int] = set()
        self.payloads: dict[str, bytes] = {}
        self.dead: list[str] = []
        self.materialised: set[int] = set()
        self.next_step, self.committed_upto, self.gc_floor, self.seq = 0, -1, 0, 0
        self.max_target: int | None = None
        self.committed_rows: dict[int, list[str]] = {}

    # -- helpers ----------------------------------------------------------------------------------

    def claimed(self, t: int) -> bool:
        return t < self.gc_floor or t in self.steps

    def _journal(self, s: int, kind: str, data: Any) -> None:
        self.seq += 1
        self.journal[s].append((self.seq, kind, data))

    def _check_lease(self, s: int, consumer: str, now: float) -> None:
        if s not in self.steps and s in self.requeue:
            raise LeaseLost(s)
        if self.steps.get(s) == "committed":
            raise (LeaseLost if self.owners[s] != consumer else StepStateError)(s)
        if self.steps.get(s) != "inflight":
            raise StepStateError(s)
        if self.owners[s] != consumer or self.leases[s] < now:
            raise LeaseLost(s)

    def _undo(self, s: int, entry: Entry, ctx: _Undo) -> None:
        _, kind, data = entry
        if kind == "D":
            ctx.excluded.add(data)
        elif kind == "P":
            t, pairs = data
            for old, new in reversed(pairs):
                if new in self.arrivals[t]:
                    self.arrivals[t].remove(new)
                    del self.payloads[new]
                else:
                    ctx.excluded.add(old)
        elif kind == "F":
            t, refs = data
            keep = [r for r in refs if r not in ctx.excluded]
            if keep:
                if self.claimed(t):
                    ctx.extras.setdefault(s, []).insert(0, keep)
                else:
                    self.batch[t][:0] = keep
        else:  # C
            na, refs = data
            self.arrivals[s] = [r for r in refs[:na] if r not in ctx.excluded]
            self.batch[s] = [r for r in refs[na:] if r not in ctx.excluded]
            for seg in ctx.extras.get(s, []):
                self.batch[s] += seg
            self.rows.pop(s, None)
            self.steps.pop(s, None)
            self.owners.pop(s, None)
            self.leases.pop(s, None)

    def _expire_step(self, s: int) -> None:
        ctx = _Undo()
        for entry in reversed(self.journal.pop(s, [])):
            self._undo(s, entry, ctx)
        self.requeue.add(s)

    def expire(self, now: float) -> list[int]:
        due = sorted((exp, str(s)) for s, exp in self.leases.items() if exp < now)
        for _, sv in due:
            self._expire_step(int(sv))
        return [int(sv) for _, sv in due]

    def _can_give_back(self, held: int | None, consumer: str, s: int) -> bool:
        """``held`` is a step claimed ahead by consumer, untouched since (its journal: the claim alone)."""
        return (
            held is not None and held != s and self.steps.get(held) == "inflight"
            and self.owners.get(held) == consumer and len(self.journal.get(held, [])) == 1
        )  # fmt: skip

    # -- operations -------------------------------------------------------------------------------

    def materialise(self, s: int, rows: list[tuple[int, bytes]]) -> bool:
        if s in self.materialised or self.claimed(s):
            return False
        refs = [f"{s // self.S}:{i}:0:-" for i, _ in rows]
        self.batch[s] = refs
        self.payloads.update(zip(refs, (p for _, p in rows)))
        self.materialised.add(s)
        return True

    def claim(
        self, consumer: str, lease: float, now: float, held: int | None = None
    ) -> tuple[int, list[str]] | None:
        if self._can_give_back(held, consumer, -1):
            assert held is not None
            self._expire_step(held)
        self.expire(now)
        if self.requeue:
            s = min(self.requeue)
            self.requeue.discard(s)
        else:
            cur = self.next_step
            if cur >= self.total:
                last = -1 if self.max_target is None else self.max_target
                while cur <= last and not self.arrivals[cur]:
                    self.steps[cur] = "skipped"
                    cur += 1
                self.next_step = cur
                if cur > last:
                    if self.leases:
                        raise NoStepReady(min(self.leases.values()))
                    return None
            elif cur not in self.materialised:
                raise NeedsMaterialisation(cur)
            s = cur
            self.next_step = s + 1
        arr, bat = self.arrivals.pop(s, []), self.batch.pop(s, [])
        self.rows[s] = arr + bat
        self._journal(s, "C", (len(arr), arr + bat))
        self.steps[s], self.owners[s], self.leases[s] = "inflight", consumer, now + lease
        return s, list(self.rows[s])

    def renew(self, s: int, consumer: str, lease: float, now: float) -> float:
        self._check_lease(s, consumer, now)
        self.leases[s] = now + lease
        return now + lease

    def commit(self, s: int, consumer: str, now: float) -> None:
        if s not in self.steps and s < self.gc_floor:
            raise StepStateError(s)
        self._check_lease(s, consumer, now)
        self.steps[s] = "committed"
        del self.leases[s]
        self.committed_rows[s] = list(self.rows[s])
        self.committed_upto = max(self.committed_upto, s)
        while self.gc_floor <= self.committed_upto - self.retain - 1 and self.steps.get(self.gc_floor) in (
            "committed", "skipped",
        ):
            g = self.gc_floor
            for r in self.rows.pop(g, []):
                self.payloads.pop(r, None)
            for _, kind, data in self.journal.pop(g, []):
                if kind == "P":
                    for old, _ in data[1]:
                        self.payloads.pop(old, None)
            del self.steps[g]
            self.owners.pop(g, None)
            self.materialised.discard(g)
            self.gc_floor += 1

    def postpone(
        self, s: int, consumer: str, moves: list[tuple[str, str, bytes]], t: int, now: float,
        held: int | None = None,
    ) -> None:
        if t <= s:
            raise StepStateError(t)
        if len({old for old, _, _ in moves}) < len(moves):
            raise ConfigError("twice")
        if not moves:
            return
        self._check_lease(s, consumer, now)
        give = self._can_give_back(held, consumer, s)
        if t < self.next_step and t not in self.requeue and not (give and t == held):
            raise StepStateError(t)
        if any(old not in self.rows[s] for old, _, _ in moves):
            raise RowsNotInStep(s)
        if give:
            assert held is not None
            self._expire_step(held)
        for old, new, payload in moves:
            self.rows[s].remove(old)
            self.payloads[new] = payload
            self.arrivals[t].append(new)
        self._journal(s, "P", (t, [(old, new) for old, new, _ in moves]))
        self.max_target = t if self.max_target is None else max(self.max_target, t)

    def prefetch(
        self, s: int, consumer: str, count: int, last: int, now: float, held: int | None = None
    ) -> tuple[list[str], int | None]:
        self._check_lease(s, consumer, now)
        if self._can_give_back(held, consumer, s):
            assert held is not None
            self._expire_step(held)
        got: list[str] = []
        needs = None
        for t in range(s + 1, last + 1):
            if len(got) >= count:
                break
            if self.claimed(t) or t >= self.total:
                continue
            if t not in self.materialised:
                needs = t
                break
            take = self.batch[t][: count - len(got)]
            del self.batch[t][: len(take)]
            if take:
                self._journal(s, "F", (t, take))
                got += take
        self.rows[s] += got
        return got, needs

    def dead_letter(self, s: int, ref: str) -> None:
        if self.steps.get(s) != "inflight":
            raise StepStateError(s)
        if ref not in self.rows[s]:
            raise RowsNotInStep(ref)
        self.rows[s].remove(ref)
        self.dead.append(ref)
        del self.payloads[ref]
        self._journal(s, "D", ref)

    def rollback(self, k: int) -> None:
        if not self.gc_floor - 1 <= k <= self.committed_upto:
            raise RollbackOutOfRange(k)
        top = self.next_step - 1
        entries = sorted(
            ((e, s) for s in range(k + 1, top + 1) for e in self.journal.get(s, [])),
            key=lambda es: -es[0][0],
        )
        ctx = _Undo()
        for entry, s in entries:
            self._undo(s, entry, ctx)
        for s in range(k + 1, top + 1):
            self.journal.pop(s, None)
            self.steps.pop(s, None)
            self.owners.pop(s, None)
            self.leases.pop(s, None)
            self.committed_rows.pop(s, None)
        self.requeue = {s for s in self.requeue if s <= k}
        self.next_step, self.committed_upto = k + 1, k

    # -- comparison -------------------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        lists: dict[str, list[str]] = {}
        for kind, table in (("batch", self.batch), ("arrivals", self.arrivals), ("rows", self.rows)):
            for s, items in table.items():
                if items:
                    lists[f"{kind}:{s}"] = list(items)
        for s, entries in self.journal.items():
            if entries:
                lists[f"journal:{s}"] = [_encode(e) for e in entries]
            claims = [data[1] for _, kind, data in entries if kind == "C"]
            if claims and claims[0]:
                lists[f"claimed:{s}"] = list(claims[0])
        return {
            "lists": lists,
            "steps": dict(self.steps),
            "owners": dict(self.owners),
            "leases": dict(self.leases),
            "requeue": sorted(self.requeue),
            "payloads": dict(self.payloads),
            "dead": list(self.dead),
            "materialised": sorted(self.materialised),
            "meta": (self.next_step, self.committed_upto, self.gc_floor, self.seq, self.max_target,
                     len(self.payloads)),
        }


def _encode(entry: Entry) -> str:
    seq, kind, data = entry
    if kind == "C":  # (its refs: the list claimed:<s>)
        words = [str(data[0])]
    elif kind == "F":
        words = [str(data[0]), *data[1]]
    elif kind == "P":
        words = [str(data[0])] + [r for pair in data[1] for r in pair]
    else:
        words = [data]
    return " ".join([str(seq), kind, *words])
