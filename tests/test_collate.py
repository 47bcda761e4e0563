"""pr_loader.collate.collate_raw side by side with torch's default_collate over decoded rows: the same
values, dtypes, strides and containers, the same errors, and tensors in fresh memory (never the payloads)."""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.utils.data as tud
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.utils.data._utils.collate import default_collate_fn_map

from pr_loader import batch_memory, codec
from pr_loader.collate import collate_raw, materialise
from tests.test_codec import TORCH_DTYPES, object_array, random_tensor

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")


class Point(NamedTuple):
    x: Any
    y: Any


def outcome(fn: Callable[[], Any]) -> tuple[bool, Any]:
    """(True, value) or (False, (exception type, message))."""
    try:
        return True, fn()
    except Exception as exc:
        return False, (type(exc), str(exc))


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.contiguous().view(-1).view(torch.uint8).numpy()) if t.numel() else b""


def assert_identical(got: Any, want: Any, path: str = "batch") -> None:
    """Same types all the way down; tensors with the same dtype, shape, strides, flags and bit patterns."""
    assert type(got) is type(want), path
    if isinstance(want, torch.Tensor):
        layout = (want.dtype, want.shape, want.stride(), want.storage_offset(), want.device)
        flags = (want.requires_grad, want.is_inference(), want._is_view(), want.is_contiguous())
        assert (got.dtype, got.shape, got.stride(), got.storage_offset(), got.device) == layout, path
        assert (got.requires_grad, got.is_inference(), got._is_view(), got.is_contiguous()) == flags, path
        assert bits(got) == bits(want), path
    elif isinstance(want, np.ndarray) and want.dtype.hasobject:
        assert got.shape == want.shape, path
        assert_identical(got.tolist(), want.tolist(), path)
    elif isinstance(want, np.ndarray):
        assert (got.dtype, got.shape) == (want.dtype, want.shape) and got.tobytes() == want.tobytes(), path
    elif isinstance(want, float):
        assert struct.pack("<d", got) == struct.pack("<d", want), path
    elif isinstance(want, dict):
        assert list(got) == list(want), path
        for key, value in want.items():
            assert_identical(got[key], value, f"{path}[{key!r}]")
    elif isinstance(want, list | tuple):
        assert len(got) == len(want), path
        for i, (x, y) in enumerate(zip(got, want)):
            assert_identical(x, y, f"{path}[{i}]")
    else:
        assert got == want, path


