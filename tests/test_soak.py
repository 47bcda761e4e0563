"""Soak: 4 competing consumer processes and one producer on one endless run, for PR_LOADER_SOAK_SECONDS
(default 20 in CI; set e.g. 3600 by hand).

The producer materialises steps a window ahead of the cursor; consumers claim, prefetch, postpone (a few steps
ahead) and commit, logging every committed step. At the end: every row of every closed epoch committed exactly
once, no duplicate anywhere, no dead letter, and Redis memory bounded by what ``retain_steps`` keeps (the key
counts per kind, and ``used_memory`` growth after the warm-up). Prints rows/s, p99 step latency and
``used_memory`` at start and end.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pr_loader.errors import NeedsMaterialisation, NoStepReady, StepStateError
from pr_loader.store.batch_store import BatchStore
from pr_loader.store.connection import connect
from pr_loader.store.records import RunConfig
from tests.chaos.helpers import check_exactly_once
from tests.servers import REDIS_SERVER, RedisServer

pytestmark = [pytest.mark.slow, pytest.mark.redis]

CONSUMERS = 4
BATCH = 8
STEPS_PER_EPOCH = 40
RETAIN = 8
WINDOW = 12  # producer materialises up to next_step + WINDOW
POSTPONE_AHEAD = 6
PAYLOAD_BYTES = 512
RUN = "soak"


def soak_seconds() -> float:
    return float(os.environ.get("PR_LOADER_SOAK_SECONDS", "") or 20.0)


def _config() -> RunConfig:
    return RunConfig(
        RUN,
        batch_size=BATCH,
        steps_per_epoch=STEPS_PER_EPOCH,
        dataset_fingerprint="soak",
        seed=3,
        policy="PostponeToNext",
        num_epochs=None,
        retain_steps=RETAIN,
    )


def _fresh_rows(step: int) -> list[tuple[int, bytes]]:
    epoch, b = divmod(step, STEPS_PER_EPOCH)
    order = list(range(BATCH * STEPS_PER_EPOCH))
    random.Random(f"soak:{epoch}").shuffle(order)
    filler = bytes(PAYLOAD_BYTES)
    return [(i, f"{epoch}:{i}|".encode() + filler) for i in order[b * BATCH : (b + 1) * BATCH]]


def _producer(url: str, stop_at: float) -> None:
    client = connect(url)
    store = BatchStore.open(client, _config())
    done = -1
    while time.time() < stop_at:
        next_step = int(client.hget(store.keys.meta, "next_step") or 0)
        todo = [s for s in range(max(done + 1, next_step), next_step + WINDOW)]
        for s in todo:
            store.materialise(s, _fresh_rows(s))
            done = s
        if not todo:
            time.sleep(0.002)  # nothing to do until consumers move the cursor
    client.close()


def _consumer(url: str, cid: str, stop_at: float, log_path: str, seed: int) -> None:
    client = connect(url)
    store = BatchStore.open(client, _config())
    rng = random.Random(seed)
    with open(log_path, "w") as log:
        while time.time() < stop_at:
            started = time.perf_counter()
            try:
                claimed = store.claim(cid, 30.0)
            except (NeedsMaterialisation, NoStepReady):
                time.sleep(0.002)  # the producer is behind
                continue
            if claimed is None:
                break
            step = claimed.step
            last = (step // STEPS_PER_EPOCH + 1) * STEPS_PER_EPOCH - 1
            if rng.random() < 0.3 and step < last:
                store.prefetch(step, cid, rng.randint(1, 3), min(last, step + 2))
            rows = store.read_rows(step)
            if rows and rng.random() < 0.4:
                picked = rng.sample(rows, rng.randint(1, min(3, len(rows))))
                # the target may be claimed already by a faster consumer: then keep the rows
                with contextlib.suppress(StepStateError):
                    store.postpone(step, cid, [(r.ref, r.payload) for r in picked], step + POSTPONE_AHEAD)
                rows = store.read_rows(step)
            store.commit(step, cid)
            latency = time.perf_counter() - started
            log.write(
                json.dumps({"step": step, "rows": [r.ref.key() for r in rows], "latency": latency}) + "\n"
            )
    client.close()


def _payloads_beyond_live_steps(client: Any) -> tuple[int, int]:
    """(stored payloads, how many more than the steps garbage collection must keep could hold), read at
    once. The steps kept run from ``gc_floor`` (collection stops at the lowest step not yet committed: a
    consumer descheduled mid-step holds it back, so this window widens under load) to what the producer
    and the postpones reach ahead of the cursor; each holds at most BATCH + 3 rows, in two versions."""
    payloads, next_step, gc_floor = map(
        int, client.hmget(f"prl:{{{RUN}:0}}:meta", ["payloads", "next_step", "gc_floor"])
    )
    live = next_step + WINDOW + POSTPONE_AHEAD + 2 * CONSUMERS - gc_floor
    return payloads, payloads - live * (BATCH + 3) * 2


def _step_keys(client: Any, kind: str) -> list[str]:
    return [k.decode() for k in client.scan_iter(match=f"prl:{{{RUN}:0}}:{kind}:*", count=1000)]


def _key_kinds(client: Any) -> Counter[str]:
    kinds: Counter[str] = Counter()
    for key in client.scan_iter(match=f"prl:{{{RUN}:0}}:*", count=1000):
        rest = key.decode().split("}:", 1)[1]
        kinds[rest.split(":", 1)[0]] += 1
    return kinds


@pytest.fixture
def soak_server(tmp_path: Path) -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.skip("redis-server binary not installed")
    server = RedisServer(tmp_path / "soak", appendfsync="everysec").start()
    yield server
    server.stop()


def test_soak(soak_server: RedisServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    duration = soak_seconds()
    client = soak_server.client()
    used_start = int(client.info("memory")["used_memory"])
    ctx = multiprocessing.get_context("fork")
    start = time.time()
    stop_at = start + duration
    warm_at = start + min(5.0, duration / 4)
    procs = [ctx.Process(target=_producer, args=(soak_server.url, stop_at + 1.0), daemon=True)]
    logs = [tmp_path / f"consumer{i}.jsonl" for i in range(CONSUMERS)]
    procs += [
        ctx.Process(target=_consumer, args=(soak_server.url, f"c{i}", stop_at, str(logs[i]), i), daemon=True)
        for i in range(CONSUMERS)
    ]
    for p in procs:
        p.start()
    used_warm = 0
    peak_payloads = 0
    peak_excess = -1
    try:
        while time.time() < stop_at + 1.0 and any(p.is_alive() for p in procs[1:]):
            time.sleep(0.5)  # sample memory while the processes work
            if not used_warm and time.time() >= warm_at:
                used_warm = int(client.info("memory")["used_memory"])
            payloads, excess = _payloads_beyond_live_steps(client)
            peak_payloads, peak_excess = max(peak_payloads, payloads), max(peak_excess, excess)
        for p in procs:
            p.join(timeout=30)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join(10)
    assert all(p.exitcode == 0 for p in procs), [p.exitcode for p in procs]
    elapsed = time.time() - start
    used_end = int(client.info("memory")["used_memory"])

    # exactly once -------------------------------------------------------------------------------------
    records = [json.loads(line) for path in logs for line in path.read_text().splitlines()]
    steps = Counter(r["step"] for r in records)
    assert not [s for s, n in steps.items() if n > 1], "a step was committed twice"
    keys = [k for r in records for k in r["rows"]]
    dup = [k for k, n in Counter(keys).items() if n > 1]
    assert not dup, f"rows committed twice: {dup[:10]}"
    committed = sorted(steps)
    contiguous = -1
    for s in committed:
        if s != contiguous + 1:
            break
        contiguous = s
    # epoch e is closed when every step up to the end of epoch e + 1 is committed (rows postponed out of e
    # land at most POSTPONE_AHEAD steps later, in e or e + 1)
    closed = [
        e for e in range(contiguous // STEPS_PER_EPOCH + 1) if (e + 2) * STEPS_PER_EPOCH - 1 <= contiguous
    ]
    by_epoch: dict[int, list[str]] = {}
    for k in keys:
        by_epoch.setdefault(int(k.split(":", 1)[0]), []).append(k)
    for e in closed:
        report = check_exactly_once(
            by_epoch.get(e, []), [f"{e}:{i}" for i in range(BATCH * STEPS_PER_EPOCH)], tally=None
        )
        assert report.ok, f"epoch {e}: {report.describe()}"
    store = BatchStore.open(connect(soak_server.url), _config())
    stats = store.stats()
    assert stats.dead_letters == 0

    # memory bounded by retain_steps --------------------------------------------------------------------
    kinds = _key_kinds(client)
    live_steps = RETAIN + WINDOW + POSTPONE_AHEAD + 2 * CONSUMERS + 2
    payload_bound = live_steps * (BATCH + 3) * 2
    bounds = {
        "journal": live_steps,
        "claimed": live_steps,
        "rows": live_steps,
        "batch": live_steps,
        "arrivals": live_steps,
        "payload": payload_bound,
        "stage": payload_bound,
    }
    too_many = {k: (kinds[k], b) for k, b in bounds.items() if kinds[k] > b}
    latencies = sorted(r["latency"] for r in records)
    p99 = latencies[int(0.99 * (len(latencies) - 1))] if latencies else float("nan")
    line = (
        f"soak: {elapsed:.1f}s {len(committed)} steps {len(keys) / elapsed:.0f} rows/s p99 step "
        f"{p99 * 1000:.1f} ms closed epochs {len(closed)} used_memory start {used_start} warm {used_warm} "
        f"end {used_end} payloads {stats.payloads} (peak {peak_payloads}) keys {dict(kinds)}"
    )
    with capsys.disabled():
        print("\n" + line)
    assert len(closed) >= 1, f"the soak did not close a single epoch: {line}"
    assert not too_many, f"keys beyond what retain_steps allows (count, bound): {too_many}; {line}"
    assert peak_excess <= 0, f"payloads beyond the live steps while running: {peak_excess}; {line}"
    assert stats.payloads <= payload_bound, f"payloads {stats.payloads} > {payload_bound} at the end; {line}"
    # op results are kept (TTL one day) for retries: they must not grow with the number of steps either
    assert kinds["op"] <= live_steps * 4, f"{kinds['op']} op:<id> keys after {len(committed)} steps; {line}"
    # nothing may stay behind for a garbage-collected step (keys without a TTL would stay for ever)
    per_step = ("batch", "arrivals", "rows", "journal", "claimed", "opids")
    orphans = sorted(
        key
        for kind in per_step
        for key in _step_keys(client, kind)
        if int(key.rsplit(":", 1)[1]) < stats.gc_floor
    )
    assert not orphans, f"{len(orphans)} keys of collected steps (< {stats.gc_floor}): {orphans[:8]}; {line}"
    growth = used_end - used_warm
    assert growth <= 2_000_000, f"used_memory grew by {growth} bytes after the warm-up; {line}"
    client.close()
