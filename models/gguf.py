"""GGUF reader (numpy only) and conversion to Hugging Face names, layouts and config.

Written from the GGUF format description (ggml ``docs/gguf.md``) and the block layouts in
``ggml-common.h`` / ``ggml-quants.c``. The ``gguf`` Python package is deliberately not used here:
it is only an independent reference in the tests.

File layout (little-endian)::

    magic "GGUF" | uint32 version (2 or 3) | uint64 tensor_count | uint64 kv_count
    kv_count x  (string key, uint32 value_type, value)
    tensor_count x (string name, uint32 n_dims, uint64 ne[n_dims], uint32 ggml_type, uint64 offset)
    padding to `general.alignment` (default 32)
    tensor data; each tensor at data_start + offset

A string is ``uint64 length`` followed by UTF-8 bytes (no terminator). ``ne[0]`` is the fastest
varying dimension, so the numpy shape is ``reversed(ne)``; quantisation blocks run along ``ne[0]``.

The file is memory-mapped, and :meth:`GGUFFile.tensor` dequantises a single tensor to float32, so
converting a model holds at most one dequantised tensor at a time (see :func:`iter_hf_tensors`).
"""
from __future__ import annotations

import dataclasses
import math
import os
import struct
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

__all__ = [
    "GGMLType",
    "GGUFFile",
    "TensorInfo",
    "SUPPORTED_TYPES",
    "dequantize",
    "hf_config_from_gguf",
    "iter_hf_tensors",
    "tokenizer_from_gguf",
]

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32


