"""Tests of pr_loader.codec: exact round trips, clear errors, safe decoding of hostile bytes."""

from __future__ import annotations

import math
import pickle
import struct
import warnings
from collections import OrderedDict
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pr_loader import codec
from pr_loader.codec import FORMAT_VERSION, MAGIC, NeedsTensor, RawTensor, decode, decode_raw_tensors, encode
from pr_loader.collate import materialise
from pr_loader.errors import CodecError

pytestmark = pytest.mark.filterwarnings("ignore:ComplexHalf support is experimental")

TORCH_DTYPES = [
    getattr(torch, name)
    for name in (
        "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
        "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
        "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
        "float4_e2m1fn_x2",
    )
    if hasattr(torch, name)
]  # fmt: skip
NUMPY_DTYPES = [
    "?", "u1", "i1", "<u2", "<i2", "<u4", "<i4", "<u8", "<i8", "<f2", "<f4", "<f8", "<c8", "<c16",
    ">i4", ">f8", "<M8[ns]", "<m8[s]", "S5", "<U3",
]  # fmt: skip
NUMPY_DTYPES += ["<f16"] if np.dtype(np.longdouble).itemsize == 16 else []


def random_tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads, signalling NaNs, subnormals ...); bools stay 0/1."""
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if dtype is torch.bool:
        raw &= 1
    return raw.view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)


def tensor_bits(t: torch.Tensor) -> bytes:
    return bytes(t.resolve_conj().resolve_neg().contiguous().view(-1).view(torch.uint8).numpy())


def assert_same(a: Any, b: Any, path: str = "x") -> None:
    """Exact equality: types, dtypes, shapes, bit patterns, dict key order."""
    assert type(a) is type(b) or (type(a) is torch.nn.Parameter and type(b) is torch.Tensor), path
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        assert tensor_bits(a) == tensor_bits(b), path
    elif isinstance(a, np.ndarray):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), path
        if a.dtype.hasobject:
            for idx in np.ndindex(a.shape):
                assert_same(a[idx], b[idx], f"{path}{list(idx)}")
        else:
            assert a.tobytes() == b.tobytes(), path
    elif isinstance(a, np.generic):
        assert a.dtype == b.dtype and a.tobytes() == b.tobytes(), path
    elif isinstance(a, float):
        assert struct.pack("<d", a) == struct.pack("<d", b), path
    elif isinstance(a, dict):
        assert list(a) == list(b), path
        for (ka, va), kb in zip(a.items(), b):
            assert_same(ka, kb, f"{path} key")
            assert_same(va, b[kb], f"{path}[{ka!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def roundtrip(sample: Any, **kw: bool) -> Any:
    payload = encode(sample, **kw)
    out = decode(payload, **kw)
    assert_same(sample, out)
    assert_same(out, materialise(decode_raw_tensors(payload, **kw)))  # the RawTensor mode decodes alike
    return out


# --- tensors --------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(), (0,), (3, 0), (5,), (2, 3, 4)], ids=str)
def test_tensor_every_dtype_and_shape(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    roundtrip({"t": random_tensor(dtype, shape)})


@pytest.mark.parametrize("dtype", TORCH_DTYPES, ids=str)
def test_tensor_views(dtype: torch.dtype) -> None:
    base = random_tensor(dtype, (4, 6), seed=1)
    views = [base.t(), base[1:, ::2], base[2], base[1, 3], base[:, :0], base[:1].expand(3, 6)]
    out = roundtrip(views)
    for t in out:
        assert t.is_contiguous()


def test_conj_and_neg_views_and_autograd() -> None:
    c = torch.randn(3, dtype=torch.complex64)
    w = torch.nn.Parameter(torch.randn(2, 2))
    out = roundtrip([c.conj(), torch._neg_view(torch.randn(3)), w, w * 2])
    assert not out[0].is_conj() and not out[2].requires_grad and type(out[2]) is torch.Tensor


def test_decoded_tensors_are_writable_private_and_warning_free() -> None:
    sample: dict[str, Any] = {"small": torch.arange(10), "big": torch.randn(1 << 19), "arr": np.arange(4.0)}
    payload = encode(sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = decode(payload)
        again = decode(payload)
    for key in ("small", "big"):
        out[key].add_(1)
        assert torch.equal(again[key], sample[key])  # no sharing between decodes
    out["arr"] += 1
    assert out["arr"].flags.writeable and again["arr"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert decode(payload) is not None and payload == encode(sample)  # payload bytes untouched


def test_zero_copy_decode_views_the_payload() -> None:
    sample: dict[str, Any] = {
        "small": torch.arange(10), "big": torch.randn(1 << 19), "grid": torch.ones(2, 3, dtype=torch.int16),
        "empty": torch.empty(0, 4), "arr": np.arange(4.0), "n": 3,
    }  # fmt: skip
    payload = encode(sample)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "not writable" warning is spent silently
        out = decode(payload, copy=False)
        decode(payload, copy=False)
    base = np.frombuffer(payload, np.uint8).ctypes.data
    for key in ("small", "big", "grid"):
        assert_same(out[key], sample[key])
        assert base <= out[key].data_ptr() < base + len(payload)  # no copy: inside the payload bytes
    assert_same(out["empty"], sample["empty"])
    assert out["n"] == 3
    address = out["arr"].ctypes.data  # numpy arrays are still copied
    assert out["arr"].flags.writeable and not base <= address < base + len(payload)
    stacked = torch.stack([out["grid"], decode(payload, copy=False)["grid"]])  # the intended use: copy
    stacked.add_(1)
    assert payload == encode(sample)


def test_zero_copy_decode_keeps_the_payload_alive() -> None:
    out = decode(encode({"t": torch.arange(1000)}), copy=False)  # nothing else holds the bytes
    assert torch.equal(out["t"].clone(), torch.arange(1000))


def test_zero_copy_decode_checks_like_a_copying_one() -> None:
    payload = encode({"t": torch.arange(100)})
    with pytest.raises(CodecError, match="truncated"):
        decode(payload[:-8], copy=False)


def test_raw_tensor_mode_defers_tensors() -> None:
    sample: dict[str, Any] = {"ids": torch.arange(6).view(2, 3), "e": torch.empty(0, 2), "a": np.arange(2)}
    payload = encode(sample)
    out = decode_raw_tensors(payload)
    ids, empty = out["ids"], out["e"]
    assert type(ids) is RawTensor and (ids.dtype, ids.shape, ids.data.nbytes) == (torch.int64, (2, 3), 48)
    assert type(empty) is RawTensor and empty.shape == (0, 2) and empty.data.nbytes == 0
    assert type(out["a"]) is np.ndarray and repr(ids) == "RawTensor(dtype=torch.int64, shape=(2, 3))"
    base = np.frombuffer(payload, np.uint8).ctypes.data
    view, private = ids.tensor(copy=False), ids.tensor()
    assert base <= view.data_ptr() < base + len(payload)
    assert not base <= private.data_ptr() < base + len(payload)
    private.add_(1)
    assert_same(view, sample["ids"])
    assert payload == encode(sample)
    for use in (len, iter, hash, lambda r: r[0]):
        with pytest.raises(NeedsTensor):
            use(ids)


def test_raw_tensor_mode_checks_like_decode() -> None:
    payload = encode({"ids": torch.arange(4), "arr": np.arange(3), "s": "text", "t": (1, torch.ones(2))})
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode_raw_tensors(payload[:cut])
    with pytest.raises(CodecError, match="unknown tensor dtype code 200"):
        decode_raw_tensors(frame(msgpack.packb(msgpack.ExtType(2, struct.pack("<BBQ", 200, 0, 0)))))
    huge = struct.pack("<BBQ", 6, 2, 0) + struct.pack("<2Q", 2**31, 2**31)
    with pytest.raises(CodecError, match="truncated"):
        decode_raw_tensors(frame(msgpack.packb(msgpack.ExtType(2, huge))))
    with pytest.raises(CodecError, match="pickled"):
        decode_raw_tensors(encode([Custom(1)], allow_pickle=True))


def test_raw_tensor_mode_decodes_tensor_keys_eagerly() -> None:
    """A RawTensor cannot be hashed: a sample with tensors in its dict keys decodes like ``decode``."""
    sample = {(1, torch.tensor(2)): torch.arange(3), "x": torch.ones(2)}
    out = decode_raw_tensors(encode(sample))
    assert all(type(v) is torch.Tensor for v in out.values())
    assert [torch.equal(a, b) for a, b in zip(out.values(), sample.values())] == [True, True]


@pytest.mark.filterwarnings("ignore:.*quantiz")
def test_unsupported_tensors() -> None:
    with pytest.raises(CodecError, match=r'sample\["q"\]: tensor of dtype torch.qint8'):
        encode({"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)})
    with pytest.raises(
        CodecError, match=r"sample\[0\]: tensor of dtype torch.float32 and layout torch.sparse"
    ):
        encode([torch.ones(2, 2).to_sparse()])


# --- numpy ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", NUMPY_DTYPES)
def test_numpy_arrays(dtype: str) -> None:
    rng = np.random.default_rng(0)
    dt = np.dtype(dtype)
    full = np.frombuffer(rng.integers(0, 256, 24 * dt.itemsize, dtype=np.uint8).tobytes(), dt).reshape(4, 6)
    if dt.kind == "b":
        full = full.view(np.uint8) & 1 == 1
    out = roundtrip([full, full.T, full[::2, 1::3], full[0, 0, ...], full[:0], np.empty((0, 5), dt)])
    assert all(a.flags.writeable and a.flags.c_contiguous for a in out)


def test_numpy_object_arrays_keep_shape_and_items() -> None:
    obj = np.empty((2, 5), dtype=object)
    items = [None, 1, "s", [1, 2], (3,), np.arange(3), torch.ones(2), {"k": b"v"}, np.float32(1), 2**70]
    for i, idx in enumerate(np.ndindex(obj.shape)):
        obj[idx] = items[i]
    zero_d = np.empty((), dtype=object)
    zero_d[()] = [1, 2]
    out = roundtrip({"o": obj, "t": obj.T, "z": zero_d, "e": np.empty((0, 2), dtype=object)})
    assert out["o"][0, 2] == "s" and isinstance(out["o"][1, 0], np.ndarray)


def test_numpy_scalars_keep_type() -> None:
    nan = np.frombuffer(b"\x01\x00\xc0\x7f", np.float32)[0]  # NaN with a payload
    scalars = [np.float16(1.5), np.float32(-0.0), nan, np.float64(3), np.int8(-3), np.uint64(2**64 - 1)]
    scalars += [
        np.bool_(True),
        np.complex64(1 + 2j),
        np.str_("hé"),
        np.bytes_(b"x\x00y"),
        np.bytes_(b""),
        np.str_(""),
        np.datetime64(5, "s"),
    ]
    out = roundtrip(scalars)
    assert all(type(a) is type(b) for a, b in zip(scalars, out))


@pytest.mark.filterwarnings("ignore:the matrix subclass")
def test_unsupported_numpy() -> None:
    structured = np.zeros(2, dtype=[("a", "i4"), ("b", "f4")])
    with pytest.raises(CodecError, match=r'sample\["s"\]: numpy dtype .* is not supported'):
        encode({"s": structured})
    obj = np.array([[1, 2], [3, {1, 2}]], dtype=object)
    with pytest.raises(CodecError, match=r'sample\["o"\]\[1, 1\]: type set is not supported'):
        encode({"o": obj})
    with pytest.raises(CodecError, match="type matrix is not supported"):
        encode(np.matrix([[1]]))


# --- Python values and containers -----------------------------------------------------------------


def test_python_scalars() -> None:
    nan_payload = struct.unpack("<d", b"\x01\x00\x00\x00\x00\x00\xf8\x7f")[0]
    values: list[Any] = [None, True, False, 0, -1, 2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1]
    values += [
        10**100,
        -(10**100),
        0.0,
        -0.0,
        math.inf,
        -math.inf,
        nan_payload,
        1e-310,
        "",
        "héllo ☃",
        b"",
        b"\x00",
    ]
    out = roundtrip(values)
    assert [type(v) for v in out] == [type(v) for v in values]


def test_containers_and_keys() -> None:
    sample = {
        "z": 1,
        "a": (1, [2, (3, ())], {"t": ()}),
        3: "int key",
        -(2**70): "big int key",
        b"k": "bytes key",
        None: "none key",
        2.5: "float key",
        (1, "x"): "tuple key",
        np.int64(7): "numpy key",
        "list": [],
        "empty": {},
    }
    out = roundtrip(sample)
    assert list(out) == list(sample) and type(out["a"]) is tuple and type(out["a"][1]) is list
    assert type(next(k for k in out if isinstance(k, np.integer))) is np.int64


def test_bytes_and_str_stay_distinct() -> None:
    roundtrip({"s": "abc", "b": b"abc", "e": "", "eb": b""})
    out = decode(encode([bytearray(b"abc"), memoryview(b"xy")]))
    assert out == [b"abc", b"xy"] and all(type(v) is bytes for v in out)  # documented


def test_unsupported_type_names_key_path() -> None:
    class Foo:
        pass

    with pytest.raises(CodecError, match=r'^sample\["extra"\]\[3\]: type Foo is not supported'):
        encode({"ids": torch.ones(2), "extra": [0, 1, 2, Foo()]})
    with pytest.raises(CodecError, match=r"sample\[0\]\[1\]: type OrderedDict is not supported"):
        encode(((1, OrderedDict()),))
    with pytest.raises(CodecError, match=r"sample: type frozenset is not supported .*\(as a dict key\)"):
        encode({frozenset([1]): 1})
    with pytest.raises(CodecError, match="type complex is not supported"):
        encode(1j)
    with pytest.raises(CodecError, match=r'sample\["s"\]\[1\]: str is not valid UTF-8'):
        encode({"s": ["ok", "\ud800"]})


def test_too_deep_nesting_is_a_clear_error() -> None:
    deep: Any = ()
    for _ in range(40):
        deep = (deep,)
    with pytest.raises(CodecError, match="nest more than"):
        encode(deep)
    ok: Any = ()
    for _ in range(20):
        ok = (ok,)
    roundtrip(ok)


# --- pickle opt-in --------------------------------------------------------------------------------


class Custom:
    def __init__(self, v: int) -> None:
        self.v = v

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Custom) and other.v == self.v

    __hash__ = None  # type: ignore[assignment]


def test_pickle_needs_opt_in_on_both_sides() -> None:
    sample: dict[str, Any] = {"ids": torch.arange(3), "c": [Custom(3)]}
    with pytest.raises(CodecError, match="allow_pickle=True"):
        encode(sample)
    payload = encode(sample, allow_pickle=True)
    with pytest.raises(CodecError, match="pickled"):
        decode(payload)
    out = decode(payload, allow_pickle=True)
    assert out["c"] == [Custom(3)] and torch.equal(out["ids"], sample["ids"])
    plain = encode({"x": 1}, allow_pickle=True)
    assert decode(plain) == {"x": 1}  # no pickled content, no flag


def test_pickle_record_refused_without_flag() -> None:
    """A forged payload with a pickle record but no header flag is still refused."""
    payload = bytearray(encode([Custom(1)], allow_pickle=True))
    payload[5] = 0  # clear the flag
    with pytest.raises(CodecError, match="pickled"):
        decode(bytes(payload))


def test_pickle_is_never_used_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle used")

    monkeypatch.setattr(pickle, "dumps", boom)
    monkeypatch.setattr(pickle, "loads", boom)
    roundtrip({"t": torch.ones(2), "a": np.zeros(2), "o": np.array([None], dtype=object), "n": np.int8(1)})


def test_unpicklable_with_opt_in() -> None:
    with pytest.raises(CodecError, match=r"sample\[0\]: type generator cannot be pickled"):
        encode([(i for i in range(2))], allow_pickle=True)


# --- header, foreign and hostile bytes ------------------------------------------------------------


def test_header_and_input_types() -> None:
    payload = encode({"a": torch.ones(3)})
    assert payload[:4] == MAGIC and payload[4] == FORMAT_VERSION
    assert_same(decode(bytearray(payload)), decode(memoryview(payload)))
    with pytest.raises(CodecError, match="expected bytes"):
        decode("text")  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "data",
    [b"", b"PRL", b"hello world, not a payload", pickle.dumps({"a": 1}), msgpack.packb({"a": 1})],
)
def test_foreign_bytes(data: bytes) -> None:
    with pytest.raises(CodecError, match="not a pr_loader codec payload"):
        decode(data)


def test_newer_version_and_unknown_flags() -> None:
    payload = bytearray(encode([1]))
    payload[4] = FORMAT_VERSION + 1
    with pytest.raises(CodecError, match="format version"):
        decode(bytes(payload))
    payload[4], payload[5] = FORMAT_VERSION, 0x80
    with pytest.raises(CodecError, match="unknown flags"):
        decode(bytes(payload))


def test_every_truncation_raises() -> None:
    payload = encode({"ids": torch.arange(4), "arr": np.arange(3), "s": "text", "t": (1, 2)})
    for cut in range(len(payload)):
        with pytest.raises(CodecError):
            decode(payload[:cut])


def frame(skeleton: bytes, raw: bytes = b"") -> bytes:
    return struct.pack("<4sBBQ", MAGIC, FORMAT_VERSION, 0, len(skeleton)) + skeleton + raw


def test_forged_lengths_do_not_allocate() -> None:
    with pytest.raises(CodecError, match="truncated"):
        decode(struct.pack("<4sBBQ", MAGIC, FORMAT_VERSION, 0, 2**63) + b"\x90")
    huge = struct.pack("<BBQ", 6, 2, 0) + struct.pack("<2Q", 2**31, 2**31)  # int64 [2^31, 2^31]
    with pytest.raises(CodecError, match="truncated"):
        decode(frame(msgpack.packb(msgpack.ExtType(2, huge))))
    overflow = struct.pack("<BBQ", 6, 2, 0) + struct.pack("<2Q", 0, 2**64 - 1)
    with pytest.raises(CodecError):
        decode(frame(msgpack.packb(msgpack.ExtType(2, overflow))))
    with pytest.raises(CodecError):  # msgpack array header claiming 2^32-1 items
        decode(frame(b"\xdd\xff\xff\xff\xff"))


def test_forged_dtypes_are_refused() -> None:
    for dtype in (b"|O", b"V8", b"(2,)i4", b"<U0", b"bogus"):
        record = struct.pack("<BQ", 1, 0) + struct.pack("<Q", 1) + dtype
        with pytest.raises(CodecError):
            decode(frame(msgpack.packb(msgpack.ExtType(3, record)), raw=b"\x00" * 8))
    with pytest.raises(CodecError, match="unknown tensor dtype code 200"):
        decode(frame(msgpack.packb(msgpack.ExtType(2, struct.pack("<BBQ", 200, 0, 0)))))
    with pytest.raises(CodecError, match="unknown extension type 99"):
        decode(frame(msgpack.packb(msgpack.ExtType(99, b""))))


def test_deprecated_dtype_aliases_are_refused_without_a_warning() -> None:
    """A corrupt payload may spell a dtype numpy still parses with a DeprecationWarning ('a' for 'S'): it is
    refused before numpy sees it (found by test_property_corruption)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for dtype in (b"a", b"a5", b"|a5", b"<i8 ", b"i8"):
            record = struct.pack("<BQ", 1, 0) + struct.pack("<Q", 1) + dtype
            with pytest.raises(CodecError, match="not a dtype string"):
                decode(frame(msgpack.packb(msgpack.ExtType(3, record)), raw=b"\x00" * 8))


