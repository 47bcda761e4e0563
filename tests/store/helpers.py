"""Helpers of the store tests: full dumps of a shard's data, for exact comparisons; a script and its
pipelined payload read pulled apart."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import redis

from pr_loader.store import BatchStore, wire

LIST_KINDS = ("batch", "arrivals", "rows", "journal", "claimed")


def _s(value: bytes) -> str:
    return value.decode()


def dump(
    client: redis.Redis, store: BatchStore, *, from_step: int = 0, journals: bool = True
) -> dict[str, Any]:
    """Every list, step state, lease and the payloads of listed refs of steps >= from_step.

    ``max_target`` (an upper bound), ``seq`` and ``op:*`` keys are bookkeeping and not part of the dump;
    ``payload_keys`` counts every payload key of the shard.
    """
    keys = store.keys
    meta = {_s(k): _s(v) for k, v in client.hgetall(keys.meta).items()}
    lists: dict[str, list[str]] = {}
    refs: set[str] = set()
    for raw in client.scan_iter(match=keys.scan_pattern(), count=1000):
        name = _s(raw)[len(keys.prefix):]
        kind, _, step = name.partition(":")
        if kind not in LIST_KINDS or int(step) < from_step or (kind == "journal" and not journals):
            continue
        items = [_s(v) for v in client.lrange(raw, 0, -1)]
        lists[name] = items
        if kind != "journal":
            refs.update(items)
    payloads = client.mget([keys.payload(r) for r in sorted(refs)]) if refs else []
    return {
        "next_step": int(meta["next_step"]),
        "committed_upto": int(meta["committed_upto"]),
        "lists": lists,
        "steps": {int(k): _s(v) for k, v in client.hgetall(keys.steps).items() if int(k) >= from_step},
        "owners": {int(k): _s(v) for k, v in client.hgetall(keys.owners).items()},
        "leases": {int(_s(k)): v for k, v in client.zrange(keys.leases, 0, -1, withscores=True)},
        "requeue": [int(v) for v in client.zrange(keys.requeue, 0, -1)],
        "payloads": dict(zip(sorted(refs), payloads)),
        "dead": client.llen(keys.dead),
        "payload_keys": int(meta["payloads"]),
    }


def restrict(state: dict[str, Any], from_step: int) -> dict[str, Any]:
    """A dump limited to steps >= from_step (payloads recomputed from the remaining lists, no count)."""
    lists = {k: v for k, v in state["lists"].items() if int(k.partition(":")[2]) >= from_step}
    refs = {r for k, v in lists.items() if not k.startswith("journal:") for r in v}
    out = dict(state)
    out["lists"] = lists
    out["steps"] = {s: v for s, v in state["steps"].items() if s >= from_step}
    out["owners"] = {s: v for s, v in state["owners"].items() if s >= from_step}
    out["payloads"] = {r: p for r, p in state["payloads"].items() if r in refs}
    del out["payload_keys"]  # includes the payloads of collected steps
    return out


class InterleavedPipeline:
    """A stand-in for ``client.pipeline()`` that runs the queued commands one by one and calls ``between``
    after the first (a store script): what another client could do between a script and the payload read
    pipelined behind it."""

    def __init__(self, client: redis.Redis, between: Callable[[], object]) -> None:
        self.client, self.between = client, between
        self.calls: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., InterleavedPipeline]:
        def queue(*args: Any, **kwargs: Any) -> InterleavedPipeline:
            self.calls.append((name, args, kwargs))
            return self

        return queue

    def execute(self, raise_on_error: bool = True) -> list[object]:
        out: list[object] = []
        for i, (name, args, kwargs) in enumerate(self.calls):
            if i == 1:
                self.between()
            try:
                out.append(getattr(self.client, name)(*args, **kwargs))
            except redis.ResponseError as exc:
                if raise_on_error:
                    raise
                out.append(exc)
        return out


def interleave_pipelined(
    monkeypatch: pytest.MonkeyPatch, client: redis.Redis, between: Callable[[], object]
) -> None:
    """Make ``between`` run between a store script and the payload read pipelined behind it (what another
    client can do there): in ``wire._pipeline`` on a plain socket, through :class:`InterleavedPipeline`
    otherwise (fakeredis)."""
    real = wire._pipeline

    def interleaved(commands: list[tuple[Any, ...]], sock: Any) -> list[Any]:
        first = real(commands[:1], sock)
        between()
        return first + real(commands[1:], sock)

    monkeypatch.setattr(wire, "_pipeline", interleaved)
    monkeypatch.setattr(client, "pipeline", lambda **_: InterleavedPipeline(client, between))
