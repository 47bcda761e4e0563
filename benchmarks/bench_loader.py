"""pr_loader.DataLoader benchmarks: background prefetch, data path against raw redis-py, big samples,
resume latency on a 1M-sample run, and torch / torchdata loaders side by side.

Run by hand: ``.venv/bin/python benchmarks/bench_loader.py [--quick] [--stock-allocator] [--no-aof-rewrite]``.
Starts its own ``redis-server`` on a free port in a temp dir (never 6379), with the jemalloc option
pr_loader's embedded server and docker-compose.yml set (``--stock-allocator``: without it), and prints a
markdown table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

T_START = time.time()  # for the resume child: the process started just before this line

# (d)'s resume child is a trainer process: it imports torch, then pr_loader's public name, and nothing of the
# benchmark's peers (redis-py for the raw reads is imported where they run)
import torch  # noqa: E402
import torch.utils.data as tud  # noqa: E402

T_TORCH = time.time()
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from pr_loader import DataLoader  # noqa: E402

T_IMPORTED = time.time()

BATCH = 256
MiB = 1 << 20


def rl_sample(i: int) -> dict[str, Any]:
    """An RL prompt sample: 1024-token ids / mask / positions, a prompt string, an index."""
    return {
        "input_ids": (torch.arange(1024, dtype=torch.int64) * 7 + i) % 150_000,
        "attention_mask": torch.ones(1024, dtype=torch.int64),
        "position_ids": torch.arange(1024, dtype=torch.int64),
        "prompt": f"Question {i}: solve the following problem step by step. " * 8,
        "index": i,
    }


class Synthetic(tud.Dataset[dict[str, Any]]):
    """``n`` small items computed on demand (a 1M-sample dataset without 1M objects in memory)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": torch.full((8,), i, dtype=torch.int64), "index": i}


@contextmanager
def redis_server(stock_allocator: bool = False, aof_rewrite: bool = True) -> Iterator[str]:
    """bench_store's redis-server (free port, never 6379), with AOF everysec, in a temp dir; ``aof_rewrite``
    False turns its automatic AOF rewrite off (``auto-aof-rewrite-percentage 0``)."""
    import redis
    from bench_store import start_server  # (here: the resume child does not need it)

    tmp = tempfile.mkdtemp(prefix="prl-bench-")
    proc, port = start_server(tmp, "everysec", stock_allocator)
    if not aof_rewrite:
        redis.Redis(port=port).config_set("auto-aof-rewrite-percentage", 0)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        shutil.rmtree(tmp, ignore_errors=True)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.2f} ms"