def test_nesting_bombs() -> None:
    inner = msgpack.packb([])
    for _ in range(5000):
        inner = msgpack.packb([msgpack.ExtType(1, inner)])
    with pytest.raises(CodecError, match="nesting"):
        decode(frame(inner))
    with pytest.raises(CodecError):
        decode(frame(b"\x91" * 100_000 + b"\xc0"))


# --- property tests -------------------------------------------------------------------------------


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(TORCH_DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    t = random_tensor(dtype, shape, seed=draw(st.integers(0, 2**16)))
    if t.dim() == 2 and draw(st.booleans()):
        t = t.t()
    return t


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray[Any, Any]:
    dt = np.dtype(draw(st.sampled_from(NUMPY_DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    data = draw(st.binary(min_size=math.prod(shape) * dt.itemsize, max_size=math.prod(shape) * dt.itemsize))
    arr = np.frombuffer(data, dt).reshape(shape)
    return (arr.view(np.uint8) & 1 == 1) if dt.kind == "b" else arr


def object_array(items: list[Any]) -> np.ndarray[Any, Any]:
    out = np.empty(len(items), dtype=object)
    for i, item in enumerate(items):  # element by element: np.array() would convert tensors and lists
        out[i] = item
    return out


np_scalars = arrays().filter(lambda a: a.size > 0).map(lambda a: a.reshape(-1)[0])
keys = st.one_of(st.text(max_size=6), st.integers(-(2**70), 2**70), st.binary(max_size=4), st.none())
leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**80), 2**80),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    tensors(),
    arrays(),
    np_scalars,
)
samples = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=4),
        st.lists(children, max_size=4).map(tuple),
        st.dictionaries(keys, children, max_size=4),
        st.lists(children, max_size=4).map(object_array),
    ),
    max_leaves=12,
)
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(samples)
def test_property_roundtrip(sample: Any) -> None:
    roundtrip(sample)


