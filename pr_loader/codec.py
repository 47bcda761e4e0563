"""Sample codec: one sample <-> bytes, exact, fast, and safe to decode.

A *sample* is a nested ``dict`` / ``list`` / ``tuple`` of ``None``, ``bool``, ``int`` (any size), ``float``,
``str``, ``bytes``, torch tensors (every dense dtype), numpy arrays (numeric, bool, datetime, fixed-width
``S``/``U``, and object arrays holding samples) and numpy scalars.  ``decode(encode(x))`` gives back the same
types, dtypes, shapes, bit patterns (NaN payloads included), dict key order and tuple-vs-list.

Dict keys may be any hashable value the codec supports (``str``, ``int``, ``bytes``, ``float``, ``bool``,
``None``, numpy scalars, tuples of these).  Notes: ``bytearray`` / ``memoryview`` decode as ``bytes``; dict,
list and tuple subclasses are rejected (no silent type change); tensors decode as plain CPU tensors with
``requires_grad=False`` (device, subclass and autograd state are not part of a sample).

Layout::

    header   "PRLC" | version u8 | flags u8 | skeleton length u64 (little endian)
    skeleton msgpack of the sample; tensors and arrays are ext records (dtype, shape, offset)
    raw      the tensor and array bytes, back to back, in C order

Encoding copies each tensor's bytes exactly once (straight into the output via ``bytes.join``).  Decoding
copies them once more into memory the tensor owns (a ``bytearray`` when small, a numpy buffer, which gets
huge pages, from 1 MiB): the payload ``bytes`` are immutable, so a zero-copy tensor over them would be
read-only (a write would corrupt an immutable object).  That copy costs about one ``memcpy`` (see
``benchmarks/bench_codec.py``).  ``decode(data, copy=False)`` skips it for tensors when the caller copies
anyway (``torch.stack`` in a collate function): the tensors then view ``data`` and must never be written.
``decode_raw_tensors`` goes one step further for :mod:`pr_loader.collate`: each tensor stays a
:class:`RawTensor` (its checked bytes, dtype and shape), so that a whole batch column is copied in one go
instead of paying ~3 us per ``torch.frombuffer`` view and then ``torch.stack``.

Decoding never runs code (no pickle unless both sides opt in with ``allow_pickle=True``), never allocates
more than the payload's size because of a forged length, and bounds nesting depth; any corrupt, truncated or
foreign input raises :class:`~pr_loader.errors.CodecError`.
"""

from __future__ import annotations

import ctypes
import functools
import math
import pickle
import re
import struct
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import numpy as np
import torch

from pr_loader.errors import CodecError

__all__ = ["FORMAT_VERSION", "MAGIC", "decode", "encode"]  # RawTensor & co. are internal (pr_loader.collate)

MAGIC = b"PRLC"
FORMAT_VERSION = 1

_HEADER = struct.Struct("<4sBBQ")  # magic, format version, flags, skeleton length
_FLAG_PICKLE = 1
_KNOWN_FLAGS = _FLAG_PICKLE

# Ext type codes of the skeleton (part of the format: never renumber).
_EXT_TUPLE = 1
_EXT_TENSOR = 2
_EXT_NDARRAY = 3
_EXT_NPSCALAR = 4
_EXT_OBJARRAY = 5
_EXT_BIGINT = 6
_EXT_PICKLE = 7

_TENSOR_HEAD = struct.Struct("<BBQ")  # dtype code, ndim, offset into raw; then ndim u64 dims
_ARRAY_HEAD = struct.Struct("<BQ")  # ndim, offset into raw; then ndim u64 dims, then the dtype string
_MAX_DEPTH = 32  # nesting of tuples / object arrays (each level is one msgpack call on the C stack)
_MAX_NDIM = 64
_MAX_DTYPE_STR = 32
_DTYPE_STR = re.compile(rb"[<>|][biufcmMSU]\d+(?:\[\w+\])?")  # what numpy's dtype.str looks like
_SMALL_COPY = 1 << 20  # decoded tensors below this size are copied into a bytearray, larger ones via numpy
_UINT8 = np.dtype(np.uint8)
_EMPTY = memoryview(b"")
_VIEW_WARNING_SPENT = threading.Event()
_VIEW_WARNING_LOCK = threading.Lock()
_unpackb = msgpack.unpackb

