"""Progress bars: tqdm on a terminal only, off with progress=False, log lines otherwise."""

from __future__ import annotations

import io

import numpy as np
import pytest

from medssr_jax.progress import progress_bar
from synth import retrieval as rt


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_bar_only_on_a_terminal_with_a_known_total():
    assert progress_bar(10, "x", stream=io.StringIO()) is None  # a log file or a pipe
    assert progress_bar(10, "x", stream=Terminal(), enabled=False) is None
    assert progress_bar(None, "x", stream=Terminal()) is None
    term = Terminal()
    bar = progress_bar(10, "work", stream=term, initial=3, unit="doc")
    bar.update(7)
    bar.close()
    assert "work" in term.getvalue() and "10/10" in term.getvalue() and "doc" in term.getvalue()


class _Config:
    hidden_size = 4


def test_embedding_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    term = Terminal()
    prog = rt._Progress(10, stream=term)
    prog.update(skipped=4)
    prog.update(embedded=6, force=True)
    out = term.getvalue()
    assert "embed" in out and "10/10" in out and "from_finished_shards=4" in out
    assert "docs/s" not in out
    log = io.StringIO()
    prog = rt._Progress(10, stream=log)
    prog.update(skipped=4)
    prog.update(embedded=6, force=True)
    assert log.getvalue().startswith("embed: 10/10 docs (") and "4 from finished shards" in log.getvalue()
    assert "\r" not in log.getvalue()
