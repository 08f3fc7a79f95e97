"""Shared benchmark helpers: device ceilings, result files, device-time summaries of traces."""

from __future__ import annotations

import json
import os
import time
from typing import Callable


def _best_of(fn: Callable[[], object], repeats: int = 20) -> float:
    """Mean seconds per call of a jitted fn after one warm-up call."""
    fn().block_until_ready()
    t = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    out.block_until_ready()
    return (time.perf_counter() - t) / repeats


def measure_bandwidth() -> float:
    """HBM copy bandwidth (bytes read + written), measured like the shared anchors."""
    import jax
    import jax.numpy as jnp
    x = jax.random.normal(jax.random.key(0), (1 << 28,), jnp.bfloat16)
    f = jax.jit(lambda a: a * 1.5 + 1)
    return 2 * x.nbytes / _best_of(lambda: f(x))


def measure_peak_flops() -> float:
    """bf16 matmul FLOP/s on 8192^3, measured like the shared anchors."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(1), (8192, 8192), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(2), (8192, 8192), jnp.bfloat16)
    g = jax.jit(lambda a, b: a @ b)
    return 2 * 8192 ** 3 / _best_of(lambda: g(a, b))


def write_results(filename: str, rows: list[dict]) -> None:
    """Append rows as JSON lines to $OUT/filename when OUT is set (device runs)."""
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, filename), "a") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")


def summarize_trace(trace_dir: str, top: int) -> list[tuple[str, float, int]]:
    """(op name, total ms, count) of the device planes in a jax.profiler trace, largest first."""
    import collections
    import glob

    from jax.profiler import ProfileData
    totals: dict[tuple[str, str], list[float]] = collections.defaultdict(lambda: [0.0, 0])
    for path in glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True):
        data = ProfileData.from_file(path)
        for plane in data.planes:
            if not plane.name.startswith("/device:"):
                continue
            for line in plane.lines:
                for event in line.events:
                    t = totals[(line.name, event.name)]
                    t[0] += event.duration_ns / 1e6
                    t[1] += 1
    if not totals:
        print(f"no device planes in the trace under {trace_dir} (CPU backend?)")
    rows = sorted(((f"{line} | {name}", ms, n) for (line, name), (ms, n) in totals.items()),
                  key=lambda r: -r[1])
    for name, ms, n in rows[:top]:
        print(f"{ms:10.2f} ms {n:7d}x  {name[:160]}")
    return rows