# Torch dtype codes (part of the format: never renumber). Newer dtypes are optional.
_TORCH_DTYPE_NAMES = (
    "bool", "uint8", "int8", "int16", "int32", "int64", "uint16", "uint32", "uint64",
    "float16", "bfloat16", "float32", "float64", "complex32", "complex64", "complex128",
    "float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu",
    "float4_e2m1fn_x2",
)  # fmt: skip
_CODE_TO_TORCH: dict[int, torch.dtype] = {
    code: dt
    for code, name in enumerate(_TORCH_DTYPE_NAMES, start=1)
    if isinstance(dt := getattr(torch, name, None), torch.dtype)
}
_TORCH_TO_CODE: dict[torch.dtype, int] = {dt: code for code, dt in _CODE_TO_TORCH.items()}
_CODE_TO_ITEMSIZE: dict[int, int] = {code: dt.itemsize for code, dt in _CODE_TO_TORCH.items()}
_NP_KINDS = frozenset("biufcmMSU")  # raw-bytes numpy kinds; "O" is handled element by element
_PICKLE_REFUSED = "payload holds pickled objects; decode with allow_pickle=True only if you trust it"
_PLAIN_TYPES = (type(None), bool, int, float, str, bytes, bytearray, memoryview)


def _np_dtype_problem(dt: np.dtype[Any], scalar: bool = False) -> str | None:
    """Why numpy dtype ``dt`` cannot be stored as raw bytes (empty ``S``/``U`` only as scalars), or None."""
    if (
        dt.kind not in _NP_KINDS
        or dt.fields is not None
        or dt.subdtype is not None
        or (dt.itemsize == 0 and not scalar)
    ):
        return f"numpy dtype {dt!s} is not supported"
    return None


def _leaf_problem(obj: object, allow_pickle: bool) -> str | None:
    """Why ``obj`` (not a plain msgpack type or container) cannot be encoded, or None if it can."""
    if isinstance(obj, torch.Tensor):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter):
            return f"tensor subclass {type(obj).__name__} is not supported"
        if obj.layout is not torch.strided or obj.is_nested or obj.dtype not in _TORCH_TO_CODE:
            return f"tensor of dtype {obj.dtype} and layout {obj.layout} is not supported"
        return None
    if type(obj) is np.ndarray:
        return None if obj.dtype.hasobject else _np_dtype_problem(obj.dtype)
    if isinstance(obj, np.generic):
        return _np_dtype_problem(obj.dtype, scalar=True)
    if allow_pickle:
        try:
            pickle.dumps(obj, protocol=5)
        except Exception as exc:
            return f"type {type(obj).__name__} cannot be pickled: {exc}"
        return None
    return f"type {type(obj).__name__} is not supported (encode with allow_pickle=True to pickle it)"


def _index(key: object) -> str:
    if isinstance(key, str) and '"' not in key and "\\" not in key:
        return f'["{key}"]'
    return f"[{key!r}]"


def _find_problem(obj: object, path: str, allow_pickle: bool) -> str | None:
    """First unsupported value below ``obj`` as ``'<path>: <reason>'`` (slow; only used after a failure)."""
    kind = type(obj)
    if kind is str:
        try:
            obj.encode()  # type: ignore[attr-defined]
        except UnicodeEncodeError as exc:
            return f"{path}: str is not valid UTF-8 ({exc.reason})"
        return None
    if kind in _PLAIN_TYPES:
        return None
    if kind is dict:
        for key, value in obj.items():  # type: ignore[attr-defined]
            problem = None if type(key) in _PLAIN_TYPES else _find_problem(key, path, allow_pickle)
            if problem is not None:
                return f"{problem} (as a dict key)"
            problem = _find_problem(value, path + _index(key), allow_pickle)
            if problem is not None:
                return problem
        return None
    if kind is list or kind is tuple:
        for i, value in enumerate(obj):  # type: ignore[arg-type]
            problem = _find_problem(value, f"{path}[{i}]", allow_pickle)
            if problem is not None:
                return problem
        return None
    if kind is np.ndarray and obj.dtype.hasobject:  # type: ignore[attr-defined]
        array: np.ndarray[Any, Any] = obj  # type: ignore[assignment]
        for idx in np.ndindex(array.shape):
            problem = _find_problem(array[idx], f"{path}[{', '.join(map(str, idx))}]", allow_pickle)
            if problem is not None:
                return problem
        return None
    reason = _leaf_problem(obj, allow_pickle)
    return None if reason is None else f"{path}: {reason}"


