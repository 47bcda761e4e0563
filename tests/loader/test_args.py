"""Argument parity with torch.utils.data.DataLoader and clear errors for what is not supported."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader.errors import ConfigError, PolicyError
from pr_loader.server import FAKE_URL
from tests.servers import RedisServer

DATA = list(range(10))
EXTRA = ["redis_url", "run_id", "linked", "policy", "rank", "world_size", "consumer_id", "lease_seconds",
         "retain_steps", "durability", "allow_pickle"]  # fmt: skip


def test_signature_is_torchs_plus_keyword_only_extras() -> None:
    ours = list(inspect.signature(prl.DataLoader.__init__).parameters.values())
    theirs = list(inspect.signature(tud.DataLoader.__init__).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[: len(theirs)]] == [
        (p.name, p.kind, p.default) for p in theirs
    ]
    assert [p.name for p in ours[len(theirs) :]] == EXTRA
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in ours[len(theirs) :])
    loader = prl.DataLoader(DATA, 3, redis_url=FAKE_URL)
    assert isinstance(loader, tud.DataLoader) and loader.batch_size == 3 and len(loader) == 4


class Stream(tud.IterableDataset[int]):
    def __iter__(self) -> Any:
        return iter(range(3))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dataset": Stream()}, "IterableDataset"),
        ({"shuffle": True, "sampler": tud.SequentialSampler(DATA)}, "mutually exclusive"),
        ({"batch_sampler": [[0]], "batch_size": 2}, "mutually exclusive"),
        ({"num_workers": -1}, "num_workers"),
        ({"timeout": 1.0}, "timeout"),
        ({"prefetch_factor": 2}, "prefetch_factor"),
        ({"policy": "PostponeToNext"}, "linked=True"),
        ({"policy": "PostponeToNext", "linked": True, "num_workers": 2}, "num_workers=0"),
        ({"num_workers": 2}, "fakeredis"),
        ({"rank": 2, "world_size": 2}, "rank"),
        ({"world_size": 2, "rank": 0, "sampler": tud.SequentialSampler(DATA)}, "num_replicas"),
        ({"lease_seconds": 0}, "lease_seconds"),
        ({"durability": "sometimes"}, "durability"),
        ({"run_id": "bad id"}, "run_id"),
        ({"batch_sampler": []}, "empty epoch"),
    ],
)
def test_unsupported_or_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    kwargs = {"dataset": DATA, "redis_url": FAKE_URL, **kwargs}
    with pytest.raises(ConfigError, match=match):
        prl.DataLoader(**kwargs)


def test_unknown_policy() -> None:
    with pytest.raises(PolicyError):
        prl.DataLoader(DATA, redis_url=FAKE_URL, linked=True, policy="Nope")


def test_set_epoch_reaches_a_user_distributed_sampler() -> None:
    sampler = tud.DistributedSampler(DATA, num_replicas=2, rank=1, shuffle=True, seed=3)
    loader = prl.DataLoader(DATA, batch_size=2, sampler=sampler, redis_url=FAKE_URL, rank=1, world_size=2)
    loader.set_epoch(4)
    assert sampler.epoch == 4
    reference = list(tud.DataLoader(DATA, batch_size=2, sampler=sampler))
    assert [b.tolist() for b in loader] == [b.tolist() for b in reference]


def test_durability_is_checked(redis_server: RedisServer) -> None:
    loader = prl.DataLoader(DATA, batch_size=5, redis_url=redis_server.url, durability="always")
    assert [b.tolist() for b in loader] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]


class Odd:
    pass


def test_sample_of_an_unsupported_type() -> None:
    loader = prl.DataLoader([Odd()], redis_url=FAKE_URL)
    with pytest.raises(ValueError, match=r"dataset index 0.*Odd"):
        list(loader)
    pickled = prl.DataLoader([Odd()], redis_url=FAKE_URL, allow_pickle=True, collate_fn=list)
    assert [type(b[0]) for b in pickled] == [Odd]


def test_generator_state_matches_torch_after_epochs() -> None:
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    ref = tud.DataLoader(DATA, batch_size=3, shuffle=True, generator=g1)
    ours = prl.DataLoader(DATA, batch_size=3, shuffle=True, generator=g2, redis_url=FAKE_URL)
    for _ in range(2):
        list(ref)
        list(ours)
    assert torch.equal(g1.get_state(), g2.get_state())
