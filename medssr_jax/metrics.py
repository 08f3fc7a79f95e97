"""Per-step metrics to JSONL and TensorBoard event files, written by process 0 only.

The TensorBoard writer emits scalar `Event` records in TFRecord framing
directly (a few protobuf fields and a CRC32C), so neither TensorFlow nor
tensorboardX is needed to produce files that TensorBoard reads.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import time
from pathlib import Path
from typing import Mapping

import jax

_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _len_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def scalar_event(tag: str, value: float, step: int, wall_time: float) -> bytes:
    """Serialized tensorflow.Event{wall_time, step, summary{value{tag, simple_value}}}."""
    value_msg = _len_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value))
    summary = _len_field(1, value_msg)
    return (_field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
            + _len_field(5, summary))


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


class MetricsWriter:
    """Append-only metrics: `<dir>/metrics.jsonl` and a TensorBoard event file."""

    def __init__(self, directory: str | os.PathLike, tensorboard: bool = True):
        self.enabled = jax.process_index() == 0
        self.dir = Path(directory)
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a")
        if tensorboard:
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.medssr"
            self._tb = open(self.dir / name, "ab")
            version = _field(1, 1, struct.pack("<d", time.time())) + _len_field(3, b"brain.Event:2")
            self._tb.write(_record(version))

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            now = time.time()
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self._tb.write(_record(scalar_event(k, v, int(step), now)))
            self._tb.flush()

    def close(self) -> None:
        for f in (self._jsonl, self._tb):
            if f is not None:
                f.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
