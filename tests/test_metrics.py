"""Metrics files: JSONL rows and TensorBoard scalars that a protobuf reader gets back."""

from __future__ import annotations

import math
import struct

import pytest

from medssr_jax.metrics import MetricsWriter, read_jsonl

tensorboardX = pytest.importorskip("tensorboardX")


def read_scalars(path):
    """(tag, step, value) of every scalar in an event file, each record's CRCs checked."""
    from tensorboardX.crc32c import crc32c
    from tensorboardX.proto.event_pb2 import Event

    def masked(data):
        c = crc32c(data)
        return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    data, pos, out, version = path.read_bytes(), 0, [], None
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked(header)
        payload = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == masked(payload)
        pos += 16 + length
        ev = Event.FromString(payload)
        if ev.file_version:
            version = ev.file_version
        for v in ev.summary.value:
            out.append((v.tag, ev.step, v.simple_value))
    assert version == "brain.Event:2"
    return out


def test_scalars_round_trip_through_the_event_file(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=True)
    w.write(1, {"loss": 0.5, "kl": 0.25})
    w.write(2, {"loss": 0.125, "kl": float("nan")})
    w.close()
    assert read_jsonl(tmp_path / "metrics.jsonl")[0] == {"step": 1, "loss": 0.5, "kl": 0.25}
    assert math.isnan(read_jsonl(tmp_path / "metrics.jsonl")[1]["kl"])
    events = list(tmp_path.glob("events.out.tfevents.*"))
    assert len(events) == 1
    # non-finite values stay in the JSONL only
    assert read_scalars(events[0]) == [("loss", 1, 0.5), ("kl", 1, 0.25), ("loss", 2, 0.125)]


def test_jsonl_only(tmp_path):
    w = MetricsWriter(tmp_path, tensorboard=False)
    w.write(3, {"x": 1.0})
    w.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 3, "x": 1.0}]
    assert not list(tmp_path.glob("events.out.tfevents.*"))
