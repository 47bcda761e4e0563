"""Subclasses of DataProto survive every operation that returns a DataProto (via _derive/_from_parts)."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pr_loader.protocol import (
    DataProto,
    fold_batch_dim,
    pad_dataproto_to_divisor,
    unfold_batch_dim,
    unpad_dataproto,
)
from pr_loader.protocol_ops import NDArray
from tests.test_protocol import make


@dataclass(eq=False)
class TaggedProto(DataProto):
    """Extra attribute with a default; _derive carries it to derived objects."""

    tag: str = "untagged"

    def _derive(
        self, batch: Any, non_tensor_batch: dict[str, NDArray], meta_info: dict[str, Any]
    ) -> TaggedProto:
        out = super()._derive(batch, non_tensor_batch, meta_info)
        out.tag = self.tag
        return out


@dataclass(eq=False, kw_only=True)
class LinkedLike(DataProto):
    """A required constructor argument: overrides both hooks, like LinkedDataProto would."""

    link: dict[str, int] = field()

    @classmethod
    def _from_parts(
        cls, batch: Any, non_tensor_batch: dict[str, NDArray], meta_info: dict[str, Any]
    ) -> LinkedLike:
        return cls(batch=batch, non_tensor_batch=non_tensor_batch, meta_info=meta_info, link={"fresh": 1})

    def _derive(
        self, batch: Any, non_tensor_batch: dict[str, NDArray], meta_info: dict[str, Any]
    ) -> LinkedLike:
        return LinkedLike(batch=batch, non_tensor_batch=non_tensor_batch, meta_info=meta_info, link=self.link)


def tagged(n: int = 4) -> TaggedProto:
    base = make(n)
    return TaggedProto(
        batch=base.batch, non_tensor_batch=base.non_tensor_batch, meta_info=base.meta_info, tag="T"
    )


def linked(n: int = 4) -> LinkedLike:
    base = make(n)
    return LinkedLike(
        batch=base.batch, non_tensor_batch=base.non_tensor_batch, meta_info=base.meta_info, link={"step": 7}
    )


OPS: dict[str, Callable[[Any], Any]] = {
    "getitem_slice": lambda d: d[1:3],
    "getitem_list": lambda d: d[[0, 2]],
    "getitem_mask": lambda d: d[np.array([True, False, True, False])],
    "getitem_tensor": lambda d: d[torch.tensor([3])],
    "select": lambda d: d.select(batch_keys=["ids"], deepcopy=True),
    "select_idxs": lambda d: d.select_idxs([1]),
    "slice": lambda d: d.slice(0, 2),
    "slice_negative_step": lambda d: d.slice(None, None, -1),
    "pop": lambda d: d.pop(batch_keys=["mask"]),
    "rename": lambda d: d.rename("ids", "input_ids"),
    "union": lambda d: d.union(make(4)),
    "to": lambda d: d.to("cpu"),
    "chunk": lambda d: d.chunk(2),
    "split": lambda d: d.split(3),
    "concat": lambda d: type(d).concat(d.chunk(2)),
    "concat_base_staticmethod": lambda d: DataProto.concat([d, make(1)]),
    "repeat": lambda d: d.repeat(2),
    "repeat_tile": lambda d: d.repeat(2, interleave=False),
    "sample_level_repeat": lambda d: d.sample_level_repeat([1, 0, 2, 1]),
    "unfold_column_chunks": lambda d: d.unfold_column_chunks(3, split_keys=["ids"]),
    "make_iterator": lambda d: list(d.make_iterator(2, epochs=1)),
    "fold_batch_dim": lambda d: fold_batch_dim(d, 2),
    "unfold_batch_dim": lambda d: unfold_batch_dim(fold_batch_dim(d, 2)),
    "pad_dataproto_to_divisor": lambda d: pad_dataproto_to_divisor(d, 3)[0],
    "unpad_dataproto": lambda d: unpad_dataproto(d, 1),
    "pickle": lambda d: pickle.loads(pickle.dumps(d)),
}


def flatten(result: Any) -> list[Any]:
    return list(result) if isinstance(result, list) else [result]


@pytest.mark.parametrize("op", sorted(OPS))
def test_tagged_subclass_survives(op: str) -> None:
    results = flatten(OPS[op](tagged()))
    assert results
    for result in results:
        assert type(result) is TaggedProto
        assert result.tag == "T"


@pytest.mark.parametrize("op", sorted(OPS))
def test_linked_subclass_survives(op: str) -> None:
    results = flatten(OPS[op](linked()))
    assert results
    for result in results:
        assert type(result) is LinkedLike
        assert result.link == {"step": 7}


def test_in_place_ops_keep_the_object() -> None:
    data = tagged()
    data.reorder(torch.tensor([3, 2, 1, 0]))
    data.padding(2)
    assert type(data) is TaggedProto and len(data) == 6
    assert data.non_tensor_batch["uid"].tolist() == ["u3", "u2", "u1", "u0", "u0", "u0"]


def test_class_constructors_use_from_parts() -> None:
    from_dict = LinkedLike.from_dict(tensors={"x": torch.zeros(2)})
    assert type(from_dict) is LinkedLike and from_dict.link == {"fresh": 1}
    single = TaggedProto.from_single_dict({"x": torch.zeros(2)})
    assert type(single) is TaggedProto and single.tag == "untagged"
    from_td = LinkedLike.from_tensordict(linked().to_tensordict())
    assert type(from_td) is LinkedLike and from_td.link == {"fresh": 1}
    assert from_td.non_tensor_batch["uid"].tolist() == ["u0", "u1", "u2", "u3"]


def test_load_from_disk_keeps_subclass_and_state(tmp_path: Path) -> None:
    path = tmp_path / "linked.pkl"
    linked().save_to_disk(path)
    loaded = DataProto.load_from_disk(path)
    assert type(loaded) is LinkedLike and loaded.link == {"step": 7}
    assert LinkedLike.load_from_disk(path).non_tensor_batch["uid"].tolist() == ["u0", "u1", "u2", "u3"]