CORPUS = [
    encode({"ids": torch.arange(6).view(2, 3), "mask": torch.ones(3, dtype=torch.bool), "p": "prompt"}),
    encode(
        {
            "t": (1, [2.5, None], {3: b"x"}),
            "a": np.arange(4, dtype=">i2"),
            "o": np.array([[1, "a"], [np.zeros(2), (2,)]], dtype=object),
            "n": np.float16(2),
            "big": -(2**90),
        }
    ),
]


@PROPERTY
@given(
    st.sampled_from(CORPUS),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=6),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.binary(max_size=8),
)
def test_property_corruption(
    payload: bytes, flips: list[tuple[int, int]], cut: int | None, junk: bytes
) -> None:
    data = bytearray(payload)
    for pos, byte in flips:
        data[pos % len(data)] = byte
    if cut is not None:
        data = data[: cut % (len(data) + 1)]
    data += junk
    try:
        out = decode(bytes(data))
    except CodecError:
        with pytest.raises(CodecError):
            decode_raw_tensors(bytes(data))
    else:
        assert_same(out, materialise(decode_raw_tensors(bytes(data))))


def test_format_constants_are_stable() -> None:
    """Renumbering ext or dtype codes would make old payloads decode wrongly."""
    assert codec._CODE_TO_TORCH[1] is torch.bool and codec._CODE_TO_TORCH[6] is torch.int64
    assert codec._CODE_TO_TORCH[11] is torch.bfloat16 and codec._CODE_TO_TORCH[12] is torch.float32
    assert (codec._EXT_TUPLE, codec._EXT_TENSOR, codec._EXT_PICKLE) == (1, 2, 7)