class GGMLType:
    """ggml tensor type ids as stored in a GGUF tensor info (``enum ggml_type``)."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


TYPE_NAMES: dict[int, str] = {
    v: k for k, v in vars(GGMLType).items() if not k.startswith("_") and isinstance(v, int)
}

# (elements per block, bytes per block). Used to size every tensor, including the ones this reader
# cannot dequantise, so a corrupt or truncated file is caught when it is opened. Q8_1 is left out on
# purpose: it is a scratch type for dot products, never stored in files, and its size has changed.
BLOCK_SIZES: dict[int, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.BF16: (1, 2),
    GGMLType.F64: (1, 8),
    GGMLType.I8: (1, 1),
    GGMLType.I16: (1, 2),
    GGMLType.I32: (1, 4),
    GGMLType.I64: (1, 8),
    GGMLType.Q4_0: (32, 18),
    GGMLType.Q4_1: (32, 20),
    GGMLType.Q5_0: (32, 22),
    GGMLType.Q5_1: (32, 24),
    GGMLType.Q8_0: (32, 34),
    GGMLType.Q2_K: (256, 84),
    GGMLType.Q3_K: (256, 110),
    GGMLType.Q4_K: (256, 144),
    GGMLType.Q5_K: (256, 176),
    GGMLType.Q6_K: (256, 210),
    GGMLType.Q8_K: (256, 292),
    GGMLType.IQ2_XXS: (256, 66),
    GGMLType.IQ2_XS: (256, 74),
    GGMLType.IQ3_XXS: (256, 98),
    GGMLType.IQ1_S: (256, 50),
    GGMLType.IQ4_NL: (32, 18),
    GGMLType.IQ3_S: (256, 110),
    GGMLType.IQ2_S: (256, 82),
    GGMLType.IQ4_XS: (256, 136),
    GGMLType.IQ1_M: (256, 56),
    GGMLType.TQ1_0: (256, 54),
    GGMLType.TQ2_0: (256, 66),
    GGMLType.MXFP4: (32, 17),
    GGMLType.NVFP4: (64, 36),
    GGMLType.Q1_0: (128, 18),
}


def type_name(ggml_type: int) -> str:
    return TYPE_NAMES.get(ggml_type, f"unknown ggml type {ggml_type}")


# ---------------------------------------------------------------------------------------------
# Dequantisation. Every function takes the raw bytes of a whole tensor (uint8, length a multiple
# of the block size) and returns a flat float32 array. Arithmetic follows ggml's reference
# `dequantize_row_*` in the same order (float32 throughout), so results are bit-identical to it.
# ---------------------------------------------------------------------------------------------


def _blocks(raw: np.ndarray, fields: list[tuple]) -> np.ndarray:
    """View raw bytes as an array of block records (a packed little-endian structured dtype)."""
    dtype = np.dtype(fields)
    return np.ascontiguousarray(raw).view(dtype)


def _f16(a: np.ndarray) -> np.ndarray:
    """float16 block scales as float32, shaped (n_blocks, 1) to broadcast over the block."""
    return a.astype(np.float32).reshape(-1, 1)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_0/Q4_1/Q5 layout: element j is the low nibble of qs[j], element j+16 its high nibble."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _deq_f32(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f4").astype(np.float32, copy=True)


def _deq_f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f2").astype(np.float32)


def _deq_bf16(raw: np.ndarray) -> np.ndarray:
    # bfloat16 is the top half of a float32.
    bits = np.ascontiguousarray(raw).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _deq_f64(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view("<f8").astype(np.float32)


def _deq_int(dtype: str) -> Callable[[np.ndarray], np.ndarray]:
    def deq(raw: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(raw).view(dtype).astype(np.float32)

    return deq


def _deq_q8_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("qs", "i1", 32)])
    return (_f16(b["d"]) * b["qs"].astype(np.float32)).reshape(-1)


def _deq_q4_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("qs", "u1", 16)])
    q = _nibbles(b["qs"]).astype(np.int8) - np.int8(8)
    return (q.astype(np.float32) * _f16(b["d"])).reshape(-1)


def _deq_q4_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)])
    q = _nibbles(b["qs"]).astype(np.float32)
    return (q * _f16(b["d"]) + _f16(b["m"])).reshape(-1)


def _q5_values(qh_u32: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """5-bit values: 4 low bits from the nibbles, bit 4 of element j from bit j of qh."""
    bits = (qh_u32.reshape(-1, 1) >> np.arange(32, dtype=np.uint32)) & 1
    return _nibbles(qs).astype(np.uint8) | (bits.astype(np.uint8) << 4)


def _deq_q5_0(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    q = _q5_values(b["qh"], b["qs"]).astype(np.int8) - np.int8(16)
    return (q.astype(np.float32) * _f16(b["d"])).reshape(-1)


def _deq_q5_1(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("m", "<f2"), ("qh", "<u4"), ("qs", "u1", 16)])
    q = _q5_values(b["qh"], b["qs"]).astype(np.float32)
    return (q * _f16(b["d"]) + _f16(b["m"])).reshape(-1)


def _k4_scales(scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K: 8 six-bit (scale, min) pairs packed in 12 bytes (ggml `get_scale_min_k4`)."""
    s = scales.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0x0F) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc.astype(np.float32), mn.astype(np.float32)


def _deq_q4_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qs", "u1", 128)])
    sc, mn = _k4_scales(b["scales"])
    d1 = (_f16(b["d"]) * sc)[:, :, None]  # (nb, 8, 1): one scale per 32 values
    m1 = (_f16(b["dmin"]) * mn)[:, :, None]
    qs = b["qs"].reshape(-1, 4, 1, 32)  # 4 chunks of 32 bytes -> 64 values each
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32).astype(np.float32)
    return (d1 * q - m1).reshape(-1)


def _deq_q5_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(
        raw,
        [("d", "<f2"), ("dmin", "<f2"), ("scales", "u1", 12), ("qh", "u1", 32), ("qs", "u1", 128)],
    )
    sc, mn = _k4_scales(b["scales"])
    d1 = (_f16(b["d"]) * sc)[:, :, None]
    m1 = (_f16(b["dmin"]) * mn)[:, :, None]
    qs = b["qs"].reshape(-1, 4, 1, 32)
    low = np.concatenate([qs & 0x0F, qs >> 4], axis=2).reshape(-1, 8, 32)
    # sub-block i (of 8) takes its fifth bit from bit i of qh[l].
    high = (b["qh"][:, None, :] >> np.arange(8, dtype=np.uint8)[None, :, None]) & 1
    q = (low | (high << 4)).astype(np.float32)
    return (d1 * q - m1).reshape(-1)


