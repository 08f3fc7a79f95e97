"""tqdm progress bars for the long host-side loops with a known total.

A bar goes to stderr, and only when stderr is a terminal: a log file or a
captured stream gets the callers' own log lines instead of carriage-return
frames. ``enabled=False`` (the callers' ``progress=False``) turns it off.
"""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int | None, desc: str, *, enabled: bool = True, initial: int = 0,
                 unit: str = "it", stream=None):
    """A ``tqdm`` bar on ``stream`` (default stderr), or ``None`` when disabled, when the
    total is unknown or when the stream is not a terminal."""
    stream = stream if stream is not None else sys.stderr
    if not enabled or total is None or not _is_terminal(stream):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=stream, dynamic_ncols=True,
                mininterval=0.5)
