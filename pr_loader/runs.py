"""Runs by id, for tools: a run's stored settings, its shards, a JSON-able report of its state, deletion.

:class:`~pr_loader.store.BatchStore` opens a shard from a full :class:`~pr_loader.store.RunConfig`; tools
such as ``pr-loader inspect`` only know the run id, so :func:`stored_config` rebuilds the config from the
shard's ``meta`` hash (its fields are the identity fields of docs/architecture.md).
"""

from __future__ import annotations

import time
from typing import Any

from pr_loader.errors import RunNotFound, UnsupportedSchema
from pr_loader.store import SCHEMA, BatchStore, RunConfig
from pr_loader.store.connection import Client
from pr_loader.store.keys import ShardKeys

__all__ = ["delete_run", "inspect_run", "open_shards", "run_exists", "stored_config"]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def run_exists(client: Client, run_id: str) -> bool:
    """Whether rank 0 of ``run_id`` has a meta hash."""
    return bool(client.exists(ShardKeys.for_shard(run_id, 0).meta))


def stored_config(client: Client, run_id: str, rank: int = 0) -> RunConfig | None:
    """The settings of one shard as stored in its meta; None if the shard does not exist."""
    raw = client.hgetall(ShardKeys.for_shard(run_id, rank).meta)
    if not raw:
        return None
    meta = {_text(k): _text(v) for k, v in raw.items()}
    if meta.get("schema") != SCHEMA:
        raise UnsupportedSchema(
            f"run {run_id!r} has store schema {meta.get('schema')!r}; this pr_loader reads schema {SCHEMA!r}"
        )
    epochs = meta.get("num_epochs", "")
    return RunConfig(
        run_id=meta["run_id"],
        batch_size=int(meta["batch_size"]),
        steps_per_epoch=int(meta["steps_per_epoch"]),
        dataset_fingerprint=meta["dataset_fingerprint"],
        seed=int(meta["seed"]),
        policy=meta["policy"],
        world_size=int(meta["world_size"]),
        rank=int(meta["rank"]),
        num_epochs=int(epochs) if epochs else None,
        retain_steps=int(meta["retain_steps"]),
    )


def open_shards(client: Client, run_id: str) -> list[BatchStore]:
    """A store handle per rank shard of ``run_id``; :class:`RunNotFound` if rank 0 does not exist."""
    first = stored_config(client, run_id, 0)
    if first is None:
        raise RunNotFound(f"run {run_id!r} not found")
    stores = [BatchStore.open(client, first, create=False)]
    for rank in range(1, first.world_size):
        config = stored_config(client, run_id, rank)
        if config is not None:
            stores.append(BatchStore.open(client, config, create=False))
    return stores


def delete_run(client: Client, run_id: str) -> int:
    """Delete every shard of ``run_id``; returns the number of keys deleted."""
    return sum(store.delete_run() for store in open_shards(client, run_id))


def count_keys(client: Client, run_id: str) -> int:
    """Keys held by the shards of ``run_id``."""
    return sum(
        sum(1 for _ in client.scan_iter(match=store.keys.scan_pattern(), count=1000))
        for store in open_shards(client, run_id)
    )


def _shard_report(client: Client, store: BatchStore, now: float) -> dict[str, Any]:
    from pr_loader.plan import PlanStore  # torch: imported only when a report is made

    config = store.config
    stats = store.stats()
    spe = config.steps_per_epoch
    plans = PlanStore(client, store.keys.prefix)
    cursor = min([stats.next_step, *stats.requeued])
    epoch = cursor // spe
    return {
        "rank": config.rank,
        "settings": {
            "batch_size": config.batch_size,
            "steps_per_epoch": spe,
            "num_epochs": config.num_epochs,
            "policy": config.policy,
            "seed": config.seed,
            "dataset_fingerprint": config.dataset_fingerprint,
            "retain_steps": config.retain_steps,
        },
        "epochs": {
            "current": epoch,
            "step_in_epoch": cursor - epoch * spe,
            "planned": [e for e in range(max(0, epoch - 2), epoch + 3) if plans.exists(e)],
        },
        "batches": {
            "next_step": stats.next_step,
            "committed_upto": stats.committed_upto,
            "gc_floor": stats.gc_floor,
            "requeued": stats.requeued,
            "upcoming": [
                {"step": s, "arrivals": a, "fresh": f} for s, (a, f) in sorted(stats.upcoming.items())
            ],
        },
        "postponed": [
            {
                "sample_id": p.ref.key(),
                "ref": p.ref.encode(),
                "times_postponed": p.ref.version,
                "first_step": p.ref.first_step,
                "target_step": p.target_step,
                "staleness": p.staleness,
            }
            for p in stats.postponed
        ],
        "in_flight": [
            {"step": lease.step, "owner": lease.owner, "expires_in_s": round(lease.expiry - now, 3)}
            for lease in stats.in_flight
        ],
        "dead_letters": [
            {
                "ref": d.ref.encode(),
                "step": d.step,
                "reason": d.reason,
                "payload_bytes": len(d.payload),
                "at": d.at,
            }
            for d in store.dead_letters()
        ],
        "payloads": stats.payloads,
        "server_memory_bytes": stats.server_memory_bytes,
    }