def _deq_q6_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("ql", "u1", 128), ("qh", "u1", 64), ("scales", "i1", 16), ("d", "<f2")])
    nb = b.shape[0]
    ql = b["ql"].reshape(nb, 2, 2, 32)  # (half, first/second 32 bytes, l)
    qh = b["qh"].reshape(nb, 2, 1, 32)
    low = np.stack([ql[:, :, 0] & 0x0F, ql[:, :, 1] & 0x0F, ql[:, :, 0] >> 4, ql[:, :, 1] >> 4], axis=2)
    high = (qh >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)  # (nb, 2, 4, 32)
    q = q.reshape(nb, 16, 16).astype(np.float32)  # 16 sub-blocks of 16 with one scale each
    d = (_f16(b["d"]) * b["scales"].astype(np.float32))[:, :, None]
    return (d * q).reshape(-1)


def _deq_q2_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("scales", "u1", 16), ("qs", "u1", 64), ("d", "<f2"), ("dmin", "<f2")])
    nb = b.shape[0]
    sc = b["scales"]
    dl = (_f16(b["d"]) * (sc & 0x0F).astype(np.float32))[:, :, None]
    ml = (_f16(b["dmin"]) * (sc >> 4).astype(np.float32))[:, :, None]
    qs = b["qs"].reshape(nb, 2, 1, 32)
    q = (qs >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)) & 3
    q = q.reshape(nb, 16, 16).astype(np.float32)
    return (dl * q - ml).reshape(-1)


def _deq_q3_k(raw: np.ndarray) -> np.ndarray:
    b = _blocks(raw, [("hmask", "u1", 32), ("qs", "u1", 64), ("scales", "u1", 12), ("d", "<f2")])
    nb = b.shape[0]
    s = b["scales"]
    lo, hi = s[:, 0:8], s[:, 8:12]
    sc = np.empty((nb, 16), np.uint8)
    sc[:, 0:4] = (lo[:, 0:4] & 0x0F) | ((hi & 3) << 4)
    sc[:, 4:8] = (lo[:, 4:8] & 0x0F) | (((hi >> 2) & 3) << 4)
    sc[:, 8:12] = (lo[:, 0:4] >> 4) | (((hi >> 4) & 3) << 4)
    sc[:, 12:16] = (lo[:, 4:8] >> 4) | (((hi >> 6) & 3) << 4)
    dl = (_f16(b["d"]) * (sc.astype(np.int8) - np.int8(32)).astype(np.float32))[:, :, None]
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (b["qs"].reshape(nb, 2, 1, 32) >> shifts) & 3  # (nb, half, j, l)
    # The high bit of value (half, j, l) is bit (4 * half + j) of hmask[l]; a clear bit subtracts 4.
    hbit = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)
    h = (b["hmask"].reshape(nb, 1, 1, 32) >> hbit) & 1
    q = q.astype(np.int8) - ((1 - h).astype(np.int8) << 2)
    q = q.reshape(nb, 16, 16).astype(np.float32)
    return (dl * q).reshape(-1)


_DEQUANT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    GGMLType.F32: _deq_f32,
    GGMLType.F16: _deq_f16,
    GGMLType.BF16: _deq_bf16,
    GGMLType.F64: _deq_f64,
    GGMLType.I8: _deq_int("i1"),
    GGMLType.I16: _deq_int("<i2"),
    GGMLType.I32: _deq_int("<i4"),
    GGMLType.I64: _deq_int("<i8"),
    GGMLType.Q4_0: _deq_q4_0,
    GGMLType.Q4_1: _deq_q4_1,
    GGMLType.Q5_0: _deq_q5_0,
    GGMLType.Q5_1: _deq_q5_1,
    GGMLType.Q8_0: _deq_q8_0,
    GGMLType.Q2_K: _deq_q2_k,
    GGMLType.Q3_K: _deq_q3_k,
    GGMLType.Q4_K: _deq_q4_k,
    GGMLType.Q5_K: _deq_q5_k,
    GGMLType.Q6_K: _deq_q6_k,
}

