"""A small safetensors reader/writer (numpy + ml_dtypes, memory-mapped).

Written against the format spec rather than the `safetensors` package so that
bf16 reads without torch, tensors stream one at a time, and a corrupt file is
reported with its name and the tensor at fault.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable, Iterator

import ml_dtypes
import numpy as np

from medssr_jax.atomic import atomic_open, write_text_atomic

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
FLOAT_TYPES = ("F64", "F32", "F16", "BF16")


class SafetensorsFile:
    """Header parsed eagerly; tensor data read lazily from a memory map."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError(f"{self.path}: not a safetensors file (shorter than its header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8 or header_len > 100 * 2**20:
                raise ValueError(f"{self.path}: corrupt safetensors header (length {header_len})")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise ValueError(f"{self.path}: corrupt safetensors header: {e}") from None
        self.metadata = header.pop("__metadata__", {}) or {}
        self.data_start = 8 + header_len
        self.entries = header
        for name, e in header.items():
            if e.get("dtype") not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {e.get('dtype')!r}")
            begin, end = e["data_offsets"]
            expected = int(np.prod(e["shape"], dtype=np.int64)) * DTYPES[e["dtype"]].itemsize
            if end - begin != expected or self.data_start + end > size:
                raise ValueError(f"{self.path}: tensor {name!r} data is truncated or inconsistent "
                                 f"(shape {e['shape']}, {e['dtype']}, bytes {begin}..{end}, file {size})")
        self._mmap = None

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.entries[name]["shape"])

    def dtype_name(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def tensor(self, name: str) -> np.ndarray:
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        e = self.entries[name]
        begin, end = e["data_offsets"]
        buf = self._mmap[self.data_start + begin:self.data_start + end]
        return buf.view(DTYPES[e["dtype"]]).reshape(e["shape"])


def read_config(directory: Path, needed_for: str) -> tuple[dict, Path]:
    """An HF directory's config.json as a dict (and its path), with errors naming the file."""
    config_file = Path(directory) / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file}: missing (needed to build {needed_for})")
    try:
        return json.loads(config_file.read_text()), config_file
    except json.JSONDecodeError as e:
        raise ValueError(f"{config_file}: invalid JSON ({e})") from None


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of an HF directory (sharded via its index, or single)."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (directory / f).exists()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are missing: {missing}")
        return [directory / f for f in files]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (only safetensors/GGUF are loaded)")
    return files


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file) one tensor at a time across all shards."""
    for path in checkpoint_files(directory):
        st = SafetensorsFile(path)
        for name in st.keys():
            yield name, st.tensor(name), path


def write_sharded(directory: Path, tensors: Iterable[tuple[str, tuple[int, ...], np.dtype]],
                  fetch, max_shard_bytes: int = 5 * 2**30, metadata: dict | None = None) -> list[Path]:
    """Write tensors into one or more safetensors files (+ index when sharded).

    `tensors` lists (name, shape, dtype) up front so headers can be written
    first; `fetch(name)` returns the host array only when it is written, so
    one tensor at a time is held in host memory.
    """
    specs = list(tensors)
    shards: list[list[tuple[str, tuple[int, ...], np.dtype]]] = [[]]
    size = 0
    for spec in specs:
        nbytes = int(np.prod(spec[1], dtype=np.int64)) * np.dtype(spec[2]).itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map, written, total = {}, [], 0
    for fname, shard in zip(names, shards):
        header, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
        for name, shape, dtype in shard:
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            header[name] = {"dtype": DTYPE_NAMES[np.dtype(dtype)], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
            weight_map[name] = fname
        total += offset
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        with atomic_open(directory / fname, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for name, shape, dtype in shard:
                arr = np.ascontiguousarray(fetch(name), dtype=dtype)
                if arr.shape != tuple(shape):
                    raise ValueError(f"tensor {name!r}: shape {arr.shape} != declared {shape}")
                f.write(arr.tobytes())
        written.append(directory / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        write_text_atomic(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
    return written