def tensors_in(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from tensors_in(value)
    elif isinstance(obj, list | tuple) or (isinstance(obj, np.ndarray) and obj.dtype.hasobject):
        for item in obj:
            yield from tensors_in(item)


def assert_private(batch: Any, payloads: list[bytes]) -> None:
    """Every tensor of ``batch`` owns memory outside the payloads, and writing it leaves them alone."""
    spans = [(np.frombuffer(p, np.uint8).ctypes.data, len(p)) for p in payloads]
    for t in tensors_in(batch):
        if t.numel():
            address = t.untyped_storage().data_ptr()
            assert not any(start <= address < start + n for start, n in spans)
            t.view(-1).view(torch.uint8).bitwise_not_()


def check(rows: list[Any], *, allow_pickle: bool = False) -> tuple[bool, Any]:
    """collate_raw over ``decode_raw_tensors`` rows against default_collate over ``decode`` rows."""
    payloads = [codec.encode(row, allow_pickle=allow_pickle) for row in rows]
    want = outcome(
        lambda: tud.default_collate([codec.decode(p, allow_pickle=allow_pickle) for p in payloads])
    )
    got = outcome(
        lambda: collate_raw([codec.decode_raw_tensors(p, allow_pickle=allow_pickle) for p in payloads])
    )
    assert got[0] == want[0], (got, want)
    if not want[0]:
        assert got[1] == want[1]
        return got
    # storage that can grow, like torch.stack's (checked first: .numpy() in the comparison pins it)
    assert [t.untyped_storage().resizable() for t in tensors_in(got[1])] == [
        t.untyped_storage().resizable() for t in tensors_in(want[1])
    ]
    assert_identical(got[1], want[1])
    assert_private(got[1], payloads)
    assert payloads == [codec.encode(row, allow_pickle=allow_pickle) for row in rows]
    return got


def rl_row(i: int) -> dict[str, Any]:
    gen = torch.Generator().manual_seed(i)
    return {
        "input_ids": torch.randint(0, 150_000, (1024,), generator=gen),
        "attention_mask": torch.ones(1024, dtype=torch.int64),
        "position_ids": torch.arange(1024),
        "raw_prompt": f"prompt {i} " * 20,
        "index": i,
    }


# --- fast path ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_every_dtype(dtype: torch.dtype) -> None:
    rows = [
        {
            "m": random_tensor(dtype, (2, 3), i),
            "s": random_tensor(dtype, (), 9 + i),
            "v": random_tensor(dtype, (5,)),
        }
        for i in range(3)
    ]
    assert check(rows)[0]


def test_rl_step() -> None:
    ok, batch = check([rl_row(i) for i in range(64)])
    assert ok and batch["input_ids"].shape == (64, 1024) and len(batch["raw_prompt"]) == 64


def test_fast_path_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    """Same-shaped tensor columns never reach torch.stack (whose copy wakes torch's intra-op threads), big
    rows included; a column of different shapes does (and raises torch's error)."""
    calls: list[int] = []
    real_stack = torch.stack

    def stack(tensors: list[torch.Tensor], *args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(len(tensors))
        return real_stack(tensors, *args, **kwargs)

    def stacks(rows: list[Any]) -> list[int]:
        raw = [codec.decode_raw_tensors(codec.encode(row)) for row in rows]
        calls.clear()
        with monkeypatch.context() as patch:
            patch.setattr(torch, "stack", stack)
            collate_raw(raw)
        return list(calls)

    assert stacks([rl_row(i) for i in range(4)]) == []
    assert stacks([{"t": torch.ones((1 << 16) - 1)}] * 2) == []
    assert stacks([{"t": torch.ones(1 << 18)}] * 3) == []  # 1 MiB rows
    with pytest.raises(RuntimeError, match="stack expects each tensor to be equal size"):
        stacks([{"t": torch.ones(4)}, {"t": torch.ones(5)}])
    assert calls == [2]


@pytest.mark.parametrize("nbytes", [(1 << 18) - 16, 1 << 18, 1 << 20], ids=str)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.complex128], ids=str)
def test_big_rows(dtype: torch.dtype, nbytes: int) -> None:
    shape = (nbytes // dtype.itemsize,)
    assert check([{"big": random_tensor(dtype, shape, i), "i": i} for i in range(4)])[0]


@pytest.mark.parametrize(
    ("rows", "row_shape", "advised"),
    [
        (64, (1 << 14,), True),  # 8 MiB of 128 KiB rows
        (8, (1 << 17,), True),  # 8 MiB of 1 MiB rows
        (31, (1 << 14,), False),  # just below 4 MiB
        (3, (1 << 17,), False),
    ],
    ids=["small-rows", "big-rows", "small-rows-small-batch", "big-rows-small-batch"],
)
def test_big_batches_are_advised_onto_huge_pages(
    monkeypatch: pytest.MonkeyPatch, rows: int, row_shape: tuple[int, ...], advised: bool
) -> None:
    """A batch tensor of 4 MiB or more gets madvise(MADV_HUGEPAGE) over the whole pages inside it; smaller
    ones get no advice. Results stay default_collate's (check())."""
    if batch_memory._madvise is None or batch_memory._MADV_HUGEPAGE is None:
        pytest.skip("madvise(MADV_HUGEPAGE) is Linux only")
    calls: list[tuple[int, int, int]] = []
    real = batch_memory._madvise

    def spy(start: int, length: int, advice: int) -> int:
        calls.append((start, length, advice))
        return int(real(start, length, advice))

    monkeypatch.setattr(batch_memory, "_madvise", spy)
    ok, batch = check([{"t": torch.full(row_shape, i, dtype=torch.int64)} for i in range(rows)])
    assert ok
    tensor = batch["t"]
    if not advised:
        assert calls == []
        return
    ((start, length, advice),) = calls
    page = mmap.PAGESIZE
    first, end = tensor.data_ptr(), tensor.data_ptr() + tensor.nbytes
    assert advice == mmap.MADV_HUGEPAGE
    assert start % page == 0 and length % page == 0
    assert first <= start < first + page and end - page < start + length <= end


def test_non_contiguous_sources() -> None:
    def row(i: int) -> list[torch.Tensor]:
        base = random_tensor(torch.float32, (4, 6), i)
        c = torch.randn(3, dtype=torch.complex64, generator=torch.Generator().manual_seed(i))
        return [
            base.t(),
            base[1:, ::2],
            base[:1].expand(3, 6),
            base[2, 3],
            c.conj(),
            torch._neg_view(base[0]),
        ]

    assert check([row(i) for i in range(3)])[0]


def test_batch_of_one_and_top_level_tensors() -> None:
    assert check([rl_row(0)])[0]
    assert check([torch.arange(6).view(2, 3)])[0]
    assert check([torch.arange(6).view(2, 3), torch.ones(2, 3, dtype=torch.int64)])[0]


def test_nested_containers_and_leaves() -> None:
    def row(i: int) -> dict[str, Any]:
        return {
            "pair": (torch.full((2,), i), [i, i / 3, {"deep": torch.tensor(i * 1.5), "s": f"s{i}"}]),
            "list": [torch.arange(3) + i, b"raw"],
            "arr": np.arange(3.0) * i,
            "np": np.float32(i),
            "flag": i % 2 == 0,
            "nan": float("nan"),
            "grid": torch.ones(2, 1, 3, dtype=torch.bfloat16) * i,
        }

    ok, batch = check([row(i) for i in range(4)])
    assert ok and type(batch["pair"]) is list and batch["pair"][1][2]["s"] == ["s0", "s1", "s2", "s3"]


def test_namedtuples_pickled_with_opt_in() -> None:
    rows = [{"p": Point(torch.arange(3) * i, i), "t": torch.ones(2) * i} for i in range(3)]
    ok, batch = check(rows, allow_pickle=True)
    assert ok and type(batch["p"]) is Point
    assert check([Point(torch.arange(2), "a"), Point(torch.arange(2), "b")], allow_pickle=True)[0]


def test_zero_element_tensors() -> None:
    assert check([{"e": torch.empty(0, 3), "z": torch.empty(2, 0, dtype=torch.int8)} for _ in range(3)])[0]
    assert not check([{"e": torch.empty(0, 3)}, {"e": torch.empty(1, 3)}])[0]


def test_inference_mode() -> None:
    with torch.inference_mode():
        assert check([rl_row(i) for i in range(3)])[0]


# --- off the fast path: same values, same errors ----------------------------------------------------

T = torch.arange(3)
ROWS: dict[str, list[Any]] = {
    "shapes differ": [{"t": T}, {"t": torch.arange(4)}],
    "dtypes differ": [{"t": T}, {"t": T.float()}, {"t": T.to(torch.uint8)}],
    "tensor then int": [{"t": T}, {"t": 5}],
    "int then 0-d tensor": [{"t": 5}, {"t": torch.tensor(7)}],
    "int then tensor": [{"t": 5}, {"t": T}],
    "float then tensor": [{"t": 0.5}, {"t": torch.tensor(2.5)}],
    "tensor then array": [{"t": T}, {"t": np.arange(3)}],
    "array then tensor": [{"t": np.arange(3)}, {"t": T}],
    "np scalar then tensor": [{"t": np.int64(1)}, {"t": torch.tensor(2)}],
    "str then tensor": [{"s": "a"}, {"s": T}],
    "bytes then nested tensor": [{"s": b"a"}, {"s": {"t": T, "o": object_array([T])}}],
    "tensor then dict": [{"t": T}, {"t": {"a": T}}],
    "dict then tensor": [{"t": {"a": T}}, {"t": T}],
    "list then tensor": [[1, 2, 3], T],
    "tuple then tensor": [(1, 2, 3), T],
    "tensor then list": [T, [1, 2, 3]],
    "list then 0-d tensor": [[1], torch.tensor(1)],
    "namedtuple then tensor": [Point(1, 2), torch.arange(2)],
    "none": [{"n": None}, {"n": None}],
    "missing key": [{"a": T}, {"b": T}],
    "list lengths differ": [[T, T], [T]],
    "int too big": [{"i": 2**70}, {"i": 1}],
    "string array": [np.array(["a"]), np.array(["b"])],
    "object array": [{"o": object_array([T])}, {"o": object_array([T])}],
    "tensor in a dict key": [{(1, torch.tensor(2)): T}, {(1, torch.tensor(2)): T}],
    "zero-size then tensor": [torch.empty(0), T],
}


@pytest.mark.filterwarnings("ignore:Using a non-tuple sequence for multidimensional indexing")
@pytest.mark.parametrize("rows", ROWS.values(), ids=ROWS.keys())
def test_like_torch_off_the_fast_path(rows: list[Any]) -> None:
    check(rows, allow_pickle=True)


def test_registered_handlers_still_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations in torch's default_collate_fn_map (its documented extension point) are honoured."""

    def tensors(batch: list[torch.Tensor], *, collate_fn_map: Any = None) -> Any:
        return ("custom", torch.cat(batch))

    def strings(batch: list[str], *, collate_fn_map: Any = None) -> str:
        return "|".join(batch)

    rows = [rl_row(i) for i in range(3)]
    monkeypatch.setitem(default_collate_fn_map, torch.Tensor, tensors)
    monkeypatch.setitem(default_collate_fn_map, str, strings)
    assert check(rows)[0]
    monkeypatch.delitem(default_collate_fn_map, torch.Tensor)
    assert not check(rows)[0]  # no handler: torch's TypeError
    monkeypatch.setitem(default_collate_fn_map, object, lambda batch, *, collate_fn_map=None: len(batch))
    assert check(rows)[0]


class Rows(tud.Dataset[Any]):
    def __init__(self, payloads: list[bytes], raw: bool) -> None:
        self.payloads, self.raw = payloads, raw

    def __len__(self) -> int:
        return len(self.payloads)

    def __getitem__(self, i: int) -> Any:
        return codec.decode_raw_tensors(self.payloads[i]) if self.raw else codec.decode(self.payloads[i])


def test_in_a_worker_process_like_torch() -> None:
    """In DataLoader workers torch stacks into shared memory: collate_raw hands the rows to it."""
    payloads = [codec.encode(rl_row(i)) for i in range(6)]
    want = list(tud.DataLoader(Rows(payloads, False), batch_size=4, num_workers=1))
    got = list(tud.DataLoader(Rows(payloads, True), batch_size=4, num_workers=1, collate_fn=collate_raw))
    assert_identical(got, want)
    assert [b["input_ids"].is_shared() for b in got] == [b["input_ids"].is_shared() for b in want]


# --- properties -------------------------------------------------------------------------------------

LEAF_KINDS = ("tensor", "int", "float", "str", "bytes", "array", "bool")


@st.composite
def leaf(draw: st.DrawFn, kind: str, dtype: torch.dtype, shape: tuple[int, ...]) -> Any:
    seed = draw(st.integers(0, 2**16))
    if kind == "tensor":
        t = random_tensor(dtype, shape, seed)
        return t.t() if t.dim() == 2 and draw(st.booleans()) else t
    if kind == "array":
        return np.arange(math.prod(shape), dtype=np.float32).reshape(shape) * seed
    return {
        "int": seed,
        "float": seed / 7,
        "str": f"s{seed}",
        "bytes": bytes([seed % 256]),
        "bool": seed % 2 == 0,
    }[kind]


@st.composite
def schemas(draw: st.DrawFn, depth: int = 0) -> Any:
    """A row layout: nested dict / list / tuple of (leaf kind, dtype, shape)."""
    if depth < 2 and draw(st.integers(0, 2)) == 0:
        children = draw(st.lists(schemas(depth + 1), min_size=1, max_size=3))
        container = draw(st.sampled_from(["dict", "list", "tuple"]))
        return (container, children)
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    return ("leaf", (draw(st.sampled_from(LEAF_KINDS)), draw(st.sampled_from(TORCH_DTYPES)), shape))


@st.composite
def row_of(draw: st.DrawFn, schema: Any) -> Any:
    node, spec = schema
    if node == "leaf":
        kind, dtype, shape = spec
        if draw(st.integers(0, 19)) == 0:  # now and then a row that breaks the layout
            kind, shape = draw(st.sampled_from(LEAF_KINDS)), (*shape, 1)
        return draw(leaf(kind, dtype, shape))
    items = [draw(row_of(child)) for child in spec]
    if node == "dict":
        return {f"k{i}": item for i, item in enumerate(items)}
    return items if node == "list" else tuple(items)


@st.composite
def batches(draw: st.DrawFn) -> list[Any]:
    schema = draw(schemas())
    return [draw(row_of(schema)) for _ in range(draw(st.integers(1, 4)))]


@pytest.mark.filterwarnings("ignore:Creating a tensor from a list of numpy.ndarrays")
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_property_like_default_collate(rows: list[Any]) -> None:
    check(rows)


def test_materialise_keeps_what_holds_no_raw_tensor() -> None:
    row = {"a": [1, "x", (2.0, None)], "n": np.arange(2), "o": object_array([1])}
    assert materialise(row) is row
    raw = codec.decode_raw_tensors(codec.encode({"t": T, "o": object_array([T]), "k": [1, (T,)]}))
    out = materialise(raw)
    assert torch.equal(out["t"], T) and torch.equal(out["o"][0], T) and torch.equal(out["k"][1][0], T)
    assert type(out["k"][1]) is tuple and out["o"].dtype == object