SUPPORTED_TYPES: frozenset[int] = frozenset(_DEQUANT)


def dequantize(raw: np.ndarray | bytes, ggml_type: int) -> np.ndarray:
    """Dequantise the raw bytes of whole blocks of `ggml_type` into a flat float32 array."""
    fn = _DEQUANT.get(ggml_type)
    if fn is None:
        raise ValueError(f"cannot dequantize ggml type {type_name(ggml_type)}")
    raw = np.frombuffer(raw, np.uint8) if isinstance(raw, (bytes, bytearray, memoryview)) else raw
    block, size = BLOCK_SIZES[ggml_type]
    if raw.size % size:
        raise ValueError(f"{raw.size} bytes is not a whole number of {type_name(ggml_type)} blocks ({size} B)")
    return fn(raw.reshape(-1))


# ---------------------------------------------------------------------------------------------
# File parsing
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order: reversed ggml `ne`
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int | None  # None only for a type whose block size this reader does not know

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)


class _Corrupt(Exception):
    pass


# GGUF metadata value types: id -> (struct format or None, size)
_SCALARS = {
    0: ("<B", 1),  # UINT8
    1: ("<b", 1),  # INT8
    2: ("<H", 2),  # UINT16
    3: ("<h", 2),  # INT16
    4: ("<I", 4),  # UINT32
    5: ("<i", 4),  # INT32
    6: ("<f", 4),  # FLOAT32
    7: ("<?", 1),  # BOOL
    10: ("<Q", 8),  # UINT64
    11: ("<q", 8),  # INT64
    12: ("<d", 8),  # FLOAT64
}
_NUMPY_SCALARS = {0: "u1", 1: "i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "u1", 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    def __init__(self, buf: memoryview):
        self.buf = buf
        self.pos = 0

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > len(self.buf):
            raise _Corrupt(f"needs {n} bytes at offset {self.pos}, past the end of the file ({len(self.buf)} bytes)")

    def unpack(self, fmt: str, size: int):
        self.need(size)
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value

    def u32(self) -> int:
        return self.unpack("<I", 4)

    def u64(self) -> int:
        return self.unpack("<Q", 8)

    def string(self) -> str | bytes:
        n = self.u64()
        self.need(n)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw  # kept verbatim rather than silently altered

    def value(self, vtype: int, depth: int = 0) -> Any:
        if vtype in _SCALARS:
            fmt, size = _SCALARS[vtype]
            return self.unpack(fmt, size)
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            if depth > 8:
                raise _Corrupt("arrays nested too deeply")
            etype = self.u32()
            n = self.u64()
            if etype in _NUMPY_SCALARS:
                dt = np.dtype(_NUMPY_SCALARS[etype])
                self.need(n * dt.itemsize)
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return (arr != 0).tolist() if etype == 7 else arr.tolist()
            if etype == _STRING or etype == _ARRAY:
                # each element takes at least 8 bytes: reject absurd counts before looping
                self.need(n * 8)
                return [self.value(etype, depth + 1) for _ in range(n)]
            raise _Corrupt(f"unknown array element type {etype}")
        raise _Corrupt(f"unknown metadata value type {vtype}")


class GGUFFile:
    """A memory-mapped GGUF file: metadata, tensor infos, and tensors dequantised on demand.

    ``metadata`` maps each key to a Python value (int, float, bool, str, or a list for arrays).
    ``tensors`` maps each tensor name to a :class:`TensorInfo`, in file order.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self._mm = np.memmap(self.path, dtype=np.uint8, mode="r")
        except ValueError as e:  # numpy refuses to map an empty file
            raise ValueError(f"{self.path}: not a GGUF file ({e})") from None
        try:
            self._parse()
        except (_Corrupt, struct.error, OverflowError) as e:
            raise ValueError(f"{self.path}: corrupt or truncated GGUF file: {e}") from None

    def _parse(self) -> None:
        buf = memoryview(self._mm)
        cur = _Cursor(buf)
        size = len(buf)
        if size < 4 or bytes(buf[:4]) != GGUF_MAGIC:
            head = bytes(buf[:4])
            raise ValueError(f"{self.path}: not a GGUF file (magic {head!r}, expected {GGUF_MAGIC!r})")
        cur.pos = 4
        version = cur.u32()
        if version & 0xFFFF == 0 and version != 0:
            raise ValueError(f"{self.path}: big-endian GGUF files are not supported")
        if version not in (2, 3):
            raise ValueError(f"{self.path}: unsupported GGUF version {version} (this reader handles 2 and 3)")
        self.version = version
        n_tensors = cur.u64()
        n_kv = cur.u64()
        # Every KV entry and tensor info takes well over 8 bytes; this bounds loops on garbage counts.
        if (n_tensors + n_kv) * 8 > size:
            raise _Corrupt(f"header claims {n_tensors} tensors and {n_kv} metadata keys in a {size}-byte file")

        metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            if not isinstance(key, str):
                raise _Corrupt(f"metadata key {key!r} is not UTF-8")
            if key in metadata:
                raise _Corrupt(f"duplicate metadata key {key!r}")
            metadata[key] = cur.value(cur.u32())
        self.metadata = metadata

        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or isinstance(alignment, bool) or alignment <= 0:
            raise _Corrupt(f"general.alignment must be a positive integer, got {alignment!r}")
        self.alignment = alignment

        raw_infos = []
        for _ in range(n_tensors):
            name = cur.string()
            if not isinstance(name, str):
                raise _Corrupt(f"tensor name {name!r} is not UTF-8")
            n_dims = cur.u32()
            if n_dims > 8:
                raise _Corrupt(f"tensor {name!r} has {n_dims} dimensions")
            ne = [cur.u64() for _ in range(n_dims)]
            ggml_type = cur.u32()
            offset = cur.u64()
            raw_infos.append((name, ne, ggml_type, offset))

        self.data_offset = -(-cur.pos // alignment) * alignment
        tensors: dict[str, TensorInfo] = {}
        for name, ne, ggml_type, offset in raw_infos:
            if name in tensors:
                raise _Corrupt(f"duplicate tensor {name!r}")
            n_elements = math.prod(ne)
            nbytes = None
            if ggml_type in BLOCK_SIZES:
                block, bsize = BLOCK_SIZES[ggml_type]
                if ne and ne[0] % block:
                    raise _Corrupt(
                        f"tensor {name!r}: row length {ne[0]} is not a multiple of the "
                        f"{type_name(ggml_type)} block size {block}"
                    )
                nbytes = n_elements // block * bsize
            start = self.data_offset + offset
            if start + (nbytes or 0) > size:
                raise _Corrupt(
                    f"tensor {name!r} ({type_name(ggml_type)}, {nbytes} bytes at offset {start}) "
                    f"runs past the end of the file ({size} bytes)"
                )
            tensors[name] = TensorInfo(name, tuple(int(x) for x in reversed(ne)), ggml_type, start, nbytes)
        self.tensors = tensors

    # -- access ---------------------------------------------------------------------------------

    def raw(self, name: str) -> np.ndarray:
        """The tensor's bytes, a read-only view into the memory map."""
        info = self._info(name)
        if info.nbytes is None:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported type {info.type_name}")
        return np.asarray(self._mm[info.offset : info.offset + info.nbytes])

    def tensor(self, name: str) -> np.ndarray:
        """Tensor `name` dequantised to a new float32 array in numpy shape order."""
        info = self._info(name)
        if info.ggml_type not in _DEQUANT:
            raise ValueError(
                f"{self.path}: tensor {name!r} has type {info.type_name}, which this reader cannot "
                f"dequantize (supported: {', '.join(sorted(type_name(t) for t in SUPPORTED_TYPES))})"
            )
        return dequantize(self.raw(name), info.ggml_type).reshape(info.shape)

    def _info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"{self.path}: no tensor named {name!r}") from None

    def close(self) -> None:
        self._mm = None  # the map is released once no returned view refers to it

    def __enter__(self) -> "GGUFFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        arch = self.metadata.get("general.architecture", "?")
        return f"GGUFFile({str(self.path)!r}, v{self.version}, arch={arch}, {len(self.tensors)} tensors)"