class _Unsupported(Exception):
    """Raised inside the msgpack hook; turned into a CodecError with the key path."""


class _Encoder:
    """State of one ``encode`` call: the raw buffers collected so far and the nesting depth."""

    __slots__ = ("allow_pickle", "buffers", "depth", "keep", "offset", "pickled")

    def __init__(self, allow_pickle: bool) -> None:
        self.allow_pickle = allow_pickle
        self.buffers: list[Any] = []
        self.keep: list[torch.Tensor] = []
        self.offset = 0
        self.depth = 0
        self.pickled = False

    def pack(self, obj: object) -> bytes:
        if self.depth >= _MAX_DEPTH:
            raise _Unsupported(f"tuples / object arrays nest more than {_MAX_DEPTH} levels deep")
        self.depth += 1
        try:
            packer = msgpack.Packer(default=self.default, strict_types=True, use_bin_type=True)
            packed: bytes = packer.pack(obj)
            return packed
        finally:
            self.depth -= 1

    def default(self, obj: Any) -> msgpack.ExtType:
        kind = type(obj)
        if kind is tuple:
            return msgpack.ExtType(_EXT_TUPLE, self.pack(list(obj)))
        if kind is torch.Tensor or kind is torch.nn.Parameter:
            return self.tensor(obj)
        if kind is np.ndarray:
            return self.ndarray(obj)
        if isinstance(obj, np.generic) and _np_dtype_problem(obj.dtype, scalar=True) is None:
            dtype_str = obj.dtype.str.encode()
            raw = obj.tobytes() if obj.dtype.itemsize else b""  # an empty np.bytes_ has itemsize 0
            return msgpack.ExtType(_EXT_NPSCALAR, bytes((len(dtype_str),)) + dtype_str + raw)
        if kind is int:  # only called for ints outside the 64-bit range
            return msgpack.ExtType(
                _EXT_BIGINT, obj.to_bytes(obj.bit_length() // 8 + 1, "little", signed=True)
            )
        reason = _leaf_problem(obj, self.allow_pickle)
        if reason is not None:
            raise _Unsupported(reason)
        self.pickled = True
        return msgpack.ExtType(_EXT_PICKLE, pickle.dumps(obj, protocol=5))

    def tensor(self, t: torch.Tensor) -> msgpack.ExtType:
        code = _TORCH_TO_CODE.get(t.dtype)
        if code is None or t.layout is not torch.strided or t.is_nested:
            raise _Unsupported(_leaf_problem(t, False))
        if t.requires_grad:
            t = t.detach()
        if not t.is_cpu:
            t = t.cpu()
        if t.is_conj():
            t = t.resolve_conj()
        if t.is_neg():
            t = t.resolve_neg()
        if not t.is_contiguous():
            t = t.contiguous()
        nbytes = t.nbytes
        offset = self.offset
        if nbytes:
            # A ctypes view of the tensor's contiguous CPU memory is ~8x cheaper to make than
            # t.view(-1).view(torch.uint8).numpy(); self.keep holds t alive until encode() joins the buffers.
            self.buffers.append((ctypes.c_char * nbytes).from_address(t.data_ptr()))
            self.keep.append(t)
            self.offset = offset + nbytes
        ndim = t.dim()
        return msgpack.ExtType(_EXT_TENSOR, struct.pack(f"<BBQ{ndim}Q", code, ndim, offset, *t.shape))

    def ndarray(self, a: np.ndarray[Any, Any]) -> msgpack.ExtType:
        if a.dtype.hasobject:
            return msgpack.ExtType(_EXT_OBJARRAY, self.pack([list(a.shape), a.ravel().tolist()]))
        problem = _np_dtype_problem(a.dtype)
        if problem is not None:
            raise _Unsupported(problem)
        if not a.flags.c_contiguous:
            a = a.copy(order="C")
        offset = self.offset
        if a.nbytes:
            self.buffers.append(a.reshape(-1).view(np.uint8))
            self.offset = offset + a.nbytes
        head = struct.pack(f"<BQ{a.ndim}Q", a.ndim, offset, *a.shape)
        return msgpack.ExtType(_EXT_NDARRAY, head + a.dtype.str.encode())


def encode(sample: Any, *, allow_pickle: bool = False) -> bytes:
    """Encode one sample into bytes (see the module docstring for what a sample may hold).

    Raises CodecError naming the key path of the first unsupported value, e.g.
    ``sample["extra"][3]: type Foo is not supported``.  With ``allow_pickle=True`` unsupported values are
    pickled instead, and the payload can only be decoded with ``allow_pickle=True``.
    """
    encoder = _Encoder(allow_pickle)
    try:
        skeleton = encoder.pack(sample)
    except Exception as exc:
        try:
            problem = _find_problem(sample, "sample", allow_pickle)
        except RecursionError:
            problem = None
        raise CodecError(problem or f"cannot encode sample: {exc}") from exc
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, _FLAG_PICKLE if encoder.pickled else 0, len(skeleton))
    return b"".join([header, skeleton, *encoder.buffers])


