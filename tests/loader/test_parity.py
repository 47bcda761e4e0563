"""Side by side with torch.utils.data.DataLoader: same values, dtypes, containers and order, epoch after
epoch, and the same random numbers drawn."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader.server import FAKE_URL
from tests.loader.conftest import assert_same_epochs
from tests.servers import RedisServer

N = 23
EPOCHS = 3

SAMPLES: dict[str, Callable[[int], Any]] = {
    "tensor": lambda i: torch.arange(3) * i,
    "tuple": lambda i: (torch.tensor(i), i, float(i) / 2),
    "dict": lambda i: {"ids": torch.full((2,), i), "text": f"t{i}", "arr": np.arange(2.0, dtype=np.float32)},
    "numpy": lambda i: np.arange(4, dtype=np.float64) * i,
    "string": lambda i: f"item-{i}",
    "int": lambda i: i,
}


def dataset(kind: str = "dict", n: int = N) -> list[Any]:
    return [SAMPLES[kind](i) for i in range(n)]


def pair_collate(batch: list[Any]) -> dict[str, Any]:
    return {"n": len(batch), "first": batch[0], "ids": torch.stack([b["ids"] for b in batch]).sum(0)}


def run_both(
    make_kwargs: Callable[[], dict[str, Any]],
    data: list[Any],
    url: str,
    *,
    epochs: int = EPOCHS,
    global_seed: int | None = None,
) -> None:
    """Iterate both loaders ``epochs`` times with freshly built (identically seeded) arguments."""
    if global_seed is not None:
        torch.manual_seed(global_seed)
    ref_loader = tud.DataLoader(data, **make_kwargs())
    reference = [list(ref_loader) for _ in range(epochs)]
    ref_after = torch.rand(3)
    if global_seed is not None:
        torch.manual_seed(global_seed)
    loader = prl.DataLoader(data, redis_url=url, **make_kwargs())
    assert len(loader) == len(ref_loader)
    got = [list(loader) for _ in range(epochs)]
    if global_seed is not None:
        assert torch.equal(torch.rand(3), ref_after), "the loaders drew different random numbers"
    assert_same_epochs(reference, got)
    loader.close()


def seeded(seed: int = 7) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


CASES: dict[str, Callable[[], dict[str, Any]]] = {
    "sequential": lambda: {"batch_size": 4},
    "sequential_drop_last": lambda: {"batch_size": 4, "drop_last": True},
    "shuffle_generator": lambda: {"batch_size": 4, "shuffle": True, "generator": seeded()},
    "shuffle_generator_drop_last": lambda: {"batch_size": 5, "shuffle": True, "drop_last": True,
                                           "generator": seeded()},
    "batch_size_none": lambda: {"batch_size": None, "shuffle": True, "generator": seeded()},
    "custom_collate": lambda: {"batch_size": 3, "collate_fn": pair_collate, "shuffle": True,
                               "generator": seeded()},
    "sampler": lambda: {"batch_size": 4,
                        "sampler": tud.SubsetRandomSampler(range(3, 20), generator=seeded(1))},
    "weighted_sampler": lambda: {"batch_size": 2, "sampler": tud.WeightedRandomSampler(
        [1.0] * 10 + [3.0] * 13, num_samples=15, generator=seeded(2))},
    "batch_sampler": lambda: {"batch_sampler": tud.BatchSampler(
        tud.RandomSampler(range(N), generator=seeded(3)), batch_size=6, drop_last=False)},
    "batch_sampler_list": lambda: {"batch_sampler": [[0, 5, 2], [7], [22, 21, 20, 19]]},
    "pin_memory": lambda: {"batch_size": 4, "shuffle": True, "generator": seeded(), "pin_memory": True},
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(CASES))
def test_parity_fakeredis(case: str) -> None:
    run_both(CASES[case], dataset(), FAKE_URL)


@pytest.mark.parametrize("kind", sorted(SAMPLES))
@pytest.mark.parametrize("shuffle", [False, True])
def test_parity_sample_types(kind: str, shuffle: bool) -> None:
    run_both(lambda: {"batch_size": 4, "shuffle": shuffle, "generator": seeded()}, dataset(kind), FAKE_URL)


@pytest.mark.parametrize("batch_size", [4, None])
def test_parity_global_rng(batch_size: int | None) -> None:
    """Without a generator both loaders draw from torch's global RNG, identically."""
    run_both(lambda: {"batch_size": batch_size, "shuffle": True}, dataset("tensor"), FAKE_URL, global_seed=11)


def test_parity_real_server(redis_server: RedisServer) -> None:
    for case in ("shuffle_generator_drop_last", "batch_sampler", "custom_collate"):
        run_both(CASES[case], dataset(), redis_server.url)


@pytest.mark.parametrize(
    "make_kwargs",
    [
        lambda: {"batch_size": 4, "shuffle": True, "generator": seeded(), "num_workers": 2},
        lambda: {"batch_size": None, "num_workers": 2},
        lambda: {"batch_size": 3, "shuffle": True, "generator": seeded(), "num_workers": 2,
                 "persistent_workers": True, "drop_last": True},
        lambda: {"batch_size": 4, "shuffle": True, "num_workers": 2, "collate_fn": pair_collate},
        lambda: {"batch_size": 4, "num_workers": 2, "pin_memory": True},
    ],
    ids=["shuffle", "no_batching", "persistent", "global_rng_collate", "pin_memory"],
)  # fmt: skip
def test_parity_workers(redis_server: RedisServer, make_kwargs: Callable[[], dict[str, Any]]) -> None:
    run_both(make_kwargs, dataset(), redis_server.url, epochs=2, global_seed=5)


@pytest.mark.slow
def test_parity_spawned_workers(redis_server: RedisServer) -> None:
    """Worker copies carry no sampler or generator (a torch.Generator does not always pickle to a worker)."""
    kwargs = {"batch_size": 4, "shuffle": True, "num_workers": 2, "multiprocessing_context": "spawn"}
    run_both(lambda: {**kwargs, "generator": seeded()}, dataset(), redis_server.url, epochs=1)