# ---------------------------------------------------------------------------------------------
# Hugging Face config and tensor names
# ---------------------------------------------------------------------------------------------

# GGUF architecture -> (HF class, model_type, q/k rows permuted by llama.cpp's converter)
_ARCHS = {
    "llama": ("LlamaForCausalLM", "llama", True),
    "qwen2": ("Qwen2ForCausalLM", "qwen2", False),
    "qwen3": ("Qwen3ForCausalLM", "qwen3", False),
}

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}


def _arch(gguf: GGUFFile) -> str:
    arch = gguf.metadata.get("general.architecture")
    if arch not in _ARCHS:
        raise ValueError(
            f"{gguf.path}: GGUF architecture {arch!r} is not supported "
            f"(supported: {', '.join(sorted(_ARCHS))})"
        )
    return arch


def _rope_scaling(md: dict[str, Any], arch: str) -> dict[str, Any] | None:
    p = f"{arch}.rope.scaling."
    rtype = md.get(p + "type")
    factor = md.get(p + "factor")
    if rtype is None and f"{arch}.rope.scale_linear" in md:  # older files
        rtype, factor = "linear", md[f"{arch}.rope.scale_linear"]
    if rtype in (None, "none"):
        return None
    out: dict[str, Any] = {"rope_type": rtype}
    if factor is not None:
        out["factor"] = float(factor)
    for gguf_key, hf_key in (
        ("original_context_length", "original_max_position_embeddings"),
        ("attn_factor", "attention_factor"),
        ("yarn_beta_fast", "beta_fast"),
        ("yarn_beta_slow", "beta_slow"),
    ):
        if p + gguf_key in md:
            out[hf_key] = md[p + gguf_key]
    return out