_DIMS = [struct.Struct(f"<{n}Q") for n in range(_MAX_NDIM + 1)]  # precompiled: decode is per-sample hot


def _shape(data: bytes, start: int, ndim: int) -> tuple[int, ...]:
    if ndim > _MAX_NDIM:
        raise CodecError(f"corrupt payload: {ndim} dimensions")
    return _DIMS[ndim].unpack_from(data, start)


def _spend_view_warning() -> None:
    """Let torch emit its once-per-process "buffer is not writable" warning now, silenced: views made by
    ``decode(copy=False)`` are read-only by contract, so the warning would only be noise."""
    with _VIEW_WARNING_LOCK:
        if not _VIEW_WARNING_SPENT.is_set():
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "The given buffer is not writable", UserWarning)
                torch.frombuffer(b"\0", dtype=torch.uint8)
            _VIEW_WARNING_SPENT.set()


def _make_tensor(data: memoryview, dtype: torch.dtype, shape: tuple[int, ...], copy: bool) -> torch.Tensor:
    """The tensor of ``data`` (checked to hold exactly ``shape``): a view of it, or else a private copy."""
    nbytes = data.nbytes
    if nbytes == 0:
        return torch.empty(shape, dtype=dtype)
    if not copy:  # a view of the payload (it keeps the payload alive)
        if not _VIEW_WARNING_SPENT.is_set():
            _spend_view_warning()
        t = torch.frombuffer(data, dtype=dtype)
    elif nbytes < _SMALL_COPY:  # a private bytearray is the cheapest writable buffer for small tensors
        t = torch.frombuffer(bytearray(data), dtype=dtype)
    else:  # numpy allocates large arrays on transparent huge pages: ~3x faster than bytearray for 64 MiB
        t = torch.from_numpy(np.frombuffer(data, _UINT8).copy()).view(dtype)
    return t if len(shape) == 1 else t.view(shape)


class NeedsTensor(Exception):
    """Internal signal, never a user-facing error: a :class:`RawTensor` was used like a tensor (hashed,
    sized, iterated or indexed), so the caller must redo the work with real tensors."""


