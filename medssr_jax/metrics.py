"""Per-step metrics to JSONL and TensorBoard event files, written by process 0 only.

Event files come from tensorboardX's ``SummaryWriter`` (no TensorFlow needed).
tensorboardX is imported only when a writer with TensorBoard output is made,
so the core imports without it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping

import jax
from absl import logging

__all__ = ["MetricsWriter", "read_jsonl"]


def _summary_writer(directory: Path, required: bool):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        if required:
            raise ImportError(f"MetricsWriter({str(directory)!r}, tensorboard=True) needs the "
                              "tensorboardX package: pip install tensorboardX") from None
        logging.warning("tensorboardX is not installed: %s gets metrics.jsonl only, no TensorBoard "
                        "event file", directory)
        return None
    # flush_secs is only the timer; write() flushes after every step anyway.
    return SummaryWriter(logdir=str(directory), filename_suffix=".medssr", flush_secs=30)


class MetricsWriter:
    """Append-only metrics: `<dir>/metrics.jsonl` and a TensorBoard event file.

    tensorboard: True needs tensorboardX; None (the default) writes the event
    file when tensorboardX is installed and warns once when it is not; False
    writes JSONL only.
    """

    def __init__(self, directory: str | os.PathLike, tensorboard: bool | None = None):
        self.enabled = jax.process_index() == 0
        self.dir = Path(directory)
        self._jsonl = self._tb = None
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.dir / "metrics.jsonl", "a")
        if tensorboard is not False:
            self._tb = _summary_writer(self.dir, required=tensorboard is True)

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: float(v) for k, v in metrics.items()}}
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and math.isfinite(v):
                    self._tb.add_scalar(k, v, global_step=int(step))
            self._tb.flush()

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