def hf_config_from_gguf(gguf: GGUFFile) -> dict[str, Any]:
    """A Hugging Face ``config.json``-style dict for a llama / qwen2 / qwen3 GGUF."""
    arch = _arch(gguf)
    hf_class, model_type, _ = _ARCHS[arch]
    md = gguf.metadata

    def req(key: str):
        full = f"{arch}.{key}"
        if full not in md:
            raise ValueError(f"{gguf.path}: metadata key {full!r} is missing")
        return md[full]

    hidden = int(req("embedding_length"))
    n_heads = int(req("attention.head_count"))
    n_kv = md.get(f"{arch}.attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise ValueError(f"{gguf.path}: per-layer {arch}.attention.head_count_kv is not supported")
    head_dim = md.get(f"{arch}.attention.key_length") or md.get(f"{arch}.rope.dimension_count")
    head_dim = int(head_dim) if head_dim else hidden // n_heads

    if "token_embd.weight" in gguf.tensors:
        vocab = gguf.tensors["token_embd.weight"].shape[0]
    elif f"{arch}.vocab_size" in md:
        vocab = int(md[f"{arch}.vocab_size"])
    elif "tokenizer.ggml.tokens" in md:
        vocab = len(md["tokenizer.ggml.tokens"])
    else:
        raise ValueError(f"{gguf.path}: cannot tell the vocabulary size")

    config: dict[str, Any] = {
        "architectures": [hf_class],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(req("feed_forward_length")),
        "num_hidden_layers": int(req("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(n_kv),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": float(req("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(md.get(f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": int(req("context_length")),
        "tie_word_embeddings": "output.weight" not in gguf.tensors,
    }
    for hf_key, gguf_key in (
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ):
        if gguf_key in md:
            config[hf_key] = int(md[gguf_key])
    scaling = _rope_scaling(md, arch)
    if scaling is not None:
        config["rope_scaling"] = scaling
    return config


def _hf_name(gguf_name: str) -> str | None:
    parts = gguf_name.split(".")
    if len(parts) == 2 and parts[0] in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[parts[0]]}.{parts[1]}" if parts[1] in ("weight", "bias") else None
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        if parts[3] in ("weight", "bias"):
            return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}.{parts[3]}"
    return None


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute``: rotary pairs (interleaved) back to HF's rotate-half order.

    The converter maps HF rows ``reshape(n_head, 2, d/2, ...).swapaxes(1, 2)``; this is its inverse.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows over {n_head} heads")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def iter_hf_tensors(gguf: GGUFFile) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(hf_name, float32 array)`` one tensor at a time, in HF names and layouts.

    Linear weights come out as ``[out_features, in_features]``, as in HF checkpoints. With tied
    embeddings (no ``output.weight``), no ``lm_head.weight`` is yielded. Every name is checked
    before the first tensor is read, so an unknown tensor fails fast.
    """
    arch = _arch(gguf)
    permuted = _ARCHS[arch][2]
    names = []
    for name in gguf.tensors:
        hf = _hf_name(name)
        if hf is None:
            hint = ""
            if name.startswith("rope_freqs"):
                hint = " (precomputed Llama-3 rope frequency factors; no HF config field can express them)"
            raise ValueError(f"{gguf.path}: tensor {name!r} has no Hugging Face {arch} equivalent{hint}")
        names.append((name, hf))
    config = hf_config_from_gguf(gguf) if permuted else None
    for name, hf in names:
        w = gguf.tensor(name)
        if permuted and ".attn_q." in name:
            w = _unpermute(w, config["num_attention_heads"])
        elif permuted and ".attn_k." in name:
            w = _unpermute(w, config["num_key_value_heads"])
        yield hf, w


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

# llama.cpp's token types (``llama_token_type``): CONTROL tokens (``<|im_end|>``) are special;
# USER_DEFINED ones (``<think>``) are matched whole in text but are ordinary text when decoding.
_TOKEN_CONTROL = 3
_TOKEN_USER_DEFINED = 4

# Split regexes of the byte-level BPE pre-tokenizers, as in llama.cpp's ``llama-vocab.cpp`` and the
# models' own ``tokenizer.json`` (transformers' ``integrations/gguf`` keeps the same table).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# ``tokenizer.ggml.pre`` -> (kind, ignore_merges, add_bos default). Kinds:
#   "gpt2":   the GPT-2 split (tokenizers' ``ByteLevel(use_regex=True)``). Also used for a file with
#             no ``tokenizer.ggml.pre``, as transformers does (llama.cpp's legacy "default" split
#             there is a guess it warns about);
#   "digits": every digit on its own first, then the GPT-2 split -- llama.cpp's ``\p{N}`` split for
#             these types, ``Digits(individual_digits=True)`` in their tokenizer.json;
#   a regex:  ``Split(regex, isolated)`` then ``ByteLevel(use_regex=False)``.
# The Llama-3 family uses whole-word vocabulary hits before merges and adds BOS unless the file says
# otherwise (llama.cpp sets ``ignore_merges`` and ``add_bos`` for exactly these names).
_PRE_TOKENIZERS: dict[str, tuple[str, bool, bool]] = {
    **{name: ("gpt2", False, False) for name in ("default", "gpt2", "mpt", "olmo", "jais", "trillion")},
    **{
        name: ("digits", False, False)
        for name in ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
    },
    **{
        name: (_LLAMA3_SPLIT, True, True)
        for name in ("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2")
    },
    **{name: (_QWEN2_SPLIT, False, False) for name in ("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez")},
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:  # unprintable bytes map to 256, 257, ... in byte order
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def tokenizer_from_gguf(path: str | os.PathLike):
    """A ``transformers.PreTrainedTokenizerFast`` built from the file's ``tokenizer.*`` metadata.

    Only the ``tokenizers`` library and this module's reader are used: neither torch nor the ``gguf``
    package is needed (transformers' own ``from_pretrained(..., gguf_file=...)`` needs both).
    Byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are supported, with the
    pre-tokenizer picked from ``tokenizer.ggml.pre`` as llama.cpp picks it. CONTROL tokens become
    special added tokens and USER_DEFINED ones plain added tokens, so neither is ever split;
    bos/eos/unk/pad come from the ``tokenizer.ggml.*_token_id`` keys, ``add_bos_token`` /
    ``add_eos_token`` from the file, and ``chat_template`` from ``tokenizer.chat_template``.

    For SmolLM2 ("smollm") this follows llama.cpp and the model's own tokenizer.json in splitting
    digits one by one before the GPT-2 split. transformers (5.x) drops that digit split, so where a
    run of two or more spaces/newlines comes right before a digit its ids differ from these.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such GGUF file")
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    with GGUFFile(path) as f:
        md = dict(f.metadata)

    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(
            f"{path}: tokenizer.ggml.model {model!r} is not supported; only byte-level BPE (\"gpt2\") "
            "vocabularies can be built from GGUF metadata here"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    if not isinstance(tokens, list) or not tokens:
        raise ValueError(f"{path}: tokenizer.ggml.tokens is missing or empty")
    if not isinstance(merges, list):
        raise ValueError(f"{path}: tokenizer.ggml.merges is missing (needed for a BPE vocabulary)")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{path}: {len(types)} token types for {len(tokens)} tokens")
    pre = md.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ValueError(
            f"{path}: pre-tokenizer {pre!r} (tokenizer.ggml.pre) is not supported "
            f"(supported: {', '.join(sorted(_PRE_TOKENIZERS))})"
        )
    split, ignore_merges, add_bos_default = _PRE_TOKENIZERS[pre]

    # Byte-level vocabularies spell every token in GPT-2's byte alphabet. A normal token that does
    # not is respelled byte by byte (as transformers does); added tokens keep their text, since they
    # are matched in the raw input and their id is found by that text.
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    control, user_defined = [], []
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        if not isinstance(tok, str):
            raise ValueError(f"{path}: token {i} is not valid UTF-8 ({tok!r})")
        if kind == _TOKEN_CONTROL:
            control.append(AddedToken(tok, special=True, normalized=False))
        elif kind == _TOKEN_USER_DEFINED:
            user_defined.append(AddedToken(tok, special=False, normalized=False))
        elif not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab[tok] = i
    pairs = []
    for m in merges:
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise ValueError(f"{path}: malformed merge {m!r} in tokenizer.ggml.merges")
        pairs.append((left, right))

    tk = Tokenizer(
        models.BPE(
            vocab, pairs, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
            byte_fallback=False, ignore_merges=ignore_merges,
        )
    )
    if split == "gpt2":
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    elif split == "digits":
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(control)
    tk.add_tokens(user_defined)

    special: dict[str, str] = {}
    special_ids: dict[str, int] = {}
    for name, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        tid = md.get(f"tokenizer.ggml.{key}_token_id")
        if tid is None:
            continue
        if not isinstance(tid, int) or not 0 <= tid < len(tokens):
            raise ValueError(
                f"{path}: tokenizer.ggml.{key}_token_id = {tid!r} is outside the {len(tokens)}-token vocabulary"
            )
        special[name], special_ids[name] = tokens[tid], tid
    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos" in special
    add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False)) and "eos" in special
    # Also set by transformers 5 from add_bos/eos_token; done here for versions that ignore those.
    bos = [special["bos"]] if add_bos else []
    eos = [special["eos"]] if add_eos else []
    single = [f"{t}:0" for t in bos] + ["$A:0"] + [f"{t}:0" for t in eos]
    pair = single + [f"{t}:1" for t in bos] + ["$B:1"] + [f"{t}:1" for t in eos]
    tk.post_processor = processors.TemplateProcessing(
        single=single,
        pair=pair,
        special_tokens=[(special[n], special_ids[n]) for n, on in (("bos", add_bos), ("eos", add_eos)) if on],
    )

    kwargs: dict[str, Any] = {f"{n}_token": t for n, t in special.items()}
    if isinstance(md.get("tokenizer.chat_template"), str):
        kwargs["chat_template"] = md["tokenizer.chat_template"]
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
        clean_up_tokenization_spaces=False,
        name_or_path=str(path),
        **kwargs,
    )