class RawTensor:
    """Internal: a checked tensor record of a payload, not yet a tensor (see :func:`decode_raw_tensors`).

    ``data`` views exactly the tensor's bytes in the payload (C order), or in the row of a batch column they
    were received into (``column``: the column and the row; :class:`pr_loader.collate.ColumnPlacer`). It is
    no container and no dict key:
    ``len``, iteration, indexing and hashing raise :class:`NeedsTensor`, which :mod:`pr_loader.collate`
    answers by falling back to real tensors.
    """

    __slots__ = ("column", "data", "dtype", "shape")

    def __init__(self, data: memoryview, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.data = data
        self.dtype = dtype
        self.shape = shape
        # (batch column, row) when ``data`` is that row of a column it was received into (ColumnPlacer)
        self.column: tuple[torch.Tensor, int] | None = None

    def tensor(self, copy: bool = True) -> torch.Tensor:
        """The tensor ``decode(payload, copy=copy)`` gives: private and writable, or a read-only view."""
        return _make_tensor(self.data, self.dtype, self.shape, copy)

    def __repr__(self) -> str:
        return f"RawTensor(dtype={self.dtype}, shape={self.shape})"

    def __hash__(self) -> int:
        raise NeedsTensor("a tensor used as a dict key")

    def __len__(self) -> int:
        raise NeedsTensor("len() of a tensor")

    def __iter__(self) -> Iterator[Any]:
        raise NeedsTensor("iteration over a tensor")

    def __getitem__(self, key: object) -> Any:
        raise NeedsTensor("indexing a tensor")


@functools.lru_cache(maxsize=1024)
def _tensor_record(data: bytes) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """The dtype, shape, raw offset and byte size of a checked tensor record (cached: the rows of a batch
    repeat the same few records, and parsing one costs about as much as the rest of a small row's decode)."""
    code, ndim, offset = _TENSOR_HEAD.unpack_from(data)
    dtype = _CODE_TO_TORCH.get(code)
    if dtype is None:
        raise CodecError(f"unknown tensor dtype code {code} (written by a newer torch or pr_loader?)")
    if len(data) != _TENSOR_HEAD.size + 8 * ndim:
        raise CodecError("corrupt payload: tensor record of the wrong size")
    shape = _shape(data, _TENSOR_HEAD.size, ndim)
    return dtype, shape, offset, math.prod(shape) * _CODE_TO_ITEMSIZE[code]


class Decoder:
    """Internal (also for :mod:`pr_loader.collate`): what one payload decodes with (the raw area, the
    nesting depth, what tensors become: private copies, views of the payload, or :class:`RawTensor`
    records), reused for the rows of a batch by :func:`row_decoder`."""

    __slots__ = ("allow_pickle", "copy", "depth", "raw", "raw_nbytes", "raw_tensors", "records", "refused")

    def __init__(self, allow_pickle: bool, copy: bool, raw_tensors: bool) -> None:
        self.raw = _EMPTY
        self.raw_nbytes = 0
        self.allow_pickle = allow_pickle
        self.copy = copy
        self.raw_tensors = raw_tensors
        self.depth = 0
        self.records: list[tuple[int, RawTensor]] | None = None  # (collate._placeable: RawTensors by offset)
        self.refused = ~_KNOWN_FLAGS | (0 if allow_pickle else _FLAG_PICKLE)  # (flags skeleton_end refuses)

    def decode(self, data: bytes | bytearray | memoryview) -> Any:
        """One payload. A decoder is reused for the rows of a batch, one row after another (one thread)."""
        try:
            view = memoryview(data)
            if view.ndim != 1 or view.format != "B" or not view.c_contiguous:
                view = view.cast("B")
        except (TypeError, ValueError) as exc:
            raise CodecError(f"expected bytes, got {type(data).__name__}") from exc
        size = len(view)
        if size < _HEADER.size:
            skeleton_end(view)  # (raises)
        magic, version, flags, skeleton_len = _HEADER.unpack_from(view)
        if magic != MAGIC or version != FORMAT_VERSION or flags & self.refused:
            skeleton_end(view, self.allow_pickle)  # (raises the reason)
        end = _HEADER.size + skeleton_len
        if end > size:
            raise CodecError(f"truncated payload: skeleton needs {end} bytes, {size} present")
        self.raw = view[end:]
        self.raw_nbytes = size - end
        self.depth = 1
        try:
            return _unpackb(view[_HEADER.size : end], ext_hook=self.ext_hook, strict_map_key=False, raw=False)
        except (CodecError, NeedsTensor):
            raise
        except Exception as exc:
            raise CodecError(f"corrupt payload: {type(exc).__name__}: {exc}") from exc
        finally:
            self.depth = 0

    def unpack(self, data: bytes | memoryview) -> Any:
        if self.depth >= _MAX_DEPTH:
            raise CodecError(f"corrupt payload: nesting deeper than {_MAX_DEPTH} levels")
        self.depth += 1
        try:
            return _unpackb(data, ext_hook=self.ext_hook, strict_map_key=False, raw=False)
        finally:
            self.depth -= 1

    def check_raw(self, offset: int, nbytes: int) -> None:
        if offset + nbytes > self.raw_nbytes:
            raise CodecError(
                f"truncated payload: data at offset {offset} needs {nbytes} bytes, "
                f"{max(len(self.raw) - offset, 0)} present"
            )

    def copy_raw(self, dtype: np.dtype[Any], offset: int, count: int) -> np.ndarray[Any, Any]:
        # numpy allocates large arrays on transparent huge pages: ~3x faster than bytearray for 64 MiB
        return np.frombuffer(self.raw, dtype, count, offset).copy()

    def ext_hook(self, code: int, data: bytes) -> Any:
        if code == _EXT_TENSOR:  # (the hot path, inlined: a batch decodes several per row)
            torch_dtype, shape, offset, nbytes = _tensor_record(data)
            if nbytes and offset + nbytes > self.raw_nbytes:
                self.check_raw(offset, nbytes)
            tensor_bytes = self.raw[offset : offset + nbytes] if nbytes else _EMPTY
            if self.raw_tensors:
                record = RawTensor(tensor_bytes, torch_dtype, shape)
                if self.records is not None and nbytes:
                    self.records.append((offset, record))
                return record
            return _make_tensor(tensor_bytes, torch_dtype, shape, self.copy)
        if code == _EXT_NDARRAY:
            return self.ndarray(data)
        if code == _EXT_TUPLE:
            items = self.unpack(data)
            if type(items) is not list:
                raise CodecError("corrupt payload: tuple record does not hold a list")
            return tuple(items)
        if code == _EXT_NPSCALAR:
            n = data[0]
            dtype = self.np_dtype(data[1 : 1 + n], scalar=True)
            if len(data) != 1 + n + dtype.itemsize:
                raise CodecError("corrupt payload: numpy scalar of the wrong size")
            return np.frombuffer(data, dtype, 1, 1 + n)[0] if dtype.itemsize else dtype.type()
        if code == _EXT_OBJARRAY:
            return self.object_array(data)
        if code == _EXT_BIGINT:
            return int.from_bytes(data, "little", signed=True)
        if code == _EXT_PICKLE:
            if not self.allow_pickle:
                raise CodecError(_PICKLE_REFUSED)
            return pickle.loads(data)
        raise CodecError(f"corrupt payload: unknown extension type {code}")

    def np_dtype(self, text: bytes, scalar: bool = False) -> np.dtype[Any]:
        if len(text) > _MAX_DTYPE_STR:
            raise CodecError("corrupt payload: numpy dtype string too long")
        if not _DTYPE_STR.fullmatch(text):  # (before numpy parses it: an alias it deprecates would warn)
            raise CodecError(f"corrupt payload: {text!r} is not a dtype string encode writes")
        dtype = np.dtype(text.decode("ascii"))
        problem = _np_dtype_problem(dtype, scalar)
        if problem is not None:
            raise CodecError(f"corrupt payload: {problem}")
        return dtype

    def ndarray(self, data: bytes) -> np.ndarray[Any, Any]:
        ndim, offset = _ARRAY_HEAD.unpack_from(data)
        shape = _shape(data, _ARRAY_HEAD.size, ndim)
        dtype = self.np_dtype(data[_ARRAY_HEAD.size + 8 * ndim :])
        nbytes = math.prod(shape) * dtype.itemsize
        if nbytes == 0:
            return np.empty(shape, dtype)
        self.check_raw(offset, nbytes)
        return self.copy_raw(dtype, offset, nbytes // dtype.itemsize).reshape(shape)

    def object_array(self, data: bytes) -> np.ndarray[Any, Any]:
        record = self.unpack(data)
        if type(record) is not list or len(record) != 2 or type(record[1]) is not list:
            raise CodecError("corrupt payload: malformed object array record")
        shape, items = record
        if (
            type(shape) is not list
            or len(shape) > _MAX_NDIM
            or not all(type(d) is int and d >= 0 for d in shape)
            or math.prod(shape) != len(items)
        ):
            raise CodecError("corrupt payload: object array shape does not match its items")
        return np.fromiter(items, dtype=object, count=len(items)).reshape(shape)


def decode(data: bytes | bytearray | memoryview, *, allow_pickle: bool = False, copy: bool = True) -> Any:
    """Decode bytes made by :func:`encode`.

    Raises CodecError for foreign, corrupt or truncated bytes, a newer format version, or pickled content
    without ``allow_pickle=True`` (only opt in for payloads from a trusted source: unpickling runs code).
    Tensors and arrays are freshly allocated and writable; they never share memory with ``data``.

    ``copy=False``: tensors are zero-copy views of ``data`` instead (keeping it alive), possibly unaligned.
    They MUST NOT be written (torch has no read-only tensors; a write corrupts ``data``, an immutable
    ``bytes`` for all Python knows) and are meant to be copied, e.g. by ``torch.stack``. numpy arrays
    are copied either way.
    """
    return Decoder(allow_pickle, copy, False).decode(data)


def decode_raw_tensors(data: bytes | bytearray | memoryview, *, allow_pickle: bool = False) -> Any:
    """Internal, for :func:`pr_loader.collate.collate_raw` (which copies each batch column once): like
    :func:`decode` (same checks, same CodecErrors), but each tensor is a :class:`RawTensor`, its bytes still
    in ``data``. A sample with a tensor in a dict key decodes as ``decode`` does (a RawTensor is unhashable).
    """
    return row_decoder(allow_pickle=allow_pickle, raw_tensors=True)(data)


def row_decoder(*, allow_pickle: bool = False, raw_tensors: bool = False) -> Callable[[Any], Any]:
    """Internal: :func:`decode` (or, ``raw_tensors``, :func:`decode_raw_tensors`) for the rows of one batch,
    called one row after another on one thread: the decoder's state is set up once, not per row (a sixth
    to a quarter of a small row's decode, measured)."""
    if not raw_tensors:
        return Decoder(allow_pickle, True, False).decode
    decode_raw = Decoder(allow_pickle, False, True).decode

    def decode_row(data: bytes | bytearray | memoryview) -> Any:
        try:
            return decode_raw(data)
        except NeedsTensor:
            return decode(data, allow_pickle=allow_pickle)

    return decode_row


HEAD_SIZE = _HEADER.size  # the bytes of a payload that :func:`skeleton_end` reads


def skeleton_end(view: memoryview, allow_pickle: bool = False) -> int:
    """Where the skeleton of a payload ends, from its checked header (``view``: at least its first
    :data:`HEAD_SIZE` bytes); CodecError for a payload :func:`decode` refuses by its header. Internal, also
    for :class:`pr_loader.collate.ColumnPlacer`."""
    if len(view) < _HEADER.size:
        raise CodecError(f"not a pr_loader codec payload (starts with {bytes(view[:8])!r})")
    magic, version, flags, skeleton_len = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise CodecError(f"not a pr_loader codec payload (starts with {bytes(view[:8])!r})")
    if version != FORMAT_VERSION:
        raise CodecError(
            f"payload format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )
    if flags & ~_KNOWN_FLAGS:
        raise CodecError(f"payload has unknown flags {flags:#x} (written by a newer pr_loader?)")
    if flags & _FLAG_PICKLE and not allow_pickle:
        raise CodecError(_PICKLE_REFUSED)
    return int(_HEADER.size + skeleton_len)