def inspect_run(client: Client, run_id: str) -> dict[str, Any]:
    """A JSON-serialisable report of every shard of ``run_id`` (RunNotFound if there is none)."""
    now = time.time()
    shards = [_shard_report(client, store, now) for store in open_shards(client, run_id)]
    return {"run_id": run_id, "world_size": len(shards), "shards": shards}


def format_report(report: dict[str, Any], *, limit: int = 20) -> list[str]:
    """Human-readable lines of :func:`inspect_run`'s report (long lists cut to ``limit`` entries)."""

    def cut(items: list[Any]) -> tuple[list[Any], str]:
        more = len(items) - limit
        return items[:limit], (f"  ... and {more} more" if more > 0 else "")

    lines = [f"run {report['run_id']} ({report['world_size']} shard(s))"]
    for shard in report["shards"]:
        cfg, ep, bt = shard["settings"], shard["epochs"], shard["batches"]
        epochs = "an endless run" if cfg["num_epochs"] is None else f"{cfg['num_epochs']}"
        lines += [
            f"rank {shard['rank']}: policy {cfg['policy']}, {cfg['batch_size']} rows x "
            f"{cfg['steps_per_epoch']} steps per epoch, seed {cfg['seed']}, "
            f"dataset {cfg['dataset_fingerprint']}",
            f"  epoch {ep['current']} of {epochs}, step {ep['step_in_epoch']} of the epoch; plans stored for "
            f"epochs {ep['planned'] or 'none'}",
            f"  next step {bt['next_step']}, committed up to {bt['committed_upto']}, journal kept from "
            f"{bt['gc_floor']}, requeued {bt['requeued'] or 'none'}",
            f"  payloads held {shard['payloads']}"
            + (
                ""
                if shard["server_memory_bytes"] is None
                else f"; server memory {shard['server_memory_bytes']:,} bytes"
            ),
        ]
        upcoming, more = cut(bt["upcoming"])
        lines.append(f"  upcoming batches: {len(bt['upcoming'])}")
        lines += [
            f"    step {u['step']}: {u['arrivals']} postponed + {u['fresh']} fresh rows" for u in upcoming
        ]
        lines += [more] if more else []
        postponed, more = cut(shard["postponed"])
        lines.append(f"  postponed rows: {len(shard['postponed'])}")
        lines += [
            f"    {p['sample_id']} -> step {p['target_step']}: postponed {p['times_postponed']}x, first step "
            f"{p['first_step']}, staleness {p['staleness']}"
            for p in postponed
        ]
        lines += [more] if more else []
        lines.append(f"  in-flight leases: {len(shard['in_flight'])}")
        lines += [
            f"    step {f['step']} held by {f['owner']!r}, "
            + (f"expires in {f['expires_in_s']:.1f}s" if f["expires_in_s"] >= 0 else "expired")
            for f in shard["in_flight"]
        ]
        dead, more = cut(shard["dead_letters"])
        lines.append(f"  dead letters: {len(shard['dead_letters'])}")
        lines += [
            f"    {d['ref']} (step {d['step']}, {d['payload_bytes']} bytes): {d['reason']}" for d in dead
        ]
        lines += [more] if more else []
    return lines