def _outcome(decode_one: Any, data: Any) -> tuple[str, Any]:
    try:
        return "ok", materialise(decode_one(data))
    except CodecError as exc:
        return "error", str(exc)


@pytest.mark.parametrize("raw_tensors", [False, True], ids=["tensors", "raw"])
def test_row_decoder_decodes_each_row_as_a_fresh_decode_does(raw_tensors: bool) -> None:
    """One decoder reused over a batch: every row (good, corrupt, refused, decoded eagerly) comes out as a
    decode of its own would give, and earlier rows' tensors stay intact while later rows decode."""
    good = encode({"ids": torch.arange(6).view(2, 3), "p": "prompt", "i": 7})
    buffer = memoryview(b"junk" + good + CORPUS[1] + b"tail")
    corrupt = bytearray(good)
    corrupt[len(good) // 2] ^= 0xFF
    rows: list[Any] = [
        good, good[:-3], buffer[4 : 4 + len(good)], bytes(corrupt), CORPUS[1], b"not a payload",
        encode([Custom(1)], allow_pickle=True), encode({(1, torch.tensor(2)): torch.arange(3)}),
        buffer[4 + len(good) : -4], memoryview(good)[::2], bytearray(CORPUS[0]), 42, good[:5], good,
    ]  # fmt: skip
    fresh = decode_raw_tensors if raw_tensors else decode
    decode_row = codec.row_decoder(raw_tensors=raw_tensors)
    outcomes = [_outcome(decode_row, row) for row in rows]
    for row, (kind, value) in zip(rows, outcomes):
        expected_kind, expected = _outcome(fresh, row)
        assert kind == expected_kind, row
        if kind == "ok":
            assert_same(value, expected)
        else:
            assert value == expected
    assert [kind for kind, _ in outcomes] == ["ok", "error", "ok", "error", "ok", "error", "error", "ok",
                                              "ok", "error", "ok", "error", "error", "ok"]  # fmt: skip
    kept = [decode_row(good) for _ in range(3)]  # (decoded before the next rows, read after them)
    decode_row(CORPUS[1])
    for sample in kept:
        assert_same(materialise(sample)["ids"], torch.arange(6).view(2, 3))


def test_row_decoder_takes_pickle_only_when_allowed() -> None:
    payload = encode([Custom(1), torch.ones(2)], allow_pickle=True)
    for raw_tensors in (False, True):
        with pytest.raises(CodecError, match="pickled"):
            codec.row_decoder(raw_tensors=raw_tensors)(payload)
        out = materialise(codec.row_decoder(allow_pickle=True, raw_tensors=raw_tensors)(payload))
        assert out[0] == Custom(1) and torch.equal(out[1], torch.ones(2))


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(CORPUS), st.integers(0, 10_000), st.integers(0, 255)), max_size=8))
def test_property_row_decoder_matches_fresh_decodes(rows: list[tuple[bytes, int, int]]) -> None:
    payloads = []
    for payload, pos, byte in rows:
        data = bytearray(payload)
        data[pos % len(data)] = byte
        payloads.append(bytes(data))
    decode_row = codec.row_decoder(raw_tensors=True)
    for data in payloads:
        kind, value = _outcome(decode_row, data)
        expected_kind, expected = _outcome(decode_raw_tensors, data)
        assert kind == expected_kind
        if kind == "ok":
            assert_same(value, expected)
        else:
            assert value == expected
