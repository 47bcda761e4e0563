"""BatchMemory: big batch tensors reuse the memory of batches nothing holds any more, and only that."""

from __future__ import annotations

import threading
import weakref
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.utils.data as tud

import pr_loader.dataloader as prl
from pr_loader import batch_memory
from pr_loader.batch_memory import BatchMemory
from tests.loader.conftest import assert_same_epochs, wait_for_claim_ahead
from tests.servers import RedisServer

MiB = 1 << 20
SHAPE = (4, MiB // 8)  # 4 MiB of int64

if batch_memory._use_count is None:  # pragma: no cover - every torch this project supports has it
    pytest.skip("this torch has no torch._C._storage_Use_Count", allow_module_level=True)


def test_a_released_tensor_s_memory_is_reused_for_the_next_of_its_size() -> None:
    memory = BatchMemory()
    first = memory.empty(SHAPE, torch.int64)
    address = first.data_ptr()
    del first
    second = memory.empty(SHAPE, torch.int64)
    assert second.data_ptr() == address and memory.reused == 1


def hold(tensor: torch.Tensor, holder: str) -> Any:
    if holder == "tensor":
        return tensor
    if holder == "view":
        return tensor[1:, ::2]
    if holder == "numpy":
        return tensor.numpy()
    if holder == "dlpack":
        return torch.utils.dlpack.to_dlpack(tensor)
    return tensor.untyped_storage()


@pytest.mark.parametrize("holder", ["tensor", "view", "numpy", "dlpack", "storage"])
def test_memory_anything_still_holds_is_never_reused(holder: str) -> None:
    memory = BatchMemory()
    tensor = memory.empty(SHAPE, torch.int64)
    tensor.fill_(7)
    kept = hold(tensor, holder)
    del tensor
    others = [memory.empty(SHAPE, torch.int64).fill_(-1) for _ in range(3)]
    assert memory.reused == 0
    if holder == "dlpack":
        kept = torch.utils.dlpack.from_dlpack(kept)
    values = kept if holder != "storage" else torch.empty(0, dtype=torch.int64).set_(kept)
    assert (torch.as_tensor(values) == 7).all()
    del others


def test_memory_moved_to_shared_memory_is_dropped_not_reused() -> None:
    memory = BatchMemory()
    tensor = memory.empty(SHAPE, torch.int64)
    tensor.share_memory_()  # (what a torch.multiprocessing queue does to the tensors it sends)
    address = tensor.data_ptr()
    del tensor
    again = memory.empty(SHAPE, torch.int64)
    assert memory.reused == 0 and again.data_ptr() != address and len(memory) == 1


def test_a_reused_tensor_is_like_a_new_one() -> None:
    memory = BatchMemory()
    cases = [
        ((3, 5, 1 << 16), torch.float32),
        ((2, 1, MiB), torch.uint8),
        ((MiB,), torch.int16),
        ((2, MiB), torch.bool),
        ((4, 1 << 18), torch.bfloat16),
        ((2, 1 << 16), torch.complex128),
    ]
    for shape, dtype in cases:
        del_me = memory.empty(shape, dtype)
        del del_me
        got, want = memory.empty(shape, dtype), torch.empty(shape, dtype=dtype)
        assert (got.shape, got.stride(), got.dtype, got.storage_offset()) == (
            want.shape, want.stride(), want.dtype, want.storage_offset()
        )  # fmt: skip
        assert got.is_contiguous() and got._base is None and not got.requires_grad
        assert got.untyped_storage().nbytes() == want.untyped_storage().nbytes()
        got.resize_(2 * got.numel())  # torch's own resizable storage
    assert memory.reused == len(cases)


def test_sizes_below_the_threshold_other_sizes_and_a_full_pool() -> None:
    memory = BatchMemory(capacity=2, min_bytes=MiB)
    small = memory.empty((MiB // 2,), torch.uint8)
    assert len(memory) == 0
    del small
    a, b, c = (memory.empty((n * MiB,), torch.uint8) for n in (1, 2, 3))
    assert len(memory) == 2  # (all in use: the third one is not kept)
    del a, c
    d = memory.empty((3 * MiB,), torch.uint8)  # a free storage of another size makes room
    assert memory.reused == 0 and len(memory) == 2
    del b, d
    e = memory.empty((2 * MiB,), torch.uint8)
    assert memory.reused == 1
    memory.clear()
    assert len(memory) == 0 and e.sum() >= 0  # (a tensor of a cleared pool lives on)


def test_empty_draws_from_the_current_pool_only_in_the_main_process(monkeypatch: pytest.MonkeyPatch) -> None:
    memory = BatchMemory()
    batch_memory.empty(SHAPE, torch.int64)
    assert len(memory) == 0
    with batch_memory.using(memory):
        batch_memory.empty(SHAPE, torch.int64)
        assert len(memory) == 1
        monkeypatch.setattr(batch_memory, "get_worker_info", lambda: object())
        batch_memory.empty(SHAPE, torch.int64)
        assert len(memory) == 1
    seen: list[int] = []
    thread = threading.Thread(target=lambda: seen.append(len(memory)))  # (a context is per thread)
    with batch_memory.using(memory):
        thread.start()
        thread.join()
        assert batch_memory._CURRENT.get() is memory
    assert batch_memory._CURRENT.get() is None and seen == [1]


class BigSamples(tud.Dataset[dict[str, Any]]):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"blob": torch.full((MiB // 4,), i, dtype=torch.int32), "i": i}


KINDS = {  # (linked, policy): the collated batches, views claimed ahead, views read ahead before their claim
    "collated": (False, "FixedBatch"),
    "linked": (True, "FixedBatch"),
    "linked-read-ahead": (True, "PostponeToNext"),
}


def handed_out(loader: prl.DataLoader) -> Iterator[Any]:
    """One epoch of ``loader``; under a postponing policy each batch is handed on once the step after it
    was read and claimed ahead, so that the next one is the view built ahead, not one its claim built."""
    it = iter(loader)
    for batch in it:
        if it.read_step >= 0:
            wait_for_claim_ahead(it)
        box = [batch]
        del batch  # (this frame holds no reference while suspended: the caller's del frees the batch)
        yield box.pop()


@pytest.mark.parametrize("keep", [False, True], ids=["dropped", "kept"])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_loader_batches_recycle_dropped_batches_and_never_touch_kept_ones(
    redis_server: RedisServer, keep: bool, kind: str
) -> None:
    """Against a real Redis, over three epochs: batches the caller drops give their memory to later
    batches, batches the caller keeps (every one of three epochs) keep their values, the loader still
    yields exactly torch's batches, and the pool lets its memory go when an epoch ends."""
    data = BigSamples()
    linked, policy = KINDS[kind]
    loader = prl.DataLoader(data, batch_size=4, redis_url=redis_server.url, linked=linked, policy=policy)
    memory = loader.source.batch_memory
    assert memory is not None
    kept: list[list[Any]] = []
    for _ in range(3):
        epoch = []
        for batch in handed_out(loader):
            blob = batch.batch["blob"] if linked else batch["blob"]
            epoch.append(blob.clone())
            if keep:
                kept.append([blob])
            del batch, blob
        kept.append(epoch)
        assert len(memory) == 0  # (let go at the end of each epoch)
    assert (memory.reused > 0) is not keep
    reference = [[b["blob"] for b in tud.DataLoader(data, batch_size=4)] for _ in range(3)]
    copies = [epoch for epoch in kept if len(epoch) > 1]
    assert_same_epochs(reference, copies)
    if keep:
        originals = [held[0] for held in kept if len(held) == 1]
        assert_same_epochs(reference, [originals[e * 6 : (e + 1) * 6] for e in range(3)])
    loader.close()
    assert len(memory) == 0


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_pin_memory_collates_into_pinned_memory(
    redis_server: RedisServer, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pin_memory=True where an accelerator is: the pool makes each batch tensor in pinned memory (none
    recycled by the pool: torch's host allocator does that), so pinning the batch copies nothing; the
    tensor handed out is the one the collate made. Without one, nothing is pinned (as torch's loader)."""
    data = BigSamples()
    linked, policy = KINDS[kind]
    loader = prl.DataLoader(
        data, batch_size=4, redis_url=redis_server.url, linked=linked, policy=policy, pin_memory=True
    )
    memory = loader.source.batch_memory
    assert memory is not None
    accelerator = torch.accelerator.is_available()
    assert memory.pinned is accelerator
    made: list[weakref.ref[torch.Tensor]] = []  # (weak: a reference kept here would stop the recycling)
    empty = memory.empty

    def recording_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        out = empty(shape, dtype)
        made.append(weakref.ref(out))
        return out

    monkeypatch.setattr(memory, "empty", recording_empty)
    blobs = []
    for _ in range(2):
        for batch in handed_out(loader):
            blob = batch.batch["blob"] if linked else batch["blob"]
            assert blob.is_pinned() is accelerator
            assert any(ref() is blob for ref in made), "the tensor handed out is not the collated one"
            blobs.append(blob.clone())
            del batch, blob
    assert memory.reused == 0 if accelerator else memory.reused > 0
    reference = [[b["blob"] for b in tud.DataLoader(data, batch_size=4)] for _ in range(2)]
    assert_same_epochs(reference, [blobs[:6], blobs[6:]])
    loader.close()
