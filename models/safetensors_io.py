"""Safetensors checkpoints: read through the `safetensors` package, written by a streaming writer.

Reading uses the package's numpy API (``safe_open``): bf16 comes back as ml_dtypes.bfloat16,
``SafetensorsFile.read`` takes one slice of a tensor (one device's shard) without reading the
rest, and the package checks the header and every tensor's offsets. This layer adds errors
that name the file and the tensor at fault, and for sharded checkpoints an index that may only
name regular files inside the checkpoint directory.

Writing stays here (:func:`write_sharded`): ``safetensors.numpy.save_file`` takes a dict of
whole arrays, so saving a 5 GB shard would hold all of it in host memory, while this writer
writes the header first and then fetches and writes one tensor at a time.
"""

from __future__ import annotations

import json
import os
import stat
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


def _regular_file(path: Path, what: str) -> None:
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: missing ({what})") from None
    if not stat.S_ISREG(mode):
        raise ValueError(f"{path}: not a regular file ({what}); refusing to read it")


def _diagnose(path: Path) -> str:
    """Why the package refused a file, naming the tensor where the header allows."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > min(size - 8, 100 * 2**20):
                return f"header length {n} does not fit the {size}-byte file"
            header = json.loads(f.read(n))
        data = size - 8 - n
        for name, e in header.items():
            if name == "__metadata__" or not isinstance(e, dict):
                continue
            begin, end = e.get("data_offsets", (None, None))
            if not (isinstance(begin, int) and isinstance(end, int)) or not 0 <= begin <= end:
                return f"tensor {name!r} has invalid data_offsets {e.get('data_offsets')!r}"
            if end > data:
                return (f"tensor {name!r} data is truncated (bytes {begin}..{end} of a "
                        f"{data}-byte data section)")
    except (OSError, ValueError, struct.error, AttributeError, TypeError):
        pass
    return ""


class SafetensorsFile:
    """One safetensors file, opened with the `safetensors` package; tensors read on demand."""

    def __init__(self, path: str | os.PathLike):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        _regular_file(self.path, "a safetensors file")
        try:
            self._file = safe_open(str(self.path), framework="numpy")
            self.metadata = self._file.metadata() or {}
            self.entries = {}
            for name in self._file.keys():
                sl = self._file.get_slice(name)
                self.entries[name] = (tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError, ValueError) as e:
            why = _diagnose(self.path)
            if why:
                raise ValueError(f"{self.path}: {why} (safetensors: {e})") from None
            raise ValueError(f"{self.path}: not a safetensors file ({e})") from None
        for name, (shape, dtype) in self.entries.items():
            if dtype not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {dtype!r}")

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][0]

    def dtype_name(self, name: str) -> str:
        return self.entries[name][1]

    def tensor(self, name: str) -> np.ndarray:
        """The whole tensor (bf16 as ml_dtypes.bfloat16)."""
        return self.read(name)

    def read(self, name: str, index: tuple = ()) -> np.ndarray:
        """tensor[index] (a tuple of slices), reading only that part of the file."""
        from safetensors import SafetensorError

        if name not in self.entries:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        try:
            if not index:
                return self._file.get_tensor(name)
            return self._file.get_slice(name)[index]
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{self.path}: tensor {name!r} cannot be read: {e}") from None


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
    """The safetensors files of an HF directory (sharded via its index, or single).

    An index may only name regular files inside `directory` (no absolute paths, no "..",
    no symlinks leading out, no FIFOs or devices)."""
    directory = Path(directory)
    index = directory / "model.safetensors.index.json"
    if index.exists():
        _regular_file(index, "the safetensors index")
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise ValueError(f"{index}: not a valid safetensors index ({type(e).__name__}: {e})") from None
        if not isinstance(weight_map, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and v for k, v in weight_map.items()):
            raise ValueError(f"{index}: 'weight_map' must map tensor names to shard file names")
        root = directory.resolve()
        files = []
        for name in sorted(set(weight_map.values())):
            target = (directory / name).resolve()
            if Path(name).is_absolute() or not target.is_relative_to(root):
                raise ValueError(f"{index}: shard {name!r} is outside the checkpoint directory {directory}")
            if not (directory / name).exists():
                raise FileNotFoundError(f"{index} names a shard that is missing: {name!r}")
            _regular_file(directory / name, f"a shard named by {index.name}")
            files.append(directory / name)
        return files
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory}: no *.safetensors files (only safetensors/GGUF are loaded)")
    return files


class LazyTensor:
    """A tensor not yet read: its shape and dtype, and `read(index)` for a part of it."""

    def __init__(self, file: SafetensorsFile, name: str):
        self.file, self.name = file, name
        self.shape = file.shape(name)
        self.dtype = DTYPES[file.dtype_name(name)]

    def read(self, index: tuple = ()) -> np.ndarray:
        return self.file.read(self.name, index)

    def __array__(self, dtype=None, copy=None):
        arr = self.read()
        return arr if dtype is None else arr.astype(dtype)


def iter_lazy_tensors(directory: Path) -> Iterator[tuple[str, LazyTensor, Path]]:
    """(name, LazyTensor, file) across all shards; nothing is read until asked for."""
    for path in checkpoint_files(directory):
        st = SafetensorsFile(path)
        for name in st.keys():
            yield name, LazyTensor(st, name), path


def iter_tensors(directory: Path) -> Iterator[tuple[str, np.ndarray, Path]]:
    """(name, array, file) one tensor at a time across all shards."""
    for name, lazy, path in iter_lazy_tensors(directory):
        yield name, lazy.read(), path


def layer_count(directory: Path) -> int:
    """1 + the highest `model.layers.{i}.` index among the checkpoint's tensor names (headers
    only), so a config's layer count can be checked before anything is built."""
    top = -1
    for path in checkpoint_files(directory):
        for name in SafetensorsFile(path).keys():
            parts = name.split(".")
            if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers" and parts[2].isdigit():
                top = max(top, int(parts[2]))
    return top + 1


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