def materialised_loader(
    data: Any, url: str, batch: int, epochs: int = 1, seed: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A loader whose first ``epochs`` epochs are already written to Redis (so timing covers reads only)."""
    loader = DataLoader(
        data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed), redis_url=url,
        pin_memory=pin_memory,
    )  # fmt: skip
    for _ in range(epochs):
        materialise_next_epoch(loader)
    return loader


def materialise_next_epoch(loader: DataLoader) -> None:
    """Write the first epoch not yet in Redis, then wait for the AOF rewrite those writes may have started:
    a forked child writing the whole dataset would slow whichever side is timed while it runs."""
    source = loader.source
    epoch = source.current_epoch()
    while source.shard().store.is_materialised(epoch * source.steps_per_epoch):
        epoch += 1
    source.ensure_plan(epoch)
    for step in range(epoch * source.steps_per_epoch, (epoch + 1) * source.steps_per_epoch):
        source.materialise(step)
    quiet(source.shard().client)


def quiet(client: Any, timeout: float = 120.0) -> None:
    """Wait until Redis has no background rewrite or save running, scheduled, or due. A due one matters:
    the server's cron starts an automatic AOF rewrite up to 1/hz s (100 ms) after the writes that made it
    due, so a check right after those writes finds nothing running, and the rewrite then runs (a forked
    child on one of the two cores, its CPU not in the server's ``INFO cpu``) inside whatever is timed
    next. ``due`` is the cron's own test (``auto-aof-rewrite-percentage`` / ``-min-size``)."""
    config = client.config_get("auto-aof-rewrite-*")  # (redis-py decodes CONFIG GET's names and values)
    percentage = int(config["auto-aof-rewrite-percentage"])
    min_size = int(config["auto-aof-rewrite-min-size"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = client.info("persistence")
        flags = ("aof_rewrite_in_progress", "aof_rewrite_scheduled", "rdb_bgsave_in_progress")
        busy = any(info.get(flag) for flag in flags)
        current, base = int(info.get("aof_current_size", 0)), max(1, int(info.get("aof_base_size", 0)))
        due = bool(info.get("aof_enabled")) and percentage > 0 and current > min_size and (
            current * 100 // base - 100 >= percentage
        )
        if not busy and not due:
            return
        time.sleep(0.05)
    sys.exit(f"redis-server still busy with a background rewrite or save after {timeout:.0f} s")


class CpuMeter:
    """CPU seconds spent inside ``with`` blocks by this process (all threads) and by the Redis server (its
    ``INFO cpu``, all threads): where a step's time goes on a machine whose cores the two share. Also the
    server's minor page faults (``/proc/<pid>/stat``, Linux only)."""

    def __init__(self, client: Any) -> None:
        self.client = client
        self.mine = self.server = 0.0
        self.faults = 0
        self._stat = Path(f"/proc/{client.info('server')['process_id']}/stat")

    def _server(self) -> float:
        info = self.client.info("cpu")
        return float(info["used_cpu_user"]) + float(info["used_cpu_sys"])

    def _server_faults(self) -> int:
        if not self._stat.exists():  # (not Linux; the server is always this benchmark's own, local one)
            return 0
        return int(self._stat.read_text().rsplit(")", 1)[1].split()[7])  # (field 10: minflt)

    def __enter__(self) -> None:
        self._start = (time.process_time(), self._server(), self._server_faults())

    def __exit__(self, *exc: object) -> None:
        self.mine += time.process_time() - self._start[0]
        self.server += self._server() - self._start[1]
        self.faults += self._server_faults() - self._start[2]

    def per(self, steps: int) -> str:
        return f"{ms(self.mine / steps)} + {ms(self.server / steps)}"

    def faults_per(self, steps: int) -> str:
        return f"{self.faults / steps:.0f}"


def work_in_python(seconds: float) -> None:
    """A consumer busy in Python bytecode (holding the GIL, as a Python-heavy training step does)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def bench_prefetch(
    url: str, data: list[dict[str, Any]], epochs: int, materialised: bool, busy: bool = False,
    pin_memory: bool = False,
) -> dict[str, str]:
    """(a) wait for the next batch while the consumer works 20 ms per step (and then drops the batch, so that
    the timed ``next()`` does not include freeing the previous one); order identical to torch.
    ``materialised``: the steps were written to Redis beforehand (else the loader writes them lazily).
    ``busy``: the consumer's 20 ms are Python bytecode holding the GIL, not a sleep (a GPU wait releases it),
    so the loader's threads get the GIL only at the interpreter's switch interval (5 ms). ``pin_memory``:
    batches pinned (on the build thread) for a consumer that copies them to a GPU (main() runs it only
    where an accelerator is)."""
    if materialised:
        loader = materialised_loader(data, url, BATCH, epochs, seed=1, pin_memory=pin_memory)
    else:
        loader = DataLoader(
            data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1), redis_url=url
        )
    reference = tud.DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(1)
    )
    waits: list[float] = []
    identical = pinned = True
    for _ in range(epochs):
        it = iter(loader)
        for k, expected in enumerate(reference):
            t0 = time.perf_counter()
            batch = next(it)
            if k > 0:  # the first batch of an epoch has nothing to overlap with
                waits.append(time.perf_counter() - t0)
            identical &= bool(torch.equal(batch["input_ids"], expected["input_ids"]))
            pinned &= batch["input_ids"].is_pinned()
            if busy:
                work_in_python(0.02)
            else:
                time.sleep(0.02)
            del batch  # the consumer is done with it: freeing its 6 MB is its cost, not the next wait's
    waits.sort()
    loader.close()
    how = "steps already in Redis" if materialised else "lazy materialisation: dataset -> encode -> Redis"
    if busy:
        how += "; the consumer's 20 ms are Python holding the GIL"
    if pin_memory:
        how += "; pin_memory=True"
    rows = {
        f"(a) wait for next batch, p50 (consumer works 20 ms/step; {how})": ms(statistics.median(waits)),
        f"(a) wait for next batch, p90 ({how})": ms(waits[int(len(waits) * 0.9)]),
        f"(a) batches identical to torch.utils.data.DataLoader ({how})": "yes" if identical else "NO",
    }
    if pin_memory:
        rows[f"(a) batches pinned ({how})"] = "yes" if pinned else "NO"
    return rows


def bench_prefetch_partial(
    url: str, data: list[dict[str, Any]], epochs: int, commit: bool = False
) -> dict[str, str]:
    """(a) with a postponing policy (``PostponeToNext``, linked views), the partial-rollout case: every step
    postpones 8 rows with a partial output into the next one, then the consumer works 20 ms. The next step
    is read, built and claimed ahead, again after the postpone (which gives the claim ahead back: rows
    postponed into it must arrive there). ``commit``: the consumer commits its view after the postpone
    (before its 20 ms of work)."""
    import numpy as np

    from pr_loader import PostponeToNext

    loader = DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(2), redis_url=url,
        linked=True, policy=PostponeToNext(),
    )  # fmt: skip
    for _ in range(epochs):
        materialise_next_epoch(loader)
    waits: list[float] = []
    for _ in range(epochs):
        it = iter(loader)
        for k in itertools.count():
            t0 = time.perf_counter()
            view = next(it, None)
            if view is None:
                break
            if k > 0:
                waits.append(time.perf_counter() - t0)
            unfinished = view.select_idxs(list(range(min(8, len(view)))))
            partial = np.array(["..."] * len(unfinished), dtype=object)
            unfinished.non_tensor_batch["partial_response"] = partial
            view.postpone_samples(unfinished)
            if commit:
                view.commit()
            time.sleep(0.02)
            del view, unfinished
    loader.close()
    waits.sort()
    how = "PostponeToNext, linked views, 8 rows postponed per step"
    if commit:
        how += ", the view committed after its postpone"
    return {
        f"(a) wait for next batch, p50 (consumer works 20 ms/step; {how})": ms(statistics.median(waits)),
        f"(a) wait for next batch, p90 ({how})": ms(waits[int(len(waits) * 0.9)]),
    }


def bench_view_moves(url: str, data: list[dict[str, Any]], epochs: int) -> dict[str, str]:
    """Partial rollout's two moves through a linked view of 256 RL rows (``PostponeToNext``): a prefetch of
    16 rows and a postpone of 8 (with a partial output), p50 over the steps, each beside the raw redis-py cost
    of moving the same bytes (LPOP of 16 payloads, RPUSH of 8), taking turns. A move also keeps the view in
    step (rows join or leave its columns) and gives the step claimed ahead back; the loader then reads and
    claims that step again on its thread, so each move waits 30 ms for that to settle before it is timed."""
    import numpy as np
    import redis

    from pr_loader import PostponeToNext, codec

    loader = DataLoader(
        data, batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3), redis_url=url,
        linked=True, policy=PostponeToNext(),
    )  # fmt: skip
    for _ in range(epochs + 1):  # (prefetches reach into the next epoch's first step)
        materialise_next_epoch(loader)
    client = redis.Redis.from_url(url)
    payloads = [codec.encode(sample) for sample in data[:16]]
    times: dict[str, list[float]] = {"prefetch": [], "postpone": [], "raw prefetch": [], "raw postpone": []}
    for _ in range(epochs):
        for view in loader:
            client.delete("bench:moves")
            client.rpush("bench:moves", *payloads)
            time.sleep(0.03)
            t0 = time.perf_counter()
            client.lpop("bench:moves", 16)
            t1 = time.perf_counter()
            view.prefetch_samples(16)
            t2 = time.perf_counter()
            times["raw prefetch"].append(t1 - t0)
            times["prefetch"].append(t2 - t1)
            unfinished = view.select_idxs(list(range(0, 64, 8)))
            unfinished.non_tensor_batch["partial_response"] = np.array(["..."] * 8, dtype=object)
            time.sleep(0.03)
            t0 = time.perf_counter()
            view.postpone_samples(unfinished)
            t1 = time.perf_counter()
            client.rpush("bench:moves", *payloads[:8])
            t2 = time.perf_counter()
            times["postpone"].append(t1 - t0)
            times["raw postpone"].append(t2 - t1)
            del view, unfinished
    loader.close()
    client.delete("bench:moves")
    out = {}
    for move, what in (("prefetch", "prefetch_samples(16)"), ("postpone", "postpone_samples(8)")):
        ours, raw = statistics.median(times[move]), statistics.median(times["raw " + move])
        out[f"(a) {what} of a 256-row linked view, p50 (raw redis-py moving the same bytes)"] = (
            f"{ms(ours)} ({ms(raw)}: {ours / raw:.1f}x)"
        )
    return out


def bench_data_path(url: str, data: list[dict[str, Any]], epochs: int) -> dict[str, str]:
    """(b) fetch + decode + collate per step against raw LRANGE of the same payload bytes.

    The raw side reads an epoch's worth of lists (one per step, the same rows), in turn, so both sides move
    the same bytes from the same footprint (re-reading one hot list would flatter it). Epochs of ours and
    runs of raw LRANGEs alternate (the VM's load drifts), and so does which of the two goes first after the
    epoch written ahead (see :func:`bench_big`); both are per-step medians (ours: the time between
    consecutive batches of an epoch, the epoch's start being iterator setup)."""
    import redis

    from pr_loader import codec

    rounds = 2 * epochs
    loader = materialised_loader(data, url, BATCH)
    client = redis.Redis.from_url(url)
    steps = len(data) // BATCH
    raw_keys = [f"bench:raw:{s}" for s in range(steps)]
    for s, key in enumerate(raw_keys):
        client.delete(key)
        client.rpush(key, *[codec.encode(sample) for sample in data[s * BATCH : (s + 1) * BATCH]])
    ours_times: list[float] = []
    raw_times: list[float] = []
    ours_cpu = CpuMeter(client)
    raw_cpu = CpuMeter(client)

    def ours_epoch() -> None:
        it = iter(loader)
        next(it)
        t0 = time.perf_counter()
        with ours_cpu:
            for _batch in it:
                t1 = time.perf_counter()
                ours_times.append(t1 - t0)
                t0 = t1

    def raw_epoch() -> None:
        with raw_cpu:
            for key in raw_keys:
                t0 = time.perf_counter()
                client.lrange(key, 0, -1)
                raw_times.append(time.perf_counter() - t0)

    for r in range(rounds):
        materialise_next_epoch(loader)  # (one epoch ahead: the Redis footprint stays two epochs)
        for side in (ours_epoch, raw_epoch) if r % 2 == 0 else (raw_epoch, ours_epoch):
            side()  # (who goes first after the materialisation alternates: see bench_big)
    loader.close()
    quiet(client)
    # the same path without the pipeline around it: claim -> decode -> collate of one step, then its commit
    # (untimed), each step followed by the raw read of one list
    source = loader.source
    source.release_inflight()
    serial: list[float] = []
    serial_raw: list[float] = []
    claims = source.claim_steps(source.current_epoch())
    for key in raw_keys:
        t0 = time.perf_counter()
        claimed = next(claims)
        source.collate(source.decode(claimed))
        serial.append(time.perf_counter() - t0)
        source.commit(claimed.step)
        t0 = time.perf_counter()
        client.lrange(key, 0, -1)
        serial_raw.append(time.perf_counter() - t0)
    mb = sum(len(p) for p in client.lrange(raw_keys[0], 0, -1)) / MiB
    client.delete(*raw_keys)
    ours, raw = statistics.median(ours_times), statistics.median(raw_times)
    alone, alone_raw = statistics.median(serial), statistics.median(serial_raw)
    return {
        f"(b) pr_loader per step, batch to batch ({BATCH} x {mb / BATCH * 1024:.0f} KiB)": ms(ours),
        "(b) raw redis-py LRANGE of the same bytes": ms(raw),
        "(b) ratio, batch to batch (target <= 2x)": f"{ours / raw:.2f}x",
        "(b) fetch+decode+collate alone: claim -> batch, serial (raw LRANGE beside it)": (
            f"{ms(alone)} ({ms(alone_raw)})"
        ),
        "(b) ratio, fetch+decode+collate alone (target <= 2x)": f"{alone / alone_raw:.2f}x",
        "(b) CPU per step, batch to batch: this process + redis-server (raw LRANGE beside it)": (
            f"{ours_cpu.per(len(ours_times))} ({raw_cpu.per(len(raw_times))})"
        ),
        "(b) redis-server page faults per step (raw LRANGE beside it)": (
            f"{ours_cpu.faults_per(len(ours_times))} ({raw_cpu.faults_per(len(raw_times))})"
        ),
    }


def bench_big(url: str, epochs: int) -> dict[str, str]:
    """(c) throughput of 1 MiB samples against the pipelined redis-py ceiling: the raw side GETs the same
    256 distinct payloads (16 per pipeline), so both move the same bytes from the same footprint. Epochs of
    ours and of the raw reads alternate (the VM's load drifts), after one untimed round of each: the first
    reads of a process and of the server's reply buffers fault their pages in, whichever side goes first.
    Which side goes first after each epoch written ahead alternates too: those writes start an AOF rewrite,
    whose fork leaves every page of the server write-protected, and the first side to read after it pays
    the server's page faults (measured: 500-700 per step of 16 MiB for the first side, 0-13 for the
    second)."""
    import redis

    from pr_loader import codec

    n, batch = 256, 16  # 16 steps per epoch: an epoch start (iterator setup, first claim) is not the rate
    data = [{"blob": torch.full((MiB,), i % 251, dtype=torch.uint8)} for i in range(n)]
    rounds = 2 * epochs
    loader = materialised_loader(data, url, batch)
    client = redis.Redis.from_url(url)
    raw_bytes = 0
    for i in range(n):
        payload = codec.encode(data[i])
        raw_bytes += len(payload)
        client.set(f"bench:big:{i}", payload)
    took = {(side, first): 0.0 for side in ("ours", "raw") for first in (True, False)}  # (seconds)
    ours_cpu, raw_cpu, skipped = CpuMeter(client), CpuMeter(client), CpuMeter(client)

    def ours_epoch(meter: CpuMeter) -> float:
        t0 = time.perf_counter()
        with meter:
            for _batch in loader:
                pass
        return time.perf_counter() - t0

    def raw_epoch(meter: CpuMeter) -> float:
        t0 = time.perf_counter()
        with meter:
            for first in range(0, n, batch):
                pipe = client.pipeline(transaction=False)
                for i in range(first, first + batch):
                    pipe.get(f"bench:big:{i}")
                pipe.execute()
        return time.perf_counter() - t0

    for r in range(rounds + 1):  # round 0: the warm-up
        if r:
            materialise_next_epoch(loader)  # (the Redis footprint stays two epochs of ours + the raw keys)
        ours_first = r % 2 == 0  # (the side read first after the epoch written ahead pays its page faults)
        if ours_first:
            ours_took, raw_took = ours_epoch(ours_cpu if r else skipped), raw_epoch(raw_cpu if r else skipped)
        else:
            raw_took, ours_took = raw_epoch(raw_cpu), ours_epoch(ours_cpu)
        if r:
            took["ours", ours_first] += ours_took
            took["raw", not ours_first] += raw_took
    loader.close()
    client.delete(*[f"bench:big:{i}" for i in range(n)])

    def rate(side: str, *firsts: bool) -> float:  # MB/s over the rounds where the side read first (or not)
        megabytes = (n * MiB if side == "ours" else raw_bytes) / MiB * (rounds // 2) * len(firsts)
        return megabytes / sum(took[side, first] for first in firsts)  # (each order: half the rounds)

    ours, raw = rate("ours", True, False), rate("raw", True, False)
    return {
        "(c) 1 MiB samples through pr_loader": f"{ours:.0f} MB/s",
        "(c) raw redis-py pipelined GET ceiling": f"{raw:.0f} MB/s",
        "(c) ratio (target >= 0.7x)": f"{ours / raw:.2f}x",
        "(c) ratio, ours read first after the epoch written ahead / raw read first": (
            f"{rate('ours', True) / rate('raw', False):.2f}x / {rate('ours', False) / rate('raw', True):.2f}x"
        ),
        f"(c) CPU per step of {batch} samples: this process + redis-server (raw GETs beside it)": (
            f"{ours_cpu.per(rounds * n // batch)} ({raw_cpu.per(rounds * n // batch)})"
        ),
        "(c) redis-server page faults per step (raw GETs beside it)": (
            f"{ours_cpu.faults_per(rounds * n // batch)} ({raw_cpu.faults_per(rounds * n // batch)})"
        ),
    }


def resume_child(url: str, run_id: str, state: str, spawned: float) -> None:
    """(d) child: resume the 1M-sample run from ``state`` and time the first batch."""
    t_build = time.time()
    loader = DataLoader(
        Synthetic(1_000_000), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3),
        redis_url=url, run_id=run_id,
    )  # fmt: skip
    loader.load_state_dict(json.loads(state))
    batch = next(iter(loader))
    t_first = time.time()
    loader.close()
    result = {"total": t_first - spawned, "after_imports": t_first - t_build, "imports": T_IMPORTED - T_START,
              "torch": T_TORCH - T_START}  # fmt: skip
    print(json.dumps({**result, "first_index": int(batch["index"][0])}))


def bench_resume(url: str, fractions: list[float]) -> dict[str, str]:
    """(d) process start -> first batch when resuming a 1M-sample run at several positions of an epoch."""
    run_id = f"resume-{os.getpid()}"
    steps_per_epoch = -(-1_000_000 // BATCH)
    done, out = 0, {}
    for fraction in fractions:
        target = int(steps_per_epoch * fraction)
        loader = DataLoader(
            Synthetic(1_000_000), batch_size=BATCH, shuffle=True, generator=torch.Generator().manual_seed(3),
            redis_url=url, run_id=run_id,
        )  # fmt: skip
        it = iter(loader)
        while done < target:
            next(it)
            done += 1
        state = json.dumps(loader.state_dict())
        loader.close()
        spawned = time.time()
        child = subprocess.run(
            [sys.executable, __file__, "--resume-child", url, run_id, state, repr(spawned)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        got = json.loads(child.stdout.strip().splitlines()[-1])
        out[f"(d) resume at step {target} ({fraction:.0%} of epoch): build -> first batch"] = ms(
            got["after_imports"]
        )
        ours = got["imports"] - got["torch"]
        imports = f"imports {got['imports']:.2f} s: torch {got['torch']:.2f} + pr_loader {ours:.2f}"
        out[f"(d) resume at step {target}: process start -> first batch ({imports})"] = (
            f"{got['total']:.2f} s"
        )
        out[f"(d) resume at step {target}: process start -> first batch without the imports"] = (
            f"{got['total'] - got['imports']:.2f} s"
        )
    return out


def bench_throughput(url: str, data: list[dict[str, Any]], epochs: int) -> dict[str, str]:
    """(e) samples/s, no consumer work: torch, torchdata StatefulDataLoader (snapshot every step), ours."""
    out = {}
    loaders: list[tuple[str, Any]] = [
        ("torch.utils.data.DataLoader", tud.DataLoader(data, batch_size=BATCH, shuffle=True)),
    ]
    try:
        from torchdata.stateful_dataloader import StatefulDataLoader

        loaders.append(
            ("torchdata StatefulDataLoader (snapshot_every_n_steps=1)",
             StatefulDataLoader(data, batch_size=BATCH, shuffle=True, snapshot_every_n_steps=1))
        )  # fmt: skip
    except ImportError:
        pass
    loaders.append(("pr_loader.DataLoader (materialise + claim + decode + collate)",
                    DataLoader(data, batch_size=BATCH, shuffle=True, redis_url=url)))  # fmt: skip
    for name, loader in loaders:
        t0, n = time.perf_counter(), 0
        for _ in range(epochs):
            for batch in loader:
                n += len(batch["index"])
        out[f"(e) {name}"] = f"{n / (time.perf_counter() - t0):,.0f} samples/s"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer epochs and resume positions")
    parser.add_argument(
        "--stock-allocator", action="store_true", help="redis-server without pr_loader's jemalloc option"
    )
    parser.add_argument(
        "--no-aof-rewrite", action="store_true",
        help="turn redis-server's automatic AOF rewrite off (its fork write-protects the heap)",
    )  # fmt: skip
    parser.add_argument(
        "--resume-child", nargs=4, metavar=("URL", "RUN", "STATE", "SPAWNED"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.resume_child:
        url, run_id, state, spawned = args.resume_child
        resume_child(url, run_id, state, float(spawned))
        return
    epochs = 1 if args.quick else 2
    data = [rl_sample(i) for i in range(2048)]
    rows: dict[str, str] = {}
    with redis_server(args.stock_allocator, aof_rewrite=not args.no_aof_rewrite) as url:
        rows.update(bench_prefetch(url, data, epochs, materialised=True))
        rows.update(bench_prefetch(url, data, epochs, materialised=False))
        rows.update(bench_prefetch(url, data, epochs, materialised=True, busy=True))
        if torch.accelerator.is_available():
            rows.update(bench_prefetch(url, data, epochs, materialised=True, pin_memory=True))
        rows.update(bench_prefetch_partial(url, data, epochs))
        rows.update(bench_prefetch_partial(url, data, epochs, commit=True))
        rows.update(bench_view_moves(url, data, epochs))
        rows.update(bench_data_path(url, data, epochs))
        rows.update(bench_big(url, epochs))
        rows.update(bench_resume(url, [0.5] if args.quick else [0.1, 0.5, 0.9]))
        rows.update(bench_throughput(url, data, epochs))
    allocator = "stock jemalloc" if args.stock_allocator else "jemalloc option"
    rewrite = ", AOF rewrite off" if args.no_aof_rewrite else ""
    header = f"measurement (torch {torch.__version__}, {os.cpu_count()} CPUs, {allocator}{rewrite})"
    print(f"\n| {header} | value |\n|---|---|")
    for name, value in rows.items():
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    main()
