"""linked=True (LinkedDataProto views) and RedisBatchDataset on its own under torch's DataLoader."""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader.dataset import RedisBatchDataset
from pr_loader.linked import LinkedDataProto
from pr_loader.server import FAKE_URL
from tests.servers import RedisServer

N = 18
DATA = [{"input_ids": torch.arange(i, i + 4), "prompt": f"prompt {i}", "score": float(i)} for i in range(N)]


def check_views_equal_drop_in(views: list[Any], batches: list[Any]) -> None:
    assert len(views) == len(batches)
    for step, (view, batch) in enumerate(zip(views, batches)):
        assert isinstance(view, LinkedDataProto) and view.step == step
        assert torch.equal(view.batch["input_ids"], batch["input_ids"])
        assert list(view.non_tensor_batch["prompt"]) == batch["prompt"]
        assert [float(x) for x in view.non_tensor_batch["score"]] == batch["score"].tolist()
        assert view.sample_ids() == [f"{step // 4}:{int(i)}" for i in batch["input_ids"][:, 0]]
        assert view.non_tensor_batch["prompt"].dtype == np.object_


def loaders(url: str, **kwargs: Any) -> tuple[prl.DataLoader, tud.DataLoader[Any]]:
    generator = torch.Generator().manual_seed(4)
    ours = prl.DataLoader(
        DATA, batch_size=5, shuffle=True, generator=generator, redis_url=url, linked=True, **kwargs
    )
    theirs = tud.DataLoader(DATA, batch_size=5, shuffle=True, generator=torch.Generator().manual_seed(4))
    return ours, theirs


def test_linked_fixed_batch_equals_drop_in() -> None:
    ours, theirs = loaders(FAKE_URL)
    views = [v for _ in range(2) for v in ours]
    batches = [b for _ in range(2) for b in theirs]
    check_views_equal_drop_in(views, batches)
    assert all(v.session is not None for v in views)


def test_linked_with_workers_gives_bound_views(redis_server: RedisServer) -> None:
    ours, theirs = loaders(redis_server.url, num_workers=2)
    views = list(ours)
    check_views_equal_drop_in(views, list(theirs))
    assert all(v.session is not None for v in views)
    assert ours.state_dict()["step"] == 3


def test_view_committed_by_its_user() -> None:
    ours, _ = loaders(FAKE_URL)
    for view in ours:
        view.commit()
    assert ours.state_dict()["step"] == 3


@pytest.mark.parametrize("num_workers", [0, 2])
def test_dataset_alone_under_torch_dataloader(redis_server: RedisServer, num_workers: int) -> None:
    """Each worker claims whole steps and commits them as it moves on: every row once per epoch."""
    dataset = RedisBatchDataset(
        DATA, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(2), linked=False,
        redis_url=redis_server.url, run_id=f"alone-{uuid.uuid4().hex}",
    )  # fmt: skip
    for epoch in range(2):
        dataset.set_epoch(epoch)
        loader = tud.DataLoader(dataset, batch_size=None, num_workers=num_workers)
        rows = sorted(int(i) for batch in loader for i in batch["input_ids"][:, 0])
        assert rows == list(range(N))
    next_step, committed, _ = dataset.position()
    assert committed == next_step - 1 == 2 * 5 - 1


def test_dataset_alone_yields_linked_views() -> None:
    dataset = RedisBatchDataset(DATA, batch_size=6, redis_url=FAKE_URL)
    views = list(dataset)
    assert [len(v) for v in views] == [6, 6, 6] and all(isinstance(v, LinkedDataProto) for v in views)
    assert dataset.position()[1] == 2
