"""Device-time summaries of jax.profiler traces (no TensorBoard needed)."""

from __future__ import annotations

import os


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
